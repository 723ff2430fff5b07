//! `tapestry hollow`: kubemark-style fake nodes against any API server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct HollowArgs {
    /// Kubeconfig of the cluster to join.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// How many nodes to run in this process.
    #[arg(long)]
    pub count: usize,
    /// Node names are PREFIX-0 .. PREFIX-(COUNT-1).
    #[arg(long, default_value = "hollow")]
    pub name_prefix: String,
    /// Lease renewal interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Node status (Ready condition heartbeat) interval.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub status_interval: Duration,
    /// Capacity each node reports.
    #[arg(long, default_value = "4")]
    pub cpu: String,
    #[arg(long, default_value = "16Gi")]
    pub memory: String,
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Threads running the nodes. One thread serves thousands of nodes and
    /// spends about 40% less CPU per pod than two (no cross-thread
    /// wake-ups), leaving the other cores to the control plane under test.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
}

pub async fn run(args: HollowArgs, shutdown: CancellationToken) -> Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    if args.heartbeat_interval.is_zero() || args.status_interval.is_zero() {
        bail!("--heartbeat-interval and --status-interval must be positive");
    }
    let kube_config = crate::kubeclient::config_from(&args.kubeconfig).await?;
    let client = crate::kubeclient::http2(kube_config.clone())?;
    // Each node writes as itself (the Node authorizer and NodeRestriction
    // apply to it), over one more connection: the kubeconfig's user must
    // be allowed to impersonate nodes (the admin is).
    let as_node = crate::kubeclient::http2_impersonating(kube_config)?;
    let node_client = move |name: &str| {
        as_node(
            &tapestry_runtime::csr::node_user(name),
            &[tapestry_runtime::csr::NODES_GROUP],
        )
    };
    let config = tapestry_hollow::Config {
        count: args.count,
        prefix: args.name_prefix,
        heartbeat: args.heartbeat_interval,
        status_interval: args.status_interval,
        cpu: args.cpu,
        memory: args.memory,
        pods: args.max_pods,
    };
    tapestry_hollow::run(client, node_client, config, shutdown).await
}
