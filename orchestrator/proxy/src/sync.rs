//! The proxy's loop: Services and EndpointSlices through one watch each,
//! the table written once in full at start (whatever an earlier run left),
//! then, after each short batching window, one transaction with only the
//! Services that changed.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use tokio_util::sync::CancellationToken;

use crate::nft::Nft;
use crate::rules::{self, Garbage, NodeConfig, Ruleset};
use crate::services::service_ports;
use crate::{Changes, Watches};
use tapestry_runtime::lock;

/// How a node's proxy runs.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// This node, for the `Local` traffic policies.
    pub node_name: String,
    pub node: NodeConfig,
    /// Changes arriving within this window go into one transaction.
    pub batch: Duration,
    /// A full sync this often, repairing what anyone else changed.
    pub resync: Duration,
}

impl ProxyConfig {
    pub fn new(node_name: String, node: NodeConfig) -> Self {
        ProxyConfig {
            node_name,
            node,
            batch: Duration::from_millis(20),
            resync: Duration::from_secs(3600),
        }
    }
}

/// What the proxy has done, as Prometheus metrics.
#[derive(Debug)]
pub struct ProxyStats {
    /// Syncs by kind (`full`, `partial`).
    syncs: Family<SyncLabels, Counter>,
    sync_errors: Counter,
    /// Seconds from the start of a sync to its transaction applied.
    sync_seconds: Histogram,
    chains: Gauge,
    rules: Gauge,
    services: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    kind: &'static str,
}

impl Default for ProxyStats {
    fn default() -> Self {
        ProxyStats {
            syncs: Family::default(),
            sync_errors: Counter::default(),
            sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            chains: Gauge::default(),
            rules: Gauge::default(),
            services: Gauge::default(),
        }
    }
}

impl ProxyStats {
    /// Register under `tapestry_proxy_*`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tapestry_proxy");
        r.register(
            "syncs",
            "Table syncs, by kind (full, partial, or collect: deleting what partial ones left unused)",
            self.syncs.clone(),
        );
        r.register("sync_errors", "Syncs nft refused", self.sync_errors.clone());
        r.register(
            "sync_duration_seconds",
            "Time from a sync's start to its transaction applied",
            self.sync_seconds.clone(),
        );
        r.register(
            "chains",
            "Service and endpoint chains in the table",
            self.chains.clone(),
        );
        r.register("rules", "Rules in those chains", self.rules.clone());
        r.register(
            "services",
            "Services with rules in the table",
            self.services.clone(),
        );
    }
}

/// Keep the table in step with the cluster until `shutdown`. The table is
/// left in place at the end: a restarted proxy takes it over without
/// breaking established connections (their NAT lives in conntrack).
/// Registers with `watches` at once; the loop waits for them to be started.
pub fn start(
    watches: &Watches,
    config: ProxyConfig,
    nft: Nft,
    stats: Arc<ProxyStats>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let changes = watches.changes();
    let watches = watches.clone();
    tokio::spawn(async move {
        if watches.ready(&shutdown).await {
            run(watches, config, nft, stats, changes, shutdown).await;
        }
    })
}

async fn run(
    watches: Watches,
    config: ProxyConfig,
    nft: Nft,
    stats: Arc<ProxyStats>,
    changes: Arc<Changes>,
    shutdown: CancellationToken,
) {
    let mut proxy = Proxy {
        config,
        watches,
        stats,
        applied: HashMap::new(),
        nft: Arc::new(Mutex::new(nft)),
        garbage: Garbage::default(),
        garbage_since: None,
    };
    let mut full = true;
    let mut last_full = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        if last_full.elapsed() >= proxy.config.resync || proxy.outgrown() {
            full = true;
        }
        let changed = changes.take();
        let outcome = if full {
            proxy.full_sync().await
        } else {
            match proxy.sync(changed).await {
                Ok(())
                    if proxy
                        .collection_due()
                        .is_some_and(|due| due <= Instant::now()) =>
                {
                    proxy.collect().await
                }
                outcome => outcome,
            }
        };
        match outcome {
            Ok(()) => {
                if full {
                    last_full = Instant::now();
                }
                full = false;
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                proxy.stats.sync_errors.inc();
                tracing::warn!("service proxy sync failed (a full sync follows): {e:#}");
                // The kernel's state is unknown now.
                full = true;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        }
        let collection = proxy.collection_due();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(proxy.config.resync.saturating_sub(last_full.elapsed())) => {}
            _ = tokio::time::sleep_until(collection.unwrap_or_else(Instant::now).into()), if collection.is_some() => continue,
        }
        // Let a burst of changes (a Deployment scaling) land in one sync.
        tokio::time::sleep(proxy.config.batch).await;
    }
}

struct Proxy {
    config: ProxyConfig,
    watches: Watches,
    stats: Arc<ProxyStats>,
    /// What the table holds for each Service, by `namespace/name`.
    applied: HashMap<String, Ruleset>,
    /// Used from blocking tasks, one at a time.
    nft: Arc<Mutex<Nft>>,
    /// What syncs left unused, deleted a while after the first of it.
    garbage: Garbage,
    garbage_since: Option<Instant>,
}

/// How long unused chains, sets and elements wait to be deleted: long
/// enough to delete a burst's leftovers in one transaction (each deletion
/// costs a listing of the table), short enough not to pile up.
pub const COLLECT_AFTER: Duration = Duration::from_secs(1);

impl Proxy {
    /// The rules one Service needs now (empty once it is gone).
    fn desired(&self, key: &str) -> Ruleset {
        match self.watches.service(key) {
            (Some(service), slices) => self.rules_for(&service, &slices),
            (None, _) => Ruleset::default(),
        }
    }

    fn rules_for(&self, service: &Service, slices: &[Arc<EndpointSlice>]) -> Ruleset {
        let slices: Vec<&EndpointSlice> = slices.iter().map(Arc::as_ref).collect();
        rules::desired(
            &self.config.node,
            &service_ports(service, &slices, &self.config.node_name),
        )
    }

    async fn full_sync(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let services = self.watches.all_services();
        self.config.node.service_tables = rules::service_tables_for(services.len());
        let next: HashMap<String, Ruleset> = services
            .into_iter()
            .map(|(key, service, slices)| {
                let rules = self.rules_for(&service, &slices);
                (key, rules)
            })
            .collect();
        let mut whole = Ruleset::default();
        for r in next.values() {
            whole.merge(r);
        }
        let nft = self.nft.clone();
        let node = self.config.node.clone();
        let cmds = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut nft = lock(&nft);
            let existing = nft.existing()?;
            nft.apply(rules::full_sync(&whole, &existing, &node))
        });
        cmds.await??;
        self.applied = next;
        // The full sync deleted whatever was left over.
        self.garbage.clear();
        self.garbage_since = None;
        self.record(started, "full");
        tracing::info!(
            services = self.applied.len(),
            tables = self.config.node.service_tables,
            ms = started.elapsed().as_millis() as u64,
            "service proxy table written in full"
        );
        Ok(())
    }

    async fn sync(&mut self, changed: Vec<String>) -> anyhow::Result<()> {
        if changed.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let empty = Ruleset::default();
        let mut cmds = Vec::new();
        let mut next = Vec::with_capacity(changed.len());
        for key in changed {
            let rules = self.desired(&key);
            cmds.extend(rules::incremental(
                self.applied.get(&key).unwrap_or(&empty),
                &rules,
                &mut self.garbage,
            ));
            next.push((key, rules));
        }
        if !cmds.is_empty() {
            self.apply(cmds).await?;
        }
        if self.garbage.is_empty() {
            self.garbage_since = None;
        } else {
            self.garbage_since.get_or_insert(started);
        }
        for (key, rules) in next {
            if rules.is_empty() {
                self.applied.remove(&key);
            } else {
                self.applied.insert(key, rules);
            }
        }
        self.record(started, "partial");
        Ok(())
    }

    async fn apply(&self, cmds: Vec<rules::Command>) -> anyhow::Result<()> {
        let nft = self.nft.clone();
        tokio::task::spawn_blocking(move || lock(&nft).apply_commands(&cmds)).await?
    }

    /// Whether the Services have grown past what their tables suit: the
    /// next full sync spreads them over more.
    fn outgrown(&self) -> bool {
        rules::service_tables_for(self.applied.len() / 2) > self.config.node.service_tables
    }

    /// When the leftovers of earlier syncs are to be deleted, if any.
    fn collection_due(&self) -> Option<Instant> {
        self.garbage_since.map(|since| since + COLLECT_AFTER)
    }

    async fn collect(&mut self) -> anyhow::Result<()> {
        let cmds = self.garbage.collect();
        self.garbage_since = None;
        self.apply(cmds).await?;
        self.stats
            .syncs
            .get_or_create(&SyncLabels { kind: "collect" })
            .inc();
        Ok(())
    }

    fn record(&self, started: Instant, kind: &'static str) {
        let s = &self.stats;
        s.syncs.get_or_create(&SyncLabels { kind }).inc();
        s.sync_seconds.observe(started.elapsed().as_secs_f64());
        let count = |f: fn(&Ruleset) -> usize| self.applied.values().map(f).sum::<usize>() as i64;
        s.chains.set(count(Ruleset::chains));
        s.rules.set(count(Ruleset::rules));
        s.services.set(self.applied.len() as i64);
    }
}

/// `10.244.0.0/16` as its network address and prefix length (host bits
/// cleared: nft refuses a prefix that has them).
pub fn parse_cidr(cidr: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = cidr.split_once('/')?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Some((Ipv4Addr::from(u32::from(addr) & mask), len))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cidrs_lose_their_host_bits() {
        let p = super::parse_cidr;
        assert_eq!(
            p("10.244.3.7/16"),
            Some(("10.244.0.0".parse().unwrap(), 16))
        );
        assert_eq!(p("0.0.0.0/0"), Some(("0.0.0.0".parse().unwrap(), 0)));
        assert_eq!(p("10.0.0.1/32"), Some(("10.0.0.1".parse().unwrap(), 32)));
        assert_eq!(p("10.0.0.0/33"), None);
        assert_eq!(p("10.0.0.0"), None);
    }
}
