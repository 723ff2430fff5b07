//! The fleet manager as a user meets it: `tapestry up` deploys the taps and
//! the aggregator by itself; policies and tools are created through the REST
//! API with curl; tshark receives the selected pods' traffic over
//! PCAP-over-IP, packet for packet what tcpdump sees on their interfaces;
//! edits apply live without restarting anything; the tap's state follows its
//! heartbeats; what is deleted by hand comes back.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tapestry_e2e::*;

const BRIDGE: &str = "tpe2e0";
const POD_CIDR: &str = "10.252.0.0/24";

fn pod(name: &str, app: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
        "spec": {"containers": [{"name": "httpd", "image": "busybox:local",
                                 "imagePullPolicy": "Never",
                                 "command": ["httpd", "-f", "-p", "80", "-h", "/var/www"]}]}
    })
    .to_string()
}

/// A PCAP-over-IP tool on a free loopback port; its address.
fn create_tool(c: &Cluster, name: &str) -> String {
    let addr = format!("127.0.0.1:{}", free_port());
    let body = json!({"name": name, "type": "pcapOverIp", "listen": addr}).to_string();
    let a = c.rest("POST", "/v1/tools", Some(&body));
    assert_eq!(a.status, 201, "{}", a.raw);
    addr
}

fn create_policy(c: &Cluster, body: Value) {
    let a = c.rest("POST", "/v1/policies", Some(&body.to_string()));
    assert_eq!(a.status, 201, "{}", a.raw);
}

/// Waits until the aggregator serves the tool and the node's tap runs the
/// policy on `pods` pods; then starts tshark on the tool and waits until the
/// aggregator counts it as a client.
fn ready_and_listening(c: &Cluster, policy: &str, tool: &str, addr: &str, pods: u64) -> Capture {
    wait_for(
        &format!("tool {tool} Ready"),
        Duration::from_secs(20),
        || {
            let t = c.rest("GET", &format!("/v1/tools/{tool}"), None).body;
            ready(&t["status"]).then_some(())
        },
    );
    wait_for(
        &format!("policy {policy} on {pods} pods of the node's tap"),
        Duration::from_secs(20),
        || {
            let nodes = c.rest("GET", "/v1/nodes", None).body;
            (nodes["items"][0]["status"]["policies"][policy]["pods"] == pods).then_some(())
        },
    );
    let capture = Capture::tshark(addr, c.dir.path(), tool);
    wait_for(
        &format!("tshark connected to {tool}"),
        Duration::from_secs(20),
        || {
            let t = c.rest("GET", &format!("/v1/tools/{tool}"), None).body;
            (t["status"]["clients"].as_u64() >= Some(1)).then_some(())
        },
    );
    capture
}

fn ready(status: &Value) -> bool {
    status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Datagrams `prefix:N` for N in `seq` to ip:port, one every `gap`.
fn send_numbered(ip: &str, port: u16, prefix: &str, seq: std::ops::Range<u32>, gap: Duration) {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    for n in seq {
        sock.send_to(format!("{prefix}:{n:06}").as_bytes(), (ip, port))
            .unwrap();
        std::thread::sleep(gap);
    }
}

/// The numbers of the `prefix:N` datagrams among the packets, in order.
fn numbers(packets: &[Packet], prefix: &str) -> Vec<u32> {
    let tag = format!("{prefix}:");
    packets
        .iter()
        .filter_map(|p| {
            let payload = p.data.get(42..)?;
            let text = std::str::from_utf8(payload).ok()?;
            text.strip_prefix(&tag)?.trim().parse().ok()
        })
        .collect()
}

fn from_or_to(packets: &[Packet], ip: &str) -> usize {
    packets
        .iter()
        .filter(|p| ipv4_addresses(&p.data).is_some_and(|(s, d)| s == ip || d == ip))
        .count()
}

#[test]
fn policies_through_the_rest_api_reach_tshark() {
    if !require(
        "policies_through_the_rest_api_reach_tshark",
        &["kubectl", "curl", "tshark", "tcpdump", "ip", "pgrep"],
    ) {
        return;
    }
    let _serial = serial();
    let c = Cluster::up(BRIDGE, POD_CIDR);
    c.must(&["create", "namespace", "shop"]);
    for (name, app) in [("web", "web"), ("api", "api"), ("other", "other")] {
        c.apply(&pod(name, app));
    }
    let web = c.running("shop", "web");
    let api = c.running("shop", "api");
    let other = c.running("shop", "other");

    refuses_bad_input(&c);

    // 1. A tool and a policy through the REST API: tshark gets exactly the
    // web pod's port-80 packets, as tcpdump sees them on its veth.
    let wireshark = create_tool(&c, "wireshark");
    create_policy(
        &c,
        json!({"name": "web-http", "namespaces": ["shop"],
               "podSelector": {"matchLabels": {"app": "web"}},
               "rules": [{"protocol": "tcp", "ports": ["80"]}],
               "filter": "tcp port 80", "slice": {"payload": 128},
               "tools": ["wireshark"]}),
    );
    let tshark = ready_and_listening(&c, "web-http", "wireshark", &wireshark, 1);
    let web_veth = c.host_veth("shop", "web");
    let tcpdump = Capture::tcpdump(&web_veth, "tcp port 80", c.dir.path(), "web-veth");
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..5 {
        let page = wait_for("web answers", Duration::from_secs(10), || {
            http_get(&web, 80)
        });
        assert!(page.contains("tapped page"), "{page}");
        http_get(&other, 80).expect("other answers");
    }
    let wire = wait_for("tcpdump's packets", Duration::from_secs(5), || {
        let n = tcpdump.packets().len();
        (n >= 50).then_some(n)
    });
    wait_for(
        "the tool to have what the wire carried",
        Duration::from_secs(10),
        || (tshark.packets().len() >= wire).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (tool, wire) = (tshark.stop(), tcpdump.stop());
    if let Err(e) = same_packets(&tool, &wire) {
        panic!("tshark and tcpdump disagree: {e}");
    }
    assert_eq!(
        from_or_to(&tool, &other),
        0,
        "other's packets reached tshark"
    );
    assert!(
        tool.iter().all(|p| p.data.len() <= 14 + 20 + 60 + 128),
        "sliced to headers + 128 bytes of payload"
    );
    eprintln!("1. tshark got the {} packets tcpdump saw", tool.len());

    // PATCH the selector while a second policy streams numbered datagrams:
    // the new pod is tapped, nothing restarted, the second stream whole.
    let pids_before = (pids("tap-agent"), pids("aggregator"));
    assert_eq!(pids_before.0.len(), 1, "one tap-agent: {pids_before:?}");
    assert_eq!(pids_before.1.len(), 1, "one aggregator: {pids_before:?}");
    let sequence = create_tool(&c, "sequence");
    create_policy(
        &c,
        json!({"name": "other-udp", "namespaces": ["shop"],
               "podSelector": {"matchLabels": {"app": "other"}},
               "rules": [{"protocol": "udp", "ports": ["9999"], "direction": "toPod"}],
               "tools": ["sequence"]}),
    );
    let seq_capture = ready_and_listening(&c, "other-udp", "sequence", &sequence, 1);
    let web_capture = Capture::tshark(&wireshark, c.dir.path(), "wireshark-2");
    wait_for("tshark back on wireshark", Duration::from_secs(20), || {
        let t = c.rest("GET", "/v1/tools/wireshark", None).body;
        (t["status"]["clients"].as_u64() >= Some(1)).then_some(())
    });
    const DATAGRAMS: u32 = 600;
    let sender = {
        let other = other.clone();
        std::thread::spawn(move || {
            send_numbered(&other, 9999, "seq", 0..DATAGRAMS, Duration::from_millis(5))
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let patched = c.rest(
        "PATCH",
        "/v1/policies/web-http",
        Some(r#"{"podSelector": {"matchLabels": {"app": "api"}}}"#),
    );
    assert_eq!(patched.status, 200, "{}", patched.raw);
    wait_for("api's traffic at tshark", Duration::from_secs(10), || {
        http_get(&api, 80)?;
        (from_or_to(&web_capture.packets(), &api) > 0).then_some(())
    });
    // Web is no longer tapped: its requests leave no trace, while a later
    // request to api (a marker) arrives.
    let mark = web_capture.packets().len();
    for _ in 0..3 {
        http_get(&web, 80).expect("web answers");
    }
    http_get(&api, 80).expect("api answers");
    wait_for("the marker request", Duration::from_secs(10), || {
        (from_or_to(&web_capture.packets()[mark..], &api) >= 6).then_some(())
    });
    assert_eq!(
        from_or_to(&web_capture.packets()[mark..], &web),
        0,
        "web still tapped after the selector moved to api"
    );
    sender.join().unwrap();
    wait_for("every numbered datagram", Duration::from_secs(10), || {
        (numbers(&seq_capture.packets(), "seq").len() >= DATAGRAMS as usize).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = numbers(&seq_capture.stop(), "seq");
    assert_eq!(
        got,
        (0..DATAGRAMS).collect::<Vec<_>>(),
        "the second policy lost or repeated packets while the first changed"
    );
    drop(web_capture);
    assert_eq!(
        (pids("tap-agent"), pids("aggregator")),
        pids_before,
        "a process restarted"
    );
    eprintln!("1. selector moved live; {DATAGRAMS} numbered datagrams of another policy all arrived, same PIDs");

    kubectl_and_rest_see_each_other(&c);
    capture_stops_after_max_packets(&c, &other);
    tap_state_follows_heartbeats(&c);
    deleted_workloads_come_back(&c);

    // The restored taps and aggregator carry the policies as before.
    let capture = ready_and_listening(&c, "web-http", "wireshark", &wireshark, 1);
    wait_for(
        "api's traffic through the restored pair",
        Duration::from_secs(20),
        || {
            http_get(&api, 80)?;
            (from_or_to(&capture.packets(), &api) > 0).then_some(())
        },
    );
}

/// Acceptance 2: Bad input: 422 naming the field, nothing stored; 412; 401.
fn refuses_bad_input(c: &Cluster) {
    let create_tool = c.rest(
        "POST",
        "/v1/tools",
        Some(r#"{"name": "t", "type": "pcapOverIp", "listen": "127.0.0.1:1"}"#),
    );
    assert_eq!(create_tool.status, 201, "{}", create_tool.raw);
    let cases = [
        (
            r#"{"name": "p", "tools": ["t"], "colour": "red"}"#,
            "colour",
        ),
        (
            r#"{"name": "p", "tools": ["t"], "podSelector": {"matchLabels": {"-bad-": "x"}}}"#,
            "podSelector.matchLabels",
        ),
        (
            r#"{"name": "p", "tools": ["t"], "rules": [{"cidrs": ["10.0.0.0/33"]}]}"#,
            "rules[0].cidrs[0]",
        ),
        (
            r#"{"name": "p", "tools": ["t"], "rules": [{"protocol": "tcp", "ports": ["80", "80-70"]}]}"#,
            "rules[0].ports[1]",
        ),
        (
            r#"{"name": "p", "tools": ["t"], "filter": "tcp port eighty"}"#,
            "filter",
        ),
        (r#"{"name": "p", "tools": ["nosuch"]}"#, "tools[0]"),
    ];
    for (body, field) in cases {
        let a = c.rest("POST", "/v1/policies", Some(body));
        assert_eq!(a.status, 422, "{body}: {}", a.raw);
        assert_eq!(
            a.header("content-type"),
            Some("application/problem+json"),
            "{}",
            a.raw
        );
        let named = a.body["errors"].as_array().is_some_and(|es| {
            es.iter()
                .any(|e| e["field"].as_str().is_some_and(|f| f.starts_with(field)))
        });
        assert!(named, "{body}: no error names {field}: {}", a.raw);
        assert_eq!(
            c.rest("GET", "/v1/policies/p", None).status,
            404,
            "{body} was stored"
        );
    }
    let stale = c.curl(
        "DELETE",
        "/v1/tools/t",
        None,
        &[
            &format!("Authorization: Bearer {}", c.token()),
            "If-Match: \"1\"",
        ],
    );
    assert_eq!(stale.status, 412, "{}", stale.raw);
    assert_eq!(c.curl("GET", "/v1/tools", None, &[]).status, 401);
    assert_eq!(
        c.curl("GET", "/v1/tools", None, &["Authorization: Bearer wrong"])
            .status,
        401
    );
    let etag = c.rest("GET", "/v1/tools/t", None);
    let etag = etag.header("etag").expect("ETag").to_string();
    let deleted = c.curl(
        "DELETE",
        "/v1/tools/t",
        None,
        &[
            &format!("Authorization: Bearer {}", c.token()),
            &format!("If-Match: {etag}"),
        ],
    );
    assert_eq!(deleted.status, 204, "{}", deleted.raw);
    eprintln!("2. bad input refused with the field named; 412; 401");
}

/// Acceptance 3: kubectl and the REST API create the same object and see each other's
/// edits.
fn kubectl_and_rest_see_each_other(c: &Cluster) {
    let spec = json!({"namespaces": ["shop"], "podSelector": {"matchLabels": {"app": "web"}},
                      "rules": [{"protocol": "tcp", "ports": ["8080"], "direction": "both"}],
                      "tools": ["wireshark"]});
    let mut rest_body = spec.clone();
    rest_body["name"] = json!("by-rest");
    create_policy(c, rest_body);
    c.apply(
        &json!({"apiVersion": "tapestry.io/v1alpha1", "kind": "TapPolicy",
                "metadata": {"name": "by-kubectl"}, "spec": spec})
        .to_string(),
    );
    let spec_of = |name: &str| {
        let out = c.must(&["get", "tappolicy", name, "-o", "jsonpath={.spec}"]);
        serde_json::from_str::<Value>(&out).unwrap()
    };
    assert_eq!(spec_of("by-rest"), spec_of("by-kubectl"));
    let rest = |name: &str| {
        let mut body = c.rest("GET", &format!("/v1/policies/{name}"), None).body;
        let map = body.as_object_mut().unwrap();
        for k in ["name", "resourceVersion", "status"] {
            map.remove(k);
        }
        body
    };
    assert_eq!(rest("by-rest"), rest("by-kubectl"));
    c.must(&[
        "patch",
        "tappolicy",
        "by-rest",
        "--type=merge",
        "-p",
        r#"{"spec":{"enabled":false}}"#,
    ]);
    assert_eq!(
        rest("by-rest")["enabled"],
        false,
        "REST sees kubectl's edit"
    );
    let a = c.rest(
        "PATCH",
        "/v1/policies/by-kubectl",
        Some(r#"{"snaplen": 96}"#),
    );
    assert_eq!(a.status, 200, "{}", a.raw);
    assert_eq!(
        spec_of("by-kubectl")["snaplen"],
        96,
        "kubectl sees REST's edit"
    );
    for name in ["by-rest", "by-kubectl"] {
        assert_eq!(
            c.rest("DELETE", &format!("/v1/policies/{name}"), None)
                .status,
            204
        );
    }
    eprintln!("3. kubectl and REST agree");
}

/// Acceptance 6: maxPackets: exactly that many packets, then the capture stops and
/// says so.
fn capture_stops_after_max_packets(c: &Cluster, other: &str) {
    let capped = create_tool(c, "capped");
    create_policy(
        c,
        json!({"name": "capped", "namespaces": ["shop"],
               "podSelector": {"matchLabels": {"app": "other"}},
               "rules": [{"protocol": "udp", "ports": ["7777"], "direction": "toPod"}],
               "limits": {"maxPackets": 100}, "tools": ["capped"]}),
    );
    let capture = ready_and_listening(c, "capped", "capped", &capped, 1);
    send_numbered(other, 7777, "cap", 0..300, Duration::from_millis(1));
    let stopped = wait_for("the capture stopped", Duration::from_secs(15), || {
        let status = c.rest("GET", "/v1/policies/capped/status", None).body;
        status.get("stopped").filter(|s| !s.is_null()).cloned()
    });
    assert_eq!(stopped["reason"], "MaxPackets", "{stopped}");
    std::thread::sleep(Duration::from_secs(1));
    let got = numbers(&capture.stop(), "cap");
    assert_eq!(got, (0..100).collect::<Vec<_>>(), "exactly the first 100");
    eprintln!("6. stopped after 100 packets: {stopped}");
}

/// Acceptance 4: The tap's state: Pending after two missed heartbeats, Disconnected
/// after three, Connected again once its pod's container is restarted.
fn tap_state_follows_heartbeats(c: &Cluster) {
    let tap = pids("tap-agent");
    assert_eq!(tap.len(), 1, "{tap:?}");
    let pid = tap[0] as i32;
    // A frozen tap sends no heartbeat; killing it lets the node restart it.
    // SAFETY: signalling a process this test's cluster started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let frozen = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    let mut observe = |c: &Cluster| {
        let nodes = c.rest("GET", "/v1/nodes", None).body;
        let state = nodes["items"][0]["tap"].as_str().unwrap_or("").to_string();
        if seen.last() != Some(&state) {
            eprintln!("   tap {state} at {:?}", frozen.elapsed());
            seen.push(state.clone());
        }
        state
    };
    wait_for("Disconnected", Duration::from_secs(30), || {
        (observe(c) == "Disconnected").then_some(())
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("Connected again", Duration::from_secs(90), || {
        (observe(c) == "Connected").then_some(())
    });
    assert_eq!(seen, ["Connected", "Pending", "Disconnected", "Connected"]);
    assert_ne!(pids("tap-agent"), tap, "a new tap-agent process");
    eprintln!("4. tap states {seen:?}");
}

/// Acceptance 5: The tap-agent DaemonSet and the aggregator Deployment, deleted by
/// hand, are restored.
fn deleted_workloads_come_back(c: &Cluster) {
    for (kind, name) in [("daemonset", "tap-agent"), ("deployment", "aggregator")] {
        let uid = |c: &Cluster| {
            c.kubectl(&[
                "get",
                kind,
                name,
                "-n",
                "tapestry-system",
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .ok()
            .filter(|u| !u.is_empty())
        };
        let before = uid(c).expect("deployed");
        c.must(&[
            "delete",
            kind,
            name,
            "-n",
            "tapestry-system",
            "--wait=false",
        ]);
        let after = wait_for(
            &format!("{kind} {name} restored"),
            Duration::from_secs(30),
            || uid(c).filter(|u| *u != before),
        );
        eprintln!("5. {kind} {name} restored as {after}");
    }
    wait_for("the tap Connected again", Duration::from_secs(120), || {
        let nodes = c.rest("GET", "/v1/nodes", None).body;
        (nodes["items"][0]["tap"] == "Connected").then_some(())
    });
    // The replaced pods go once their processes have stopped.
    wait_for(
        "one tap-agent and one aggregator pod",
        Duration::from_secs(60),
        || {
            let names: BTreeSet<String> = c
                .must(&[
                    "get",
                    "pods",
                    "-n",
                    "tapestry-system",
                    "-o",
                    "jsonpath={.items[*].metadata.name}",
                ])
                .split_whitespace()
                .map(str::to_string)
                .collect();
            (names.len() == 2).then_some(())
        },
    );
}

/// A second machine: a network namespace joined to the host by a veth pair
/// (host 10.250.77.1, node 10.250.77.2), with a route to its pod range.
struct Machine {
    ns: &'static str,
    pod_cidr: &'static str,
}

const MACHINE_HOST_IP: &str = "10.250.77.1";

impl Machine {
    fn new(ns: &'static str, pod_cidr: &'static str) -> Machine {
        let m = Machine { ns, pod_cidr };
        m.remove();
        let script = format!(
            "ip netns add {ns} && ip link add tpe2e-h type veth peer name eth0 netns {ns} && \
             ip addr add {MACHINE_HOST_IP}/30 dev tpe2e-h && ip link set tpe2e-h up && \
             ip -n {ns} addr add 10.250.77.2/30 dev eth0 && ip -n {ns} link set eth0 up && \
             ip -n {ns} link set lo up && ip -n {ns} route add default via {MACHINE_HOST_IP} && \
             ip route add {pod_cidr} via 10.250.77.2"
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        m
    }

    fn remove(&self) {
        for args in [
            vec!["route", "del", self.pod_cidr],
            vec!["link", "del", "tpe2e-h"],
            vec!["netns", "del", self.ns],
        ] {
            let _ = Command::new("ip")
                .args(&args)
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `tapestry node` on that machine, stopped with SIGTERM.
struct JoinedNode(Child);

impl JoinedNode {
    fn start(c: &Cluster, machine: &Machine, name: &str, bridge: &str) -> JoinedNode {
        let data = c.dir.path().join(name);
        build_busybox_image(c.dir.path(), &data);
        let log = std::fs::File::create(c.dir.path().join(format!("{name}.log"))).unwrap();
        // nsenter changes only the network namespace: the node keeps the
        // host's cgroup mounts, as a second machine has its own.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", machine.ns))
            .arg(program_path("tapestry").unwrap())
            .arg("node")
            .args(["--server", &format!("https://{}", c.api)])
            .arg("--token-file")
            .arg(c.data().join("node-token"))
            .arg("--ca-file")
            .arg(c.data().join("pki/ca.crt"))
            .arg("--data-dir")
            .arg(&data)
            .args(["--name", name, "--kubelet-port", &free_port().to_string()])
            .args(["--pod-cidr", machine.pod_cidr, "--bridge", bridge])
            .arg("--stop-pods-on-exit")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tapestry node");
        JoinedNode(child)
    }
}

impl Drop for JoinedNode {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Acceptance 4: a node joins with a matching pod bound to it; within
/// 2 s of its Ready condition the pod's packets reach the tool and
/// `/v1/nodes` shows the node's tap Connected.
#[test]
fn a_joining_node_is_tapped_within_two_seconds_of_ready() {
    if !require(
        "a_joining_node_is_tapped_within_two_seconds_of_ready",
        &["kubectl", "curl", "tshark", "ip", "nsenter"],
    ) {
        return;
    }
    let _serial = serial();
    let machine = Machine::new("tpe2e-m2", "10.252.9.0/24");
    let c = Cluster::up_on(MACHINE_HOST_IP, BRIDGE, POD_CIDR);
    let tool = create_tool(&c, "joined-tool");
    create_policy(
        &c,
        json!({"name": "late", "namespaces": ["shop"],
               "podSelector": {"matchLabels": {"app": "late"}},
               "rules": [{"protocol": "udp", "ports": ["5555"]}],
               "tools": ["joined-tool"]}),
    );
    wait_for("tool Ready", Duration::from_secs(20), || {
        ready(&c.rest("GET", "/v1/tools/joined-tool", None).body["status"]).then_some(())
    });
    let capture = Capture::tshark(&tool, c.dir.path(), "joined-tool");
    wait_for("tshark connected", Duration::from_secs(20), || {
        let t = c.rest("GET", "/v1/tools/joined-tool", None).body;
        (t["status"]["clients"].as_u64() >= Some(1)).then_some(())
    });
    // The pod is bound to the node before the node exists.
    c.must(&["create", "namespace", "shop"]);
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "late", "namespace": "shop", "labels": {"app": "late"}},
                "spec": {"nodeName": "joined",
                         "containers": [{"name": "c", "image": "busybox:local",
                                         "imagePullPolicy": "Never",
                                         "command": ["sleep", "3600"]}]}})
        .to_string(),
    );
    let _node = JoinedNode::start(&c, &machine, "joined", "tpe2e1");
    let token = c.token();
    let ready_at = wait_for("node joined Ready", Duration::from_secs(60), || {
        let out = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(c.data().join("pki/ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("https://{}/api/v1/nodes/joined", c.api))
            .output()
            .ok()?;
        let node: Value = serde_json::from_slice(&out.stdout).ok()?;
        let ready = node["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready.then(SystemTime::now)
    });
    // Traffic to the pod from the moment it has an address.
    let ip = c.running("shop", "late");
    eprintln!(
        "   the pod ran {:?} after Ready",
        SystemTime::now()
            .duration_since(ready_at)
            .unwrap_or_default()
    );
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (sending, ip) = (sending.clone(), ip.clone());
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            while sending.load(Ordering::Relaxed) {
                let _ = sock.send_to(b"late", (ip.as_str(), 5555));
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let first = wait_for(
        "the late pod's first packet",
        Duration::from_secs(30),
        || {
            capture
                .packets()
                .iter()
                .find(|p| ipv4_addresses(&p.data).is_some_and(|(_, d)| d == ip))
                .map(|p| p.ts)
        },
    );
    let ready = ready_at.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let after = first.saturating_sub(ready);
    eprintln!(
        "4. node Ready -> first packet of its pod at the tool: {:?} (packet {} Ready)",
        first.abs_diff(ready),
        if first >= ready { "after" } else { "before" }
    );
    wait_for(
        "the joined node's tap Connected",
        Duration::from_secs(10),
        || {
            let nodes = c.rest("GET", "/v1/nodes/joined", None).body;
            (nodes["tap"] == "Connected").then_some(())
        },
    );
    sending.store(false, Ordering::Relaxed);
    sender.join().unwrap();
    assert!(
        after < Duration::from_secs(2),
        "the joined node's pod was tapped {after:?} after the node turned Ready"
    );
}
