//! The proxy's table in a real kernel: a network namespace of the test's
//! own, rules applied through `nft -j`, and real TCP connections to
//! ClusterIPs and NodePorts. Needs root and nft; skips without them unless
//! `CI=true`, where it fails loudly.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tapestry_proxy::nft;
use tapestry_proxy::rules::{self, Endpoint, Existing, NodeConfig, Protocol, ServicePort};

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
        let name = format!("tpproxy-{}", std::process::id());
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
        };
        let cluster_ip = SocketAddr::from((CLUSTER_IP, 80));
        let node_port = SocketAddr::from((POD_IP, 30080));

        // A table in an unknown state: the full sync.
        let first = rules::desired(&node, &[web(&[8080], None), empty()]);
        nft::apply(rules::full_sync(&first, &nft::existing().unwrap())).unwrap();
        assert_eq!(answered_by(cluster_ip).unwrap(), 8080);
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
        let second = rules::desired(&node, &[web(&[8080, 8081], None), empty()]);
        let cmds = rules::incremental(&first, &second);
        nft::apply(cmds).unwrap();
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..60 {
            *seen.entry(answered_by(cluster_ip).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 2, "{seen:?}");

        // ClientIP affinity: one client sticks to one endpoint.
        let sticky = rules::desired(&node, &[web(&[8080, 8081], Some(60)), empty(), echo()]);
        nft::apply(rules::incremental(&second, &sticky)).unwrap();
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
        let existing = nft::existing().unwrap();
        assert!(existing.chains.len() > 5, "{existing:?}");
        nft::apply(rules::full_sync(&sticky, &existing)).unwrap();
        assert!([8080, 8081].contains(&answered_by(cluster_ip).unwrap()));
        round_trip(&mut established, "after a full sync");
        let gone = rules::desired(&node, &[empty(), echo()]);
        nft::apply(rules::incremental(&sticky, &gone)).unwrap();
        let left = nft::existing().unwrap();
        assert!(
            !left.chains.iter().any(|c| c.contains("shop/web/")),
            "{left:?}"
        );
        assert!(answered_by(cluster_ip).is_err());
        round_trip(&mut established, "after another service went");
        // And a full sync from scratch removes what a previous run left.
        nft::apply(rules::full_sync(
            &rules::desired(&node, &[]),
            &Existing {
                chains: nft::existing().unwrap().chains,
                ..Default::default()
            },
        ))
        .unwrap();
        nft::delete_table().unwrap();
    })
    .join()
    .unwrap();
}
