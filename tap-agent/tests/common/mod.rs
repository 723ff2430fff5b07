//! Test fixtures: network namespaces joined by a veth pair, running code and
//! processes inside them, a receiving TapIngest server, tcpdump and pcap
//! reading. Everything real: root, kernel, tcpdump, bpftool.
#![allow(dead_code)]

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use tapestry_proto::records;
use tapestry_proto::tap::v1::Hello;
use tapestry_proto::tap::v2::{
    tap_ingest_server::{TapIngest, TapIngestServer},
    Ack, Batch,
};
use tokio_stream::StreamExt as _;

/// One agent at a time: `bpftool prog` is machine-wide.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this test can run: root, bpffs, tools. In CI a missing
/// requirement fails loudly; elsewhere the test is skipped with a message.
pub fn require_root(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for tool in ["ip", "tcpdump", "bpftool"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
            && Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: needs {} (run as root with iproute2, tcpdump, bpftool)",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI is set, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {msg}");
    false
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, `a` and `b`, joined by veth `tap_if` (in a, the tapped
/// side) <-> `peer_if` (in b). a = 10.77.N.1, b = 10.77.N.2; no IPv6, static
/// neighbours, so the only traffic on the link is the test's.
pub struct Pair {
    pub a: String,
    pub b: String,
    pub tap_if: String,
    pub peer_if: String,
    pub ip_a: Ipv4Addr,
    pub ip_b: Ipv4Addr,
}

impl Pair {
    pub fn new() -> Pair {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = std::process::id() % 100_000;
        let a = format!("tapt{id}-{n}a");
        let b = format!("tapt{id}-{n}b");
        let tap_if = format!("tta{n}");
        let peer_if = format!("ttb{n}");
        let net = 10 + (id * 7 + n) % 200;
        let ip_a = Ipv4Addr::new(10, 77, net as u8, 1);
        let ip_b = Ipv4Addr::new(10, 77, net as u8, 2);
        let p = Pair {
            a,
            b,
            tap_if,
            peer_if,
            ip_a,
            ip_b,
        };
        for ns in [&p.a, &p.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            sh(&format!("ip netns add {ns}"));
            sh(&format!(
                "ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 && ip -n {ns} link set lo up"
            ));
        }
        sh(&format!(
            "ip -n {a} link add {ta} type veth peer name {tb} netns {b}",
            a = p.a,
            ta = p.tap_if,
            tb = p.peer_if,
            b = p.b
        ));
        let mac_a = "02:00:00:00:0a:01";
        let mac_b = "02:00:00:00:0b:02";
        sh(&format!(
            "ip -n {a} link set {ta} address {mac_a} && ip -n {b} link set {tb} address {mac_b} && \
             ip -n {a} addr add {ip_a}/24 dev {ta} && ip -n {b} addr add {ip_b}/24 dev {tb} && \
             ip -n {a} link set {ta} up && ip -n {b} link set {tb} up && \
             ip -n {a} neigh replace {ip_b} lladdr {mac_b} dev {ta} nud permanent && \
             ip -n {b} neigh replace {ip_a} lladdr {mac_a} dev {tb} nud permanent",
            a = p.a,
            b = p.b,
            ta = p.tap_if,
            tb = p.peer_if,
            ip_a = p.ip_a,
            ip_b = p.ip_b
        ));
        p
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The namespace name that means "this process's own network namespace".
pub const HOST_NETNS: &str = "";

/// Runs `f` on a thread that has entered network namespace `ns`; sockets
/// it creates stay in that namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    let enter = ns != HOST_NETNS;
    std::thread::spawn(move || {
        if !enter {
            return f();
        }
        let file = File::open(&path).unwrap();
        // SAFETY: a valid netns fd; affects only this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// `GET path` over HTTP/1.0 to 127.0.0.1:port inside `ns`.
pub fn http_get(ns: &str, port: u16, path: &str) -> Option<String> {
    let path = path.to_string();
    in_netns(ns, move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

/// A metric's value from the agent's /metrics (labels included in `name`).
pub fn metric(ns: &str, port: u16, name: &str) -> Option<u64> {
    let body = http_get(ns, port, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A received packet, read from a batch's records.
#[derive(Clone, Debug)]
pub struct Packet {
    pub timestamp_ns: u64,
    pub source_id: u32,
    pub direction: i32,
    pub wire_length: u32,
    pub data: Vec<u8>,
    pub policy_mask: u64,
}

/// A received batch.
#[derive(Clone, Debug)]
pub struct ReceivedBatch {
    pub sequence: u64,
    pub hello: Option<Hello>,
    pub dropped_since_last: u64,
    pub resumed_after: u64,
    pub packets: Vec<Packet>,
}

/// What the receiving server got.
#[derive(Default)]
pub struct Received {
    pub batches: Vec<ReceivedBatch>,
    pub streams: u32,
    pub packets: u64,
    pub bytes: u64,
    pub dropped_reported: u64,
    /// The last sequence taken in.
    pub last_sequence: u64,
    /// Keep the batches (tests) or only count them (benchmarks).
    pub keep: bool,
}

#[derive(Clone, Default)]
pub struct Sink(pub Arc<Mutex<Received>>);

type Acks = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Ack, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl TapIngest for Sink {
    type StreamStream = Acks;

    async fn stream(
        &self,
        req: tonic::Request<tonic::Streaming<Batch>>,
    ) -> Result<tonic::Response<Acks>, tonic::Status> {
        let mut s = req.into_inner();
        let sink = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            sink.0.lock().unwrap().streams += 1;
            let mut first = true;
            let mut resumed = 0;
            while let Some(Ok(b)) = s.next().await {
                if first {
                    first = false;
                    resumed = sink.0.lock().unwrap().last_sequence.max(b.resumed_after);
                }
                let packets: Vec<Packet> = records::read(b.record_format, b.records.clone())
                    .expect("record format")
                    .map(|r| {
                        let (r, data) = r.expect("well-formed records");
                        Packet {
                            timestamp_ns: r.timestamp_ns,
                            source_id: r.source_id,
                            direction: i32::from(r.direction),
                            wire_length: r.wire_length,
                            data: data.to_vec(),
                            policy_mask: r.policy_mask,
                        }
                    })
                    .collect();
                {
                    let mut r = sink.0.lock().unwrap();
                    r.packets += packets.len() as u64;
                    r.bytes += packets.iter().map(|p| p.data.len() as u64).sum::<u64>();
                    r.dropped_reported += b.dropped_since_last;
                    r.last_sequence = b.sequence;
                    if r.keep {
                        r.batches.push(ReceivedBatch {
                            sequence: b.sequence,
                            hello: b.hello,
                            dropped_since_last: b.dropped_since_last,
                            resumed_after: b.resumed_after,
                            packets,
                        });
                    }
                }
                let _ = tx
                    .send(Ok(Ack {
                        through_sequence: b.sequence,
                        resumed_through: resumed,
                    }))
                    .await;
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl Sink {
    pub fn packet_count(&self) -> usize {
        self.0.lock().unwrap().packets as usize
    }
}

/// A TapIngest server listening on 127.0.0.1:`port` inside `ns`, served by
/// the given runtime.
pub struct Server {
    pub sink: Sink,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn start(rt: &tokio::runtime::Runtime, ns: &str, port: u16) -> Server {
        Self::start_with(rt, ns, port, true)
    }

    /// A server that only counts what it receives.
    pub fn start_counting(rt: &tokio::runtime::Runtime, ns: &str, port: u16) -> Server {
        Self::start_with(rt, ns, port, false)
    }

    fn start_with(rt: &tokio::runtime::Runtime, ns: &str, port: u16, keep: bool) -> Server {
        let std_listener = in_netns(ns, move || {
            let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        });
        let sink = Sink::default();
        sink.0.lock().unwrap().keep = keep;
        let svc = TapIngestServer::new(sink.clone()).max_decoding_message_size(256 << 20);
        let task = rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        Server { sink, task }
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// A running tap-agent inside a namespace.
pub struct Agent {
    pub child: Child,
    pub ns: String,
    pub metrics_port: u16,
    pub log: PathBuf,
}

pub const METRICS_PORT: u16 = 9464;
pub const GRPC_PORT: u16 = 50051;

impl Agent {
    pub fn start(ns: &str, log_dir: &Path, args: &[&str]) -> Agent {
        let log = log_dir.join(format!("agent-{}.log", NEXT.fetch_add(1, Ordering::SeqCst)));
        let mut command = if ns == HOST_NETNS {
            Command::new(env!("CARGO_BIN_EXE_tap-agent"))
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_tap-agent")]);
            c
        };
        let child = command
            .arg("run")
            .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut a = Agent {
            child,
            ns: ns.to_string(),
            metrics_port: METRICS_PORT,
            log,
        };
        a.wait_healthy();
        a
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tap-agent exited early ({status}):\n{}", self.log_text());
            }
            if let Some(body) = http_get(&self.ns, self.metrics_port, "/healthz") {
                if body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200") {
                    if body.contains("attached_interfaces 0") {
                        continue;
                    }
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tap-agent not healthy in time:\n{}", self.log_text());
    }

    pub fn metric(&self, name: &str) -> u64 {
        metric(&self.ns, self.metrics_port, name)
            .unwrap_or_else(|| panic!("metric {name} missing:\n{}", self.log_text()))
    }

    pub fn kernel(&self, counter: &str) -> u64 {
        self.metric(&format!(
            "tapestry_tap_kernel_packets_total{{counter=\"{counter}\"}}"
        ))
    }

    /// Like [`wait_until`], but a timeout shows the agent's log and metrics.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !f() {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\n--- agent log ---\n{}\n--- metrics ---\n{}",
                    self.log_text(),
                    http_get(&self.ns, self.metrics_port, "/metrics").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns whether it exited 0.
    pub fn terminate(self) -> bool {
        let mut this = self;
        this.terminate_inner()
    }

    fn terminate_inner(&mut self) -> bool {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            assert!(
                Instant::now() < deadline,
                "agent ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(self) {
        let mut this = self;
        this.kill_inner();
    }

    fn kill_inner(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    /// A failed test must not leave an agent (and its attachments) behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// tcpdump writing a pcap of `iface` inside `ns`.
pub struct Tcpdump {
    child: Child,
    pub file: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Tcpdump {
    pub fn start(ns: &str, iface: &str, file: &Path, filter: &[&str]) -> Tcpdump {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "tcpdump",
                "-i",
                iface,
                "-n",
                "-U",
                "--immediate-mode",
                "-B",
                "524288",
                "-s",
                "0",
                "-w",
            ])
            .arg(file)
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for "listening on".
        let stderr = child.stderr.take().unwrap();
        let mut r = BufReader::new(stderr);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "tcpdump: {line}");
        let stderr = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = r.read_to_string(&mut rest);
            rest
        });
        Tcpdump {
            child,
            file: file.to_path_buf(),
            stderr: Some(stderr),
        }
    }

    /// Waits until tcpdump has written everything it was handed (the file
    /// stops growing), then stops it and reads the capture. `None` when
    /// tcpdump itself lost packets ("dropped by kernel"): then it is no
    /// reference, and the caller retries.
    pub fn stop(mut self) -> Option<Vec<PcapPacket>> {
        let mut last = (0u64, Instant::now());
        let start = Instant::now();
        loop {
            let len = std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
            if len != last.0 {
                last = (len, Instant::now());
            } else if last.1.elapsed() > Duration::from_millis(700)
                || start.elapsed() > Duration::from_secs(30)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap_or_default();
        eprintln!("tcpdump: {}", stderr.trim());
        let dropped: u64 = stderr
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if dropped > 0 {
            eprintln!("tcpdump dropped {dropped} packets: its capture is no reference, retrying");
            return None;
        }
        Some(read_pcap(&self.file))
    }
}

#[derive(Clone, Debug)]
pub struct PcapPacket {
    pub orig_len: u32,
    pub data: Vec<u8>,
}

/// Minimal pcap (not pcapng) reader.
pub fn read_pcap(path: &Path) -> Vec<PcapPacket> {
    let b = std::fs::read(path).unwrap();
    assert!(b.len() >= 24, "pcap too short");
    let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
    assert!(
        magic == 0xa1b2c3d4 || magic == 0xa1b23c4d,
        "not a little-endian pcap"
    );
    let mut off = 24;
    let mut out = Vec::new();
    while off + 16 <= b.len() {
        let incl = u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap()) as usize;
        let orig = u32::from_le_bytes(b[off + 12..off + 16].try_into().unwrap());
        off += 16;
        if off + incl > b.len() {
            break;
        }
        out.push(PcapPacket {
            orig_len: orig,
            data: b[off..off + incl].to_vec(),
        });
        off += incl;
    }
    out
}

/// Tapestry programs attached: clsact filters on interfaces of `ns`
/// (`bpftool net show`) plus TCX links (`bpftool link show`; Debian 12's
/// bpftool 7.1 does not list TCX under `net`, and links are machine-wide,
/// which is why the tests run one agent at a time).
pub fn tapestry_attachments(ns: &str) -> Vec<String> {
    let mut out: Vec<String> = sh(&format!("ip netns exec {ns} bpftool net show"))
        .lines()
        .filter(|l| l.contains("tapestry_"))
        .map(str::to_string)
        .collect();
    let progs: serde_json::Value = serde_json::from_str(&sh("bpftool -j prog show")).unwrap();
    let names: std::collections::HashMap<u64, String> = progs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect();
    let links: serde_json::Value = serde_json::from_str(&sh("bpftool -j link show")).unwrap();
    for l in links.as_array().unwrap() {
        // TCX is link type 11 (older bpftool prints the number).
        let tcx = l["type"] == 11 || l["type"] == "tcx";
        let name = l["prog_id"].as_u64().and_then(|id| names.get(&id));
        if let (true, Some(name)) = (tcx, name) {
            if name.starts_with("tapestry_") {
                out.push(format!("tcx link {} prog {} {name}", l["id"], l["prog_id"]));
            }
        }
    }
    out
}

/// `bpftool prog show`: ids of loaded tapestry programs (machine-wide).
pub fn tapestry_programs() -> Vec<String> {
    sh("bpftool prog show")
        .lines()
        .filter(|l| l.contains("tapestry_"))
        .map(str::to_string)
        .collect()
}

/// Runs a test body that compares against tcpdump up to 3 times: the body
/// returns false when tcpdump could not keep up (a loaded machine), never
/// when the tap is wrong (that panics).
pub fn with_reference_retries(name: &str, mut body: impl FnMut() -> bool) {
    for attempt in 1..=3 {
        if body() {
            return;
        }
        eprintln!("{name}: attempt {attempt}: tcpdump dropped packets");
    }
    panic!("{name}: tcpdump dropped packets in 3 attempts, nothing to compare against");
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// UDP echo server in `a`, client in `b`: `count` datagrams of `size`
/// bytes carrying a sequence number, at most `window` unanswered.
pub fn udp_echo(pair: &Pair, port: u16, count: u32, size: usize, window: u32) -> u32 {
    let ip_a = pair.ip_a;
    let server = in_netns(&pair.a, move || {
        std::net::UdpSocket::bind((ip_a, port)).unwrap()
    });
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        let mut n = 0;
        while let Ok((len, from)) = server.recv_from(&mut buf) {
            server.send_to(&buf[..len], from).unwrap();
            n += 1;
        }
        n
    });
    let ip_b = pair.ip_b;
    let client = in_netns(&pair.b, move || {
        std::net::UdpSocket::bind((ip_b, 0)).unwrap()
    });
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; size];
    let mut rbuf = [0u8; 65536];
    let (mut sent, mut got) = (0u32, 0u32);
    while sent < count {
        while sent < count && sent - got < window {
            buf[..4].copy_from_slice(&sent.to_be_bytes());
            client.send_to(&buf, (ip_a, port)).unwrap();
            sent += 1;
        }
        match client.recv(&mut rbuf) {
            Ok(_) => got += 1,
            Err(_) => got = sent, // lost: move on (the tap must still agree with tcpdump)
        }
    }
    while got < sent {
        if client.recv(&mut rbuf).is_err() {
            break;
        }
        got += 1;
    }
    echo.join().unwrap()
}

/// Sends `bytes` over TCP from b to a:`port` and waits for all to arrive.
pub fn tcp_transfer(pair: &Pair, port: u16, bytes: usize) {
    let ip_a = pair.ip_a;
    let listener = in_netns(&pair.a, move || {
        std::net::TcpListener::bind((ip_a, port)).unwrap()
    });
    let recv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let mut s = in_netns(&pair.b, move || TcpStream::connect((ip_a, port)).unwrap());
    let chunk: Vec<u8> = (0..1 << 16).map(|i| (i * 31 % 251) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    drop(s);
    assert_eq!(recv.join().unwrap(), bytes);
}
