//! The aggregator's benchmarks (results go to BENCHMARKS.md):
//!
//! * `replay`: `aggregator replay` vs `tcpdump -r IN -w OUT EXPR` on the
//!   same generated capture and expressions, both pinned to one core;
//!   packets/s and the ratio to tcpdump measured in the same run, with the
//!   capture cached as read from disk and as just written.
//! * `ingest`: 8 synthetic taps streaming over gRPC to an in-process
//!   aggregator with 3 sinks (PCAP-over-IP with a reading client, HTTP
//!   stream with a reading client, rotating pcapng files): the highest
//!   offered rate delivered with zero drops, and capture-to-sink latency
//!   percentiles at 100k packets/s.
//!
//! * `filter`: the filter alone over packets in the CPU cache, ns per
//!   packet: libpcap's `bpf_filter` against ours, one packet at a time and
//!   in batches.
//!
//! Build with `cargo build --release -p tapestry-aggregator` and run
//! `target/release/aggregator-bench all`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tapestry_aggregator::config::Config;
use tapestry_aggregator::metrics::Registry;
use tapestry_aggregator::serve::{start, ServeOptions, Source};
use tapestry_aggregator::synth;
use tapestry_aggregator::synthtap::{self, TapSpec};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    what: What,
    /// Working directory for generated captures and outputs.
    #[arg(long, default_value = "/tmp/tapestry-aggregator-bench", global = true)]
    dir: PathBuf,
}

#[derive(Subcommand, Clone)]
enum What {
    /// Replay vs tcpdump.
    Replay {
        #[arg(long, default_value_t = 2_000_000)]
        packets: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Live ingest from synthetic taps.
    Ingest {
        #[arg(long, default_value_t = 8)]
        taps: usize,
    },
    /// Ingest over mutual TLS against plaintext: CPU per packet and
    /// capture-to-sink latency at 100k packets/s, rounds interleaved.
    IngestTls {
        #[arg(long, default_value_t = 8)]
        taps: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The filter alone, in cache.
    Filter {
        #[arg(long, default_value_t = 20_000)]
        packets: usize,
        #[arg(long, default_value_t = 200)]
        passes: usize,
    },
    /// Both.
    All,
    /// Act as one synthetic tap: stream the generated mix to an aggregator.
    Tap {
        /// The aggregator's gRPC address (host:port).
        #[arg(long)]
        grpc: String,
        #[arg(long, default_value_t = 10_000)]
        packets: usize,
        /// Packets per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
        /// Tag every packet with this tap policy (repeatable; at most 64),
        /// as a tap does for the TapPolicies a cluster-mode aggregator
        /// runs. Without it the packets reach only policies that take all
        /// traffic.
        #[arg(long = "policy", value_name = "NAME")]
        policies: Vec<String>,
    },
}

const EXPRESSIONS: &[&str] = &[
    "tcp port 80",
    "net 10.1.0.0/16 and (tcp[tcpflags] & tcp-syn != 0)",
    "(udp port 53 or icmp6) and not vlan",
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.dir)?;
    match cli.what {
        What::Replay { packets, runs } => replay(&cli.dir, packets, runs),
        What::Ingest { taps } => ingest(&cli.dir, taps),
        What::IngestTls { taps, rounds } => ingest_tls(&cli.dir, taps, rounds),
        What::Filter { packets, passes } => filter(packets, passes),
        What::Tap {
            grpc,
            packets,
            rate,
            policies,
        } => {
            anyhow::ensure!(policies.len() <= 64, "--policy: at most 64");
            let mask = u64::MAX
                .checked_shr(64 - policies.len() as u32)
                .unwrap_or(0);
            let mut m = synth::Mix::new(7);
            let frames = (0..packets).map(|_| (m.next_frame(), mask)).collect();
            let spec = TapSpec {
                tap_id: "synthetic".into(),
                pods: vec![
                    ("default".into(), "client".into()),
                    ("default".into(), "server".into()),
                ],
                policy_names: policies,
                batch: 256,
                rate,
                stamp_now: true,
            };
            let rt = tokio::runtime::Runtime::new()?;
            let s = rt.block_on(synthtap::run(synthtap::plaintext(&grpc)?, spec, frames))?;
            println!("sent {} packets in {} batches", s.packets, s.batches);
            Ok(())
        }
        What::All => {
            replay(&cli.dir, 2_000_000, 3)?;
            ingest(&cli.dir, 8)
        }
    }
}

fn pinned(cmd: &str) -> Command {
    // One core, as the benchmark asks; taskset is in util-linux.
    let mut c = Command::new("taskset");
    c.args(["-c", "0", cmd]);
    c
}

fn time(mut c: Command) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let o = c.output()?;
    let d = t.elapsed();
    anyhow::ensure!(
        o.status.success(),
        "{:?}: {}",
        c,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(d)
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn count(path: &Path) -> anyhow::Result<u64> {
    let f = tapestry_aggregator::capture::CaptureFile::open(path)?;
    Ok(f.for_each(|_, _| true)?.packets)
}

/// How the capture got into the page cache, which decides how the kernel
/// maps it: read from disk (2 MiB folios from readahead, on a file system
/// with large folios such as ext4 on Linux 6.x) or just written by a
/// capture tool (4 KiB folios). tcpdump copies with `read()` either way.
/// `--dir` must be on a disk-backed file system: on tmpfs the eviction is a
/// no-op and both states are the same.
#[derive(Clone, Copy)]
enum CacheState {
    ReadFromDisk,
    JustWritten,
}

impl CacheState {
    fn label(self) -> &'static str {
        match self {
            CacheState::ReadFromDisk => "read from disk",
            CacheState::JustWritten => "just written",
        }
    }

    /// Puts `input` (or a fresh copy of it) into the page cache in this
    /// state and returns the file to replay.
    fn prepare(self, input: &Path) -> anyhow::Result<PathBuf> {
        use std::io::{Read, Write};
        match self {
            CacheState::ReadFromDisk => {
                let mut f = std::fs::File::open(input)?;
                evict(&f)?;
                // A plain sequential read, as any reader would do.
                std::io::copy(&mut f, &mut std::io::sink())?;
                Ok(input.to_path_buf())
            }
            CacheState::JustWritten => {
                let copy = input.with_extension("written.pcap");
                let mut from = std::fs::File::open(input)?;
                let mut to = std::fs::File::create(&copy)?;
                // In 4 KiB writes, as tcpdump's stdio writes its files:
                // the page cache keeps them in folios of that size (1 MiB
                // writes would leave large folios behind, and `io::copy`
                // would copy in the kernel with `copy_file_range`).
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = from.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    to.write_all(&buf[..n])?;
                }
                // Written back now, so no writeback runs during the timings;
                // the folios stay as the writes left them.
                to.sync_all()?;
                Ok(copy)
            }
        }
    }
}

/// Writes `f` back and drops it from the page cache.
fn evict(f: &std::fs::File) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    f.sync_all()?;
    // SAFETY: a plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(
        rc == 0,
        "posix_fadvise: {}",
        std::io::Error::from_raw_os_error(rc)
    );
    Ok(())
}

fn replay(dir: &Path, packets: usize, runs: usize) -> anyhow::Result<()> {
    let input = dir.join(format!("mix-{packets}.pcap"));
    if !input.exists() {
        eprintln!("generating {packets} packets into {}", input.display());
        let mut m = synth::Mix::new(1);
        let f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&input)?);
        synth::write_pcap(f, (0..packets).map(|_| m.next_frame()), 262_144)?;
    }
    let size = std::fs::metadata(&input)?.len();
    let agg = std::env::current_exe()?.with_file_name("aggregator");
    println!(
        "## replay vs tcpdump ({packets} packets, {:.0} MB, one core, best of {runs})\n",
        size as f64 / 1e6
    );
    println!("| input in the page cache | expression | kept | tcpdump packets/s | aggregator packets/s | ratio |");
    println!("|---|---|---:|---:|---:|---:|");
    for state in [CacheState::ReadFromDisk, CacheState::JustWritten] {
        let file = state.prepare(&input)?;
        for expr in EXPRESSIONS {
            let (mut best_t, mut best_a) = (Duration::MAX, Duration::MAX);
            let out_t = dir.join("tcpdump.pcap");
            let out_a = dir.join("aggregator.pcapng");
            // Interleaved runs, so background load hits both alike. Each
            // run writes a new file: truncating the previous run's output
            // waits for its writeback (ext4 starts it when a truncated file
            // is closed), 10-20 ms of disk time that is neither tool's work.
            for _ in 0..runs {
                remove_if_present(&out_t)?;
                let mut c = pinned("tcpdump");
                c.arg("-r").arg(&file).arg("-w").arg(&out_t).arg(expr);
                best_t = best_t.min(time(c)?);
                remove_if_present(&out_a)?;
                let mut c = pinned(agg.to_str().unwrap_or("aggregator"));
                c.args(["replay", "--filter", expr, "-i"])
                    .arg(&file)
                    .arg("-o")
                    .arg(&out_a);
                best_a = best_a.min(time(c)?);
            }
            let (kt, ka) = (count(&out_t)?, count(&out_a)?);
            anyhow::ensure!(kt == ka, "{expr}: tcpdump kept {kt}, aggregator {ka}");
            let pt = packets as f64 / best_t.as_secs_f64();
            let pa = packets as f64 / best_a.as_secs_f64();
            println!(
                "| {} | `{expr}` | {ka} | {pt:.0} | {pa:.0} | {:.2}× |",
                state.label(),
                pa / pt
            );
        }
        if let CacheState::JustWritten = state {
            std::fs::remove_file(&file)?;
        }
    }
    println!();
    Ok(())
}

fn filter(packets: usize, passes: usize) -> anyhow::Result<()> {
    use tapestry_aggregator::bpf::{Program, BATCH, LINKTYPE_ETHERNET};
    let mut m = synth::Mix::new(1);
    let frames: Vec<Vec<u8>> = (0..packets).map(|_| m.next_frame().data).collect();
    let dead = pcap::Capture::dead(pcap::Linktype(LINKTYPE_ETHERNET as i32))?;
    println!("## filter alone ({packets} packets in cache, best of {passes} passes, ns/packet)\n");
    println!("| expression | libpcap bpf_filter | one at a time | batches of {BATCH} |");
    println!("|---|---:|---:|---:|");
    for expr in EXPRESSIONS {
        let theirs = dead.compile(expr, true)?;
        let ours = Program::compile(expr, LINKTYPE_ETHERNET, 262_144)?;
        let mut runner = ours.batch_runner();
        let wires: Vec<u32> = frames.iter().map(|f| f.len() as u32).collect();
        let slices: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        let mut keep = [false; BATCH];
        let mut best = [Duration::MAX; 3];
        let mut kept = [0usize; 3];
        for _ in 0..passes {
            let t = Instant::now();
            kept[0] = frames.iter().filter(|f| theirs.filter(f)).count();
            best[0] = best[0].min(t.elapsed());
            let t = Instant::now();
            kept[1] = frames
                .iter()
                .filter(|f| ours.matches(f, f.len() as u32))
                .count();
            best[1] = best[1].min(t.elapsed());
            let t = Instant::now();
            kept[2] = 0;
            for (p, w) in slices.chunks(BATCH).zip(wires.chunks(BATCH)) {
                runner.run(p, w, &mut keep[..p.len()]);
                kept[2] += keep[..p.len()].iter().filter(|&&k| k).count();
            }
            best[2] = best[2].min(t.elapsed());
        }
        anyhow::ensure!(
            kept[1] == kept[0] && kept[2] == kept[0],
            "{expr}: libpcap kept {}, ours {} and {}",
            kept[0],
            kept[1],
            kept[2]
        );
        let ns = |d: Duration| d.as_nanos() as f64 / packets as f64;
        println!(
            "| `{expr}` | {:.1} | {:.1} | {:.1} |",
            ns(best[0]),
            ns(best[1]),
            ns(best[2])
        );
    }
    println!();
    Ok(())
}

fn ingest_config(dir: &Path) -> anyhow::Result<Config> {
    let files = dir.join("files");
    let _ = std::fs::remove_dir_all(&files);
    Config::parse(&format!(
        r#"
sinks:
  - {{ name: pcap, type: pcap_over_ip, listen: "127.0.0.1:0", queue: 4096, client_queue: 4096 }}
  - {{ name: stream, type: http, queue: 4096, client_queue: 4096 }}
  - {{ name: files, type: pcapng_file, directory: "{}", rotate_bytes: 200000000, max_files: 3, queue: 4096 }}
policies:
  - name: all
    filter: "ip or ip6 or vlan"
    sinks: [pcap, stream, files]
    queue: 4096
"#,
        files.display()
    ))
}

/// Reads and discards a TCP stream (a tool that keeps up).
fn drain(addr: std::net::SocketAddr, request: Option<String>) {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return;
        };
        if let Some(r) = request {
            let _ = s.write_all(r.as_bytes());
        }
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
}

struct Totals {
    delivered: [u64; 3],
    dropped: u64,
    /// Packets the policy took in and passed on.
    received: u64,
    passed: u64,
}

fn totals(r: &Registry) -> Totals {
    let sinks = r.sinks.lock().unwrap().clone();
    let pol = r.policies.lock().unwrap().clone();
    let mut delivered = [0; 3];
    let mut dropped = pol.iter().map(|(_, p)| p.dropped.get()).sum::<u64>();
    for (i, (_, _, s)) in sinks.iter().enumerate().take(3) {
        delivered[i] = s.packets.get();
        dropped += s.dropped.get() + s.client_dropped.get();
    }
    let received = pol
        .iter()
        .map(|(_, p)| p.received.get() + p.dropped.get())
        .sum();
    let passed = pol.iter().map(|(_, p)| p.delivered.get()).sum();
    Totals {
        delivered,
        dropped,
        received,
        passed,
    }
}

/// Runs `taps` taps at `rate` packets/s in total (None = flat out) with
/// `per_tap` packets each; returns (offered packets/s, seconds, drops).
async fn run_taps(
    endpoint: &dyn Fn(usize) -> anyhow::Result<tonic::transport::Endpoint>,
    taps: usize,
    per_tap: usize,
    rate: Option<f64>,
    stamp_now: bool,
    r: &Registry,
) -> anyhow::Result<(f64, f64, u64)> {
    let before = totals(r);
    let t = Instant::now();
    let mut handles = Vec::new();
    for i in 0..taps {
        let mut m = synth::Mix::new(100 + i as u64);
        let frames: Vec<_> = (0..per_tap).map(|_| (m.next_frame(), 0u64)).collect();
        let spec = TapSpec {
            tap_id: format!("node-{i}"),
            pods: (0..4)
                .map(|p| (format!("ns{i}"), format!("pod-{p}")))
                .collect(),
            policy_names: vec![],
            batch: 256,
            rate: rate.map(|r| r / taps as f64),
            stamp_now,
        };
        handles.push(tokio::spawn(synthtap::run(endpoint(i)?, spec, frames)));
    }
    for h in handles {
        h.await??;
    }
    let total = (taps * per_tap) as u64;
    // Wait for the sinks to catch up (or give up after a while).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = totals(r);
        let passed = now.passed - before.passed;
        let done = now.received - before.received >= total
            && (0..3).all(|i| {
                now.delivered[i] - before.delivered[i] + (now.dropped - before.dropped) >= passed
            });
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let after = totals(r);
    // Rates count packets the taps sent; the policy keeps ~99% (not ARP).
    Ok((total as f64 / secs, secs, after.dropped - before.dropped))
}

fn ingest(dir: &Path, taps: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let running = start(ServeOptions {
            grpc: "127.0.0.1:0".into(),
            http_tls: false,
            http: "127.0.0.1:0".into(),
            tls: None,
            source: Source::Config(ingest_config(dir)?),
        })
        .await?;
        let r: Arc<Registry> = running.registry.clone();
        drain(running.sinks[0].1, None);
        drain(running.http, Some("GET /v1/tools/stream/pcap HTTP/1.1\r\nHost: x\r\n\r\n".into()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let grpc = running.grpc.to_string();
        let plain = |_| synthtap::plaintext(&grpc);
        println!("## live ingest ({taps} synthetic taps → 1 policy → 3 sinks: PCAP-over-IP, HTTP stream, pcapng files)\n");
        println!("| offered rate | packets | seconds | delivered packets/s per sink | drops |");
        println!("|---|---:|---:|---:|---:|");
        let mut best_zero_drop = 0.0f64;
        let per_tap = 50_000;
        for rate in [None, Some(100_000.0), Some(200_000.0), Some(300_000.0), Some(400_000.0)] {
            let (pps, secs, drops) = run_taps(&plain, taps, per_tap, rate, false, &r).await?;
            let label = rate.map_or("flat out".to_string(), |r| format!("{r:.0}/s"));
            println!("| {label} | {} | {secs:.2} | {pps:.0} | {drops} |", taps * per_tap);
            if drops == 0 {
                best_zero_drop = best_zero_drop.max(pps);
            }
        }
        println!("\nhighest delivered rate with zero drops: {best_zero_drop:.0} packets/s\n");

        // Latency at 100k packets/s: fresh histograms, packets stamped at send.
        for (_, _, s) in r.sinks.lock().unwrap().iter() {
            s.latency.lock().unwrap().reset();
        }
        let (pps, secs, drops) = run_taps(&plain, taps, 62_500, Some(100_000.0), true, &r).await?;
        println!("### capture-to-sink latency at {pps:.0} packets/s ({secs:.1} s, {drops} drops)\n");
        println!("| sink | p50 | p99 | p99.9 | max |");
        println!("|---|---:|---:|---:|---:|");
        for (name, _, s) in r.sinks.lock().unwrap().iter() {
            let h = s.latency.lock().unwrap();
            let ms = |v: u64| format!("{:.2} ms", v as f64 / 1e6);
            println!(
                "| {name} | {} | {} | {} | {} |",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max())
            );
        }
        println!();
        anyhow::Ok(())
    })
}

/// (certificate PEM, key PEM) for `cn`, signed by `issuer`; a server
/// certificate for 127.0.0.1 or a client one.
fn issue(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    cn: &str,
    server: bool,
) -> anyhow::Result<(String, String)> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let key = KeyPair::generate()?;
    let sans = if server {
        vec!["127.0.0.1".to_string()]
    } else {
        vec![]
    };
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}

/// Process CPU (user + system) so far, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn ingest_tls(dir: &Path, taps: usize, rounds: usize) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench-ca");
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let (server_cert, server_key) = issue(&issuer, "aggregator", true)?;
    let taps_ids: Vec<(String, String)> = (0..taps)
        .map(|i| {
            issue(
                &issuer,
                &tapestry_proto::identity::tap_user(&format!("node-{i}")),
                false,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    std::fs::write(pki.join("ca.pem"), &ca_pem)?;
    std::fs::write(pki.join("server.pem"), &server_cert)?;
    std::fs::write(pki.join("server-key.pem"), &server_key)?;
    let files = tapestry_aggregator::tls::TlsFiles {
        cert: pki.join("server.pem"),
        key: pki.join("server-key.pem"),
        client_ca: pki.join("ca.pem"),
    };

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut modes = Vec::new();
        for tls in [None, Some(files)] {
            let mode_dir = dir.join(if tls.is_some() { "tls" } else { "plain" });
            std::fs::create_dir_all(&mode_dir)?;
            let running = start(ServeOptions {
                grpc: "127.0.0.1:0".into(),
                http_tls: false,
                http: "127.0.0.1:0".into(),
                tls,
                source: Source::Config(ingest_config(&mode_dir)?),
            })
            .await?;
            drain(running.sinks[0].1, None);
            drain(running.http, Some("GET /v1/tools/stream/pcap HTTP/1.1\r\nHost: x\r\n\r\n".into()));
            modes.push(running);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let plain_addr = modes[0].grpc.to_string();
        let tls_addr = modes[1].grpc.to_string();
        let plain = |_| synthtap::plaintext(&plain_addr);
        let secure = |i: usize| -> anyhow::Result<tonic::transport::Endpoint> {
            let (cert, key) = &taps_ids[i];
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca_pem))
                .identity(Identity::from_pem(cert, key));
            Ok(tonic::transport::Endpoint::from_shared(format!("https://{tls_addr}"))?.tls_config(tls)?)
        };
        println!("## ingest over mutual TLS vs plaintext ({taps} synthetic taps at 100k packets/s in total → 1 policy → 3 sinks; rounds interleaved)\n");
        println!("CPU is the whole process's (synthetic taps, aggregator and the sink readers), so the TLS cost of both ends is in it.\n");
        println!("| round | ingest | packets | CPU s per M packets | p99 capture-to-sink | drops |");
        println!("|---:|---|---:|---:|---:|---:|");
        let per_tap = 62_500;
        let mut ratios = Vec::new();
        let mut worst_p99 = 0.0f64;
        for round in 1..=rounds {
            let mut cpu = [0.0; 2];
            for (m, running) in modes.iter().enumerate() {
                let r = running.registry.clone();
                for (_, _, s) in r.sinks.lock().unwrap().iter() {
                    s.latency.lock().unwrap().reset();
                }
                let endpoint: &dyn Fn(usize) -> anyhow::Result<tonic::transport::Endpoint> =
                    if m == 0 { &plain } else { &secure };
                let c0 = cpu_seconds();
                let (_, _, drops) = run_taps(endpoint, taps, per_tap, Some(100_000.0), true, &r).await?;
                let packets = (taps * per_tap) as f64;
                cpu[m] = (cpu_seconds() - c0) / packets * 1e6;
                let p99 = r
                    .sinks
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(_, _, s)| s.latency.lock().unwrap().value_at_quantile(0.99))
                    .max()
                    .unwrap_or(0) as f64
                    / 1e6;
                worst_p99 = worst_p99.max(p99);
                let label = if m == 0 { "plaintext" } else { "mutual TLS" };
                println!("| {round} | {label} | {packets} | {:.3} | {p99:.2} ms | {drops} |", cpu[m]);
            }
            ratios.push(cpu[1] / cpu[0]);
        }
        ratios.sort_by(|a, b| a.total_cmp(b));
        println!(
            "\nCPU per packet, mutual TLS / plaintext: median {:.3} (rounds: {}); worst p99 {worst_p99:.2} ms\n",
            ratios[ratios.len() / 2],
            ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")
        );
        anyhow::Ok(())
    })
}
