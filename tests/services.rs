//! Services route: a ClusterIP spreads connections over the ready pods,
//! from the host and from a pod; a NodePort answers on the node's address;
//! a Service without ready pods refuses at once; ClientIP affinity sticks.
//! Cluster DNS answers pods through the `kube-dns` Service: Service names
//! through the search path, headless Services' pods, SRV for named ports,
//! PTR, and names outside the cluster through the node's resolvers.
//! Real `tapestry up`, the machine's kubectl, dig and busybox, the node
//! agent's nftables.

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

fn spread(ip: &str, port: u16, requests: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..requests {
        if let Some(pod) = web_pod_at(ip, port) {
            *seen.entry(pod).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn cluster_ips_and_node_ports_reach_ready_pods() {
    if !require(
        "cluster_ips_and_node_ports_reach_ready_pods",
        &["kubectl", "nft", "curl", "dig"],
    ) {
        return;
    }
    let _serial = serial();
    let c = Cluster::up(BRIDGE, POD_CIDR);
    c.must(&["create", "namespace", "shop"]);
    c.apply(&web(2));
    c.apply(&service("None"));
    wait_for("two ready endpoints", Duration::from_secs(60), || {
        (c.ready_endpoints("shop", "web") == 2).then_some(())
    });
    let cluster_ip = c.service_field("shop", "web", ".spec.clusterIP");
    let node_port: u16 = c
        .service_field("shop", "web", ".spec.ports[0].nodePort")
        .parse()
        .unwrap();

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
    let request = get_in_pod(&cluster_ip, 80);
    let mut from_pod = BTreeMap::new();
    for _ in 0..20 {
        let body = c.must(&["exec", "-n", "shop", "client", "--", "sh", "-c", &request]);
        *from_pod.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    assert_eq!(from_pod.len(), 2, "from a pod: {from_pod:?}");

    cluster_dns(&c, &cluster_ip);

    // ClientIP affinity: one client, one pod.
    c.apply(&service("ClientIP"));
    wait_for("affinity", Duration::from_secs(10), || {
        (spread(&cluster_ip, 80, 20).len() == 1).then_some(())
    });

    // No ready pods: refused at once, not a time-out.
    c.must(&["scale", "deployment", "web", "-n", "shop", "--replicas=0"]);
    wait_for("no endpoints", Duration::from_secs(60), || {
        (c.ready_endpoints("shop", "web") == 0).then_some(())
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
        web_pod_at(&cluster_ip, 80)
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
        r#"tapestry_dns_responses_total{rcode="NOERROR"}"#,
        r#"tapestry_dns_responses_total{rcode="NXDOMAIN"}"#,
        "tapestry_dns_services ",
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

/// `dig @kube-dns +short ...` from the host.
fn dig(args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("dig")
        .args(["@10.96.0.10", "+short", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("running dig");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// The addresses busybox's nslookup in pod `client` finds for `name`. It
/// asks every search-path candidate of a name without dots at once and
/// exits 1 when any of them is missing, so only its output counts.
fn nslookup(c: &Cluster, name: &str) -> Result<Vec<String>, String> {
    let script = format!("busybox nslookup {name}; true");
    let out = c.kubectl(&["exec", "-n", "shop", "client", "--", "sh", "-c", &script])?;
    // The first Address lines are the server's; answers follow "Name:".
    let mut addresses: Vec<String> = out
        .split_once("Name:")
        .map(|(_, answers)| answers)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Address:"))
        .map(|a| a.trim().to_string())
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

fn cluster_dns(c: &Cluster, cluster_ip: &str) {
    let resolv = c.must(&[
        "exec",
        "-n",
        "shop",
        "client",
        "--",
        "busybox",
        "cat",
        "/etc/resolv.conf",
    ]);
    for line in [
        "search shop.svc.cluster.local svc.cluster.local cluster.local",
        "nameserver 10.96.0.10",
        "options ndots:5",
    ] {
        assert!(resolv.contains(line), "{line:?} missing from:\n{resolv}");
    }
    let dns_ip = c.must(&[
        "get",
        "service",
        "kube-dns",
        "-n",
        "kube-system",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(dns_ip, "10.96.0.10");

    // From the pod, through the kube-dns ClusterIP and the search path.
    for name in ["web", "web.shop.svc.cluster.local"] {
        let found = wait_for(
            &format!("{name} from a pod"),
            Duration::from_secs(20),
            || nslookup(c, name).ok().filter(|a| !a.is_empty()),
        );
        assert_eq!(found, [cluster_ip.to_string()], "{name}");
    }
    // A name the cluster does not have.
    let missing = nslookup(c, "nothing.shop.svc.cluster.local").unwrap();
    assert!(
        missing.is_empty(),
        "a missing Service resolved: {missing:?}"
    );
    // Connect by name: resolve in the pod, then connect.
    let request = get_in_pod(
        "$(busybox nslookup web | busybox sed -n 's/^Address: *//p' | busybox tail -1)",
        80,
    );
    let reply = c.must(&["exec", "-n", "shop", "client", "--", "sh", "-c", &request]);
    assert!(reply.contains("web-"), "by name: {reply}");

    // A headless Service: its name is the ready pods' addresses; each pod
    // has a name of its own; SRV names the named port.
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web-pods", "namespace": "shop"},
                "spec": {"clusterIP": "None", "selector": {"app": "web"},
                         "ports": [{"name": "http", "port": 8080}]}})
        .to_string(),
    );
    let mut pod_ips: Vec<String> = c
        .must(&[
            "get",
            "pods",
            "-n",
            "shop",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    pod_ips.sort();
    let headless = wait_for(
        "the headless Service's pods",
        Duration::from_secs(20),
        || {
            let found = dig(&["web-pods.shop.svc.cluster.local"]);
            (found == pod_ips).then_some(found)
        },
    );
    assert_eq!(nslookup(c, "web-pods").unwrap(), headless);
    let srv = dig(&["SRV", "_http._tcp.web-pods.shop.svc.cluster.local"]);
    let expected: Vec<String> = pod_ips
        .iter()
        .map(|ip| {
            format!(
                "0 100 8080 {}.web-pods.shop.svc.cluster.local.",
                ip.replace('.', "-")
            )
        })
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(srv, expected_sorted, "SRV of the headless Service");
    let own = dig(&[&format!(
        "{}.web-pods.shop.svc.cluster.local",
        pod_ips[0].replace('.', "-")
    )]);
    assert_eq!(own, [pod_ips[0].clone()]);
    let srv = dig(&["SRV", "_http._tcp.web.shop.svc.cluster.local"]);
    assert_eq!(srv, ["0 100 80 web.shop.svc.cluster.local."]);
    let ptr = dig(&["-x", cluster_ip]);
    assert_eq!(ptr, ["web.shop.svc.cluster.local."]);

    // Names outside the cluster go to the node's resolvers: as the host
    // resolves them, if it can.
    let outside = "deb.debian.org";
    let host_view = std::process::Command::new("getent")
        .args(["ahostsv4", outside])
        .output()
        .ok()
        .filter(|o| o.status.success());
    match host_view {
        Some(_) => {
            let found = nslookup(c, outside).unwrap_or_default();
            assert!(!found.is_empty(), "{outside} was not forwarded");
        }
        None => eprintln!("the host cannot resolve {outside}: forwarding left unchecked"),
    }
}
