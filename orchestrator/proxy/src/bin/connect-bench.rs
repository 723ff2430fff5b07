//! The first packet's cost through a ClusterIP: TCP connect latency from a
//! client pod to a Service's ClusterIP (DNAT by the proxy's table, with
//! 1,000 other Services in it) against connecting straight to the pod's
//! address, through the same node. Three network namespaces: a client
//! pod, a server pod (three endpoint addresses) and the node routing
//! between them with the proxy's tables. Rounds alternate the two targets
//! (the pod's three addresses in turn, as the Service spreads over them).
//! Then the tables are removed and the pod connected to again: what the
//! proxy's NAT hooks cost connections that are not to a Service.
//! Needs root, iproute2 and nft.
//!
//! `connect-bench [CONNECTIONS]` (default 4000 per target).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tapestry_proxy::nft;
use tapestry_proxy::rules::{self, Endpoint, NodeConfig, Protocol, Ruleset, ServicePort};

#[path = "support/netns.rs"]
mod netns;
use netns::Netns;

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 128, 1, 2);
const PODS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 128, 2, 2),
    Ipv4Addr::new(10, 128, 2, 3),
    Ipv4Addr::new(10, 128, 2, 4),
];
const FILLER_SERVICES: u32 = 1000;

fn main() -> Result<()> {
    let connections: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().with_context(|| format!("{a:?}: not a count"))?,
        None => 4000,
    };
    let node = Netns::new("tpcb-node".into())?;
    let client = Netns::new("tpcb-client".into())?;
    let server = Netns::new("tpcb-server".into())?;
    wire(&node, &client, &server)?;
    let node_name = node.0.clone();
    std::thread::spawn(move || -> Result<()> {
        netns::enter(&node_name)?;
        let config = NodeConfig {
            cluster_cidr: Some((Ipv4Addr::new(10, 128, 0, 0), 16)),
            pod_cidr: None,
            service_tables: rules::service_tables_for(FILLER_SERVICES as usize + 1),
        };
        let mut whole = Ruleset::default();
        for i in 0..=FILLER_SERVICES {
            whole.merge(&rules::desired(&config, &[service(i)]));
        }
        let mut nft = nft::Nft::open()?;
        let existing = nft.existing()?;
        nft.apply(rules::full_sync(&whole, &existing, &config))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("rules thread panicked"))??;

    let server_name = server.0.clone();
    let listening = std::thread::spawn(move || -> Result<TcpListener> {
        netns::enter(&server_name)?;
        Ok(TcpListener::bind("0.0.0.0:8080")?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listener thread panicked"))??;
    std::thread::spawn(move || {
        for stream in listening.incoming() {
            drop(stream);
        }
    });

    let client_name = client.0.clone();
    let (through_service, straight) = std::thread::spawn(move || -> Result<_> {
        netns::enter(&client_name)?;
        let service = SocketAddr::from((CLUSTER_IP, 80));
        let pod = |round: usize| SocketAddr::from((PODS[round % PODS.len()], 8080));
        // Warm both paths (ARP, routes) before timing.
        for round in 0..50 {
            connect_time(service)?;
            connect_time(pod(round))?;
        }
        let mut a = Vec::with_capacity(connections);
        let mut b = Vec::with_capacity(connections);
        for round in 0..connections {
            if round % 2 == 0 {
                a.push(connect_time(service)?);
                b.push(connect_time(pod(round))?);
            } else {
                b.push(connect_time(pod(round))?);
                a.push(connect_time(service)?);
            }
        }
        Ok((a, b))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let node_name = node.0.clone();
    std::thread::spawn(move || -> Result<()> {
        netns::enter(&node_name)?;
        nft::Nft::open()?.delete_tables()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("rules thread panicked"))??;
    let client_name = client.0.clone();
    let without_tables = std::thread::spawn(move || -> Result<_> {
        netns::enter(&client_name)?;
        (0..connections)
            .map(|round| connect_time(SocketAddr::from((PODS[round % PODS.len()], 8080))))
            .collect::<Result<Vec<_>>>()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let (s50, s99) = percentiles(through_service);
    let (p50, p99) = percentiles(straight);
    let (n50, n99) = percentiles(without_tables);
    println!(
        "{:<28} {:>10} {:>10}",
        format!("{connections} connects each"),
        "p50",
        "p99"
    );
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    println!(
        "{:<28} {:>10} {:>10}",
        "through the ClusterIP",
        us(s50),
        us(s99)
    );
    println!(
        "{:<28} {:>10} {:>10}",
        "straight to the pod",
        us(p50),
        us(p99)
    );
    println!(
        "{:<28} {:>10} {:>10}",
        "straight, no proxy tables",
        us(n50),
        us(n99)
    );
    println!(
        "{:<28} {:>9.2}x {:>9.2}x",
        "ratio (ClusterIP/straight)",
        s50.as_secs_f64() / p50.as_secs_f64(),
        s99.as_secs_f64() / p99.as_secs_f64()
    );
    Ok(())
}

fn connect_time(to: SocketAddr) -> Result<Duration> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .with_context(|| format!("connecting to {to}"))?;
    let took = started.elapsed();
    drop(stream);
    Ok(took)
}

fn percentiles(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    (at(0.50), at(0.99))
}

/// The measured Service is number 0 (10.96.0.10:80 → the server pod's
/// three addresses); the rest fill the table as a cluster's would.
fn service(i: u32) -> ServicePort {
    let endpoints = if i == 0 {
        PODS.iter()
            .map(|ip| Endpoint {
                ip: *ip,
                port: 8080,
                local: false,
            })
            .collect()
    } else {
        (0..3)
            .map(|e| Endpoint {
                ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 100, 0)) + i * 4 + e),
                port: 8080,
                local: false,
            })
            .collect()
    };
    ServicePort {
        namespace: "bench".into(),
        name: format!("svc{i}"),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        cluster_ips: vec![Ipv4Addr::from(u32::from(CLUSTER_IP) + i)],
        port: 80,
        node_port: None,
        affinity_seconds: None,
        internal_local: false,
        external_local: false,
        endpoints,
    }
}

/// A veth pair from the node to each pod; the node forwards between them.
fn wire(node: &Netns, client: &Netns, server: &Netns) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let ok = Command::new("ip").args(args).status()?.success();
        if !ok {
            bail!("ip {} failed", args.join(" "));
        }
        Ok(())
    };
    let n = node.0.as_str();
    for (pod, host_side, gateway, addresses) in [
        (client, "cb-client", "10.128.1.1", vec![CLIENT]),
        (server, "cb-server", "10.128.2.1", PODS.to_vec()),
    ] {
        let p = pod.0.as_str();
        run(&[
            "link", "add", host_side, "netns", n, "type", "veth", "peer", "name", "eth0", "netns",
            p,
        ])?;
        run(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            host_side,
        ])?;
        run(&["-n", n, "link", "set", host_side, "up"])?;
        for a in &addresses {
            run(&["-n", p, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        run(&["-n", p, "link", "set", "eth0", "up"])?;
        run(&["-n", p, "link", "set", "lo", "up"])?;
        run(&["-n", p, "route", "add", "default", "via", gateway])?;
    }
    run(&["-n", n, "link", "set", "lo", "up"])?;
    let ok = Command::new("ip")
        .args(["netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .status()?
        .success();
    if !ok {
        bail!("enabling forwarding in {n}");
    }
    Ok(())
}
