//! The fleet manager as a user meets it: `tapestry up` deploys the taps and
//! the aggregator by itself; policies and tools are created through the REST
//! API with curl; tshark receives the selected pods' traffic over
//! PCAP-over-IP, packet for packet what tcpdump sees on their interfaces;
//! edits apply live without restarting anything; the tap's state follows its
//! heartbeats; what is deleted by hand comes back.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tapestry_e2e::api::*;
use tapestry_e2e::node::{join_and_time, Machine, MACHINE_HOST_IP};
use tapestry_e2e::*;

const BRIDGE: &str = "tpfleet0";
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

/// Waits until the aggregator serves the tool and the node's tap runs the
/// policy on `pods` pods; then starts tshark on the tool and waits until the
/// aggregator counts it as a client.
fn ready_and_listening(c: &Cluster, policy: &str, tool: &str, addr: &str, pods: u64) -> Capture {
    wait_for(
        &format!("tool {tool} Ready"),
        Duration::from_secs(20),
        || {
            let t = c.rest("GET", &format!("/v1/tools/{tool}"), None).body;
            ready_condition(&t["status"]).then_some(())
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
    // Over mutual TLS: the tap and the aggregator hold certificates the
    // cluster issued them through CertificateSigningRequests.
    let csrs: serde_json::Value =
        serde_json::from_str(&c.must(&["get", "csr", "-o", "json"])).unwrap();
    for signer in ["tapestry.io/tap-client", "tapestry.io/aggregator-serving"] {
        assert!(
            csrs["items"].as_array().unwrap().iter().any(|r| {
                r["spec"]["signerName"] == signer
                    && r["status"]["certificate"]
                        .as_str()
                        .is_some_and(|c| !c.is_empty())
            }),
            "no certificate issued by {signer}: {csrs}"
        );
    }

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
    tools_stream_only_with_their_token(&c);
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

/// Acceptance 2: Bad input: 422 naming the field, nothing stored; 412;
/// 401; 403 for a user RBAC does not allow.
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
    // A valid token whose user RBAC grants no tools: 403, worded like the
    // cluster's refusals.
    let node_token = std::fs::read_to_string(c.data().join("node-token")).unwrap();
    let refused = c.curl(
        "POST",
        "/v1/tools",
        Some(r#"{"name": "n", "type": "pcapOverIp", "listen": "127.0.0.1:1"}"#),
        &[&format!("Authorization: Bearer {}", node_token.trim())],
    );
    assert_eq!(refused.status, 403, "{}", refused.raw);
    assert!(
        refused.body["detail"].as_str().is_some_and(
            |d| d.contains(r#"cannot create resource "taptools" in API group "tapestry.io""#)
        ),
        "{}",
        refused.raw
    );
    assert_eq!(
        c.curl("GET", "/v1/tools", None, &["Authorization: Bearer wrong"])
            .status,
        401
    );
    // The fleet manager writes the tool's status as well, which changes
    // its ETag: a careful client reads it again and retries on 412.
    let deleted = wait_for(
        "a delete with the current ETag",
        Duration::from_secs(10),
        || {
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
            (deleted.status != 412).then_some(deleted)
        },
    );
    assert_eq!(deleted.status, 204, "{}", deleted.raw);
    eprintln!("2. bad input refused with the field named; 412; 401");
}

/// A tool with a token Secret: its HTTP stream is served over TLS (a
/// certificate from the cluster CA) only to clients presenting the token.
fn tools_stream_only_with_their_token(c: &Cluster) {
    let token_secret = |token: &str| {
        c.must(&[
            "create",
            "secret",
            "generic",
            "stream-token",
            "-n",
            "tapestry-system",
            &format!("--from-literal=token={token}"),
        ]);
    };
    token_secret("e2e-stream-token");
    let body = json!({"name": "stream", "type": "http", "tokenSecret": "stream-token"});
    let a = c.rest("POST", "/v1/tools", Some(&body.to_string()));
    assert_eq!(a.status, 201, "{}", a.raw);
    let url = wait_for(
        "the stream tool Ready, with its address",
        Duration::from_secs(30),
        || {
            let t = c.rest("GET", "/v1/tools/stream", None).body;
            if !ready_condition(&t["status"]) {
                return None;
            }
            t["status"]["address"].as_str().map(String::from)
        },
    );
    assert!(url.starts_with("https://"), "{url}");
    let status = |token: Option<&str>| -> String {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            "--cacert",
        ])
        .arg(c.data().join("pki/ca.crt"));
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        String::from_utf8_lossy(&cmd.arg(&url).output().unwrap().stdout).into_owned()
    };
    assert_eq!(status(None), "401");
    assert_eq!(status(Some("not-the-token")), "401");
    // With it, the stream opens (curl's time limit ends it).
    assert_eq!(status(Some("e2e-stream-token")), "200");
    // A rotated token takes over, and the old one stops working, without
    // touching the tool.
    c.must(&["delete", "secret", "stream-token", "-n", "tapestry-system"]);
    token_secret("e2e-rotated-token");
    wait_for(
        "the rotated token to take over",
        Duration::from_secs(30),
        || {
            (status(Some("e2e-stream-token")) == "401"
                && status(Some("e2e-rotated-token")) == "200")
                .then_some(())
        },
    );
    // The certified tap's pod identities all stood against the
    // aggregator's own pod watch.
    let base = url.split("/v1/").next().unwrap();
    let metrics = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5", "--cacert"])
        .arg(c.data().join("pki/ca.crt"))
        .arg(format!("{base}/metrics"))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let foreign: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tapestry_aggregator_tap_foreign_pods_total{"))
        .collect();
    assert!(!foreign.is_empty(), "no tap in the metrics: {metrics}");
    assert!(foreign.iter().all(|l| l.ends_with(" 0")), "{foreign:?}");
    let gone = c.rest("DELETE", "/v1/tools/stream", None);
    assert!(gone.status < 300, "{}", gone.raw);
    eprintln!("3b. the HTTP tool streams over TLS only with its token");
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
        // A replacement started while the old pod still held its ports
        // restarts with the kubelet's back-off.
        Duration::from_secs(120),
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
        ready_condition(&c.rest("GET", "/v1/tools/joined-tool", None).body["status"]).then_some(())
    });
    let capture = Capture::tshark(&tool, c.dir.path(), "joined-tool");
    wait_for("tshark connected", Duration::from_secs(20), || {
        let t = c.rest("GET", "/v1/tools/joined-tool", None).body;
        (t["status"]["clients"].as_u64() >= Some(1)).then_some(())
    });
    c.must(&["create", "namespace", "shop"]);
    let join = join_and_time(&c, &machine, "joined", "tpe2e1", &capture);
    eprintln!(
        "4. node Ready -> first packet of its pod at the tool: {:?} (the pod ran after {:?})",
        join.tapped, join.pod_running
    );
    wait_for(
        "the joined node's tap Connected",
        Duration::from_secs(10),
        || {
            let nodes = c.rest("GET", "/v1/nodes/joined", None).body;
            (nodes["tap"] == "Connected").then_some(())
        },
    );
    // Two nodes, a page at a time, in name order.
    let all = c.rest("GET", "/v1/nodes", None).body;
    let names: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{all}");
    assert!(names[0] < names[1], "{all}");
    let first = c.rest("GET", "/v1/nodes?limit=1", None).body;
    assert_eq!(first["items"].as_array().map(Vec::len), Some(1), "{first}");
    assert_eq!(first["items"][0]["name"], names[0], "{first}");
    let token = first["continue"].as_str().expect("a continue token");
    let second = c
        .rest("GET", &format!("/v1/nodes?limit=1&continue={token}"), None)
        .body;
    assert_eq!(second["items"][0]["name"], names[1], "{second}");
    assert!(second.get("continue").is_none(), "{second}");
    assert!(
        join.tapped < Duration::from_secs(2),
        "the joined node's pod was tapped {:?} after the node turned Ready",
        join.tapped
    );
}
