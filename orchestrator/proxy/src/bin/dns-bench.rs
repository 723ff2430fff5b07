//! Cluster DNS throughput and latency, as a pod sees them: the node's DNS
//! server (this crate's, with a zone of N Services) in one network
//! namespace, the client in another behind a veth pair (a pod and its
//! node). `dnsperf` asks for random Service names as fast as they are
//! answered; then a paced client asks at a fixed rate and records each
//! answer's latency. The same runs against dnsmasq answering the same
//! names from a hosts file (a C server answering from memory), when
//! dnsmasq is installed. Needs root, iproute2 and dnsperf.
//!
//! `dns-bench [--services N] [--seconds S] [--rate QPS]`

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use serde_json::json;
use tapestry_proxy::dns::server::{self, DnsServer};
use tapestry_proxy::dns::zone::Zone;
use tokio_util::sync::CancellationToken;

#[path = "support/netns.rs"]
mod netns;
use netns::Netns;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 254, 77, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 254, 77, 2);

#[derive(Parser)]
struct Args {
    /// Services in the zone.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Length of each dnsperf run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queries per second of the paced latency run.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if Command::new("dnsperf").arg("-h").output().is_err() {
        bail!("dnsperf is not installed (apt-get install dnsperf)");
    }
    let node = Netns::new("tpdns-node".into())?;
    let pod = Netns::new("tpdns-pod".into())?;
    wire(&node, &pod)?;
    let names: Vec<String> = (0..args.services)
        .map(|i| format!("svc{i}.ns{}.svc.cluster.local", i % 100))
        .collect();
    let dir = std::env::temp_dir().join(format!("dns-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let queries = dir.join("queries");
    let mut text = String::new();
    for i in 0..100_000usize {
        // A fixed spread over every name (no rand dependency needed).
        let pick = (i.wrapping_mul(2_654_435_761)) % names.len();
        text.push_str(&format!("{} A\n", names[pick]));
    }
    std::fs::write(&queries, text)?;
    println!(
        "{:<10} {:>10} {:>12} | {:>10} {:>9} {:>9} {:>9}",
        "server", "services", "dnsperf QPS", "paced QPS", "p50 ms", "p99 ms", "lost"
    );

    let runtime = tokio::runtime::Runtime::new()?;
    let shutdown = CancellationToken::new();
    let ours = serve_ours(&runtime, &node, args.services, shutdown.clone())?;
    let qps = dnsperf(&pod, &queries, args.seconds)?;
    let paced = paced_run(&pod, &names, args.rate, Duration::from_secs(args.seconds))?;
    report("tapestry", args.services, qps, &paced);
    let answered = ours.stats.responses("NOERROR");
    shutdown.cancel();
    drop(runtime);
    if answered == 0 {
        bail!("the server answered nothing");
    }

    match serve_dnsmasq(&node, &names, &dir) {
        Ok(mut dnsmasq) => {
            let qps = dnsperf(&pod, &queries, args.seconds);
            let paced = paced_run(&pod, &names, args.rate, Duration::from_secs(args.seconds));
            let _ = dnsmasq.kill();
            let _ = dnsmasq.wait();
            report("dnsmasq", args.services, qps?, &paced?);
        }
        Err(e) => println!("dnsmasq: not measured ({e:#})"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A veth pair between the namespaces: the node at .1, the pod at .2.
fn wire(node: &Netns, pod: &Netns) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let ok = Command::new("ip").args(args).status()?.success();
        if !ok {
            bail!("ip {} failed", args.join(" "));
        }
        Ok(())
    };
    run(&[
        "link", "add", "dnsb0", "netns", &node.0, "type", "veth", "peer", "name", "eth0", "netns",
        &pod.0,
    ])?;
    for (ns, dev, addr) in [(node, "dnsb0", SERVER), (pod, "eth0", CLIENT)] {
        run(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            dev,
        ])?;
        run(&["-n", &ns.0, "link", "set", dev, "up"])?;
        run(&["-n", &ns.0, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// The node's DNS server with N Services, its sockets made inside the
/// node's namespace (a socket stays in the namespace it was made in).
fn serve_ours(
    runtime: &tokio::runtime::Runtime,
    node: &Netns,
    services: usize,
    shutdown: CancellationToken,
) -> Result<Arc<DnsServer>> {
    let mut zone =
        Zone::new("cluster.local", tapestry_proxy::dns::TTL).map_err(anyhow::Error::msg)?;
    for i in 0..services {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 16 + i as u32);
        let service = serde_json::from_value(json!({
            "metadata": {"name": format!("svc{i}"), "namespace": format!("ns{}", i % 100)},
            "spec": {"clusterIP": ip.to_string(), "ports": [{"name": "http", "port": 80}]}
        }))?;
        let records = zone.service_records(&service, &[]);
        zone.set_service(&format!("ns{}/svc{i}", i % 100), records);
    }
    let server = Arc::new(DnsServer::new(
        Arc::new(RwLock::new(zone)),
        Vec::new(),
        Arc::default(),
    ));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let handle = runtime.handle().clone();
    let node_name = node.0.clone();
    let (udp, tcp) = std::thread::spawn(move || -> Result<_> {
        netns::enter(&node_name)?;
        let _guard = handle.enter();
        let addr = SocketAddr::from((SERVER, 53));
        let udp = (0..workers)
            .map(|_| server::udp_socket(addr))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok((udp, server::tcp_listener(addr)?))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("socket thread panicked"))??;
    for socket in udp {
        runtime.spawn(server::serve_udp(
            Arc::new(socket),
            server.clone(),
            shutdown.clone(),
        ));
    }
    runtime.spawn(server::serve_tcp(tcp, server.clone(), shutdown));
    Ok(server)
}

/// dnsmasq answering the same names from a hosts file, in the node's
/// namespace, in the foreground.
fn serve_dnsmasq(
    node: &Netns,
    names: &[String],
    dir: &std::path::Path,
) -> Result<std::process::Child> {
    let hosts = dir.join("hosts");
    let mut text = String::new();
    for (i, name) in names.iter().enumerate() {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 16 + i as u32);
        text.push_str(&format!("{ip} {name}\n"));
    }
    std::fs::write(&hosts, text)?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.0, "dnsmasq", "--keep-in-foreground"])
        .args([
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--bind-interfaces",
        ])
        .arg(format!("--listen-address={SERVER}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .args(["--local-ttl=30", "--cache-size=10000", "--pid-file="])
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq")?;
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = child.try_wait()? {
        bail!("dnsmasq exited: {status}");
    }
    Ok(child)
}

/// dnsperf from the pod's namespace: queries per second.
fn dnsperf(pod: &Netns, queries: &std::path::Path, seconds: u64) -> Result<f64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.0,
            "dnsperf",
            "-s",
            &SERVER.to_string(),
        ])
        .arg("-d")
        .arg(queries)
        .args(["-l", &seconds.to_string(), "-c", "4", "-q", "1000"])
        .output()
        .context("running dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no rate in dnsperf's output:\n{text}"))
}

struct Paced {
    qps: f64,
    p50: f64,
    p99: f64,
    lost: u64,
}

/// Queries at `rate` per second from the pod's namespace for `length`,
/// each answer's latency recorded.
fn paced_run(pod: &Netns, names: &[String], rate: u64, length: Duration) -> Result<Paced> {
    let pod_name = pod.0.clone();
    let packets: Vec<Vec<u8>> = names
        .iter()
        .take(4096)
        .map(|n| {
            let mut q = Message::query();
            q.metadata.recursion_desired = true;
            q.add_query(Query::query(
                Name::from_ascii(format!("{n}.")).expect("a name"),
                RecordType::A,
            ));
            q.to_vec().expect("a query")
        })
        .collect();
    std::thread::spawn(move || -> Result<Paced> {
        netns::enter(&pod_name)?;
        let socket = UdpSocket::bind((CLIENT, 0))?;
        socket.connect((SERVER, 53))?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let receiver = socket.try_clone()?;
        let sent_at: Arc<Vec<std::sync::atomic::AtomicU64>> =
            Arc::new((0..65536).map(|_| Default::default()).collect());
        let epoch = Instant::now();
        let sent_times = sent_at.clone();
        let reader = std::thread::spawn(move || {
            let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("a histogram");
            let mut buf = [0u8; 1500];
            let mut received = 0u64;
            let mut idle = 0;
            while idle < 3 {
                match receiver.recv(&mut buf) {
                    Ok(n) if n >= 2 => {
                        idle = 0;
                        let id = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                        let sent = sent_times[id].load(std::sync::atomic::Ordering::Relaxed);
                        let now = epoch.elapsed().as_micros() as u64;
                        let _ = histogram.record(now.saturating_sub(sent).max(1));
                        received += 1;
                    }
                    Ok(_) => {}
                    Err(_) => idle += 1,
                }
            }
            (histogram, received)
        });
        let interval = Duration::from_micros(1_000_000 / rate.max(1));
        let mut sent = 0u64;
        let started = Instant::now();
        let mut packet = 0usize;
        while started.elapsed() < length {
            let due = started + interval * (sent as u32);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let id = (sent % 65536) as u16;
            let mut bytes = packets[packet].clone();
            bytes[..2].copy_from_slice(&id.to_be_bytes());
            sent_at[usize::from(id)].store(
                epoch.elapsed().as_micros() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            socket.send(&bytes)?;
            sent += 1;
            packet = (packet + 1) % packets.len();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let (histogram, received) = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?;
        Ok(Paced {
            qps: sent as f64 / elapsed,
            p50: histogram.value_at_quantile(0.50) as f64 / 1000.0,
            p99: histogram.value_at_quantile(0.99) as f64 / 1000.0,
            lost: sent.saturating_sub(received),
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("paced client panicked"))?
}

fn report(server: &str, services: usize, qps: f64, paced: &Paced) {
    println!(
        "{server:<10} {services:>10} {qps:>12.0} | {:>10.0} {:>9.3} {:>9.3} {:>9}",
        paced.qps, paced.p50, paced.p99, paced.lost
    );
}
