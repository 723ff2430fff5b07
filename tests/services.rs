//! Services route: a ClusterIP spreads connections over the ready pods,
//! from the host and from a pod; a NodePort answers on the node's address;
//! a Service without ready pods refuses at once; ClientIP affinity sticks.
//! Real `tapestry up`, the machine's kubectl, the node agent's nftables.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tapestry_e2e::*;

const BRIDGE: &str = "tpsvc0";
const POD_CIDR: &str = "10.253.0.0/24";
/// The bridge's address: the node's own, in the pods' network.
const NODE_ADDRESS: &str = "10.253.0.1";

fn web(replicas: u32) -> String {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"replicas": replicas,
                 "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                     "spec": {"containers": [{"name": "httpd", "image": "busybox:local",
                        "imagePullPolicy": "Never",
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "command": ["sh", "-c", "echo $POD_NAME > /var/www/index.html; exec httpd -f -p 8080 -h /var/www"],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}
    })
    .to_string()
}

fn service(affinity: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "NodePort", "selector": {"app": "web"}, "sessionAffinity": affinity,
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    })
    .to_string()
}

/// The pod that answered a GET, from the host.
fn answer(ip: &str, port: u16) -> Option<String> {
    let reply = http_get(ip, port)?;
    let body = reply.split("\r\n\r\n").nth(1)?.trim();
    body.starts_with("web-").then(|| body.to_string())
}

fn spread(ip: &str, port: u16, requests: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..requests {
        if let Some(pod) = answer(ip, port) {
            *seen.entry(pod).or_insert(0) += 1;
        }
    }
    seen
}

fn ready_endpoints(c: &Cluster) -> usize {
    c.kubectl(&[
        "get",
        "endpoints",
        "web",
        "-n",
        "shop",
        "-o",
        "jsonpath={.subsets[*].addresses[*].ip}",
    ])
    .map(|s| s.split_whitespace().count())
    .unwrap_or(0)
}

#[test]
fn cluster_ips_and_node_ports_reach_ready_pods() {
    if !require(
        "cluster_ips_and_node_ports_reach_ready_pods",
        &["kubectl", "nft", "curl"],
    ) {
        return;
    }
    let _serial = serial();
    let c = Cluster::up(BRIDGE, POD_CIDR);
    c.must(&["create", "namespace", "shop"]);
    c.apply(&web(2));
    c.apply(&service("None"));
    wait_for("two ready endpoints", Duration::from_secs(60), || {
        (ready_endpoints(&c) == 2).then_some(())
    });
    let web_field = |path: &str| {
        c.must(&[
            "get",
            "service",
            "web",
            "-n",
            "shop",
            "-o",
            &format!("jsonpath={{{path}}}"),
        ])
    };
    let cluster_ip = web_field(".spec.clusterIP");
    let node_port: u16 = web_field(".spec.ports[0].nodePort").parse().unwrap();

    // From the host, through the ClusterIP: both pods answer.
    let seen = wait_for(
        "both pods through the ClusterIP",
        Duration::from_secs(20),
        || {
            let seen = spread(&cluster_ip, 80, 60);
            (seen.len() == 2 && seen.values().all(|&n| n >= 10)).then_some(seen)
        },
    );
    eprintln!("ClusterIP {cluster_ip}:80 from the host: {seen:?}");
    // Through the NodePort on the node's address.
    let seen = spread(NODE_ADDRESS, node_port, 60);
    assert_eq!(
        seen.len(),
        2,
        "NodePort {NODE_ADDRESS}:{node_port}: {seen:?}"
    );
    // From a pod (on the same bridge as the endpoints).
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "client", "namespace": "shop"},
                "spec": {"containers": [{"name": "sh", "image": "busybox:local",
                    "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}})
        .to_string(),
    );
    c.running("shop", "client");
    let request = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc {cluster_ip} 80");
    let mut from_pod = BTreeMap::new();
    for _ in 0..20 {
        let reply = c.must(&["exec", "-n", "shop", "client", "--", "sh", "-c", &request]);
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        *from_pod.entry(body.to_string()).or_insert(0) += 1;
    }
    assert_eq!(from_pod.len(), 2, "from a pod: {from_pod:?}");

    // ClientIP affinity: one client, one pod.
    c.apply(&service("ClientIP"));
    wait_for("affinity", Duration::from_secs(10), || {
        (spread(&cluster_ip, 80, 20).len() == 1).then_some(())
    });

    // No ready pods: refused at once, not a time-out.
    c.must(&["scale", "deployment", "web", "-n", "shop", "--replicas=0"]);
    wait_for("no endpoints", Duration::from_secs(60), || {
        (ready_endpoints(&c) == 0).then_some(())
    });
    let refused = wait_for("a refusal", Duration::from_secs(5), || {
        let started = Instant::now();
        match std::net::TcpStream::connect_timeout(
            &format!("{cluster_ip}:80").parse().unwrap(),
            Duration::from_secs(2),
        ) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(started.elapsed()),
            _ => None,
        }
    });
    assert!(
        refused < Duration::from_millis(100),
        "refused after {refused:?}"
    );
    // And served again once pods are ready.
    c.must(&["scale", "deployment", "web", "-n", "shop", "--replicas=2"]);
    wait_for("served again", Duration::from_secs(60), || {
        answer(&cluster_ip, 80)
    });

    // The node agent's /metrics, read as the API server reads the kubelet
    // API (a client certificate from the cluster CA).
    let port = c.must(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[0].status.daemonEndpoints.kubeletEndpoint.Port}",
    ]);
    let pki = c.data().join("pki");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "-k", "--cert"])
        .arg(pki.join("apiserver-kubelet-client.crt"))
        .arg("--key")
        .arg(pki.join("apiserver-kubelet-client.key"))
        .arg(format!("https://127.0.0.1:{port}/metrics"))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        r#"tapestry_proxy_syncs_total{kind="full"} 1"#,
        "tapestry_proxy_sync_duration_seconds_count",
        "tapestry_proxy_chains ",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    let partial: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"tapestry_proxy_syncs_total{kind="partial"} "#))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(partial >= 3, "partial syncs: {partial}\n{metrics}");
}
