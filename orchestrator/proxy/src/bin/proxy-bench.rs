//! How long the proxy takes to write its table: a full sync of 1,000 /
//! 5,000 / 10,000 Services with 3 endpoints each, and one endpoint of one
//! Service changing, against `nft -f` loading the same table from its text
//! (the floor: one transaction, nothing computed). As in the proxy, what
//! changes leave unused is deleted in one collection once it is a second
//! old, timed apart. Each size runs in a network namespace of its own.
//! Needs root and nft.
//!
//! `proxy-bench [SIZES...]` (default 1000 5000 10000).

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tapestry_proxy::nft::Nft;
use tapestry_proxy::sync::COLLECT_AFTER;

#[path = "support/netns.rs"]
mod netns;
use netns::Netns;
use tapestry_proxy::rules::{self, Endpoint, Garbage, NodeConfig, Protocol, Ruleset, ServicePort};

const CHANGES: usize = 100;

fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().with_context(|| format!("{a:?}: not a count")))
        .collect::<Result<_>>()?;
    let sizes = if sizes.is_empty() {
        vec![1000, 5000, 10000]
    } else {
        sizes
    };
    println!(
        "{:>8} {:>7} {:>7} | {:>12} {:>12} {:>8} | {:>14} {:>14} {:>14} | {:>13}",
        "services",
        "chains",
        "rules",
        "full sync",
        "nft -f",
        "ratio",
        "1 change p50",
        "1 change p99",
        "first change",
        "collections"
    );
    for n in sizes {
        // Each size in a thread of its own, moved into its namespace.
        std::thread::spawn(move || run(n))
            .join()
            .map_err(|_| anyhow::anyhow!("the run for {n} services panicked"))??;
    }
    Ok(())
}

fn service(i: usize, generation: usize) -> ServicePort {
    let ip = |base: u32| Ipv4Addr::from(base + i as u32);
    ServicePort {
        namespace: format!("ns{}", i % 50),
        name: format!("svc{i}"),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
        // 10.96.0.0 + i, pods from 10.128.0.0 on.
        cluster_ips: vec![ip(0x0a60_0000)],
        port: 80,
        node_port: None,
        affinity_seconds: None,
        internal_local: false,
        external_local: false,
        endpoints: (0..3)
            .map(|e| Endpoint {
                ip: Ipv4Addr::from(0x0a80_0000 + (i * 4 + e) as u32 + (generation << 20) as u32),
                port: 8080,
                local: false,
            })
            .collect(),
    }
}

fn run(n: usize) -> Result<()> {
    let ours = Netns::new(format!("tpbench-{n}"))?;
    netns::enter(&ours.0)?;
    let node = NodeConfig {
        cluster_cidr: Some((Ipv4Addr::new(10, 128, 0, 0), 9)),
        pod_cidr: None,
        service_tables: rules::service_tables_for(n),
    };
    // As the sync loop keeps it: one ruleset per Service.
    let mut applied: Vec<Ruleset> = (0..n)
        .map(|i| rules::desired(&node, &[service(i, 0)]))
        .collect();
    let started = Instant::now();
    let fresh: Vec<Ruleset> = (0..n)
        .map(|i| rules::desired(&node, &[service(i, 0)]))
        .collect();
    let mut whole = Ruleset::default();
    for r in &fresh {
        whole.merge(r);
    }
    // The proxy's way: one libnftables context for its life.
    let mut nft = Nft::open()?;
    let existing = nft.existing()?;
    nft.apply(rules::full_sync(&whole, &existing, &node))?;
    let full = started.elapsed();
    let chains = whole.chains();
    let rule_count = whole.rules();

    // One endpoint of one Service changes, as one sync applies it.
    let mut times = Vec::with_capacity(CHANGES);
    let mut collections = Vec::new();
    let mut garbage = Garbage::default();
    let mut garbage_since: Option<Instant> = None;
    for c in 0..CHANGES {
        let i = (c * 7919) % n;
        let started = Instant::now();
        let mut changed = service(i, 0);
        changed.endpoints[1] = service(i, c + 1).endpoints[1].clone();
        let next = rules::desired(&node, &[changed]);
        nft.apply_commands(&rules::incremental(&applied[i], &next, &mut garbage))?;
        times.push(started.elapsed());
        applied[i] = next;
        let since = *garbage_since.get_or_insert(started);
        if since.elapsed() >= COLLECT_AFTER {
            let started = Instant::now();
            nft.apply_commands(&garbage.collect())?;
            collections.push(started.elapsed());
            garbage_since = None;
        }
    }
    // What is left, as the proxy deletes it a second later.
    if !garbage.is_empty() {
        let started = Instant::now();
        nft.apply_commands(&garbage.collect())?;
        collections.push(started.elapsed());
    }
    // The first change after the full sync is reported on its own: it
    // costs several times what later ones do.
    let first = times[0];
    times.sort();
    collections.sort();

    // The floor: the same tables as text, loaded by nft into a fresh namespace.
    let listing = Command::new("nft").args(["list", "ruleset"]).output()?;
    if !listing.status.success() {
        bail!("nft list: {}", String::from_utf8_lossy(&listing.stderr));
    }
    let file = std::env::temp_dir().join(format!("tpbench-{n}.nft"));
    std::fs::write(&file, &listing.stdout)?;
    let floor_ns = Netns::new(format!("tpbench-{n}-floor"))?;
    netns::enter(&floor_ns.0)?;
    let started = Instant::now();
    let loaded = Command::new("nft").arg("-f").arg(&file).output()?;
    let floor = started.elapsed();
    if !loaded.status.success() {
        bail!("nft -f: {}", String::from_utf8_lossy(&loaded.stderr));
    }
    let _ = std::fs::remove_file(&file);
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!(
        "{:>8} {:>7} {:>7} | {:>12} {:>12} {:>7.2}x | {:>14} {:>14} {:>14} | {:>2} × {:>8}",
        n,
        chains,
        rule_count,
        ms(full),
        ms(floor),
        full.as_secs_f64() / floor.as_secs_f64(),
        ms(times[times.len() / 2]),
        ms(times[(times.len() * 99 / 100).min(times.len() - 1)]),
        ms(first),
        collections.len(),
        collections
            .get(collections.len() / 2)
            .map_or("-".to_string(), |d| ms(*d)),
    );
    Ok(())
}
