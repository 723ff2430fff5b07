//! Live reconfiguration, driven through the same handle the TapPolicy and
//! TapTool watchers feed (no API server needed): sequence-numbered
//! traffic from a synthetic tap on the real ingest protocol, real
//! PCAP-over-IP clients, and a recorder in place of the status writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tapestry_aggregator::cluster::status::{Kind, StatusKey, StatusWriter};
use tapestry_aggregator::cluster::{Change, ClusterHandle};
use tapestry_aggregator::serve::{self, LiveOptions, ServeOptions, Source};
use tapestry_aggregator::synth::{self, Frame};
use tapestry_aggregator::synthtap::{self, TapSpec};
use tapestry_proto::crd::{TapPolicy, TapTool};
use tokio::io::AsyncReadExt;

/// The latest status written for each object.
#[derive(Default)]
struct Recorder(Mutex<HashMap<StatusKey, Value>>);

impl StatusWriter for Recorder {
    fn write<'a>(
        &'a self,
        key: &'a StatusKey,
        status: &'a Value,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.0.lock().unwrap().insert(key.clone(), status.clone());
        Box::pin(async { Ok(()) })
    }
}

struct Live {
    grpc: String,
    http: String,
    handle: ClusterHandle,
    status: Arc<Recorder>,
}

impl Live {
    async fn start() -> Live {
        let status = Arc::new(Recorder::default());
        let running = serve::start(ServeOptions {
            grpc: "127.0.0.1:0".into(),
            http_tls: false,
            http: "127.0.0.1:0".into(),
            tls: None,
            source: Source::Live(LiveOptions {
                status: status.clone(),
                status_period: Duration::from_millis(100),
                advertise_host: None,
                client: None,
                pods: None,
            }),
        })
        .await
        .unwrap();
        Live {
            grpc: running.grpc.to_string(),
            http: running.http.to_string(),
            handle: running.cluster.unwrap(),
            status,
        }
    }

    /// The body of `GET path` on the HTTP listener, read until `enough`
    /// bytes arrived or the server closed.
    async fn http_get(&self, path: &str, enough: usize) -> Vec<u8> {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(&self.http).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let body = out.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            if body.is_some_and(|b| out.len() - b >= enough) {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("GET {path}: {e}"),
            }
        }
        let b = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(out.len(), |i| i + 4);
        out.split_off(b)
    }

    async fn metric(&self, line_start: &str) -> Option<f64> {
        let body = self.http_get("/metrics", usize::MAX).await;
        String::from_utf8_lossy(&body).lines().find_map(|l| {
            l.strip_prefix(line_start)
                .and_then(|v| v.trim().parse().ok())
        })
    }

    async fn apply(&self, c: Change) {
        self.handle.apply(c).await.unwrap();
    }

    async fn tool(&self, name: &str, spec: Value) {
        self.apply(Change::Tool(Box::new(tool(name, spec)))).await;
    }

    async fn policy(&self, name: &str, generation: i64, spec: Value) {
        self.apply(Change::Policy(Box::new(policy(name, generation, spec))))
            .await;
    }

    /// Waits until the object's latest status satisfies `ok`.
    async fn wait_status(&self, kind: Kind, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let key = StatusKey {
            kind,
            name: name.into(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let last = self.status.0.lock().unwrap().get(&key).cloned();
            if let Some(v) = &last {
                if ok(v) {
                    return v.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} {name}: status stayed {last:?}",
                kind.as_str()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where a PCAP-over-IP tool listens, once it is ready.
    async fn address(&self, tool: &str) -> String {
        let s = self
            .wait_status(Kind::TapTool, tool, |s| s["address"].is_string())
            .await;
        s["address"].as_str().unwrap().to_string()
    }

    /// A client of a PCAP-over-IP tool, once the tool counts it.
    async fn client(&self, tool: &str) -> PcapClient {
        let before = self.clients(tool).await;
        let c = PcapClient::connect(&self.address(tool).await).await;
        self.wait_status(Kind::TapTool, tool, |s| s["clients"] == json!(before + 1))
            .await;
        c
    }

    async fn clients(&self, tool: &str) -> u64 {
        self.wait_status(Kind::TapTool, tool, |s| s["clients"].is_u64())
            .await["clients"]
            .as_u64()
            .unwrap()
    }

    /// Streams `seqs` as one tap that carries policies `names` (every
    /// packet tagged with all of them).
    fn send(
        &self,
        names: &[&str],
        seqs: std::ops::Range<u64>,
        rate: f64,
    ) -> tokio::task::JoinHandle<()> {
        let spec = TapSpec {
            tap_id: "node-a".into(),
            pods: vec![("web".into(), "frontend-0".into())],
            policy_names: names.iter().map(|n| n.to_string()).collect(),
            batch: 64,
            rate: Some(rate),
            stamp_now: false,
        };
        let mask = (1u64 << names.len()) - 1;
        let frames = seqs.map(|s| (seq_frame(s), mask)).collect();
        let endpoint = synthtap::plaintext(&self.grpc).unwrap();
        tokio::spawn(async move {
            synthtap::run(endpoint, spec, frames).await.unwrap();
        })
    }
}

fn tool(name: &str, spec: Value) -> TapTool {
    serde_json::from_value(json!({
        "apiVersion": "tapestry.io/v1alpha1",
        "kind": "TapTool",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

fn policy(name: &str, generation: i64, spec: Value) -> TapPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tapestry.io/v1alpha1",
        "kind": "TapPolicy",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": generation},
        "spec": spec,
    }))
    .unwrap()
}

/// UDP 10.0.0.1:40000 → 10.0.0.2:9000 carrying `seq` (big endian) at
/// frame offset 42, then padding.
fn seq_frame(seq: u64) -> Frame {
    let mut payload = seq.to_be_bytes().to_vec();
    payload.resize(64, 0xab);
    let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let ip_len = (20 + 8 + payload.len()) as u16;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&ip_len.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    let c = synth::ipv4_checksum(&p[14..34]);
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&9000u16.to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&payload);
    Frame {
        ts_ns: 1_700_000_000_000_000_000 + seq * 1_000,
        data: p,
    }
}

/// Reads a PCAP-over-IP stream, keeping each packet's sequence number.
struct PcapClient {
    seqs: Arc<Mutex<Vec<u64>>>,
    closed: Arc<AtomicBool>,
}

impl PcapClient {
    async fn connect(addr: &str) -> PcapClient {
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let seqs = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let (s, c) = (seqs.clone(), closed.clone());
        tokio::spawn(async move {
            let read = async {
                let mut header = [0u8; 24];
                sock.read_exact(&mut header).await?;
                loop {
                    let mut rec = [0u8; 16];
                    sock.read_exact(&mut rec).await?;
                    let len = u32::from_le_bytes(rec[8..12].try_into().unwrap()) as usize;
                    let mut data = vec![0u8; len];
                    sock.read_exact(&mut data).await?;
                    let seq = data
                        .get(42..50)
                        .map_or(u64::MAX, |b| u64::from_be_bytes(b.try_into().unwrap()));
                    s.lock().unwrap().push(seq);
                }
                #[allow(unreachable_code)]
                Ok::<_, std::io::Error>(())
            };
            let _ = read.await;
            c.store(true, Ordering::SeqCst);
        });
        PcapClient { seqs, closed }
    }

    fn seqs(&self) -> Vec<u64> {
        self.seqs.lock().unwrap().clone()
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits until `n` packets arrived (or fails), then a moment more so
    /// any packet too many would show.
    async fn wait_for(&self, n: usize) -> Vec<u64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.seqs.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "received {} of {n} packets",
                self.seqs.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.seqs()
    }
}

fn pcap_tool(listen: &str) -> Value {
    json!({"type": "pcapOverIp", "listen": listen})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn editing_and_deleting_one_policy_and_tool_leaves_another_untouched() {
    let live = Live::start().await;
    live.tool("ta", pcap_tool("127.0.0.1:0")).await;
    live.tool("tb", pcap_tool("127.0.0.1:0")).await;
    live.policy("a", 1, json!({"filter": "udp", "tools": ["ta"]}))
        .await;
    live.policy("b", 1, json!({"filter": "udp", "tools": ["tb"]}))
        .await;
    let a_client = live.client("ta").await;
    let b_client = live.client("tb").await;

    const N: u64 = 30_000;
    let sender = live.send(&["a", "b"], 0..N, 15_000.0);

    // While b's traffic flows, a goes through every kind of change.
    let pause = || tokio::time::sleep(Duration::from_millis(150));
    pause().await;
    live.policy("a", 2, json!({"filter": "udp port 9000", "tools": ["ta"]}))
        .await;
    pause().await;
    live.policy(
        "a",
        3,
        json!({"filter": "udp", "slice": {"snaplen": 60}, "dedup": {}, "tools": ["ta"]}),
    )
    .await;
    pause().await;
    live.policy("a", 4, json!({"filter": "udp", "tools": []}))
        .await;
    pause().await;
    live.policy(
        "a",
        5,
        json!({"filter": "udp", "toolGroups": [{"name": "g", "tools": ["ta"]}]}),
    )
    .await;
    pause().await;
    // The tool itself changes: stopped, then bound again on its port.
    let ta_addr = live.address("ta").await;
    live.tool(
        "ta",
        json!({"type": "pcapOverIp", "listen": ta_addr, "snaplen": 1500}),
    )
    .await;
    let ready = live
        .wait_status(Kind::TapTool, "ta", |s| {
            s["conditions"][0]["status"] == "True" && s["clients"] == 0
        })
        .await;
    assert_eq!(
        ready["address"],
        json!(ta_addr),
        "rebound on the same address"
    );
    pause().await;
    live.apply(Change::PolicyDeleted("a".into())).await;
    pause().await;
    live.policy("a", 1, json!({"filter": "tcp", "tools": ["ta"]}))
        .await;
    pause().await;
    live.apply(Change::ToolDeleted("ta".into())).await;
    live.policy("c", 1, json!({"tools": ["nowhere"]})).await;
    pause().await;
    live.apply(Change::PolicyDeleted("c".into())).await;

    sender.await.unwrap();
    let got = b_client.wait_for(N as usize).await;
    assert!(!b_client.closed(), "b's client was disconnected");
    let missing = (0..N).filter(|s| got.binary_search(s).is_err()).count();
    assert_eq!(got.len() as u64, N, "{missing} of b's packets missing");
    assert!(
        got.iter().copied().eq(0..N),
        "b's packets out of order or duplicated"
    );
    // a's client was a client of the changed tool: it was disconnected,
    // after receiving a prefix of the traffic.
    assert!(
        a_client.closed(),
        "a client of a replaced tool stays connected"
    );
    assert!(!a_client.seqs().is_empty());

    let b = live
        .wait_status(Kind::TapPolicy, "b", |s| s["delivered"]["tb"] == json!(N))
        .await;
    assert_eq!(b["dropped"], json!(0), "{b}");
    assert!(b.get("stopped").is_none(), "{b}");
    let tb = live
        .wait_status(Kind::TapTool, "tb", |s| s["deliveredPackets"] == json!(N))
        .await;
    assert_eq!(tb["clients"], json!(1), "{tb}");
    assert_eq!(tb["dropped"], json!(0), "{tb}");

    // Per-policy and per-tool series; deleted ones are gone.
    let route = "tapestry_aggregator_policy_tool_packets_total{policy=\"b\",tool=\"tb\"}";
    assert_eq!(live.metric(route).await, Some(N as f64));
    let ready = "tapestry_aggregator_sink_ready{sink=\"tb\",type=\"pcap_over_ip\"}";
    assert_eq!(live.metric(ready).await, Some(1.0));
    let gone = "tapestry_aggregator_policy_received_total{policy=\"c\"}";
    assert_eq!(live.metric(gone).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_packets_delivers_exactly_the_limit_to_each_tool() {
    let live = Live::start().await;
    for t in ["t1", "t2", "g1", "g2"] {
        live.tool(t, pcap_tool("127.0.0.1:0")).await;
    }
    let spec = |max: u64| {
        json!({
            "filter": "udp",
            "tools": ["t1", "t2"],
            "toolGroups": [{"name": "ids", "tools": ["g1", "g2"]}],
            "limits": {"maxPackets": max},
        })
    };
    live.policy("lim", 1, spec(100)).await;
    let mut clients = HashMap::new();
    for t in ["t1", "t2", "g1", "g2"] {
        clients.insert(t, live.client(t).await);
    }
    // Batches of 64 from several streams at once: the limit falls inside
    // a batch, and counting must hold across batches and streams.
    let senders: Vec<_> = (0..4)
        .map(|i| live.send(&["lim"], i * 250..(i + 1) * 250, 20_000.0))
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    let stopped = live
        .wait_status(Kind::TapPolicy, "lim", |s| s.get("stopped").is_some())
        .await;
    assert_eq!(stopped["stopped"]["reason"], "MaxPackets", "{stopped}");
    assert!(
        stopped["stopped"]["at"].as_str().unwrap().ends_with('Z'),
        "{stopped}"
    );
    assert_eq!(stopped["delivered"]["t1"], json!(100), "{stopped}");
    assert_eq!(stopped["delivered"]["t2"], json!(100), "{stopped}");
    let g = |t: &str| stopped["delivered"][t].as_u64().unwrap();
    assert_eq!(g("g1") + g("g2"), 100, "{stopped}");

    let t1 = clients["t1"].wait_for(100).await;
    let t2 = clients["t2"].wait_for(100).await;
    assert_eq!(t1.len(), 100);
    assert_eq!(t1, t2, "both tools get the same packets");
    let mut group: Vec<u64> = clients["g1"].seqs();
    group.extend(clients["g2"].seqs());
    group.sort_unstable();
    let mut each = t1.clone();
    each.sort_unstable();
    assert_eq!(group, each, "the group shares exactly those packets");

    // A stopped policy stays stopped: more traffic, the same status again.
    live.send(&["lim"], 1000..1500, 20_000.0).await.unwrap();
    live.policy("lim", 1, spec(100)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(clients["t1"].seqs().len(), 100);

    // A new spec runs it again, counting from zero; `stopped` goes.
    live.policy("lim", 2, spec(30)).await;
    let running = live
        .wait_status(Kind::TapPolicy, "lim", |s| s.get("stopped").is_none())
        .await;
    assert_eq!(running["delivered"]["t1"], json!(0), "{running}");
    live.send(&["lim"], 2000..2100, 20_000.0).await.unwrap();
    let t1 = clients["t1"].wait_for(130).await;
    assert_eq!(t1.len(), 130);
    assert!(t1[100..].iter().copied().eq(2000..2030));
    let again = live
        .wait_status(Kind::TapPolicy, "lim", |s| s.get("stopped").is_some())
        .await;
    assert_eq!(again["delivered"]["t2"], json!(30), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_limit_stops_a_policy_without_traffic() {
    let live = Live::start().await;
    live.tool("t", json!({"type": "grpc"})).await;
    live.policy(
        "short",
        1,
        json!({"tools": ["t"], "limits": {"duration": "300ms"}}),
    )
    .await;
    let s = live
        .wait_status(Kind::TapPolicy, "short", |s| s.get("stopped").is_some())
        .await;
    assert_eq!(s["stopped"]["reason"], "Duration", "{s}");
    assert!(
        s["stopped"]["message"].as_str().unwrap().contains("300ms"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_that_cannot_bind_is_not_ready_and_the_others_are() {
    let live = Live::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    live.tool("good", pcap_tool("127.0.0.1:0")).await;
    let good_client = live.client("good").await;
    live.tool("bad", pcap_tool(&format!("127.0.0.1:{port}")))
        .await;
    let bad = live
        .wait_status(Kind::TapTool, "bad", |s| {
            s["conditions"][0]["status"] == "False"
        })
        .await;
    let c = &bad["conditions"][0];
    assert_eq!(c["type"], "Ready");
    assert_eq!(c["reason"], "StartFailed");
    assert!(
        c["message"].as_str().unwrap().contains("in use"),
        "the OS error is reported: {c}"
    );
    assert!(bad.get("address").is_none(), "{bad}");
    let good = live
        .wait_status(Kind::TapTool, "good", |s| s["clients"] == 1)
        .await;
    assert_eq!(good["conditions"][0]["status"], "True", "{good}");
    assert!(!good_client.closed());

    // Once the address is free, the same spec starts.
    drop(taken);
    live.tool("bad", pcap_tool(&format!("127.0.0.1:{port}")))
        .await;
    let fixed = live
        .wait_status(Kind::TapTool, "bad", |s| {
            s["conditions"][0]["status"] == "True"
        })
        .await;
    assert_eq!(fixed["address"], json!(format!("127.0.0.1:{port}")));

    // An HTTP tool is served on the aggregator's HTTP listener, under
    // its name.
    live.tool("stream", json!({"type": "http", "snaplen": 96}))
        .await;
    let stream = live
        .wait_status(Kind::TapTool, "stream", |s| s["address"].is_string())
        .await;
    let path = "/v1/tools/stream/pcap";
    assert_eq!(
        stream["address"],
        json!(format!("http://{}{path}", live.http))
    );
    let header = live.http_get(path, 24).await;
    assert_eq!(&header[..4], &0xa1b2_c3d4u32.to_le_bytes());
    assert_eq!(&header[16..20], &96u32.to_le_bytes(), "the tool's snaplen");

    // A spec the aggregator cannot run says so.
    live.tool("odd", json!({"type": "vxlan"})).await;
    let odd = live
        .wait_status(Kind::TapTool, "odd", |s| {
            s["conditions"][0]["status"] == "False"
        })
        .await;
    assert_eq!(odd["conditions"][0]["reason"], "InvalidSpec", "{odd}");
}

#[tokio::test]
async fn a_stopping_aggregator_reports_its_tools_not_ready_before_it_goes() {
    let live = Live::start().await;
    live.tool("t", pcap_tool("127.0.0.1:0")).await;
    let _client = live.client("t").await;
    tokio::time::timeout(Duration::from_secs(5), live.apply(Change::Stop))
        .await
        .expect("the stop is written within 5 s");
    // Done means written: no waiting for another round.
    let key = StatusKey {
        kind: Kind::TapTool,
        name: "t".into(),
    };
    let last = live.status.0.lock().unwrap()[&key].clone();
    let c = &last["conditions"][0];
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("AggregatorStopped")),
        "{last}"
    );
    assert!(
        last.get("clients").is_none() && last.get("address").is_none(),
        "{last}"
    );
}
