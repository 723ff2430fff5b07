//! Wiring of one agent run: sweep, load, attach, read, ship, serve metrics,
//! and on SIGTERM/SIGINT detach first, then flush.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tapestry_proto::tap::v1::Hello;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{error, info, warn};

use crate::{
    bpf::{self, AttachMode, LoadOptions, Tap},
    filter::{Layout, PolicySpec},
    heartbeat::Heartbeat,
    metrics::{self, Metrics, MetricsState},
    ring::{BatchLimits, Reader},
    ship::Shipper,
    status::StatusBoard,
    targets::{self, Desired, Reconciler, TapIdentity, Target},
    DropCounter,
};

/// Where the desired state comes from.
pub enum TargetSource {
    /// `--iface` names tapped by fixed policies: everything must attach at
    /// start, and a missing interface is an error.
    Static {
        interfaces: Vec<String>,
        policies: Vec<PolicySpec>,
    },
    /// A watcher (the cluster source) publishing the whole desired state.
    Dynamic(watch::Receiver<Desired>),
}

pub struct RunConfig {
    pub targets: TargetSource,
    /// Aggregator URLs to choose from (one fixed, or a Service's endpoints).
    pub aggregators: watch::Receiver<Vec<String>>,
    /// Renew a heartbeat Lease (cluster modes).
    pub heartbeat: Option<Heartbeat>,
    pub board: Arc<StatusBoard>,
    pub metrics_addr: SocketAddr,
    pub ring_bytes: u32,
    pub wakeup_bytes: u32,
    pub queue_batches: usize,
    pub batch: BatchLimits,
    pub mode: AttachMode,
    pub tap_id: String,
    pub node: String,
    /// TLS to the aggregator with this client identity (https:// URLs).
    pub tls: Option<ClientTls>,
}

/// A tap's client identity for TLS to the aggregator. The files are read
/// at every connection, so a renewed certificate is used from the next one.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The tap's certificate (PEM), CN `tapestry:tap:NODE`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that issued the aggregator's certificate (PEM).
    pub ca: PathBuf,
}

impl ClientTls {
    fn config(&self) -> Result<ClientTlsConfig> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("{what} {}", p.display()))
        };
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(
                &self.ca,
                "the aggregator's CA",
            )?))
            .identity(Identity::from_pem(
                read(&self.cert, "this tap's certificate")?,
                read(&self.key, "this tap's key")?,
            )))
    }
}

/// `url` as an endpoint, if it can be an aggregator's address: a host,
/// and `https` exactly when TLS is configured.
pub fn check_url(url: &str, tls: bool) -> Result<Endpoint> {
    let ep = Endpoint::from_shared(url.to_string()).with_context(|| {
        format!("--aggregator `{url}` is not a valid URL (expected http://HOST:PORT)")
    })?;
    if ep.uri().host().is_none() {
        bail!("--aggregator `{url}` has no host (expected http://HOST:PORT)");
    }
    match (ep.uri().scheme_str() == Some("https"), tls) {
        (true, false) => bail!(
            "--aggregator `{url}` is https: give --tls-cert, --tls-key and --tls-ca (or --tls-from-csr)"
        ),
        (false, true) => bail!(
            "--aggregator `{url}`: with TLS configured the aggregator is reached at https://HOST:PORT"
        ),
        _ => Ok(ep),
    }
}

pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint> {
    let ep = check_url(url, tls.is_some())?;
    let ep = match tls {
        Some(tls) => ep
            .tls_config(tls.config()?)
            .with_context(|| format!("TLS to {url}"))?,
        None => ep,
    };
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
    let stop_signal = tapestry_runtime::shutdown::on_signals()?;
    if let TargetSource::Static {
        interfaces,
        policies,
    } = &cfg.targets
    {
        if let Some(r) = Layout::default().plan(policies).1.into_iter().next() {
            bail!("policy {}: {}", r.policy, r.error);
        }
        for iface in interfaces {
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
    let (tap, outputs) = Tap::load(&LoadOptions {
        ring_bytes: cfg.ring_bytes,
        wakeup_bytes: cfg.wakeup_bytes,
        mode: cfg.mode,
    })?;

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
    };
    let board = cfg.board.clone();
    let mut reconciler = Reconciler::new(tap, identity, hello_tx, metrics.clone(), board.clone());
    let mut desired_rx = match cfg.targets {
        TargetSource::Static {
            interfaces,
            policies,
        } => {
            let names: BTreeSet<String> = policies.iter().map(|p| p.name.clone()).collect();
            let desired = Desired {
                targets: interfaces
                    .iter()
                    .map(|i| {
                        (
                            i.clone(),
                            Target {
                                interface: i.clone(),
                                pod: None,
                                policies: names.clone(),
                            },
                        )
                    })
                    .collect(),
                policies,
            };
            // Interfaces named on the command line must attach at start.
            let outcome = reconciler.reconcile(&desired);
            if let Some(problem) = outcome.messages().into_iter().next() {
                reconciler.detach_all();
                bail!("--iface: {problem}");
            }
            info!(interfaces = ?interfaces, "tapping");
            watch::channel(desired).1
        }
        TargetSource::Dynamic(rx) => rx,
    };
    // A static source's sender is gone at once; its last value still holds.
    let mut source_open = desired_rx.has_changed().is_ok();
    // Level-triggered: reconcile on every change and every few seconds (an
    // interface may come back, a pod's veth may be recreated).
    let (attach_stop_tx, mut attach_stop_rx) = watch::channel(false);
    let attach_board = board.clone();
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
            let outcome = reconciler.reconcile(&desired);
            targets::report(&attach_board, &outcome);
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
    let shipper = Shipper::new(
        cfg.aggregators,
        board.clone(),
        queue_rx,
        hello_rx,
        metrics.clone(),
        drops.clone(),
        Duration::from_secs(3),
    )
    .with_tls(cfg.tls);
    let shipper_task = tokio::spawn(shipper.run(stop_rx.clone()));

    // Kernel-side losses (ring full) are reported to the aggregator too.
    let loss_state = state.clone();
    let loss_drops = drops.clone();
    let loss_task = tokio::spawn(async move {
        let mut last = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let now = loss_state.ring_full();
            if now > last {
                loss_drops.add(now - last);
            }
            last = now;
        }
    });

    let heartbeat_task = cfg.heartbeat.map(|hb| {
        let (state, status_board) = (state.clone(), board.clone());
        let status = move || status_board.snapshot(&state.metrics, state.ring_full());
        tokio::spawn(hb.run(status, board.clone()))
    });

    let mut failed = None;
    tokio::select! {
        _ = stop_signal.cancelled() => info!("stopping"),
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
    if let Some(t) = heartbeat_task {
        t.abort();
    }
    drop(reconciler);
    if let Some(f) = failed {
        error!("{f}");
        bail!(f);
    }
    info!("stopped; all programs detached");
    Ok(())
}
