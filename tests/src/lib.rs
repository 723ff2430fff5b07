//! What the end-to-end tests drive: a `tapestry up` cluster as a user starts
//! it (its fleet manager deploying the tap-agent and the aggregator as pods),
//! the fleet manager's REST API through curl, kubectl, and tshark and tcpdump
//! capturing as a security tool and an operator would.

pub mod api;
pub mod node;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether this test can run: root and the machine's tools. In CI a missing
/// requirement fails loudly; elsewhere the test is skipped with a message.
pub fn require(test: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    missing.extend(missing_tools_and_programs(
        tools,
        &["tapestry", "tap-agent", "aggregator"],
    ));
    verdict(test, missing)
}

/// Like [`require`] for a test that runs as any user and needs only these
/// tools (commands, or absolute paths) and workspace programs.
pub fn require_programs(test: &str, tools: &[&str], programs: &[&str]) -> bool {
    verdict(test, missing_tools_and_programs(tools, programs))
}

fn missing_tools_and_programs(tools: &[&str], programs: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    for tool in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(tool.to_string());
        }
    }
    for program in programs {
        if program_path(program).is_none() {
            missing.push(format!(
                "the {program} binary (cargo build --workspace --bins)"
            ));
        }
    }
    missing
}

fn verdict(test: &str, missing: Vec<String>) -> bool {
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI is set, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// A program of the workspace, next to this test's directory in the target
/// dir (`cargo test --workspace` builds them all).
pub fn program_path(name: &str) -> Option<PathBuf> {
    // Tests run from target/PROFILE/deps, programs from target/PROFILE.
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|path| path.is_file() && *path != exe)
}

/// The administrator's bearer token in a server's data directory.
pub fn admin_token(data: &Path) -> String {
    std::fs::read_to_string(data.join("tokens.csv"))
        .expect("tokens.csv")
        .lines()
        .find(|l| l.contains(",admin,"))
        .and_then(|l| l.split(',').next())
        .expect("the admin token")
        .to_string()
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `f` every 100 ms until it returns Some, or panics naming `what`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A one-node `tapestry up` cluster with its own bridge, pod range, ports and
/// data directory, stopped with SIGTERM (which removes its pods).
pub struct Cluster {
    child: Child,
    /// Read once from the tokens file the server writes.
    token: std::sync::OnceLock<String>,
    pub dir: tempfile::TempDir,
    pub api: String,
    pub fleet: String,
    pub bridge: String,
}

/// An HTTP answer as curl saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub raw: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One end-to-end test at a time: clusters share the aggregator's ports.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `busybox:local` (httpd and sh, a page saying "tapped page") in the image
/// store of the node data directory `data`.
pub fn build_busybox_image(work: &Path, data: &Path) {
    let rootfs = work.join("rootfs");
    if !rootfs.exists() {
        for d in ["bin", "var/www"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "httpd", "sleep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("var/www/index.html"), "tapped page\n").unwrap();
    }
    let built = Command::new(program_path("tapestry").expect("tapestry binary"))
        .args(["image", "build", "busybox:local", "--rootfs"])
        .arg(&rootfs)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "tapestry image build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
}

impl Cluster {
    /// Starts the cluster with a busybox image (`busybox:local`: httpd and
    /// sh), and waits until the fleet manager answers and the node's tap is
    /// connected.
    pub fn up(bridge: &str, pod_cidr: &str) -> Cluster {
        Self::up_on("127.0.0.1", bridge, pod_cidr)
    }

    /// The same with the API server (and so the node) on `host`.
    pub fn up_on(host: &str, bridge: &str, pod_cidr: &str) -> Cluster {
        let mut cluster = Self::start(host, bridge, &["--pod-cidr", pod_cidr]);
        let started = Instant::now();
        wait_for("the node's tap Connected", Duration::from_secs(90), || {
            cluster.exited();
            let nodes = cluster.rest("GET", "/v1/nodes", None).body;
            (nodes["items"][0]["tap"] == "Connected").then_some(())
        });
        eprintln!(
            "node tapped {:?} after the fleet manager answered",
            started.elapsed()
        );
        cluster
    }

    /// `tapestry up` with these extra arguments on `host`, its node 1's pods
    /// on `bridge`, with `busybox:local` in its image store; returns once
    /// the API server and the fleet manager answer. Its standard output
    /// goes to `up.out`, its log to `up.log`.
    pub fn start(host: &str, bridge: &str, extra: &[&str]) -> Cluster {
        let tapestry = program_path("tapestry").expect("tapestry binary");
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        build_busybox_image(dir.path(), &data);
        let api = format!("{host}:{}", free_port());
        let fleet = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
        let out = std::fs::File::create(dir.path().join("up.out")).unwrap();
        let child = Command::new(&tapestry)
            .arg("up")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &api, "--fleet-manager-listen", &fleet])
            .args(["--kubelet-port", &free_port().to_string()])
            .args(["--bridge", bridge])
            .args(extra)
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawning tapestry up");
        let mut cluster = Cluster {
            child,
            token: std::sync::OnceLock::new(),
            dir,
            api,
            fleet,
            bridge: bridge.to_string(),
        };
        let started = Instant::now();
        wait_for("the API server", Duration::from_secs(60), || {
            cluster.exited();
            cluster.kubectl(&["get", "--raw", "/readyz"]).ok()
        });
        wait_for("the fleet manager", Duration::from_secs(60), || {
            cluster.exited();
            (cluster.rest("GET", "/healthz", None).status == 200).then_some(())
        });
        eprintln!("cluster up in {:?}", started.elapsed());
        cluster
    }

    /// What `tapestry up` printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.out")).unwrap_or_default()
    }

    /// Waits until `tapestry up` exits (after `tapestry down`); its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        wait_for("tapestry up to exit", within, || {
            self.child.try_wait().ok().flatten()
        })
    }

    fn exited(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default();
            panic!("tapestry up exited early ({status}):\n{log}");
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data().join("kubeconfig")
    }

    /// The administrator's bearer token (the kubeconfig's).
    pub fn token(&self) -> String {
        self.token.get_or_init(|| admin_token(&self.data())).clone()
    }

    /// kubectl with the cluster's kubeconfig; stdout, or stderr as the error.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        // A discovery cache per cluster: kubectl would otherwise map kinds
        // from the cache of an earlier cluster on the same port.
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        // kubectl's own waits can be endless (`delete` waits up to a week):
        // a command past the limit is killed and fails the test by name.
        let pid = child.id();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait_with_output());
        });
        let Ok(out) = finished.recv_timeout(Duration::from_secs(240)) else {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            return Err(format!(
                "kubectl {} did not finish within 240 s; killed",
                args.join(" ")
            ));
        };
        let out = out.unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_stdin(args, None)
    }

    /// kubectl that must succeed.
    pub fn must(&self, args: &[&str]) -> String {
        self.kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    pub fn apply(&self, manifest: &str) {
        if let Err(e) = self.kubectl_stdin(&["apply", "-f", "-"], Some(manifest)) {
            panic!("kubectl apply: {e}\n{manifest}");
        }
    }

    /// A request to the fleet manager's REST API with the admin token.
    pub fn rest(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        let auth = format!("Authorization: Bearer {}", self.token());
        self.curl(method, path, body, &[&auth])
    }

    /// A request to the fleet manager with exactly these extra headers.
    pub fn curl(&self, method: &str, path: &str, body: Option<&str>, headers: &[&str]) -> Answer {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-i", "--max-time", "20", "-X", method, "--cacert"])
            .arg(self.data().join("pki/ca.crt"));
        for h in headers {
            cmd.args(["-H", h]);
        }
        if let Some(body) = body {
            let content_type = if method == "PATCH" {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            cmd.args(["-H", &format!("Content-Type: {content_type}")])
                .args(["--data-binary", body]);
        }
        cmd.arg(format!("https://{}{path}", self.fleet));
        let out = cmd.output().expect("curl");
        parse_answer(&out)
    }

    /// A field of a Service (a JSONPath such as `.spec.clusterIP`).
    pub fn service_field(&self, ns: &str, name: &str, path: &str) -> String {
        self.must(&[
            "get",
            "service",
            name,
            "-n",
            ns,
            "-o",
            &format!("jsonpath={{{path}}}"),
        ])
    }

    /// How many ready addresses the Endpoints `ns/name` list.
    pub fn ready_endpoints(&self, ns: &str, name: &str) -> usize {
        self.kubectl(&[
            "get",
            "endpoints",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.subsets[*].addresses[*].ip}",
        ])
        .map(|s| s.split_whitespace().count())
        .unwrap_or(0)
    }

    /// The pod's host-side interface, as its kubelet recorded it.
    pub fn host_veth(&self, ns: &str, pod: &str) -> String {
        self.must(&[
            "get",
            "pod",
            "-n",
            ns,
            pod,
            "-o",
            "jsonpath={.metadata.annotations.tapestry\\.io/host-veth}",
        ])
    }

    /// Waits until the pod runs; its IP.
    pub fn running(&self, ns: &str, pod: &str) -> String {
        wait_for(
            &format!("pod {ns}/{pod} Running"),
            Duration::from_secs(60),
            || {
                let out = self
                    .kubectl(&[
                        "get",
                        "pod",
                        "-n",
                        ns,
                        pod,
                        "-o",
                        "jsonpath={.status.phase} {.status.podIP}",
                    ])
                    .ok()?;
                let (phase, ip) = out.split_once(' ')?;
                (phase == "Running" && !ip.is_empty()).then(|| ip.to_string())
            },
        )
    }
}

fn parse_answer(out: &Output) -> Answer {
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    // Informational answers (100 Continue) come first; the last head counts.
    let mut rest = raw.as_str();
    let (head, body) = loop {
        let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        if head.starts_with("HTTP/") && head.split_whitespace().nth(1) == Some("100") {
            rest = body;
            continue;
        }
        break (head, body);
    };
    let mut lines = head.lines();
    // 0: no HTTP answer at all (e.g. nothing listens yet); `raw` says why.
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
        raw: if status == 0 {
            String::from_utf8_lossy(&out.stderr).into_owned()
        } else {
            raw
        },
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("TAPESTRY_E2E_KEEP").is_some() {
            eprintln!("keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // Nodes in namespaces stop their pods within 30 s each, together.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// One captured packet: its length on the wire and the bytes kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// When the tap (or tcpdump) captured it, since the Unix epoch.
    pub ts: Duration,
    pub orig_len: u32,
    pub data: Vec<u8>,
}

/// A capture running in the background (tshark or tcpdump) into a pcap file.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// `tshark -i TCP@ADDR`: a security tool reading PCAP-over-IP.
    pub fn tshark(addr: &str, dir: &Path, name: &str) -> Capture {
        Self::tshark_in(None, addr, dir, name)
    }

    /// [`Capture::tshark`] inside network namespace `netns`.
    pub fn tshark_in(netns: Option<&str>, addr: &str, dir: &Path, name: &str) -> Capture {
        let file = dir.join(format!("{name}.pcap"));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tshark"]);
                c
            }
            None => Command::new("tshark"),
        };
        let child = command
            .args(["-q", "-i", &format!("TCP@{addr}"), "-F", "pcap", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tshark");
        Capture { child, file }
    }

    /// `tcpdump -i IFACE FILTER`: what the interface really carried.
    /// Returns once tcpdump says it is listening.
    pub fn tcpdump(iface: &str, filter: &str, dir: &Path, name: &str) -> Capture {
        let file = dir.join(format!("{name}.pcap"));
        let mut child = Command::new("tcpdump")
            .args(["-i", iface, "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("tcpdump did not start listening within 20 s");
        Capture { child, file }
    }

    /// The packets written so far.
    pub fn packets(&self) -> Vec<Packet> {
        let Ok(file) = std::fs::File::open(&self.file) else {
            return Vec::new();
        };
        let Ok(mut reader) = pcap_file::pcap::PcapReader::new(file) else {
            return Vec::new();
        };
        let mut packets = Vec::new();
        // A record still being written ends the read.
        while let Some(Ok(p)) = reader.next_packet() {
            packets.push(Packet {
                ts: p.timestamp,
                orig_len: p.orig_len,
                data: p.data.into_owned(),
            });
        }
        packets
    }

    /// Whether the capture process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the capture (SIGINT, so it flushes) and returns its packets.
    pub fn stop(mut self) -> Vec<Packet> {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.packets()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `tool` holds the same packets as `wire`, each cut at most to what
/// the tool kept (a slice keeps a prefix and the wire length); the first
/// packet that does not match, if any.
pub fn same_packets(tool: &[Packet], wire: &[Packet]) -> Result<(), String> {
    if tool.len() != wire.len() {
        return Err(format!(
            "the tool got {} packets, the wire carried {}",
            tool.len(),
            wire.len()
        ));
    }
    let mut left: Vec<&Packet> = wire.iter().collect();
    for (i, p) in tool.iter().enumerate() {
        let Some(at) = left
            .iter()
            .position(|w| w.orig_len == p.orig_len && w.data.starts_with(&p.data))
        else {
            return Err(format!(
                "the tool's packet {i} ({} of {} bytes) was not on the wire",
                p.data.len(),
                p.orig_len
            ));
        };
        left.swap_remove(at);
    }
    Ok(())
}

/// The IPv4 source and destination of an Ethernet frame.
pub fn ipv4_addresses(frame: &[u8]) -> Option<(String, String)> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = |b: &[u8]| format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3]);
    Some((ip(&frame[26..30]), ip(&frame[30..34])))
}

/// The PIDs of the processes running `program` (by executable name).
pub fn pids(program: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-x", program])
        .output()
        .expect("pgrep");
    let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    pids.sort();
    pids
}

/// An HTTP/1.0 GET to ip:port from this host; the answer.
pub fn http_get(ip: &str, port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect((ip, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").ok()?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).ok()?;
    Some(out)
}

/// The `web-…` pod that answered a GET to ip:port from this host (the
/// tests' web pods serve their own name).
pub fn web_pod_at(ip: &str, port: u16) -> Option<String> {
    let reply = http_get(ip, port)?;
    let body = reply.split("\r\n\r\n").nth(1)?.trim();
    body.starts_with("web-").then(|| body.to_string())
}

/// A shell command for a busybox pod: GET / from ip:port (ip may be a
/// `$(…)` expansion), the body on standard output. wget, not nc: busybox
/// nc ends with status 0 and prints nothing when a read fails, which hides
/// what went wrong; wget exits non-zero and says why. (`timeout`, because
/// this busybox's `wget -T` crashes.)
pub fn get_in_pod(ip: &str, port: u16) -> String {
    format!("busybox timeout 3 busybox wget -q -O - http://{ip}:{port}/")
}
