//! `tapestry up`: a one-node cluster on this machine — the control plane
//! and a node agent in one process, until SIGINT/SIGTERM.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tapestry_apiserver::pki::Pki;
use tapestry_apiserver::ServerConfig;
use tapestry_store::{RedbStore, Store};
use tokio_util::sync::CancellationToken;

use crate::node::{agent_config, hostname, node_client, require_root, AgentArgs};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Where the store, certificates, kubeconfig, images and pods live.
    #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path)]
    data_dir: PathBuf,
    /// Address to serve the Kubernetes API on (HTTPS).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// IPv4 range ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// Where the fleet manager's REST API listens (HTTPS, certificate from
    /// the cluster CA, the cluster's tokens).
    #[arg(long, default_value = "127.0.0.1:8443")]
    fleet_manager_listen: SocketAddr,
    /// Run without the fleet manager: no tap policies API, no taps.
    #[arg(long)]
    no_fleet_manager: bool,
    #[command(flatten)]
    control: crate::control::ControlArgs,
    #[command(flatten)]
    agent: AgentArgs,
}

/// The control plane of a local cluster: the API server, then the scheduler
/// and the controller manager as its clients.
async fn start_control_plane(
    args: &UpArgs,
    shutdown: CancellationToken,
) -> Result<tapestry_apiserver::Running> {
    let path = args.data_dir.join("store.redb");
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(&path).with_context(|| format!("opening store {}", path.display()))?,
    );
    let running = tapestry_apiserver::start(
        ServerConfig {
            service_cidr: args.service_cidr.clone(),
            ..ServerConfig::new(args.data_dir.clone(), args.listen)
        },
        store,
        shutdown.clone(),
    )
    .await?;
    crate::control::start(running.local_handler(), args.control.clone(), shutdown).await?;
    Ok(running)
}

pub async fn run(args: UpArgs) -> Result<()> {
    require_root("tapestry up")?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let signals = crate::shutdown_on_signals()?;
    let cp_shutdown = CancellationToken::new();
    let node_shutdown = CancellationToken::new();
    let cp = start_control_plane(&args, cp_shutdown.clone()).await?;
    let ca = std::fs::read_to_string(args.data_dir.join("pki/ca.crt"))?;
    let token = std::fs::read_to_string(args.data_dir.join("node-token"))?
        .trim()
        .to_string();
    // The node takes the API server's address when that is a specific one,
    // so nodes that join from other hosts (or network namespaces) reach
    // this node's host-network pods, such as the aggregator.
    let node_ip = match cp.addr.ip() {
        ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    let server = format!("https://{}", SocketAddr::new(node_ip, cp.addr.port()));
    let client = node_client(&server, &ca, &token).await?;
    let node_name = args.agent.node_name.clone().unwrap_or_else(hostname);
    // The kubelet's serving certificate comes from the cluster CA here.
    let pki = Pki {
        dir: args.data_dir.join("pki"),
        ca_cert_pem: ca.clone(),
        serving_cert_pem: String::new(),
        serving_key_pem: String::new(),
    };
    let serving = pki.issue(
        &node_name,
        &[],
        &[node_name.clone(), node_ip.to_string(), "localhost".into()],
        true,
    )?;
    let mut agent = args.agent.clone();
    agent.node_name = Some(node_name);
    agent.cluster_dns = agent
        .cluster_dns
        .or(crate::node::default_cluster_dns(&args.service_cidr));
    let config = agent_config(
        &agent,
        args.data_dir.clone(),
        node_ip,
        ca,
        Some(serving),
        true,
        &args.control.cluster_cidr,
    )?;
    let node = match tapestry_kubelet::start(config, client, node_shutdown.clone()).await {
        Ok(n) => n,
        Err(e) => {
            cp_shutdown.cancel();
            cp.wait().await;
            return Err(e);
        }
    };
    let fleet_shutdown = CancellationToken::new();
    let fleet = if args.no_fleet_manager {
        None
    } else {
        match start_fleet_manager(&args, &pki, fleet_shutdown.clone()).await {
            Ok(f) => Some(f),
            Err(e) => {
                node_shutdown.cancel();
                node.wait().await;
                cp_shutdown.cancel();
                cp.wait().await;
                return Err(e);
            }
        }
    };
    tracing::info!(api = %cp.addr, kubelet_api = %node.addr, "cluster ready");
    println!("kubeconfig: {}", cp.kubeconfig.display());
    if let Some(f) = &fleet {
        println!(
            "fleet manager: https://{} (CA {})",
            f.addr,
            args.data_dir.join("pki/ca.crt").display()
        );
    }
    signals.cancelled().await;
    fleet_shutdown.cancel();
    if let Some(f) = fleet {
        f.wait().await;
    }
    // Pods stop while the API server still records their last status.
    node_shutdown.cancel();
    node.wait().await;
    cp_shutdown.cancel();
    cp.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// The fleet manager beside the cluster: its own identity, a serving
/// certificate from the cluster CA, the cluster's tokens for its REST API,
/// and tap-agent and aggregator images built from the programs installed
/// next to `tapestry` (without them it serves its API but deploys no taps).
async fn start_fleet_manager(
    args: &UpArgs,
    pki: &Pki,
    shutdown: CancellationToken,
) -> Result<tapestry_fleet_manager::Running> {
    let credentials = args.data_dir.join("credentials");
    let client =
        crate::kubeclient::client_from(&credentials.join("fleet-manager.kubeconfig")).await?;
    let ip = args.fleet_manager_listen.ip().to_string();
    let (cert_pem, key_pem) = pki.issue(
        "tapestry-fleet-manager",
        &[],
        &["localhost".into(), "127.0.0.1".into(), ip],
        true,
    )?;
    let workloads = match crate::node::tap_images(&args.data_dir) {
        Ok((tap_agent_image, aggregator_image)) => {
            let read = |name: &str| {
                let path = credentials.join(format!("{name}.kubeconfig"));
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))
            };
            Some(tapestry_fleet_manager::Workloads {
                tap_agent_image,
                aggregator_image,
                image_pull_policy: "Never".into(),
                tap_agent_kubeconfig: Some(read("tap-agent")?),
                aggregator_kubeconfig: Some(read("aggregator")?),
            })
        }
        Err(e) => {
            tracing::warn!("no taps will be deployed: {e:#}");
            None
        }
    };
    tapestry_fleet_manager::start(
        client,
        tapestry_fleet_manager::Config {
            listen: args.fleet_manager_listen,
            tls: tapestry_fleet_manager::tls::Identity { cert_pem, key_pem },
            token_file: Some(args.data_dir.join("tokens.csv")),
            workloads,
            status_period: Duration::from_secs(2),
        },
        shutdown,
    )
    .await
    .context("starting the fleet manager")
}
