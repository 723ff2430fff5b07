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

pub struct RunConfig {
    pub interfaces: Vec<String>,
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
    for iface in &cfg.interfaces {
        bpf::ifindex(iface).with_context(|| format!("--iface {iface}"))?;
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
    let desired: TargetSet = cfg
        .interfaces
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
    let errors = reconciler.reconcile(&desired);
    if let Some((iface, e)) = errors.into_iter().next() {
        reconciler.detach_all();
        return Err(e.context(format!("--iface {iface}")));
    }
    info!(interfaces = ?cfg.interfaces, aggregator = cfg.aggregator, "tapping");

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
    reconciler.detach_all();
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
