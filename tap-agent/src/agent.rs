//! Wiring of one agent run: sweep, load, attach, read, ship, serve metrics,
//! and on SIGTERM/SIGINT detach first, then flush.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tapestry_proto::tap::v1::Hello;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};
use tonic::transport::Endpoint;
use tracing::{error, info, warn};

use crate::{
    bpf::{self, AttachMode, LoadOptions, Tap},
    filter::{self, PolicySpec},
    metrics::{self, Metrics, MetricsState},
    ring::{BatchLimits, Reader},
    ship::Shipper,
    targets::{Reconciler, TapIdentity, Target, TargetSet},
    DropCounter,
};

/// Where the set of interfaces to tap comes from.
pub enum TargetSource {
    /// `--iface` names, fixed for the run (a missing one is an error at start).
    Static(Vec<String>),
    /// A watcher (e.g. pods of this node) publishing the whole desired set.
    Dynamic(watch::Receiver<TargetSet>),
}

pub struct RunConfig {
    pub targets: TargetSource,
    pub aggregator: String,
    pub policies: Vec<PolicySpec>,
    pub metrics_addr: SocketAddr,
    pub ring_bytes: u32,
    pub wakeup_bytes: u32,
    pub queue_batches: usize,
    pub batch: BatchLimits,
    pub mode: AttachMode,
    pub tap_id: String,
    pub node: String,
}

pub fn endpoint(url: &str) -> Result<Endpoint> {
    let ep = Endpoint::from_shared(url.to_string()).with_context(|| {
        format!("--aggregator `{url}` is not a valid URL (expected http://HOST:PORT)")
    })?;
    if ep.uri().host().is_none() {
        bail!("--aggregator `{url}` has no host (expected http://HOST:PORT)");
    }
    Ok(ep
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

pub async fn run(cfg: RunConfig) -> Result<()> {
    let endpoint = endpoint(&cfg.aggregator)?;
    let compiled = filter::compile(&cfg.policies)?;
    if let TargetSource::Static(ifaces) = &cfg.targets {
        for iface in ifaces {
            bpf::ifindex(iface).with_context(|| format!("--iface {iface}"))?;
        }
    }

    let swept = bpf::sweep_stale().context("removing stale tapestry programs")?;
    if swept.tcx_links + swept.clsact_filters > 0 {
        warn!(
            tcx_links = swept.tcx_links,
            clsact_filters = swept.clsact_filters,
            "removed programs left by an earlier run"
        );
    }
    let (mut tap, outputs) = Tap::load(&LoadOptions {
        ring_bytes: cfg.ring_bytes,
        wakeup_bytes: cfg.wakeup_bytes,
        mode: cfg.mode,
    })?;
    tap.set_policies(compiled)?;

    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(MetricsState {
        metrics: metrics.clone(),
        counters: Mutex::new(outputs.counters),
    });
    let listener_state = state.clone();
    let addr = cfg.metrics_addr;
    let metrics_task = tokio::spawn(async move { metrics::serve(addr, listener_state).await });

    let (hello_tx, hello_rx) = watch::channel(Hello::default());
    let identity = TapIdentity {
        tap_id: cfg.tap_id.clone(),
        node: cfg.node.clone(),
        policy_names: cfg.policies.iter().map(|p| p.name.clone()).collect(),
    };
    let mut reconciler = Reconciler::new(tap, identity, hello_tx, metrics.clone());
    let all_policies = if cfg.policies.len() == 64 {
        u64::MAX
    } else {
        (1u64 << cfg.policies.len()) - 1
    };
    let mut desired_rx = match cfg.targets {
        TargetSource::Static(ifaces) => {
            let desired: TargetSet = ifaces
                .iter()
                .map(|i| {
                    (
                        i.clone(),
                        Target {
                            interface: i.clone(),
                            pod: None,
                            policy_mask: all_policies,
                        },
                    )
                })
                .collect();
            // Interfaces named on the command line must attach at start.
            let errors = reconciler.reconcile(&desired);
            if let Some((iface, e)) = errors.into_iter().next() {
                reconciler.detach_all();
                return Err(e.context(format!("--iface {iface}")));
            }
            info!(interfaces = ?ifaces, aggregator = cfg.aggregator, "tapping");
            watch::channel(desired).1
        }
        TargetSource::Dynamic(rx) => rx,
    };
    // A static source's sender is gone at once; its last value still holds.
    let mut source_open = desired_rx.has_changed().is_ok();
    // Level-triggered: reconcile on every change and every few seconds (an
    // interface may come back, a pod's veth may be recreated).
    let (attach_stop_tx, mut attach_stop_rx) = watch::channel(false);
    let attach_task = tokio::spawn(async move {
        let mut resync = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                r = desired_rx.changed(), if source_open => source_open = r.is_ok(),
                _ = resync.tick() => {}
                _ = attach_stop_rx.changed() => {}
            }
            if *attach_stop_rx.borrow() {
                break;
            }
            let desired = desired_rx.borrow_and_update().clone();
            for (iface, e) in reconciler.reconcile(&desired) {
                warn!(interface = iface, "not tapped (will retry): {e:#}");
            }
        }
        reconciler.detach_all();
        reconciler
    });

    let drops = Arc::new(DropCounter::default());
    let (queue_tx, queue_rx) = mpsc::channel(cfg.queue_batches.max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = Reader {
        ring: outputs.ring,
        queue: queue_tx,
        limits: cfg.batch,
        metrics: metrics.clone(),
        drops: drops.clone(),
    };
    let mut reader_task = tokio::spawn(reader.run(stop_rx.clone()));
    let shipper = Shipper {
        endpoint,
        queue: queue_rx,
        hello: hello_rx,
        metrics: metrics.clone(),
        drops: drops.clone(),
        drain_timeout: Duration::from_secs(3),
    };
    let shipper_task = tokio::spawn(shipper.run(stop_rx.clone()));

    // Kernel-side losses (ring full) are reported to the aggregator too.
    let loss_state = state.clone();
    let loss_drops = drops.clone();
    let loss_task = tokio::spawn(async move {
        let mut last = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let now = loss_state.kernel_counters().get(3).copied().unwrap_or(0);
            if now > last {
                loss_drops.add(now - last);
            }
            last = now;
        }
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut failed = None;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
        r = &mut reader_task => { failed = Some(format!("ring reader ended: {r:?}")); }
        r = metrics_task => { failed = Some(format!("metrics server ended: {r:?}")); }
    }
    // Stop capturing first, then drain what the ring still holds and flush.
    let _ = attach_stop_tx.send(true);
    let reconciler = attach_task.await.context("attach task failed")?;
    let _ = stop_tx.send(true);
    if failed.is_none() {
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut reader_task).await;
    }
    if tokio::time::timeout(Duration::from_secs(5), shipper_task)
        .await
        .is_err()
    {
        warn!("gave up flushing to the aggregator");
    }
    loss_task.abort();
    drop(reconciler);
    if let Some(f) = failed {
        error!("{f}");
        bail!(f);
    }
    info!("stopped; all programs detached");
    Ok(())
}
