//! Resource metrics: a busy pod's CPU shows in `kubectl top pods`, the node
//! in `kubectl top nodes`, both read through metrics.k8s.io from the
//! kubelet's `/metrics/resource` (cgroups and /proc); and a
//! HorizontalPodAutoscaler acting on them. Real `tapestry up`, the
//! machine's kubectl.

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

/// The replica count the Deployment `name` asks for.
fn spec_replicas(c: &Cluster, name: &str) -> Option<u32> {
    c.kubectl(&["get", "deployment", name, "-o", "jsonpath={.spec.replicas}"])
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The messages of the autoscaler's events with this reason.
fn hpa_events(c: &Cluster, reason: &str) -> String {
    c.kubectl(&[
        "get",
        "events",
        &format!("--field-selector=involvedObject.kind=HorizontalPodAutoscaler,reason={reason}"),
        "-o",
        "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
    ])
    .unwrap_or_default()
}

/// An HPA targeting 50% CPU scales a Deployment of CPU burners up under
/// load and back down after its scale-down stabilization window, with
/// Kubernetes' default periods (15 s metrics resolution, 15 s sync). The
/// pods burn CPU only while /burn exists in them, so the load starts
/// and stops at a known instant; the time from the load's start to the
/// scale-up decision is printed (BENCHMARKS.md: HPA reaction).
#[test]
fn hpa_scales_a_deployment_up_under_load_and_back_down() {
    if !require(
        "hpa_scales_a_deployment_up_under_load_and_back_down",
        &["kubectl"],
    ) {
        return;
    }
    let _serial = serial();
    // TAPESTRY_HPA_PERIOD=5s measures with a shorter metrics resolution and
    // sync period (both default to Kubernetes' 15 s).
    let c = match std::env::var("TAPESTRY_HPA_PERIOD") {
        Ok(period) => Cluster::start(
            "127.0.0.1",
            BRIDGE,
            &[
                "--pod-cidr",
                POD_CIDR,
                "--metric-resolution",
                &period,
                "--horizontal-pod-autoscaler-sync-period",
                &period,
            ],
        ),
        Err(_) => Cluster::up(BRIDGE, POD_CIDR),
    };
    c.apply(
        &json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "burn", "namespace": "default"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "burn"}},
                "template": {"metadata": {"labels": {"app": "burn"}},
                    "spec": {"containers": [{"name": "burn", "image": "busybox:local",
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c",
                            "while :; do if [ -e /burn ]; then :; else sleep 1; fi; done"],
                        "resources": {"requests": {"cpu": "100m"},
                                      "limits": {"cpu": "500m"}}}]}}}})
        .to_string(),
    );
    c.apply(
        &json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "burn", "namespace": "default"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                    "name": "burn"},
                "minReplicas": 1, "maxReplicas": 3,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 50}}}],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 20}}}})
        .to_string(),
    );
    let pod = wait_for("the burner pod", Duration::from_secs(60), || {
        let out = c
            .kubectl(&[
                "get",
                "pods",
                "-l",
                "app=burn",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ])
            .ok()?;
        (!out.trim().is_empty()).then(|| out.trim().to_string())
    });
    c.running("default", &pod);

    // Idle: the autoscaler measures the pod and leaves it alone.
    let idle = wait_for(
        "the autoscaler measuring the idle pod",
        Duration::from_secs(120),
        || {
            let u = c
                .kubectl(&[
                    "get",
                    "hpa",
                    "burn",
                    "-o",
                    "jsonpath={.status.currentMetrics[0].resource.current.averageUtilization}",
                ])
                .ok()?;
            u.trim().parse::<u32>().ok()
        },
    );
    eprintln!("idle utilization {idle}%:\n{}", c.must(&["get", "hpa"]));
    assert!(idle < 50, "an idle pod at {idle}%");
    assert_eq!(spec_replicas(&c, "burn"), Some(1));

    // Load: the decision to scale up, timed from the load's start.
    c.must(&["exec", &pod, "--", "/bin/busybox", "touch", "/burn"]);
    let started = std::time::Instant::now();
    let up = wait_for("a scale-up", Duration::from_secs(120), || {
        spec_replicas(&c, "burn").filter(|r| *r > 1)
    });
    let reaction = started.elapsed();
    eprintln!(
        "HPA reaction: load start → scale-up decision {:.1} s (to {up} replicas)",
        reaction.as_secs_f64()
    );
    eprintln!("{}", c.must(&["get", "hpa"]));
    let rescaled = wait_for("the scale-up event", Duration::from_secs(30), || {
        let e = hpa_events(&c, "SuccessfulRescale");
        e.contains("above target").then_some(e)
    });
    assert!(
        rescaled.contains(&format!(
            "New size: {up}; reason: cpu resource utilization (percentage of request) above target"
        )),
        "{rescaled}"
    );

    // Load stopped: back to one replica once the 20 s window has passed.
    c.must(&["exec", &pod, "--", "/bin/busybox", "rm", "-f", "/burn"]);
    let stopped = std::time::Instant::now();
    wait_for("the scale-down to 1", Duration::from_secs(240), || {
        (spec_replicas(&c, "burn") == Some(1)).then_some(())
    });
    let down = stopped.elapsed();
    eprintln!(
        "HPA scale-down: load stop → 1 replica {:.1} s (window 20 s)",
        down.as_secs_f64()
    );
    assert!(
        down >= Duration::from_secs(20),
        "scaled down within the stabilization window ({down:?})"
    );
    let rescaled = hpa_events(&c, "SuccessfulRescale");
    assert!(
        rescaled.contains("New size: 1; reason: All metrics below target"),
        "{rescaled}"
    );
    let hpa: serde_json::Value =
        serde_json::from_str(&c.must(&["get", "hpa", "burn", "-o", "json"])).unwrap();
    assert!(hpa["status"]["lastScaleTime"].is_string(), "{hpa}");
    c.must(&["delete", "hpa", "burn"]);
    c.must(&["delete", "deployment", "burn", "--wait=true"]);
}
