//! The scheduler and controller manager inside `tapestry server`: started
//! once the API server answers, each under its own leader-election Lease.
//! They use the API like any client, through kube-rs, but reach the
//! handler in process rather than over HTTPS.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use kube::Client;
use tapestry_controllers::ClusterCidr;
use tapestry_runtime::leader::{self, LeaderConfig};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Clone)]
pub struct ControlArgs {
    /// Pod address range; each node gets a /24 of it as spec.podCIDR.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// Elect a leader among servers sharing a store before scheduling or
    /// running controllers.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_elect_lease_duration: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub leader_elect_retry_period: Duration,
    /// A node whose kubelet stayed silent this long turns NotReady
    /// (Ready=Unknown) and gets the unreachable taints.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    pub node_monitor_grace_period: Duration,
    /// How often node health is checked.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub node_monitor_period: Duration,
    /// How often each HorizontalPodAutoscaler is evaluated.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub horizontal_pod_autoscaler_sync_period: Duration,
    /// How far back an autoscaler without its own scale-down behaviour
    /// looks before scaling down (the highest recent recommendation wins).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub horizontal_pod_autoscaler_downscale_stabilization: Duration,
    /// Do not run the scheduler in this process.
    #[arg(long)]
    pub no_scheduler: bool,
    /// Do not run the controller manager in this process.
    #[arg(long)]
    pub no_controllers: bool,
}

/// Start the scheduler and the controller manager as background tasks,
/// each as its own user (`system:kube-scheduler`,
/// `system:kube-controller-manager`) with the rights its bootstrap role
/// gives it.
pub async fn start(
    server: &tapestry_apiserver::Running,
    args: ControlArgs,
    data_dir: &std::path::Path,
    shutdown: CancellationToken,
) -> Result<()> {
    use tapestry_apiserver::authz::bootstrap::{CONTROLLER_MANAGER, SCHEDULER};
    let cluster_cidr = ClusterCidr::parse(&args.cluster_cidr).map_err(anyhow::Error::msg)?;
    let root_ca = server.ca_cert_pem.clone();
    let scheduler_client = Client::new(server.local_handler_as(SCHEDULER), "default");
    let client = Client::new(server.local_handler_as(CONTROLLER_MANAGER), "default");
    let identity = leader::identity();
    let lease = |name: &str| {
        let mut cfg = LeaderConfig::new(name, identity);
        cfg.lease_duration = args.leader_elect_lease_duration;
        cfg.renew_deadline = args.leader_elect_renew_deadline;
        cfg.retry_period = args.leader_elect_retry_period;
        cfg
    };
    if !args.no_scheduler {
        let stats = Arc::new(tapestry_scheduler::Stats::default());
        let c = scheduler_client.clone();
        let run = move |token: CancellationToken| {
            tapestry_scheduler::run(c.clone(), stats.clone(), token)
        };
        spawn_elected(
            args.leader_elect,
            scheduler_client,
            lease("kube-scheduler"),
            shutdown.clone(),
            run,
        );
    }
    if !args.no_controllers {
        if args.node_monitor_period.is_zero() {
            anyhow::bail!("--node-monitor-period must be positive");
        }
        // An hour is the longest window an autoscaler's own behaviour may
        // name; longer values would only overflow the controller's clocks.
        let hour = Duration::from_secs(3600);
        let sync = args.horizontal_pod_autoscaler_sync_period;
        if sync.is_zero() || sync > hour {
            anyhow::bail!(
                "--horizontal-pod-autoscaler-sync-period must be positive and at most 1h"
            );
        }
        if args.horizontal_pod_autoscaler_downscale_stabilization > hour {
            anyhow::bail!("--horizontal-pod-autoscaler-downscale-stabilization must be at most 1h");
        }
        let config = tapestry_controllers::Config {
            cluster_cidr,
            node_monitor_grace_period: args.node_monitor_grace_period,
            node_monitor_period: args.node_monitor_period,
            signer: signer(data_dir, &root_ca)?,
            root_ca: Some(root_ca),
            clock: tapestry_controllers::Clock::system(),
            hpa_sync_period: args.horizontal_pod_autoscaler_sync_period,
            hpa_downscale_stabilization: args.horizontal_pod_autoscaler_downscale_stabilization,
        };
        let c = client.clone();
        let run = move |token: CancellationToken| {
            tapestry_controllers::run(c.clone(), config.clone(), token)
        };
        spawn_elected(
            args.leader_elect,
            client,
            lease("kube-controller-manager"),
            shutdown,
            run,
        );
    }
    Ok(())
}

fn spawn_elected<F, Fut>(
    elect: bool,
    client: Client,
    cfg: LeaderConfig,
    shutdown: CancellationToken,
    run: F,
) where
    F: Fn(CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if elect {
        tokio::spawn(leader::run_elected(client, cfg, shutdown, run));
    } else {
        tokio::spawn(run(shutdown));
    }
}

/// The cluster CA for signing certificate requests, if this server holds
/// its key (`DATA_DIR/pki/ca.key`).
fn signer(
    data_dir: &std::path::Path,
    ca_pem: &str,
) -> Result<Option<tapestry_controllers::Signer>> {
    let path = data_dir.join("pki/ca.key");
    match std::fs::read_to_string(&path) {
        Ok(key_pem) => Ok(Some(tapestry_controllers::Signer {
            cert_pem: ca_pem.to_string(),
            key_pem,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "no {}: certificate requests are not signed here",
                path.display()
            );
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}
