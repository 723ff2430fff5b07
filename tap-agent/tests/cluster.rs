//! Cluster mode against a real Kubernetes API: a `tapestry server` process
//! in the test's network namespace, objects created and changed with the
//! machine's kubectl. The agent watches the pods of its node (and the
//! TapPolicy objects, namespaces and its node) with kube-rs, finds each
//! selected pod's host-side veth from the kernel's facts, and follows every
//! change live. Pods' networks are wired as CNI plugins do: a namespace per
//! pod holding `eth0` with the pod's IP, the host end in the node's
//! namespace.

mod common;

use std::{
    collections::BTreeSet,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::json;
use tapestry_proto::tap::v1::Direction;

/// A `tapestry server` process inside a network namespace.
struct ApiServer {
    ns: String,
    dir: PathBuf,
    child: Child,
}

impl ApiServer {
    /// The `tapestry` binary sits next to this test's directory in the
    /// target dir; `cargo test --workspace` builds it.
    /// None (after saying so) outside CI when it is not built; in CI its
    /// absence fails the test.
    fn binary() -> Option<PathBuf> {
        let path = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("tapestry")))
            .filter(|path| path.exists());
        if path.is_none() {
            if std::env::var_os("CI").is_some() {
                panic!("the tapestry binary is not built: run `cargo build -p tapestry` (cargo test --workspace builds it)");
            }
            eprintln!("skipping: tapestry binary not built (cargo build -p tapestry)");
        }
        path
    }

    fn start(ns: &str, dir: &Path, binary: &Path) -> ApiServer {
        let dir = dir.join("apiserver");
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(binary)
            .args(["server", "--listen", "127.0.0.1:6443", "--data-dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tapestry server");
        let server = ApiServer {
            ns: ns.to_string(),
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.kubectl(&["get", "--raw", "/readyz"], None).is_none() {
            assert!(
                Instant::now() < deadline,
                "tapestry server did not get ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Run kubectl in the server's namespace; None if it failed.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Option<String> {
        self.kubectl_output(args, stdin).ok()
    }

    fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns, "kubectl", "--kubeconfig"]);
        command.arg(self.kubeconfig());
        kubectl_output(command, args, stdin)
    }

    fn apply(&self, manifest: &serde_json::Value) {
        self.apply_with(manifest, &[]);
    }

    fn apply_with(&self, manifest: &serde_json::Value, flags: &[&str]) {
        let text = manifest.to_string();
        let mut args = vec!["apply", "-f", "-"];
        args.extend(flags);
        if let Err(e) = self.kubectl_output(&args, Some(&text)) {
            panic!("kubectl apply: {e}\nfor {text}");
        }
    }

    /// A pod of namespace `ns` bound to `node`, with the kubelet's veth hint.
    fn pod(ns: &str, name: &str, app: &str, node: &str, veth: &str) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app},
                         "annotations": {"tapestry.io/host-veth": veth}},
            // No kubelet heartbeats here: tolerate the node's taints.
            "spec": {"nodeName": node, "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "c", "image": "busybox"}]}
        })
    }

    /// Reports the pod running with `ip`, as its kubelet would.
    fn set_pod_ip(&self, ns: &str, name: &str, ip: Ipv4Addr) {
        let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(),
                                       "podIPs": [{"ip": ip.to_string()}]}});
        self.must(&[
            "patch",
            "pod",
            "-n",
            ns,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
    }

    /// `kubectl ARGS` that must succeed.
    fn must(&self, args: &[&str]) -> String {
        self.kubectl_output(args, None)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }
}

/// A pod's network wired as CNI plugins do: namespace `{node_ns}-{veth}`
/// with `eth0` holding the pod's IP, the host end `veth` in `node_ns`, and
/// static routes and neighbours so test datagrams flow both ways without
/// ARP.
struct PodNet {
    node_ns: String,
    ns: String,
    veth: String,
    ip: Ipv4Addr,
}

/// Where datagrams from pods are sent (a static neighbour: nothing answers).
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 99, 99);

impl PodNet {
    fn new(node_ns: &str, veth: &str, ip: Ipv4Addr) -> PodNet {
        let ns = format!("{node_ns}-{veth}");
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        sh(&format!("ip netns add {ns}"));
        let mac = format!("02:00:00:aa:00:{:02x}", ip.octets()[3]);
        sh(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 && \
             ip -n {node_ns} link add {veth} type veth peer name eth0 netns {ns} && \
             ip -n {ns} link set eth0 address {mac} && ip -n {ns} addr add {ip}/32 dev eth0 && \
             ip -n {ns} link set eth0 up && ip -n {ns} link set lo up && ip -n {node_ns} link set {veth} up && \
             ip -n {ns} route add default dev eth0 && \
             ip -n {ns} neigh replace {OUTSIDE} lladdr 02:00:00:00:99:99 dev eth0 nud permanent && \
             ip -n {node_ns} route replace {ip}/32 dev {veth} && \
             ip -n {node_ns} neigh replace {ip} lladdr {mac} dev {veth} nud permanent"
        ));
        PodNet {
            node_ns: node_ns.to_string(),
            ns,
            veth: veth.to_string(),
            ip,
        }
    }

    /// A UDP datagram from the pod (ingress on its host-side veth).
    fn send_from(&self, payload: &[u8]) {
        let payload = payload.to_vec();
        in_netns(&self.ns, move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            s.send_to(&payload, (OUTSIDE, 9)).unwrap();
        });
    }

    /// A UDP datagram to the pod (egress on its host-side veth).
    fn send_to(&self, payload: &[u8]) {
        let (payload, ip) = (payload.to_vec(), self.ip);
        in_netns(&self.node_ns, move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            s.send_to(&payload, (ip, 9)).unwrap();
        });
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["-n", &self.node_ns, "link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
    }
}

/// Run `command` (kubectl with its kubeconfig) with `args`, feeding
/// `stdin`; its stdout, or None if it failed.
fn run_kubectl(command: Command, args: &[&str], stdin: Option<&str>) -> Option<String> {
    kubectl_output(command, args, stdin).ok()
}

/// Like [`run_kubectl`], with kubectl's complaint when it failed.
fn kubectl_output(
    mut command: Command,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, String> {
    let mut child = command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn latest_sources(server: &Server) -> Vec<(String, String)> {
    let rec = server.sink.0.lock().unwrap();
    rec.batches
        .iter()
        .rev()
        .find_map(|b| b.hello.as_ref())
        .map(|h| {
            h.sources
                .iter()
                .map(|s| {
                    (
                        s.interface.clone(),
                        s.pod.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn policy_taps_selected_pods_and_follows_them() {
    if !require_root("policy_taps_selected_pods_and_follows_them") {
        return;
    }
    let _g = serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let Some(binary) = ApiServer::binary() else {
        return;
    };
    let nets: Vec<PodNet> = [("vw1", 11), ("vw2", 12), ("vd1", 13), ("vw3", 14)]
        .iter()
        .map(|(veth, host)| PodNet::new(&pair.a, veth, Ipv4Addr::new(10, 97, 0, *host)))
        .collect();
    let api = ApiServer::start(&pair.a, dir.path(), &binary);
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    api.apply(&ApiServer::pod("shop", "web-1", "web", "n1", "vw1"));
    api.set_pod_ip("shop", "web-1", nets[0].ip);
    api.apply(&ApiServer::pod("shop", "db-1", "db", "n1", "vd1"));
    api.set_pod_ip("shop", "db-1", nets[2].ip);
    api.apply(&ApiServer::pod("shop", "web-9", "web", "n2", "vw9"));
    // Its annotation names db-1's veth, but its IP is behind vw3: refused.
    api.apply(&ApiServer::pod("shop", "web-3", "web", "n1", "vd1"));
    api.set_pod_ip("shop", "web-3", nets[3].ip);
    let kubeconfig = api.kubeconfig();
    let policies = dir.path().join("policies.json");
    std::fs::write(
        &policies,
        r#"[{"name": "web", "namespace": "shop", "selector": {"matchLabels": {"app": "web"}}}]"#,
    )
    .unwrap();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node",
            "n1",
            "--policy-file",
            policies.to_str().unwrap(),
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
        ],
    );
    agent.wait_for("web-1 tapped", Duration::from_secs(15), || {
        latest_sources(&server) == [("vw1".to_string(), "web-1".to_string())]
    });
    assert_eq!(agent.metric("tapestry_tap_attached_interfaces"), 1);
    agent.wait_for("web-3 refused", Duration::from_secs(10), || {
        agent.log_text().contains(
            "pod shop/web-3 not tapped: annotation tapestry.io/host-veth names vd1, but the veth whose peer holds 10.97.0.14 is vw3",
        )
    });

    // A pod created later is tapped; a deleted one is detached.
    api.apply(&ApiServer::pod("shop", "web-2", "web", "n1", "vw2"));
    api.set_pod_ip("shop", "web-2", nets[1].ip);
    agent.wait_for("web-2 tapped", Duration::from_secs(15), || {
        agent.metric("tapestry_tap_attached_interfaces") == 2
    });
    // Without a kubelet to confirm, a forced delete removes the pod at once.
    api.kubectl(
        &[
            "delete",
            "pod",
            "-n",
            "shop",
            "web-1",
            "--grace-period=0",
            "--force",
        ],
        None,
    )
    .expect("kubectl delete");
    agent.wait_for("web-1 detached", Duration::from_secs(15), || {
        agent.metric("tapestry_tap_attached_interfaces") == 1
    });
    // The stream's Hello now names web-2's veth and identity only.
    agent.wait_for("hello naming web-2", Duration::from_secs(10), || {
        latest_sources(&server) == [("vw2".to_string(), "web-2".to_string())]
    });
    assert!(agent.terminate());
    assert_eq!(tapestry_attachments(&pair.a), Vec::<String>::new());
}

/// The status JSON of the heartbeat Lease `tap-n1`.
fn tap_status(api: &ApiServer) -> Option<serde_json::Value> {
    let text = api.kubectl(
        &[
            "get",
            "lease",
            "-n",
            "tapestry-system",
            "tap-n1",
            "-o",
            "jsonpath={.metadata.annotations.tapestry\\.io/tap-status}",
        ],
        None,
    )?;
    serde_json::from_str(&text).ok()
}

/// Packets whose bytes contain `needle`: (direction, policy names).
fn captured(server: &Server, needle: &[u8]) -> Vec<(i32, BTreeSet<String>)> {
    let rec = server.sink.0.lock().unwrap();
    let mut names: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for b in &rec.batches {
        if let Some(h) = &b.hello {
            names = h.policy_names.clone();
        }
        for p in &b.packets {
            if p.data.windows(needle.len()).any(|w| w == needle) {
                let policies = (0..64)
                    .filter(|i| p.policy_mask & (1u64 << i) != 0)
                    .map(|i| names.get(i).cloned().unwrap_or_default())
                    .collect();
                out.push((p.direction, policies));
            }
        }
    }
    out
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// TCX link ids attached to `ifindex`'s interfaces, machine-wide.
fn tcx_links() -> Vec<u64> {
    let links: serde_json::Value = serde_json::from_str(&sh("bpftool -j link show")).unwrap();
    let mut ids: Vec<u64> = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["type"] == 11 || l["type"] == "tcx")
        .filter_map(|l| l["id"].as_u64())
        .collect();
    ids.sort();
    ids
}

/// TapPolicy objects from the cluster: namespaces by name and by label, pod
/// and node selectors, pod-relative directions, live edits without
/// re-attaching or losing packets of other policies, disabling and stopping,
/// the aggregator found (and followed) through EndpointSlices, and the
/// heartbeat Lease with the tap's status.
#[test]
fn tap_policies_from_the_cluster_are_followed_live() {
    if !require_root("tap_policies_from_the_cluster_are_followed_live") {
        return;
    }
    let _g = serial();
    let Some(binary) = ApiServer::binary() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let web = PodNet::new(&pair.a, "cw1", Ipv4Addr::new(10, 96, 0, 11));
    let db = PodNet::new(&pair.a, "cd1", Ipv4Addr::new(10, 96, 0, 12));
    let teller = PodNet::new(&pair.a, "ct1", Ipv4Addr::new(10, 96, 0, 13));
    let api = ApiServer::start(&pair.a, dir.path(), &binary);
    let crds = json!({"apiVersion": "v1", "kind": "List",
                      "items": tapestry_proto::crd::crds()});
    // kubectl's own schema check of CRDs is not what this test is about.
    api.apply_with(&crds, &["--validate=false"]);
    api.must(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/tappolicies.tapestry.io",
    ]);
    for (ns, team) in [("shop", "a"), ("bank", "b"), ("tapestry-system", "sys")] {
        api.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": ns, "labels": {"team": team}}}));
    }
    api.apply(&json!({"apiVersion": "v1", "kind": "Node",
                      "metadata": {"name": "n1", "labels": {"role": "edge"}}}));
    for (ns, name, app, net) in [
        ("shop", "web-1", "web", &web),
        ("shop", "db-1", "db", &db),
        ("bank", "teller-1", "teller", &teller),
    ] {
        api.apply(&ApiServer::pod(ns, name, app, "n1", &net.veth));
        api.set_pod_ip(ns, name, net.ip);
    }
    let policy = |name: &str, spec: serde_json::Value| {
        json!({"apiVersion": "tapestry.io/v1alpha1", "kind": "TapPolicy",
               "metadata": {"name": name}, "spec": spec})
    };
    // web: only what web pods send (as the pod sees it).
    api.apply(&policy(
        "web",
        json!({"namespaces": ["shop"], "podSelector": {"matchLabels": {"app": "web"}},
               "rules": [{"protocol": "udp", "direction": "fromPod"}]}),
    ));
    api.apply(&policy(
        "bank",
        json!({"namespaceSelector": {"matchLabels": {"team": "b"}}}),
    ));
    api.apply(&policy(
        "edge-db",
        json!({"podSelector": {"matchLabels": {"app": "db"}},
               "nodeSelector": {"matchLabels": {"role": "edge"}}}),
    ));
    api.apply(&policy("off", json!({"enabled": false})));
    // The aggregator's Service endpoints, as the endpoints controller
    // would write them.
    let slice = |port: u16| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "aggregator-x", "namespace": "tapestry-system",
                            "labels": {"kubernetes.io/service-name": "aggregator"}},
               "addressType": "IPv4",
               "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
               "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}]})
    };
    api.apply(&slice(GRPC_PORT));
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--kubeconfig",
            api.kubeconfig().to_str().unwrap(),
            "--node",
            "n1",
            "--tap-id",
            "tap-test",
            "--aggregator-service",
            "tapestry-system/aggregator:grpc",
            "--heartbeat-period",
            "1",
        ],
    );
    let all = |s: &Server| {
        let mut v = latest_sources(s);
        v.sort();
        v
    };
    let want = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    agent.wait_for("web, db and teller tapped", Duration::from_secs(20), || {
        all(&server) == want(&[("cd1", "db-1"), ("ct1", "teller-1"), ("cw1", "web-1")])
    });
    agent.wait_for("a heartbeat", Duration::from_secs(10), || {
        tap_status(&api).is_some_and(|s| s["podsTapped"] == 3 && s["connected"] == true)
    });
    let status = tap_status(&api).unwrap();
    assert_eq!(status["policies"]["web"]["pods"], 1, "{status}");
    assert_eq!(status["policies"]["bank"]["pods"], 1, "{status}");
    assert!(status["policies"].get("off").is_none(), "{status}");
    let lease = api.must(&[
        "get",
        "lease",
        "-n",
        "tapestry-system",
        "tap-n1",
        "-o",
        "jsonpath={.spec.holderIdentity} {.spec.leaseDurationSeconds}",
    ]);
    assert_eq!(lease, "tap-test 3");

    // Directions are the pod's: web keeps what web-1 sends, not what it
    // receives.
    web.send_from(b"web-out-1");
    web.send_to(b"web-in-1");
    agent.wait_for("web-1's datagram", Duration::from_secs(10), || {
        !captured(&server, b"web-out-1").is_empty()
    });
    assert_eq!(
        captured(&server, b"web-out-1"),
        [(Direction::Ingress as i32, names(&["web"]))]
    );
    assert_eq!(captured(&server, b"web-in-1"), []);

    // Edit web's rules while teller's traffic flows: nothing is re-attached
    // and bank loses no packet.
    let links = tcx_links();
    let attached_lines = agent.log_text().matches(" attached").count();
    let sender = {
        let ns = teller.ns.clone();
        std::thread::spawn(move || {
            in_netns(&ns, || {
                let s = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
                for i in 0..3000u32 {
                    let mut msg = b"teller-seq-".to_vec();
                    msg.extend_from_slice(&i.to_be_bytes());
                    s.send_to(&msg, (OUTSIDE, 9)).unwrap();
                    std::thread::sleep(Duration::from_micros(700));
                }
            })
        })
    };
    api.apply(&policy(
        "web",
        json!({"namespaces": ["shop"], "podSelector": {"matchLabels": {"app": "web"}},
               "rules": [{"protocol": "udp", "direction": "toPod"}], "snaplen": 200}),
    ));
    agent.wait_for("the edit applied", Duration::from_secs(10), || {
        web.send_to(b"web-in-2");
        std::thread::sleep(Duration::from_millis(100));
        !captured(&server, b"web-in-2").is_empty()
    });
    sender.join().unwrap();
    web.send_from(b"web-out-2");
    agent.wait_for("every teller datagram", Duration::from_secs(10), || {
        captured(&server, b"teller-seq-").len() >= 3000
    });
    let teller_seen = captured(&server, b"teller-seq-");
    assert_eq!(teller_seen.len(), 3000, "each datagram exactly once");
    assert!(teller_seen
        .iter()
        .all(|(d, p)| *d == Direction::Ingress as i32 && *p == names(&["bank"])));
    assert!(captured(&server, b"web-in-2")
        .iter()
        .all(|(d, p)| *d == Direction::Egress as i32 && *p == names(&["web"])));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(captured(&server, b"web-out-2"), []);
    assert_eq!(tcx_links(), links, "no interface was re-attached");
    assert_eq!(
        agent.log_text().matches(" attached").count(),
        attached_lines
    );

    // Namespace and node labels, disabling and stopping, all live.
    api.must(&["label", "namespace", "bank", "team=c", "--overwrite"]);
    agent.wait_for("teller untapped", Duration::from_secs(10), || {
        all(&server) == want(&[("cd1", "db-1"), ("cw1", "web-1")])
    });
    api.must(&["label", "node", "n1", "role=core", "--overwrite"]);
    agent.wait_for("db untapped", Duration::from_secs(10), || {
        all(&server) == want(&[("cw1", "web-1")])
    });
    api.must(&["label", "namespace", "bank", "team=b", "--overwrite"]);
    agent.wait_for("teller tapped again", Duration::from_secs(10), || {
        all(&server) == want(&[("ct1", "teller-1"), ("cw1", "web-1")])
    });
    api.must(&[
        "patch",
        "tappolicy",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec": {"enabled": false}}"#,
    ]);
    agent.wait_for("web disabled", Duration::from_secs(10), || {
        all(&server) == want(&[("ct1", "teller-1")])
    });

    // The aggregator moves: the agent follows its endpoints.
    let second = Server::start(&rt, &pair.a, GRPC_PORT + 1);
    api.apply(&slice(GRPC_PORT + 1));
    agent.wait_for(
        "a stream to the new endpoint",
        Duration::from_secs(15),
        || all(&second) == want(&[("ct1", "teller-1")]),
    );

    let stopped = json!({"status": {"stopped": {"reason": "MaxPackets",
        "message": "limit reached", "at": "2026-01-01T00:00:00Z"}}});
    api.must(&[
        "patch",
        "tappolicy",
        "bank",
        "--subresource=status",
        "--type=merge",
        "-p",
        &stopped.to_string(),
    ]);
    agent.wait_for("nothing tapped", Duration::from_secs(10), || {
        agent.metric("tapestry_tap_attached_interfaces") == 0
    });
    agent.wait_for(
        "a heartbeat with nothing tapped",
        Duration::from_secs(10),
        || tap_status(&api).is_some_and(|s| s["podsTapped"] == 0 && s["interfaces"] == json!([])),
    );
    assert!(agent.terminate());
    assert_eq!(tapestry_attachments(&pair.a), Vec::<String>::new());
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A one-node `tapestry up` cluster on this machine (its own bridge and pod
/// range), stopped with SIGTERM so it removes its pods.
struct LocalCluster {
    child: Child,
    dir: PathBuf,
}

const TEST_BRIDGE: &str = "tptap0";

impl LocalCluster {
    fn start(binary: &Path, dir: &Path) -> LocalCluster {
        // A busybox image from Debian's static busybox.
        let rootfs = dir.join("rootfs");
        for d in ["bin", "etc", "tmp", "var/www"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "httpd"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("var/www/index.html"), "tapped page\n").unwrap();
        let built = Command::new(binary)
            .args(["image", "build", "busybox:local", "--rootfs"])
            .arg(&rootfs)
            .arg("--data-dir")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let log = std::fs::File::create(dir.join("up.log")).unwrap();
        let child = Command::new(binary)
            .arg("up")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--kubelet-port", &free_port().to_string()])
            .args(["--name", "tapnode", "--bridge", TEST_BRIDGE])
            // The agent under test alone: no fleet manager deploying taps.
            .arg("--no-fleet-manager")
            .args([
                "--pod-cidr",
                "10.251.0.0/24",
                "--cluster-cidr",
                "10.251.0.0/16",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let cluster = LocalCluster {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster
            .kubectl(&["get", "--raw", "/readyz"], None)
            .is_none()
        {
            assert!(Instant::now() < deadline, "tapestry up did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Option<String> {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(self.dir.join("kubeconfig"));
        run_kubectl(command, args, stdin)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["link", "del", TEST_BRIDGE])
            .status();
    }
}

/// The whole path on a real node: the kubelet of `tapestry up` runs a web
/// pod and records its host veth, the agent (cluster mode) finds it through
/// the API and taps it, and an HTTP exchange with the pod arrives at the
/// receiver in both directions, named after the pod.
#[test]
fn pods_run_by_the_node_agent_are_tapped() {
    if !require_root("pods_run_by_the_node_agent_are_tapped") {
        return;
    }
    let _g = serial();
    let Some(binary) = ApiServer::binary() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(&binary, dir.path());
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "httpd", "image": "busybox:local",
                                 "command": ["httpd", "-f", "-p", "8080", "-h", "/var/www"]}]}
    });
    cluster
        .kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()))
        .expect("kubectl apply");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ip, veth) = loop {
        let fields = cluster
            .kubectl(
                &["get", "pod", "web", "-o",
                  "jsonpath={.status.phase} {.status.podIP} {.metadata.annotations.tapestry\\.io/host-veth}"],
                None,
            )
            .unwrap_or_default();
        let f: Vec<&str> = fields.split_whitespace().collect();
        if f.len() == 3 && f[0] == "Running" {
            break (f[1].to_string(), f[2].to_string());
        }
        assert!(Instant::now() < deadline, "web pod not running: {fields:?}");
        std::thread::sleep(Duration::from_millis(200));
    };

    let grpc_port = free_port();
    let server = Server::start(&rt, HOST_NETNS, grpc_port);
    let policies = dir.path().join("policies.json");
    std::fs::write(
        &policies,
        r#"[{"name": "web", "namespace": "default", "selector": {"matchLabels": {"app": "web"}}}]"#,
    )
    .unwrap();
    let agent = Agent::start(
        HOST_NETNS,
        dir.path(),
        &[
            "--kubeconfig",
            dir.path().join("kubeconfig").to_str().unwrap(),
            "--node",
            "tapnode",
            "--policy-file",
            policies.to_str().unwrap(),
            "--aggregator",
            &format!("http://127.0.0.1:{grpc_port}"),
        ],
    );
    agent.wait_for("web's veth tapped", Duration::from_secs(20), || {
        latest_sources(&server) == [(veth.clone(), "web".to_string())]
    });

    // An HTTP exchange with the pod, from the node.
    let page = (0..50)
        .find_map(|attempt| {
            if attempt > 0 {
                // httpd may still be binding; a refused connect fails at once.
                std::thread::sleep(Duration::from_millis(200));
            }
            let mut s = std::net::TcpStream::connect((ip.as_str(), 8080)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(s, "GET / HTTP/1.0\r\nHost: web\r\n\r\n").ok()?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).ok()?;
            Some(out)
        })
        .expect("the web pod answers on its pod IP");
    assert!(page.contains("tapped page"), "{page}");
    let seen = |needle: &[u8], direction: i32| {
        let rec = server.sink.0.lock().unwrap();
        rec.batches
            .iter()
            .flat_map(|b| &b.packets)
            .any(|p| p.direction == direction && p.data.windows(needle.len()).any(|w| w == needle))
    };
    // The host veth's egress carries packets towards the pod (the request),
    // its ingress what the pod sends (the response).
    agent.wait_for(
        "request and response captured",
        Duration::from_secs(15),
        || {
            seen(b"GET / HTTP/1.0", Direction::Egress as i32)
                && seen(b"tapped page", Direction::Ingress as i32)
        },
    );
    assert!(agent.terminate());
    drop(cluster);
}
