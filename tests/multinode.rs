//! A local multi-node cluster on one machine: `tapestry up --nodes 3` makes
//! three Ready nodes (two in network namespaces of their own, on an
//! underlay bridge); a Service's ClusterIP spreads a client's requests over
//! web pods on every node; NodePorts answer on every node's address; pods
//! reach each other across nodes; connections through a ClusterIP survive
//! a node agent's restart; `tapestry node add|remove` change the
//! membership; `tapestry down` leaves nothing behind. Real processes, real
//! network namespaces, the machine's kubectl.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tapestry_e2e::*;

/// Node 1's pod bridge, in the host.
const BRIDGE: &str = "tpmn0";
const UNDERLAY_BRIDGE: &str = "tpmn-ul";
const UNDERLAY: &str = "10.237.0.0/24";
const CLUSTER_CIDR: &str = "10.238.0.0/16";
const NODE1: &str = "mn-1";

/// The underlay address of node `k` (the host is node 1).
fn node_address(k: u32) -> String {
    format!("10.237.0.{k}")
}

fn web() -> String {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"replicas": 3,
                 "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                     "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                            {"labelSelector": {"matchLabels": {"app": "web"}},
                             "topologyKey": "kubernetes.io/hostname"}]}},
                        "containers": [{"name": "httpd", "image": "busybox:local",
                        "imagePullPolicy": "Never",
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "command": ["sh", "-c", "echo $POD_NAME > /var/www/index.html; exec httpd -f -p 8080 -h /var/www"],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}
    })
    .to_string()
}

fn ready_nodes(c: &Cluster) -> BTreeSet<String> {
    let out = c
        .kubectl(&["get", "nodes", "-o", "json"])
        .unwrap_or_default();
    let nodes: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    nodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

/// Ready pods of `app=web`: name → (node, IP).
fn web_pods(c: &Cluster) -> BTreeMap<String, (String, String)> {
    let out = c
        .kubectl(&["get", "pods", "-n", "shop", "-l", "app=web", "-o", "json"])
        .unwrap_or_default();
    let pods: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|p| {
            Some((
                p["metadata"]["name"].as_str()?.to_string(),
                (
                    p["spec"]["nodeName"].as_str()?.to_string(),
                    p["status"]["podIP"].as_str()?.to_string(),
                ),
            ))
        })
        .collect()
}

/// An HTTP answer's body, trimmed.
fn body(reply: &str) -> &str {
    reply.split("\r\n\r\n").nth(1).unwrap_or_default().trim()
}

fn tapestry(args: &[&str]) -> std::process::Output {
    Command::new(program_path("tapestry").unwrap())
        .args(args)
        .output()
        .expect("tapestry")
}

/// `tapestry ARGS`, which must succeed; what it printed.
fn tapestry_ok(args: &[&str]) -> String {
    let out = tapestry(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tapestry {}: {stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("tapestry {}:\n{stdout}", args.join(" "));
    stdout
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn links() -> String {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nft_tables() -> String {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_routes() -> String {
    let out = Command::new("ip").args(["route"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Enter the network namespace `netns` (this thread, or a child between
/// fork and exec): only the network, as `tapestry up` runs its nodes, so
/// mounts and cgroups stay the host's.
fn enter_netns(netns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    // SAFETY: setns with a valid descriptor; async-signal-safe.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connections from node 2's namespace through the web Service's
/// ClusterIP, each with a request half sent; node 2's agent killed and
/// started again as it was; then each request finished over its
/// connection. The restarted agent is stopped at the end (it stops its
/// pods), as `tapestry down` would have.
fn agent_restart_keeps_connections(c: &Cluster, cluster_ip: &str) {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    let netns = "tapestry-node-mn-1-2";
    let target: std::net::SocketAddr = format!("{cluster_ip}:80").parse().unwrap();
    let mut held: Vec<std::net::TcpStream> = std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(netns).unwrap();
            (0..6)
                .map(|_| {
                    let mut conn =
                        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
                            .unwrap();
                    conn.write_all(b"GET / HTTP/1.0\r\n").unwrap();
                    conn
                })
                .collect()
        })
        .join()
        .unwrap()
    });

    let state: Value =
        serde_json::from_slice(&std::fs::read(c.data().join("local/state.json")).unwrap()).unwrap();
    let pid = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "mn-1-2")
        .and_then(|n| n["pid"].as_u64())
        .expect("node 2's pid in state.json") as i32;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(argv.iter().any(|a| a == "node"), "{argv:?}");
    // SAFETY: plain kill of the agent's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for("node 2's agent gone", Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie until `up` reaps it.
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    });
    let log_path = c.data().join("node-2-restarted.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = Command::new(&argv[0]);
    agent
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: only setns between fork and exec.
    unsafe { agent.pre_exec(move || enter_netns(netns)) };
    let mut restarted = agent.spawn().unwrap();
    let agent_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for(
        "the restarted agent's first full sync",
        Duration::from_secs(60),
        || {
            agent_log()
                .contains("service proxy table written in full")
                .then_some(())
        },
    );
    for (i, conn) in held.iter_mut().enumerate() {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.write_all(b"\r\n").unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply)
            .unwrap_or_else(|e| panic!("connection {i} broke across the restart: {e}"));
        assert!(
            body(&reply).starts_with("web-"),
            "connection {i}, after the restart: {reply:?}"
        );
    }
    // SAFETY: plain kill of our child's pid.
    unsafe { libc::kill(restarted.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while restarted.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted agent did not stop:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("node 2's restarted agent:\n{}", agent_log());
}

#[test]
fn three_nodes_serve_grow_shrink_and_leave_nothing_behind() {
    if !require(
        "three_nodes_serve_grow_shrink_and_leave_nothing_behind",
        &["kubectl", "nft", "ip", "curl"],
    ) {
        return;
    }
    let _serial = serial();
    let mut c = Cluster::start(
        "127.0.0.1",
        BRIDGE,
        &[
            "--nodes",
            "3",
            "--name",
            NODE1,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--underlay-cidr",
            UNDERLAY,
            "--underlay-bridge",
            UNDERLAY_BRIDGE,
        ],
    );
    let data = c.data();
    let data_arg = data.to_str().unwrap().to_string();
    let nodes: BTreeSet<String> = [NODE1, "mn-1-2", "mn-1-3"].map(String::from).into();
    let all_ready = wait_for("three nodes Ready", Duration::from_secs(60), || {
        let out = c.output();
        let line = out.lines().find(|l| l.starts_with("3 nodes Ready in "))?;
        (ready_nodes(&c) == nodes).then(|| line.to_string())
    });
    eprintln!("tapestry up --nodes 3: {all_ready}\n{}", c.output());
    for k in [2, 3] {
        let ns = format!("tapestry-node-mn-1-{k}");
        assert!(
            netns_list().contains(&ns),
            "{ns} missing:\n{}",
            netns_list()
        );
    }
    let nat_table = format!("table ip {UNDERLAY_BRIDGE}-nat");
    assert!(nft_tables().contains(&nat_table), "{}", nft_tables());

    // The fleet manager's taps run on every node (host-network pods, in
    // each node's own namespace) and reach the API server and the
    // aggregator from there.
    wait_for(
        "a tap Connected on every node",
        Duration::from_secs(90),
        || {
            let view = c.rest("GET", "/v1/nodes", None).body;
            let connected: BTreeSet<String> = view["items"]
                .as_array()?
                .iter()
                .filter(|n| n["tap"] == "Connected")
                .filter_map(|n| n["name"].as_str().map(str::to_string))
                .collect();
            (connected == nodes).then_some(())
        },
    );

    // Three web pods, one per node.
    c.must(&["create", "namespace", "shop"]);
    c.apply(&web());
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"type": "NodePort", "selector": {"app": "web"},
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        .to_string(),
    );
    let pods = wait_for("three ready web pods", Duration::from_secs(90), || {
        let pods = web_pods(&c);
        (pods.len() == 3).then_some(pods)
    });
    let on: BTreeSet<&String> = pods.values().map(|(n, _)| n).collect();
    assert_eq!(on.len(), 3, "web pods not spread over the nodes: {pods:?}");
    let cluster_ip = c.service_field("shop", "web", ".spec.clusterIP");
    let node_port: u16 = c
        .service_field("shop", "web", ".spec.ports[0].nodePort")
        .parse()
        .unwrap();
    wait_for("three endpoints", Duration::from_secs(30), || {
        (c.ready_endpoints("shop", "web") == 3).then_some(())
    });

    // A client on node 2: 300 requests to the Service.
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "client", "namespace": "shop"},
                "spec": {"nodeName": "mn-1-2", "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "sh", "image": "busybox:local",
                    "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}})
        .to_string(),
    );
    c.running("shop", "client");
    let exec = |script: &str| c.must(&["exec", "-n", "shop", "client", "--", "sh", "-c", script]);
    // By name (resolved by node 2's cluster DNS at every request), and
    // through the ClusterIP.
    let by_name = "$(busybox nslookup web.shop.svc.cluster.local | busybox sed -n \
                   's/^Address: *//p' | busybox tail -1)";
    for (what, target) in [
        ("web.shop.svc.cluster.local", by_name),
        ("the ClusterIP", &cluster_ip),
    ] {
        let loop_script = format!(
            "i=0; while [ $i -lt 300 ]; do {}; i=$((i+1)); done",
            get_in_pod(target, 80)
        );
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for line in exec(&loop_script).lines().filter(|l| l.starts_with("web-")) {
            *seen.entry(line.trim().to_string()).or_insert(0) += 1;
        }
        eprintln!("300 requests from node 2 to {what}: {seen:?}");
        for pod in pods.keys() {
            let n = seen.get(pod).copied().unwrap_or(0);
            assert!(n >= 60, "{pod} answered {n} of 300 requests: {seen:?}");
        }
    }

    // Pod to pod across nodes, from node 2 to each web pod.
    for (pod, (node, ip)) in &pods {
        let reply = exec(&get_in_pod(ip, 8080));
        assert_eq!(reply.trim(), pod, "{pod} on {node} at {ip}");
    }

    // The NodePort on every node's underlay address, from the host.
    for k in 1..=3 {
        let addr = node_address(k);
        let mut answered = BTreeSet::new();
        for _ in 0..30 {
            if let Some(pod) = web_pod_at(&addr, node_port) {
                answered.insert(pod);
            }
        }
        eprintln!("NodePort {addr}:{node_port}: {answered:?}");
        assert!(
            !answered.is_empty(),
            "NodePort {addr}:{node_port} did not answer"
        );
    }

    // A pod on node 1 talking to the web pod on node 3 is seen by the taps
    // at both ends, each in its own node's namespace.
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "probe", "namespace": "shop", "labels": {"app": "probe"}},
                "spec": {"nodeName": NODE1, "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "sh", "image": "busybox:local",
                    "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}})
        .to_string(),
    );
    c.running("shop", "probe");
    api::create_tool(&c, "mn-pcap");
    api::create_policy(
        &c,
        json!({"name": "across", "namespaces": ["shop"],
               "podSelector": {"matchExpressions": [
                   {"key": "app", "operator": "In", "values": ["web", "probe"]}]},
               "rules": [{"protocol": "tcp", "ports": ["8080"]}],
               "tools": ["mn-pcap"]}),
    );
    let web3 = pods
        .values()
        .find(|(node, _)| node == "mn-1-3")
        .map(|(_, ip)| ip.clone())
        .expect("a web pod on mn-1-3");
    let captured = |view: &Value, node: &str| {
        view["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == node)
            .and_then(|n| n["status"]["policies"]["across"]["captured"].as_u64())
            .unwrap_or(0)
    };
    wait_for(
        "the web pod's packets at the taps of mn-1 and mn-1-3",
        Duration::from_secs(60),
        || {
            let reply = c
                .kubectl(&[
                    "exec",
                    "-n",
                    "shop",
                    "probe",
                    "--",
                    "sh",
                    "-c",
                    &get_in_pod(&web3, 8080),
                ])
                .ok()?;
            assert!(reply.starts_with("web-"), "{reply}");
            let view = c.rest("GET", "/v1/nodes", None).body;
            let (one, three) = (captured(&view, NODE1), captured(&view, "mn-1-3"));
            (one > 0 && three > 0)
                .then(|| eprintln!("packets tapped across nodes: {NODE1} {one}, mn-1-3 {three}"))
        },
    );

    // A fourth node joins; a DaemonSet places a pod on it.
    tapestry_ok(&["node", "add", "--name", "mn-4", "--data-dir", &data_arg]);
    assert!(ready_nodes(&c).contains("mn-4"));
    // The Service includes it: its NodePort answers on its address.
    let addr = node_address(4);
    wait_for("the NodePort on mn-4", Duration::from_secs(20), || {
        web_pod_at(&addr, node_port)
    });
    c.apply(
        &json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "every", "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "every"}},
                         "template": {"metadata": {"labels": {"app": "every"}},
                            "spec": {"terminationGracePeriodSeconds": 1,
                                     "containers": [{"name": "sh", "image": "busybox:local",
                                "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]}}}})
        .to_string(),
    );
    let every = wait_for(
        "the DaemonSet's pod on mn-4",
        Duration::from_secs(60),
        || {
            let name = c
                .kubectl(&[
                    "get",
                    "pods",
                    "-n",
                    "shop",
                    "-l",
                    "app=every",
                    "--field-selector",
                    "spec.nodeName=mn-4,status.phase=Running",
                    "-o",
                    "jsonpath={.items[0].metadata.name}",
                ])
                .ok()?;
            (!name.trim().is_empty()).then(|| name.trim().to_string())
        },
    );
    // Its pods reach the others.
    let (pod, (_, ip)) = pods.iter().next().unwrap();
    let reply = c.must(&[
        "exec",
        "-n",
        "shop",
        &every,
        "--",
        "sh",
        "-c",
        &get_in_pod(ip, 8080),
    ]);
    assert_eq!(reply.trim(), pod);

    // A fourth web pod can only go to the new node (one per node).
    c.must(&["scale", "deployment", "web", "-n", "shop", "--replicas=4"]);
    wait_for("a web pod on mn-4", Duration::from_secs(60), || {
        web_pods(&c)
            .values()
            .any(|(node, _)| node == "mn-4")
            .then_some(())
    });

    // Clear refusals.
    let taken = tapestry(&["node", "add", "--name", "mn-4", "--data-dir", &data_arg]);
    assert!(!taken.status.success());
    let msg = String::from_utf8_lossy(&taken.stderr);
    assert!(msg.contains("mn-4"), "{msg}");
    let bad = tapestry(&["node", "add", "--name", "Bad_Name", "--data-dir", &data_arg]);
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("not a node name"), "{msg}");
    let unknown = tapestry(&["node", "remove", "nope", "--data-dir", &data_arg]);
    assert!(!unknown.status.success());
    let msg = String::from_utf8_lossy(&unknown.stderr);
    assert!(msg.contains("no node nope"), "{msg}");
    let elsewhere = tapestry(&["node", "add", "--data-dir", "/nonexistent/tapestry"]);
    assert!(!elsewhere.status.success());
    let msg = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(msg.contains("no local cluster runs"), "{msg}");

    // And leaves.
    let removed = tapestry_ok(&["node", "remove", "mn-4", "--data-dir", &data_arg]);
    assert!(removed.contains("(1 pod evicted)"), "{removed}");
    assert!(
        c.kubectl(&["get", "node", "mn-4"]).is_err(),
        "Node mn-4 remains"
    );
    assert!(
        !netns_list().contains("tapestry-node-mn-4"),
        "{}",
        netns_list()
    );
    assert!(
        !links().contains(&format!("{UNDERLAY_BRIDGE}4")),
        "{}",
        links()
    );
    // Its web pod has nowhere to go; the Service keeps the other three.
    wait_for("three endpoints again", Duration::from_secs(30), || {
        (c.ready_endpoints("shop", "web") == 3).then_some(())
    });
    let seen: BTreeSet<String> = (0..30)
        .filter_map(|_| web_pod_at(&node_address(1), node_port))
        .collect();
    assert_eq!(seen.len(), 3, "after the removal: {seen:?}");

    // Restarting a node agent keeps connections established through a
    // ClusterIP: their NAT lives in conntrack, and the agent's first full
    // sync rewrites the proxy's tables around them.
    agent_restart_keeps_connections(&c, &cluster_ip);

    // What must be gone afterwards: the pods' cgroups and node 1's veths.
    let uids = c.must(&[
        "get",
        "pods",
        "-A",
        "-o",
        "jsonpath={.items[*].metadata.uid}",
    ]);
    let veths = c.must(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        &format!("spec.nodeName={NODE1}"),
        "-o",
        "jsonpath={.items[*].metadata.annotations.tapestry\\.io/host-veth}",
    ]);
    tapestry_ok(&["down", "--data-dir", &data_arg]);
    assert!(c.wait_exit(Duration::from_secs(10)).success());
    let names = netns_list();
    assert!(
        !names.contains("tapestry-node-"),
        "namespaces left: {names}"
    );
    for uid in uids.split_whitespace() {
        assert!(!names.contains(uid), "pod {uid}'s namespace left: {names}");
    }
    let left = links();
    for name in [UNDERLAY_BRIDGE, BRIDGE]
        .iter()
        .map(|s| s.to_string())
        .chain(veths.split_whitespace().map(str::to_string))
    {
        assert!(
            !left.contains(&format!(" {name}:")) && !left.contains(&format!(" {name}@")),
            "{name} left:\n{left}"
        );
    }
    let routes = host_routes();
    assert!(
        !routes.contains("10.238.") && !routes.contains("10.237."),
        "routes left:\n{routes}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let under = data.to_str().unwrap();
    assert!(
        !mounts.contains(under),
        "mounts left under {under}:\n{mounts}"
    );
    let cgroups = Command::new("sh")
        .arg("-c")
        .arg("find /sys/fs/cgroup -maxdepth 4 -type d -name 'pod*' 2>/dev/null")
        .output()
        .unwrap();
    let cgroups = String::from_utf8_lossy(&cgroups.stdout);
    for uid in uids.split_whitespace() {
        assert!(
            !cgroups.contains(uid),
            "cgroup of pod {uid} left:\n{cgroups}"
        );
    }
    let tables = nft_tables();
    assert!(!tables.contains(&nat_table), "{tables}");
    // With no other cluster on this machine, no proxy table remains either.
    if pids("tapestry").is_empty() {
        assert!(!tables.contains("tapestry-proxy"), "{tables}");
    }
    let again = tapestry(&["down", "--data-dir", &data_arg]);
    assert!(!again.status.success(), "a second down succeeded");
}
