//! `tapestry up`: a local cluster on this machine — the control plane and
//! node 1 in one process, nodes 2..N in network namespaces of their own
//! (see [`crate::local`]), until SIGINT/SIGTERM or `tapestry down`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tapestry_apiserver::pki::Pki;
use tapestry_apiserver::ServerConfig;
use tapestry_store::{RedbStore, Store};
use tokio_util::sync::CancellationToken;

use crate::local::{Local, LocalConfig, Underlay};
use crate::node::{agent_config, hostname, require_root, AgentArgs};

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
    /// How often the resource metrics API scrapes every kubelet.
    #[arg(long, default_value = "15s", value_parser = crate::parse_metric_resolution)]
    metric_resolution: std::time::Duration,
    #[command(flatten)]
    control: crate::control::ControlArgs,
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    local: crate::local::LocalArgs,
}

/// The control plane of a local cluster: the API server, then the scheduler
/// and the controller manager as its clients.
async fn start_control_plane(
    args: &UpArgs,
    underlay: Option<&Underlay>,
    shutdown: CancellationToken,
) -> Result<tapestry_apiserver::Running> {
    tapestry_apiserver::pki::secure_data_dir(&args.data_dir)?;
    let path = args.data_dir.join("store.redb");
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(&path).with_context(|| format!("opening store {}", path.display()))?,
    );
    let running = tapestry_apiserver::start(
        ServerConfig {
            service_cidr: args.service_cidr.clone(),
            // Nodes in namespaces (and every pod, through the `kubernetes`
            // Service) reach the API server on the underlay's host address.
            extra_sans: underlay
                .map(|u| vec![u.host_ip().to_string()])
                .unwrap_or_default(),
            advertise_address: underlay.map(|u| IpAddr::V4(u.host_ip())),
            metric_resolution: args.metric_resolution,
            ..ServerConfig::new(args.data_dir.clone(), args.listen)
        },
        store,
        shutdown.clone(),
    )
    .await?;
    crate::control::start(&running, args.control.clone(), &args.data_dir, shutdown).await?;
    Ok(running)
}

pub async fn run(args: UpArgs) -> Result<()> {
    let started = Instant::now();
    require_root("tapestry up")?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let node_name = args.agent.node_name.clone().unwrap_or_else(hostname);
    crate::local::claim(&args.data_dir, &node_name).await?;
    let result = run_claimed(&args, node_name, started).await;
    crate::local::release(&args.data_dir);
    result
}

async fn run_claimed(args: &UpArgs, node_name: String, started: Instant) -> Result<()> {
    let signals = tapestry_runtime::shutdown::on_signals()?;
    let cp_shutdown = CancellationToken::new();
    let node_shutdown = CancellationToken::new();
    let local_shutdown = CancellationToken::new();
    let underlay = (args.local.nodes > 1).then(|| Underlay::new(&args.local));
    let cp = start_control_plane(args, underlay.as_ref(), cp_shutdown.clone()).await?;
    let stop_cp = || async {
        local_shutdown.cancel();
        cp_shutdown.cancel();
    };
    let ca = std::fs::read_to_string(args.data_dir.join("pki/ca.crt"))?;
    let token = std::fs::read_to_string(args.data_dir.join("node-token"))?
        .trim()
        .to_string();
    // The node takes the API server's address when that is a specific one,
    // so nodes that join from other hosts (or network namespaces) reach
    // this node's host-network pods, such as the aggregator; with an
    // underlay, the host's address on it.
    let api_ip = match cp.addr.ip() {
        ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    let node_ip = underlay
        .as_ref()
        .map_or(api_ip, |u| IpAddr::V4(u.host_ip()));
    let server = format!("https://{}", SocketAddr::new(api_ip, cp.addr.port()));
    // Where nodes in namespaces reach the API server.
    let nodes_server = underlay.as_ref().map(|u| {
        format!(
            "https://{}",
            SocketAddr::new(IpAddr::V4(u.host_ip()), cp.addr.port())
        )
    });
    // Every node of the cluster runs with these options (and a name and
    // addresses of its own).
    let mut agent = args.agent.clone();
    agent.node_name = Some(node_name.clone());
    agent.cluster_dns = agent
        .cluster_dns
        .or(crate::node::default_cluster_dns(&args.service_cidr));
    let local = match &underlay {
        None => None,
        Some(u) => {
            let config = LocalConfig {
                data_dir: args.data_dir.clone(),
                underlay: u.clone(),
                server: nodes_server.clone().unwrap_or_default(),
                cluster_cidr: args.control.cluster_cidr.clone(),
                agent: agent.clone(),
                started,
            };
            let client = kube::Client::new(cp.local_handler(), "default");
            let made = async {
                let local = Local::start(config, client, local_shutdown.clone()).await?;
                let on_underlay = SocketAddr::new(IpAddr::V4(u.host_ip()), cp.addr.port());
                if !cp.addr.ip().is_unspecified() && cp.addr != on_underlay {
                    crate::local::relay(on_underlay, cp.addr, local_shutdown.clone()).await?;
                }
                anyhow::Ok(local)
            };
            match made.await {
                Ok(l) => Some(l),
                Err(e) => {
                    stop_cp().await;
                    cp.wait().await;
                    return Err(e);
                }
            }
        }
    };
    if let Err(e) = crate::local::serve(&args.data_dir, local.clone(), local_shutdown.clone()) {
        stop_cp().await;
        cp.wait().await;
        return Err(e);
    }
    // Node 1 joins as every node does: a bootstrap token, then
    // certificates of its own from the cluster CA.
    let credentials = crate::join::Join::new(
        &server,
        &ca,
        Some(token),
        &args.data_dir,
        &node_name,
        node_ip,
    )
    .credentials(node_shutdown.clone())
    .await;
    let credentials = match credentials {
        Ok(c) => c,
        Err(e) => {
            stop_cp().await;
            cp.wait().await;
            return Err(e);
        }
    };
    let client = credentials.client;
    let pki = Pki {
        dir: args.data_dir.join("pki"),
        ca_cert_pem: ca.clone(),
        serving_cert_pem: String::new(),
        serving_key_pem: String::new(),
    };
    let config = agent_config(
        &agent,
        args.data_dir.clone(),
        node_ip,
        ca,
        Some(credentials.serving),
        true,
        &args.control.cluster_cidr,
    )?;
    // Node 1 here and the others in their namespaces start together. With
    // one node the output is the kubeconfig line alone, as it always was.
    let progress = |msg: String| say(&msg);
    let first = async {
        let node = tapestry_kubelet::start(config, client, node_shutdown.clone()).await;
        if node.is_ok() && local.is_some() {
            say(&format!(
                "node {node_name}: Ready in {} ms (this host's network namespace, {node_ip})",
                started.elapsed().as_millis()
            ));
        }
        node
    };
    let others = async {
        match &local {
            Some(l) => {
                let adds = (2..=args.local.nodes).map(|_| l.add(None, &progress));
                futures::future::join_all(adds).await
            }
            None => Vec::new(),
        }
    };
    let (node, others) = tokio::join!(first, others);
    let failed = others.into_iter().find_map(Result::err);
    let node = match (node, failed) {
        (Ok(n), None) => n,
        (node, failed) => {
            if let Some(l) = &local {
                local_shutdown.cancel();
                l.stop().await;
            }
            if let Ok(n) = node {
                node_shutdown.cancel();
                n.wait().await;
            }
            stop_cp().await;
            cp.wait().await;
            return Err(failed.unwrap_or_else(|| anyhow::anyhow!("starting node 1")));
        }
    };
    if local.is_some() {
        say(&format!(
            "{} nodes Ready in {} ms",
            args.local.nodes,
            started.elapsed().as_millis()
        ));
    }
    let fleet_shutdown = CancellationToken::new();
    let fleet = if args.no_fleet_manager {
        None
    } else {
        match start_fleet_manager(args, &pki, fleet_shutdown.clone()).await {
            Ok(f) => Some(f),
            Err(e) => {
                if let Some(l) = &local {
                    local_shutdown.cancel();
                    l.stop().await;
                }
                node_shutdown.cancel();
                node.wait().await;
                stop_cp().await;
                cp.wait().await;
                return Err(e);
            }
        }
    };
    tracing::info!(api = %cp.addr, kubelet_api = %node.addr, "cluster ready");
    say(&format!("kubeconfig: {}", cp.kubeconfig.display()));
    if let Some(f) = &fleet {
        say(&format!(
            "fleet manager: https://{} (CA {})",
            f.addr,
            args.data_dir.join("pki/ca.crt").display()
        ));
    }
    signals.cancelled().await;
    fleet_shutdown.cancel();
    if let Some(f) = fleet {
        f.wait().await;
    }
    // Nodes stop their pods (all nodes at once) while the API server still
    // records their last status.
    local_shutdown.cancel();
    node_shutdown.cancel();
    let others = async {
        if let Some(l) = &local {
            l.stop().await;
        }
    };
    tokio::join!(others, node.wait());
    // Node 1's pods are gone: so goes the bridge the CNI plugin made them.
    crate::local::remove_link(&args.agent.bridge).await;
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
        // The taps and the aggregator run as their ServiceAccounts, with
        // the tokens the kubelet projects into their pods.
        Ok((tap_agent_image, aggregator_image)) => Some(tapestry_fleet_manager::Workloads {
            tap_agent_image,
            aggregator_image,
            image_pull_policy: "Never".into(),
            tap_agent_kubeconfig: None,
            aggregator_kubeconfig: None,
        }),
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
            // The API server answers TokenReviews: users added with
            // `tapestry user add` reach the REST API too.
            token_file: None,
            workloads,
            status_period: Duration::from_secs(2),
        },
        shutdown,
    )
    .await
    .context("starting the fleet manager")
}

/// A line on standard output. A reader that went away (a closed pipe) is
/// no reason to stop the cluster without cleaning up.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}
