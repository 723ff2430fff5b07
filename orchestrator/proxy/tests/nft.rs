//! The proxy's table in a real kernel: a network namespace of the test's
//! own, rules applied as the proxy applies them (full syncs through
//! `nft -j`, incremental ones as nft text), and real TCP connections to
//! ClusterIPs and NodePorts. Needs root and nft; skips without them unless
//! `CI=true`, where it fails loudly.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tapestry_proxy::nft::Nft;
use tapestry_proxy::rules::{self, Endpoint, Garbage, NodeConfig, Protocol, Ruleset, ServicePort};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 11);
const ECHO_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 12);

fn can_run() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let nft = Command::new("nft").arg("--version").output().is_ok();
    if root && nft {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the proxy's kernel test needs root and nft in CI (root: {root}, nft: {nft})");
    }
    eprintln!("skipping: needs root and nft");
    false
}

/// A network namespace that is removed when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        // Tests run in parallel, each in a namespace of its own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("tpproxy-{}-{n}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        run(&[
            "ip", "-n", &name, "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
        ]);
        run(&["ip", "-n", &name, "link", "set", "pod0p", "up"]);
        run(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            "10.77.0.2/24",
            "dev",
            "pod0",
        ]);
        run(&["ip", "-n", &name, "link", "set", "pod0", "up"]);
        // ClusterIPs are routed somewhere, as on a node (a default route).
        run(&["ip", "-n", &name, "route", "add", "default", "dev", "pod0"]);
        Netns(name)
    }

    /// Move the calling thread into the namespace (children it spawns,
    /// `nft` included, follow).
    fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A listener answering each connection with its own port.
fn listener(port: u16) {
    let l = TcpListener::bind((POD_IP, port)).unwrap();
    std::thread::spawn(move || {
        for mut conn in l.incoming().flatten() {
            let _ = conn.write_all(port.to_string().as_bytes());
        }
    });
}

/// A listener echoing what each connection sends, for as long as it stays.
fn echo_listener(port: u16) {
    let l = TcpListener::bind((POD_IP, port)).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// One exchange over an established connection.
fn round_trip(conn: &mut TcpStream, text: &str) {
    conn.write_all(text.as_bytes()).unwrap();
    let mut buf = vec![0u8; text.len()];
    conn.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("the established connection broke at {text:?}: {e}"));
    assert_eq!(String::from_utf8_lossy(&buf), text);
}

/// Which listener answered a connection to `addr`.
fn answered_by(addr: SocketAddr) -> std::io::Result<u16> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    Ok(text.parse().unwrap())
}

/// The tables as the kernel lists them (the namespace holds the proxy's
/// only), without handles and counters, sorted:
/// what two ways of writing the same rules must agree on.
fn listing() -> Vec<String> {
    let out = Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut objects: Vec<String> = listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("metainfo").is_none())
        .map(|o| {
            let mut o = o.clone();
            for kind in ["rule", "chain", "map", "set", "table"] {
                if let Some(body) = o.get_mut(kind).and_then(|b| b.as_object_mut()) {
                    body.remove("handle");
                    // Entries clients put into affinity sets.
                    if kind == "set" {
                        body.remove("elem");
                    }
                }
            }
            o.to_string()
        })
        .collect();
    objects.sort();
    objects
}

/// A full sync over whatever the table holds, as the proxy's first.
fn full_sync(nft: &mut Nft, next: &Ruleset, node: &NodeConfig) -> anyhow::Result<()> {
    let existing = nft.existing()?;
    nft.apply(rules::full_sync(next, &existing, node))
}

/// One incremental sync, as the proxy applies it.
fn step(nft: &mut Nft, prev: &Ruleset, next: &Ruleset, garbage: &mut Garbage) {
    nft.apply_commands(&rules::incremental(prev, next, garbage))
        .unwrap();
}

fn web(endpoints: &[u16], affinity: Option<u32>) -> ServicePort {
    ServicePort {
        namespace: "shop".into(),
        name: "web".into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        cluster_ips: vec![CLUSTER_IP],
        port: 80,
        node_port: Some(30080),
        affinity_seconds: affinity,
        internal_local: false,
        external_local: false,
        endpoints: endpoints
            .iter()
            .map(|&port| Endpoint {
                ip: POD_IP,
                port,
                local: true,
            })
            .collect(),
    }
}

fn echo() -> ServicePort {
    ServicePort {
        name: "echo".into(),
        cluster_ips: vec![ECHO_IP],
        port: 7,
        node_port: None,
        ..web(&[8090], None)
    }
}

fn empty() -> ServicePort {
    ServicePort {
        name: "empty".into(),
        cluster_ips: vec![EMPTY_IP],
        node_port: Some(30081),
        endpoints: vec![],
        ..web(&[], None)
    }
}

/// A table as an earlier layout of the proxy left it.
const EARLIER_LAYOUT: &str = "table ip tapestry-proxy {
  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
  set aff-ep-shop/old/tcp/__10.77.0.2/8080 { type ipv4_addr; flags timeout; timeout 60s; }
  chain nat-prerouting { type nat hook prerouting priority -100; policy accept; jump services; }
  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }
  chain ep-shop/old/tcp/__10.77.0.2/8080 {
    update @aff-ep-shop/old/tcp/__10.77.0.2/8080 { ip saddr }
    meta l4proto tcp dnat to 10.77.0.2:8080
  }
  chain svc-shop/old/tcp/ { goto ep-shop/old/tcp/__10.77.0.2/8080; }
}
add element ip tapestry-proxy service-ips { 10.96.77.99 . tcp . 80 : goto svc-shop/old/tcp/ }
";

#[test]
fn cluster_ips_and_node_ports_route_and_empty_services_refuse() {
    if !can_run() {
        return;
    }
    let netns = Netns::new();
    let name = netns.0.clone();
    std::thread::spawn(move || {
        let _ = name;
        netns.enter();
        listener(8080);
        listener(8081);
        echo_listener(8090);
        let node = NodeConfig {
            cluster_cidr: Some((Ipv4Addr::new(10, 77, 0, 0), 16)),
            pod_cidr: Some((Ipv4Addr::new(10, 77, 0, 0), 24)),
            // Several Service tables, as a large cluster has.
            service_tables: 4,
        };
        let cluster_ip = SocketAddr::from((CLUSTER_IP, 80));
        let node_port = SocketAddr::from((POD_IP, 30080));

        let mut nft = Nft::open().unwrap();
        // A table in an unknown state, here one table holding everything
        // as an earlier layout did (a Service's chains, affinity set and
        // map entries beside the hooks): the full sync takes it over.
        let mut earlier = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        earlier
            .stdin
            .take()
            .unwrap()
            .write_all(EARLIER_LAYOUT.as_bytes())
            .unwrap();
        assert!(earlier.wait().unwrap().success());
        let first = rules::desired(&node, &[web(&[8080], None), empty()]);
        full_sync(&mut nft, &first, &node).unwrap();
        assert_eq!(answered_by(cluster_ip).unwrap(), 8080);
        let tables = nft.existing().unwrap();
        for gone in ["nat-prerouting", "services", "svc-shop/old/tcp/"] {
            assert!(
                !tables
                    .chains
                    .contains(&(rules::Table::Main, gone.to_string())),
                "{gone}: {tables:?}"
            );
        }
        assert!(
            tables.sets.is_empty() && tables.maps.len() == 2 * (1 + 4),
            "{tables:?}"
        );
        assert_eq!(answered_by(node_port).unwrap(), 8080);

        // No endpoints: refused at once, never a time-out.
        for addr in [
            SocketAddr::from((EMPTY_IP, 80)),
            SocketAddr::from((POD_IP, 30081)),
        ] {
            let started = Instant::now();
            let err = answered_by(addr).unwrap_err();
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{addr}: {err}"
            );
            assert!(started.elapsed() < Duration::from_millis(100), "{addr}");
        }

        // Two endpoints: both are chosen.
        let mut garbage = Garbage::default();
        let second = rules::desired(&node, &[web(&[8080, 8081], None), empty()]);
        step(&mut nft, &first, &second, &mut garbage);
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..60 {
            *seen.entry(answered_by(cluster_ip).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 2, "{seen:?}");

        // ClientIP affinity: one client sticks to one endpoint.
        let sticky = rules::desired(&node, &[web(&[8080, 8081], Some(60)), empty(), echo()]);
        step(&mut nft, &second, &sticky, &mut garbage);
        // An established connection, to be kept through what follows.
        let mut established =
            TcpStream::connect_timeout(&SocketAddr::from((ECHO_IP, 7)), Duration::from_secs(2))
                .unwrap();
        established
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        round_trip(&mut established, "before");
        let first_answer = answered_by(cluster_ip).unwrap();
        for _ in 0..30 {
            assert_eq!(answered_by(cluster_ip).unwrap(), first_answer);
        }

        // A restart: full sync over the same table, then the service goes.
        let existing = nft.existing().unwrap();
        assert!(existing.chains.len() > 5, "{existing:?}");
        nft.apply(rules::full_sync(&sticky, &existing, &node))
            .unwrap();
        assert!([8080, 8081].contains(&answered_by(cluster_ip).unwrap()));
        round_trip(&mut established, "after a full sync");
        let gone = rules::desired(&node, &[empty(), echo()]);
        step(&mut nft, &sticky, &gone, &mut garbage);
        assert!(answered_by(cluster_ip).is_err());
        nft.apply_commands(&garbage.collect()).unwrap();
        let left = nft.existing().unwrap();
        assert!(
            !left.chains.iter().any(|(_, c)| c.contains("shop/web/")),
            "{left:?}"
        );
        assert!(answered_by(cluster_ip).is_err());
        round_trip(&mut established, "after another service went");

        // Back with no ready endpoint, refused at once; then served again;
        // then down to one endpoint, its old chains collected.
        let unready = rules::desired(&node, &[web(&[], None), empty(), echo()]);
        step(&mut nft, &gone, &unready, &mut garbage);
        let started = Instant::now();
        let err = answered_by(cluster_ip).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(started.elapsed() < Duration::from_millis(100));
        let ready = rules::desired(&node, &[web(&[8080, 8081], None), empty(), echo()]);
        step(&mut nft, &unready, &ready, &mut garbage);
        assert!([8080, 8081].contains(&answered_by(cluster_ip).unwrap()));
        let one = rules::desired(&node, &[web(&[8081], None), empty(), echo()]);
        step(&mut nft, &ready, &one, &mut garbage);
        for _ in 0..10 {
            assert_eq!(answered_by(cluster_ip).unwrap(), 8081);
        }
        assert!(!garbage.is_empty());
        nft.apply_commands(&garbage.collect()).unwrap();
        round_trip(&mut established, "after the collection");

        // What the incremental syncs built is what a full sync writes.
        let incremental = listing();
        nft.delete_tables().unwrap();
        full_sync(&mut nft, &one, &node).unwrap();
        assert_eq!(incremental, listing());
        // And a full sync from scratch removes what a previous run left.
        // Fewer tables: the extra ones go.
        let fewer = NodeConfig {
            service_tables: 2,
            ..node.clone()
        };
        let existing = nft.existing().unwrap();
        nft.apply(rules::full_sync(
            &rules::desired(&fewer, &[]),
            &existing,
            &fewer,
        ))
        .unwrap();
        let left = nft.existing().unwrap();
        assert_eq!(left.tables.len(), 3, "{left:?}");
        assert!(
            left.chains.iter().all(|(_, c)| !c.contains("shop/")),
            "{left:?}"
        );
        nft.delete_tables().unwrap();
    })
    .join()
    .unwrap();
}

/// Endpoints of a Service with ClientIP affinity coming and going in every
/// order, with collections in between, as a deployment scaled up and down
/// does: every incremental transaction applies (nft refuses a chain block
/// naming a set that an earlier transaction made, unless it is declared
/// again), and what they build is what a full sync writes.
#[test]
fn affinity_endpoints_churn() {
    if !can_run() {
        return;
    }
    let netns = Netns::new();
    std::thread::spawn(move || {
        netns.enter();
        let node = NodeConfig {
            cluster_cidr: Some((Ipv4Addr::new(10, 77, 0, 0), 16)),
            pod_cidr: Some((Ipv4Addr::new(10, 77, 0, 0), 24)),
            service_tables: 1,
        };
        let mut nft = Nft::open().unwrap();
        let mut prev = rules::desired(&node, &[web(&[8080, 8081], Some(60))]);
        full_sync(&mut nft, &prev, &node).unwrap();
        let mut garbage = Garbage::default();
        // A fixed pseudo-random walk over subsets of four endpoints.
        let mut state: u64 = 12345;
        for step in 0..400 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let draw = (state >> 33) as u32;
            let cmds = if draw.is_multiple_of(4) {
                garbage.collect()
            } else {
                let ports: Vec<u16> = (0..4u16)
                    .filter(|bit| (draw >> 8) & (1 << bit) != 0)
                    .map(|bit| 8080 + bit)
                    .collect();
                let next = rules::desired(&node, &[web(&ports, Some(60))]);
                let cmds = rules::incremental(&prev, &next, &mut garbage);
                prev = next;
                cmds
            };
            if let Err(e) = nft.apply_commands(&cmds) {
                panic!("step {step}: {e:#}");
            }
        }
        nft.apply_commands(&garbage.collect()).unwrap();
        let incremental = listing();
        nft.delete_tables().unwrap();
        full_sync(&mut nft, &prev, &node).unwrap();
        assert_eq!(incremental, listing());
        nft.delete_tables().unwrap();
    })
    .join()
    .unwrap();
}
