//! Tap cost benchmark (run as root), as a user runs the tap:
//! `tap-agent run --iface VETH` → `aggregator serve --filter F
//! --pcap-over-ip` → a PCAP-over-IP reader, against `tcpdump -i VETH -w
//! /dev/null F` on the same veth.
//!
//! 1. iperf3 TCP throughput between two namespaces joined by a veth pair:
//!    untapped vs tapped (snaplen 128 and full packets) vs tcpdump,
//!    interleaved rounds, medians, ratios against the untapped anchor of
//!    the same run.
//! 2. Small UDP packets at the highest rate iperf3 makes here: captured/sent
//!    for the tap and for tcpdump (with its "dropped by kernel"), the
//!    records the tool read, and CPU time (user + system) per million
//!    packets of the tap-agent, the aggregator and tcpdump.
//!
//! ```
//! cargo build --release -p tapestry-aggregator
//! cargo bench -p tapestry-tap-agent --bench tap_throughput
//! ```
//! (TAP_BENCH_SECS, TAP_BENCH_ROUNDS change the run length; extra
//! tap-agent flags in TAP_BENCH_AGENT_ARGS; the results replace the marked
//! tap section of BENCHMARKS.md.)

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn iperf3(pair: &Pair, secs: u64, udp: bool) -> serde_json::Value {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &pair.b,
        "iperf3",
        "-c",
        &pair.ip_a.to_string(),
        "-p",
        "5201",
        "-J",
    ])
    .args(["-t", &secs.to_string()]);
    if udp {
        cmd.args(["-u", "-b", "0", "-l", "64"]);
    }
    let out = cmd.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    if let Some(err) = v.get("error") {
        panic!("iperf3: {err}");
    }
    v
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime); `after` starts at field 3.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as u64
}

struct TcpdumpNull {
    child: Child,
    stderr_file: std::path::PathBuf,
}

impl TcpdumpNull {
    fn start(pair: &Pair, dir: &std::path::Path, filter: &[&str]) -> TcpdumpNull {
        let stderr_file = dir.join(format!("tcpdump-{}.err", std::process::id()));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pair.a,
                "tcpdump",
                "-i",
                &pair.tap_if,
                "-n",
                "-s",
                "0",
                "-w",
                "/dev/null",
            ])
            .args(filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_file).unwrap())
            .spawn()
            .unwrap();
        wait_until("tcpdump to listen", Duration::from_secs(10), || {
            std::fs::read_to_string(&stderr_file)
                .unwrap_or_default()
                .contains("listening on")
        });
        TcpdumpNull { child, stderr_file }
    }

    /// Stops it; returns (captured, dropped by kernel, CPU seconds).
    fn stop(mut self, cpu_before: u64) -> (u64, u64, f64) {
        let cpu = cpu_ticks(self.child.id()) - cpu_before;
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait().unwrap();
        let err = std::fs::read_to_string(&self.stderr_file).unwrap_or_default();
        let num = |what: &str| {
            err.lines()
                .find(|l| l.contains(what))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (
            num("packets captured"),
            num("dropped by kernel"),
            cpu as f64 / ticks_per_sec() as f64,
        )
    }
}

/// The real aggregator in the tap's namespace, quick path, with one
/// PCAP-over-IP reader counting the records it gets.
struct AggregatorWithReader {
    child: Child,
    records: std::sync::Arc<std::sync::atomic::AtomicU64>,
    reader: Option<std::thread::JoinHandle<()>>,
}

const PCAP_OVER_IP_PORT: u16 = 57012;

impl AggregatorWithReader {
    fn start(pair: &Pair, dir: &std::path::Path, filter: &str) -> AggregatorWithReader {
        let bin =
            std::path::Path::new(env!("CARGO_BIN_EXE_tap-agent")).with_file_name("aggregator");
        assert!(
            bin.exists(),
            "{} is missing: build it first with `cargo build --release -p tapestry-aggregator`",
            bin.display()
        );
        let log = dir.join(format!("aggregator-{}.log", std::process::id()));
        let child = Command::new("ip")
            .args(["netns", "exec", &pair.a])
            .arg(&bin)
            .args(["serve", "--grpc", &format!("127.0.0.1:{GRPC_PORT}")])
            .args(["--http", "127.0.0.1:9091"])
            .args(["--pcap-over-ip", &format!("127.0.0.1:{PCAP_OVER_IP_PORT}")])
            .args(["--filter", filter])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let ns = pair.a.clone();
        let mut stream = None;
        wait_until(
            "the aggregator's PCAP-over-IP port",
            Duration::from_secs(10),
            || {
                let ns = ns.clone();
                stream = in_netns(&ns, || {
                    std::net::TcpStream::connect(("127.0.0.1", PCAP_OVER_IP_PORT)).ok()
                });
                stream.is_some()
            },
        );
        let records = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = records.clone();
        let mut stream = stream.unwrap();
        let reader = std::thread::spawn(move || count_pcap_records(&mut stream, &counted));
        AggregatorWithReader {
            child,
            records,
            reader: Some(reader),
        }
    }

    /// Stops it once the reader has had `settle` to catch up; returns the
    /// records the tool read.
    fn stop(mut self, settle: Duration) -> u64 {
        std::thread::sleep(settle);
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.records.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Reads a pcap stream to its end, counting records as they complete.
fn count_pcap_records(stream: &mut impl std::io::Read, records: &std::sync::atomic::AtomicU64) {
    let mut buf = vec![0u8; 1 << 20];
    let (mut filled, mut at) = (0usize, 24usize);
    loop {
        let n = match stream.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        filled += n;
        let mut complete = 0;
        while at + 16 <= filled {
            let incl = u32::from_le_bytes(buf[at + 8..at + 12].try_into().unwrap()) as usize;
            if at + 16 + incl > filled {
                break;
            }
            at += 16 + incl;
            complete += 1;
        }
        records.fetch_add(complete, std::sync::atomic::Ordering::Relaxed);
        // Keep the partial record at the front of the buffer.
        if at <= filled {
            buf.copy_within(at..filled, 0);
            filled -= at;
            at = 0;
        }
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Untapped,
    Tap128,
    TapFull,
    Tcpdump,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Untapped => "untapped (anchor)",
            Mode::Tap128 => "tap-agent, snaplen 128",
            Mode::TapFull => "tap-agent, full packets",
            Mode::Tcpdump => "tcpdump -w /dev/null",
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if !require_root("tap_throughput benchmark") {
        std::process::exit(1);
    }
    assert!(
        Command::new("iperf3")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok(),
        "iperf3 is needed (apt-get install iperf3)"
    );
    let secs = env_or("TAP_BENCH_SECS", 5);
    let rounds = env_or("TAP_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let mut iperf_server = Command::new("ip")
        .args(["netns", "exec", &pair.a, "iperf3", "-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let aggregator = format!("http://127.0.0.1:{GRPC_PORT}");
    let agent_args = |snaplen: Option<&str>, extra: &[&str]| {
        let mut a = vec![
            "--iface".to_string(),
            pair.tap_if.clone(),
            "--aggregator".into(),
            aggregator.clone(),
        ];
        if let Some(s) = snaplen {
            a.push("--snaplen".into());
            a.push(s.into());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(
            std::env::var("TAP_BENCH_AGENT_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from),
        );
        a
    };

    // 1. TCP throughput.
    let modes = [Mode::Untapped, Mode::Tap128, Mode::TapFull, Mode::Tcpdump];
    let mut gbps: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    let mut notes: Vec<String> = vec![String::new(); modes.len()];
    for round in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            let aggregator = matches!(mode, Mode::Tap128 | Mode::TapFull)
                .then(|| AggregatorWithReader::start(&pair, dir.path(), "tcp"));
            let agent = match mode {
                Mode::Tap128 | Mode::TapFull => {
                    let snap = if *mode == Mode::Tap128 {
                        Some("128")
                    } else {
                        None
                    };
                    let a = agent_args(snap, &[]);
                    let a: Vec<&str> = a.iter().map(String::as_str).collect();
                    Some(Agent::start(&pair.a, dir.path(), &a))
                }
                _ => None,
            };
            let tcpdump =
                (*mode == Mode::Tcpdump).then(|| TcpdumpNull::start(&pair, dir.path(), &[]));
            let v = iperf3(&pair, secs, false);
            let bps = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap();
            gbps[i].push(bps / 1e9);
            if let Some(agent) = agent {
                let (cap, full) = (agent.kernel("captured"), agent.kernel("ringbuf_full"));
                let qdrop = agent.metric("tapestry_tap_queue_dropped_packets_total");
                assert!(agent.terminate());
                let read = aggregator.map_or(0, |a| a.stop(Duration::from_millis(500)));
                notes[i] = format!("kernel captured {cap}, ring-full drops {full}, queue drops {qdrop}, the tool read {read} (last round)");
            }
            if let Some(t) = tcpdump {
                let (cap, dropped, _) = t.stop(0);
                notes[i] =
                    format!("tcpdump captured {cap}, dropped by kernel {dropped} (last round)");
            }
            eprintln!(
                "round {round} {:<26} {:6.2} Gbit/s",
                mode.label(),
                bps / 1e9
            );
        }
    }
    let anchor = median(gbps[0].clone());

    // 2. Small UDP packets, as fast as iperf3 sends them.
    let aggregator = AggregatorWithReader::start(&pair, dir.path(), "udp");
    let a = agent_args(Some("128"), &["--rule", "proto=udp"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let agent = Agent::start(&pair.a, dir.path(), &a);
    let (pid, aggregator_pid) = (agent.child.id(), aggregator.child.id());
    let (cpu0, aggregator_cpu0) = (cpu_ticks(pid), cpu_ticks(aggregator_pid));
    let v = iperf3(&pair, secs, true);
    let sent = v["end"]["sum"]["packets"].as_u64().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / ticks_per_sec() as f64;
    let aggregator_cpu =
        (cpu_ticks(aggregator_pid) - aggregator_cpu0) as f64 / ticks_per_sec() as f64;
    let (tap_cap, tap_full) = (agent.kernel("captured"), agent.kernel("ringbuf_full"));
    let tap_sent = agent.metric("tapestry_tap_sent_packets_total");
    let tap_qdrop = agent.metric("tapestry_tap_queue_dropped_packets_total");
    assert!(agent.terminate());
    let tool_read = aggregator.stop(Duration::ZERO);
    let udp_pps = sent as f64 / secs as f64;

    let t = TcpdumpNull::start(&pair, dir.path(), &["udp"]);
    let tcpdump_cpu0 = cpu_ticks(t.child.id());
    let v = iperf3(&pair, secs, true);
    let sent2 = v["end"]["sum"]["packets"].as_u64().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));
    let (td_cap, td_drop, td_cpu) = t.stop(tcpdump_cpu0);

    let _ = iperf_server.kill();
    let _ = iperf_server.wait();

    let kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout)
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut md = String::new();
    md.push_str(&format!(
        "Measured {} on kernel {kernel}, {cpus} CPUs, {rounds} interleaved rounds of {secs} s, medians.\n\n",
        chrono_free_date()
    ));
    md.push_str("| iperf3 TCP, veth between two namespaces | Gbit/s | ratio to untapped | notes |\n|---|---:|---:|---|\n");
    for (i, m) in modes.iter().enumerate() {
        let g = median(gbps[i].clone());
        md.push_str(&format!(
            "| {} | {:.2} | {:.3} | {} |\n",
            m.label(),
            g,
            g / anchor,
            notes[i]
        ));
    }
    let per_m = |cpu: f64, packets: u64| cpu / (packets.max(1) as f64 / 1e6);
    let (tap_per_m, aggregator_per_m, tcpdump_per_m) = (
        per_m(cpu, sent),
        per_m(aggregator_cpu, sent),
        per_m(td_cpu, sent2),
    );
    md.push_str(&format!(
        "\n| 64-byte UDP, iperf3 `-u -b 0 -l 64` | sent | captured | captured/sent | drops | CPU s (user + system) per M packets |\n|---|---:|---:|---:|---:|---:|\n\
         | tap-agent (snaplen 128, rule proto=udp) | {sent} | {tap_cap} (streamed {tap_sent}) | {:.4} | ring full {tap_full}, queue {tap_qdrop} | {tap_per_m:.3} |\n\
         | aggregator serve --filter udp --pcap-over-ip | | the tool read {tool_read} | {:.4} | | {aggregator_per_m:.3} |\n\
         | tcpdump -w /dev/null udp | {sent2} | {td_cap} | {:.4} | dropped by kernel {td_drop} | {tcpdump_per_m:.3} |\n",
        tap_cap as f64 / sent.max(1) as f64,
        tool_read as f64 / sent.max(1) as f64,
        td_cap as f64 / sent2.max(1) as f64,
    ));
    md.push_str(&format!(
        "\nCPU against tcpdump's: tap-agent {:.2}×, tap-agent and aggregator {:.2}×. UDP send rate reached: {:.0} packets/s. The eBPF programs' own cost is paid in the sender's softirq and shows in the throughput ratios, not in the CPU column.\n",
        tap_per_m / tcpdump_per_m,
        (tap_per_m + aggregator_per_m) / tcpdump_per_m,
        udp_pps
    ));
    println!("{md}");
    write_section(&md);
}

fn chrono_free_date() -> String {
    String::from_utf8_lossy(
        &Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string()
}

const START: &str = "<!-- tap-bench:start -->";
const END: &str = "<!-- tap-bench:end -->";

/// Replaces the generated part of the tap section of BENCHMARKS.md.
fn write_section(md: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let block = format!("{START}\n{md}{END}");
    let new = match (text.find(START), text.find(END)) {
        (Some(s), Some(e)) if e > s => format!("{}{}{}", &text[..s], block, &text[e + END.len()..]),
        _ => format!(
            "{text}\n## Tap (eBPF data path)\n\nReproduce (root): `cargo bench -p tapestry-tap-agent --bench tap_throughput`\n\n{block}\n"
        ),
    };
    std::fs::write(&path, new).unwrap();
    eprintln!("updated {}", path.display());
}
