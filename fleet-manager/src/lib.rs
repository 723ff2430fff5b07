//! Tapestry's fleet manager: a REST API for tap policies and tools, and the
//! controllers that make every node tapped by them.
//!
//! ```text
//!  curl / UI ──HTTPS──► api (axum) ──kube-rs──► TapPolicy / TapTool objects
//!                                                   │ (the only state)
//!  Nodes, Pods, Namespaces, tap Leases ──► fleet (informers) ◄──┘
//!        │                                   │
//!        ▼                                   ▼
//!  deploy: CRDs, tapestry-system,       status: matched pods and nodes,
//!  tap-agent DaemonSet, aggregator      packets from the taps' heartbeats,
//!  Deployment + Service, restored       Ready condition, Events
//!  when edited or deleted
//! ```
//!
//! The REST API is a validated face over the custom resources, so
//! `kubectl get tappolicies` and the API see the same objects. Tap-agents
//! and aggregators watch those objects themselves; the fleet manager never
//! talks to them, it reads what they report (Leases, status).

pub mod api;
pub mod deploy;
pub mod fleet;
pub mod metrics;
pub mod status;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

pub use deploy::Workloads;

/// How a fleet manager runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the REST API listens (HTTPS).
    pub listen: SocketAddr,
    /// The serving certificate and key (PEM).
    pub tls: tls::Identity,
    /// Tokens accepted by the REST API, in kube-apiserver's token-file
    /// format; without it tokens are checked with the cluster (TokenReview).
    pub token_file: Option<std::path::PathBuf>,
    /// What is deployed onto the cluster; `None`: nothing (another fleet
    /// manager, or the user, deploys the taps).
    pub workloads: Option<Workloads>,
    /// How often policy status is recomputed and heartbeats are read.
    pub status_period: Duration,
}

/// A running fleet manager.
pub struct Running {
    /// Where the REST API listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Wait until it has stopped (after its shutdown token is cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Start the fleet manager: informers, then (leader-elected) deployment and
/// status controllers, then the REST API. Returns once the API listens.
pub async fn start(
    client: kube::Client,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Running> {
    let metrics = Arc::new(metrics::Metrics::new());
    let auth = match &config.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading token file {}", path.display()))?;
            let file = tapestry_apimachinery::tokens::TokenFile::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            api::auth::Authenticator::File(file)
        }
        None => api::auth::Authenticator::cluster(client.clone()),
    };
    // The kinds must be served before anything watches them.
    deploy::install_crds(&client, &shutdown).await?;
    let fleet = fleet::Fleet::start(client.clone(), shutdown.clone());
    let state = Arc::new(api::AppState {
        client: client.clone(),
        auth,
        authorizer: api::auth::Authorizer::new(client.clone()),
        metrics: metrics.clone(),
        fleet: fleet.clone(),
    });
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let server = api::serve(listener, config.tls.clone(), state, shutdown.clone())?;

    let controllers = {
        let client = client.clone();
        let shutdown = shutdown.clone();
        let workloads = config.workloads.clone();
        let period = config.status_period;
        tokio::spawn(async move {
            let leader = tapestry_runtime::leader::LeaderConfig {
                namespace: tapestry_proto::heartbeat::NAMESPACE.into(),
                ..tapestry_runtime::leader::LeaderConfig::new(
                    "tapestry-fleet-manager",
                    tapestry_runtime::leader::identity(),
                )
            };
            if let Err(e) = deploy::ensure_namespace(&client, &shutdown).await {
                tracing::error!("creating namespace {}: {e:#}", leader.namespace);
                return;
            }
            tapestry_runtime::leader::run_elected(client.clone(), leader, shutdown, |token| {
                let client = client.clone();
                let fleet = fleet.clone();
                let metrics = metrics.clone();
                let workloads = workloads.clone();
                async move {
                    let deploying = workloads.map(|w| {
                        tokio::spawn(deploy::run(
                            client.clone(),
                            w,
                            metrics.clone(),
                            token.clone(),
                        ))
                    });
                    status::run(client, fleet, metrics, period, token).await;
                    if let Some(d) = deploying {
                        let _ = d.await;
                    }
                }
            })
            .await;
        })
    };
    let task = tokio::spawn(async move {
        let _ = server.await;
        let _ = controllers.await;
    });
    tracing::info!(%addr, "fleet manager serving");
    Ok(Running { addr, task })
}
