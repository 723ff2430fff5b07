//! Resource metrics: a busy pod's CPU shows in `kubectl top pods`, the node
//! in `kubectl top nodes`, both read through metrics.k8s.io from the
//! kubelet's `/metrics/resource` (cgroups and /proc). Real `tapestry up`,
//! the machine's kubectl.

use std::time::Duration;

use serde_json::json;
use tapestry_e2e::*;

const BRIDGE: &str = "tpmet0";
const POD_CIDR: &str = "10.251.0.0/24";

/// Millicores of a `kubectl top` CPU column (`123m`).
fn millicores(s: &str) -> Option<u64> {
    s.strip_suffix('m')?.parse().ok()
}

#[test]
fn kubectl_top_shows_node_and_busy_pod() {
    if !require("kubectl_top_shows_node_and_busy_pod", &["kubectl"]) {
        return;
    }
    let _serial = serial();
    let c = Cluster::up(BRIDGE, POD_CIDR);
    // Discovery lists the metrics kinds.
    let resources = c.must(&["api-resources", "--api-group=metrics.k8s.io"]);
    assert!(
        resources.contains("nodes") && resources.contains("pods"),
        "{resources}"
    );
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "busy", "namespace": "default"},
                "spec": {"containers": [{"name": "loop", "image": "busybox:local",
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", "while :; do :; done"],
                    "resources": {"requests": {"cpu": "100m"}}}]}})
        .to_string(),
    );
    c.running("default", "busy");

    let top = wait_for(
        "the busy pod in kubectl top pods",
        Duration::from_secs(90),
        || {
            let out = c.kubectl(&["top", "pods", "-A", "--no-headers"]).ok()?;
            let line = out
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some("busy"))?;
            let cpu = millicores(line.split_whitespace().nth(2)?)?;
            (cpu >= 200).then(|| out.clone())
        },
    );
    eprintln!("kubectl top pods -A:\n{top}");
    let containers = c.must(&["top", "pod", "busy", "--containers", "--no-headers"]);
    assert!(containers.contains("loop"), "{containers}");

    let nodes = wait_for(
        "the node in kubectl top nodes",
        Duration::from_secs(60),
        || {
            c.kubectl(&["top", "nodes", "--no-headers"])
                .ok()
                .filter(|o| !o.trim().is_empty())
        },
    );
    eprintln!("kubectl top nodes:\n{nodes}");
    let line = nodes.lines().next().unwrap_or_default();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields.len() >= 5, "{nodes}");
    assert!(millicores(fields[1]).is_some_and(|m| m > 0), "{nodes}");
    assert!(fields[3].ends_with("Mi"), "{nodes}");

    // The raw API: a PodMetrics with timestamp and window; writes refused.
    let raw = c.must(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/busy",
    ]);
    let pm: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(pm["kind"], "PodMetrics", "{raw}");
    assert!(
        pm["timestamp"].is_string() && pm["window"].is_string(),
        "{raw}"
    );
    assert_eq!(pm["containers"][0]["name"], "loop", "{raw}");
    let missing = c
        .kubectl(&[
            "get",
            "--raw",
            "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/nope",
        ])
        .unwrap_err();
    assert!(
        missing.contains("NotFound") || missing.contains("not found"),
        "{missing}"
    );
    c.must(&["delete", "pod", "busy", "--wait=true"]);
}
