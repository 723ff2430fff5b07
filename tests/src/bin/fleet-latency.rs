//! How fast the fleet reacts, as a user sees it, on a `tapestry up` cluster
//! with the programs built beside this one:
//!
//! 1. policy created through the REST API → its first matching packet at a
//!    PCAP-over-IP client (`--policies` policies, one after another, each
//!    selecting a port that traffic already flows to);
//! 2. node Ready → the first packet of a pod on it at the tool
//!    (`--joins` nodes joining, one after another, from a network
//!    namespace).
//!
//! `cargo build --release -p tapestry -p tapestry-tap-agent -p tapestry-aggregator -p tapestry-e2e`
//! then, as root, `target/release/fleet-latency`.

use std::io::Read;
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use tapestry_e2e::api::{create_policy, create_tool, ready_condition};
use tapestry_e2e::node::{join_and_time, Machine, MACHINE_HOST_IP};
use tapestry_e2e::{require, wait_for, Capture, Cluster};

#[derive(Parser)]
struct Args {
    /// Policies created one after another.
    #[arg(long, default_value_t = 20)]
    policies: u16,
    /// Nodes joined one after another.
    #[arg(long, default_value_t = 10)]
    joins: usize,
}

/// Destination UDP ports of the packets a PCAP-over-IP client received,
/// with when each arrived.
type Arrivals = Arc<Mutex<Vec<(Instant, u16)>>>;

/// A PCAP-over-IP client recording arrivals until the stream ends.
fn pcap_over_ip_client(addr: &str) -> Arrivals {
    let arrivals: Arrivals = Arc::default();
    let mut stream = TcpStream::connect(addr).expect("connecting to the tool");
    let seen = arrivals.clone();
    std::thread::spawn(move || {
        let mut header = [0u8; 24];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let mut record = [0u8; 16];
        let mut data = Vec::new();
        while stream.read_exact(&mut record).is_ok() {
            let caplen = u32::from_le_bytes(record[8..12].try_into().unwrap()) as usize;
            data.resize(caplen, 0);
            if stream.read_exact(&mut data).is_err() {
                return;
            }
            // Ethernet, IPv4 without options, UDP: the destination port.
            if caplen >= 38 && data[12..14] == [8, 0] && data[23] == 17 {
                let port = u16::from_be_bytes([data[36], data[37]]);
                seen.lock().unwrap().push((Instant::now(), port));
            }
        }
    });
    arrivals
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summary(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: n={} p50={:.0} ms p99={:.0} ms max={:.0} ms (all: {})",
        samples.len(),
        quantile(&samples, 0.5).as_secs_f64() * 1e3,
        quantile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
        samples
            .iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn main() {
    let args = Args::parse();
    if !require(
        "fleet-latency",
        &["kubectl", "curl", "ip", "nsenter", "tshark"],
    ) {
        std::process::exit(1);
    }
    let machine = Machine::new("tpbench-m2", "10.252.9.0/24");
    let c = Cluster::up_on(MACHINE_HOST_IP, "tpbench0", "10.252.0.0/24");
    c.must(&["create", "namespace", "shop"]);
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "busybox:local",
                                         "imagePullPolicy": "Never",
                                         "command": ["sleep", "3600"]}]}})
        .to_string(),
    );
    let web = c.running("shop", "web");

    // 1. Policy created → first packet.
    let tool = create_tool(&c, "bench");
    wait_for("tool Ready", Duration::from_secs(20), || {
        ready_condition(&c.rest("GET", "/v1/tools/bench", None).body["status"]).then_some(())
    });
    let arrivals = pcap_over_ip_client(&tool);
    let port = Arc::new(AtomicU16::new(0));
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (port, sending, web) = (port.clone(), sending.clone(), web.clone());
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            while sending.load(Ordering::Relaxed) {
                let p = port.load(Ordering::Relaxed);
                if p != 0 {
                    let _ = sock.send_to(b"x", (web.as_str(), p));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut created_to_first = Vec::new();
    for i in 0..args.policies {
        let p = 6000 + i;
        port.store(p, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        create_policy(
            &c,
            json!({"name": format!("latency-{i}"), "namespaces": ["shop"],
                   "podSelector": {"matchLabels": {"app": "web"}},
                   "rules": [{"protocol": "udp", "ports": [p.to_string()], "direction": "toPod"}],
                   "tools": ["bench"]}),
        );
        let first = wait_for("the policy's first packet", Duration::from_secs(30), || {
            arrivals
                .lock()
                .unwrap()
                .iter()
                .find(|(at, dport)| *dport == p && *at >= start)
                .map(|(at, _)| *at - start)
        });
        eprintln!("policy {i}: first packet after {first:?}");
        created_to_first.push(first);
        let deleted = c.rest("DELETE", &format!("/v1/policies/latency-{i}"), None);
        assert_eq!(deleted.status, 204, "{}", deleted.raw);
    }
    sending.store(false, Ordering::Relaxed);
    sender.join().unwrap();

    // 2. Node Ready → its pod's first packet.
    let joined_tool = create_tool(&c, "joined");
    create_policy(
        &c,
        json!({"name": "late", "namespaces": ["shop"],
               "podSelector": {"matchLabels": {"app": "late"}},
               "rules": [{"protocol": "udp", "ports": ["5555"]}],
               "tools": ["joined"]}),
    );
    wait_for("tool Ready", Duration::from_secs(20), || {
        ready_condition(&c.rest("GET", "/v1/tools/joined", None).body["status"]).then_some(())
    });
    let capture = Capture::tshark(&joined_tool, c.dir.path(), "joined");
    wait_for("tshark connected", Duration::from_secs(20), || {
        let t = c.rest("GET", "/v1/tools/joined", None).body;
        (t["status"]["clients"].as_u64() >= Some(1)).then_some(())
    });
    let mut ready_to_tapped = Vec::new();
    for j in 0..args.joins {
        let name = format!("joined-{j}");
        let join = join_and_time(&c, &machine, &name, "tpbench1", &capture);
        eprintln!(
            "{name}: pod running {:?}, tapped {:?} after Ready",
            join.pod_running, join.tapped
        );
        ready_to_tapped.push(join.tapped);
        // The node goes away with its pods; its objects are removed.
        drop(join.node);
        c.must(&[
            "delete",
            "pod",
            "-n",
            "shop",
            &format!("late-{name}"),
            "--force",
            "--grace-period=0",
        ]);
        c.must(&["delete", "node", &name]);
    }
    summary(
        "policy created -> first packet at the tool",
        created_to_first,
    );
    summary(
        "node Ready -> its pod's first packet at the tool",
        ready_to_tapped,
    );
}
