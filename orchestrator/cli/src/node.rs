//! `tapestry node`: a node agent joining an existing control plane.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tapestry_kubelet::Config;

/// Options shared by `tapestry node` and `tapestry up`.
#[derive(clap::Args, Clone)]
pub struct AgentArgs {
    /// This node's name (default: the host name).
    #[arg(long = "name")]
    pub node_name: Option<String>,
    /// Pod address range this node claims [default: the one the controller
    /// manager's node IPAM assigns, a /24 of its --cluster-cidr].
    #[arg(long, value_parser = parse_ipv4_cidr)]
    pub pod_cidr: Option<String>,
    /// Port of the kubelet HTTPS API.
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// The OCI runtime (runc-compatible).
    #[arg(long, default_value = "/usr/sbin/runc")]
    pub runtime: PathBuf,
    /// Where the CNI plugins are.
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_bin_dir: PathBuf,
    /// The Linux bridge the pods of this node attach to.
    #[arg(long, default_value = "tapestry0")]
    pub bridge: String,
    /// Most pods this node accepts.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Most new pods set up at once (network namespace, containers); the
    /// rest wait their turn in arrival order. Default: twice the CPU count.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallel_pod_starts: Option<u32>,
    /// Leave Services to another proxy: this node writes no nftables rules.
    #[arg(long)]
    pub no_service_proxy: bool,
    /// The cluster DNS Service's address, the nameserver in pods'
    /// resolv.conf (default: the tenth address of the service range,
    /// 10.96.0.10 for the default range).
    #[arg(long)]
    pub cluster_dns: Option<IpAddr>,
    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local", value_parser = parse_domain)]
    pub cluster_domain: String,
    /// The node's resolver configuration: what `dnsPolicy: Default` pods
    /// get, and where this node's DNS server relays names outside the
    /// cluster.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Serve no cluster DNS on this node, and give pods the node's
    /// resolvers instead.
    #[arg(long)]
    pub no_cluster_dns: bool,
}

/// The API server's default ClusterIP range.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

/// The cluster DNS address when `--cluster-dns` is not given: the tenth
/// address of the service range, where the API server puts `kube-dns`.
pub fn default_cluster_dns(service_cidr: &str) -> Option<IpAddr> {
    let (network, _) = tapestry_proxy::sync::parse_cidr(service_cidr)?;
    Some(IpAddr::V4(std::net::Ipv4Addr::from(
        u32::from(network) + 10,
    )))
}

fn parse_domain(arg: &str) -> Result<String, String> {
    let domain = arg.trim_end_matches('.');
    let valid = !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid {
        Ok(domain.to_ascii_lowercase())
    } else {
        Err(format!("{arg:?}: not a DNS domain such as cluster.local"))
    }
}

fn parse_ipv4_cidr(arg: &str) -> Result<String, String> {
    tapestry_proxy::sync::parse_cidr(arg)
        .map(|_| arg.to_string())
        .ok_or_else(|| format!("{arg:?}: not an IPv4 CIDR such as 10.244.0.0/16"))
}

#[derive(clap::Args)]
pub struct NodeArgs {
    // Required unless a local cluster's `add`/`remove` is asked for.
    /// The API server, e.g. https://10.0.0.1:6443.
    #[arg(long, required = true)]
    server: Option<String>,
    /// File holding the node bootstrap token (the server's DATA_DIR/node-token).
    #[arg(long, required = true)]
    token_file: Option<PathBuf>,
    /// The cluster CA certificate (the server's DATA_DIR/pki/ca.crt).
    #[arg(long, required = true)]
    ca_file: Option<PathBuf>,
    /// Node state: pods, runtime state and the image store.
    #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path)]
    data_dir: PathBuf,
    /// Address the API server reaches this node on (default: the local
    /// address used to reach the server).
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// Stop and remove this node's pods when the agent stops (a node that is
    /// going away). By default they keep running, so the agent can be
    /// restarted or upgraded under them.
    #[arg(long)]
    stop_pods_on_exit: bool,
    /// Every pod's addresses, all nodes together (the control plane's
    /// --cluster-cidr): Service traffic from outside it is masqueraded.
    #[arg(long, default_value = "10.244.0.0/16", value_parser = parse_ipv4_cidr)]
    cluster_cidr: String,
    /// The image store is a local cluster's, whose `tapestry up` puts the
    /// tap images there.
    #[arg(long, hide = true)]
    shared_image_store: bool,
    #[command(flatten)]
    agent: AgentArgs,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} runs containers (namespaces, mounts, cgroups) and needs root");
    }
    Ok(())
}

/// A kube client for a node agent: bearer token, cluster CA, HTTP/2.
pub async fn node_client(server: &str, ca_pem: &str, token: &str) -> Result<kube::Client> {
    let text = tapestry_apiserver::pki::kubeconfig(server, ca_pem, "node", token);
    let kc = kube::config::Kubeconfig::from_yaml(&text).context("node kubeconfig")?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .context("node client configuration")?;
    crate::kubeclient::http2(cfg)
}

pub fn agent_config(
    agent: &AgentArgs,
    data_dir: PathBuf,
    node_ip: IpAddr,
    ca_pem: String,
    serving: Option<std::sync::Arc<tapestry_runtime::identity::LiveIdentity>>,
    stop_pods_on_exit: bool,
    cluster_cidr: &str,
) -> Result<Config> {
    Ok(Config {
        node_name: agent.node_name.clone().unwrap_or_else(hostname),
        data_dir,
        pod_cidr: agent.pod_cidr.clone(),
        node_ip,
        port: agent.kubelet_port,
        runtime: agent.runtime.clone(),
        cni_bin_dir: agent.cni_bin_dir.clone(),
        bridge: agent.bridge.clone(),
        client_ca_pem: ca_pem,
        serving,
        shim: shim_command()?,
        max_pods: agent.max_pods,
        parallel_pod_starts: agent.parallel_pod_starts.map_or_else(
            || std::thread::available_parallelism().map_or(4, |n| 2 * n.get()),
            |n| n as usize,
        ),
        stop_pods_on_exit,
        service_proxy: !agent.no_service_proxy,
        cluster_cidr: Some(cluster_cidr.to_string()),
        cluster_dns: agent.cluster_dns.filter(|_| !agent.no_cluster_dns),
        cluster_domain: agent.cluster_domain.clone(),
        resolv_conf: agent.resolv_conf.clone(),
        dns_server: !agent.no_cluster_dns,
    })
}

/// How to start a container monitor: the small `tapestry-shim` installed
/// next to this binary, else this binary's `container-shim` command (the
/// same code, with the whole program's start-up cost and memory).
fn shim_command() -> Result<Vec<std::ffi::OsString>> {
    let exe = std::env::current_exe().context("locating the tapestry binary")?;
    let small = exe.with_file_name("tapestry-shim");
    Ok(if small.is_file() {
        vec![small.into()]
    } else {
        vec![exe.into(), "container-shim".into()]
    })
}

/// The local address the kernel would use to reach `server`.
fn local_ip_towards(server: &str) -> Option<IpAddr> {
    let authority = server.split("://").nth(1)?.split('/').next()?;
    let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .ok()?
        .next()?;
    let sock = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .ok()?;
    sock.connect(addr).ok()?;
    sock.local_addr().ok().map(|a| a.ip())
}

pub async fn run(args: NodeArgs) -> Result<()> {
    require_root("tapestry node")?;
    let (Some(server), Some(token_file), Some(ca_file)) =
        (&args.server, &args.token_file, &args.ca_file)
    else {
        bail!("tapestry node needs --server, --token-file and --ca-file");
    };
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("--token-file {}", token_file.display()))?
        .trim()
        .to_string();
    if token.is_empty() {
        bail!("--token-file {}: empty", token_file.display());
    }
    let ca = std::fs::read_to_string(ca_file)
        .with_context(|| format!("--ca-file {}", ca_file.display()))?;
    let node_ip = match args.node_ip {
        Some(ip) => ip,
        None => local_ip_towards(server).with_context(|| {
            format!(
                "--server {}: cannot tell the local address; pass --node-ip",
                server
            )
        })?,
    };
    // Before the node is Ready, so the tap-agent's pod finds its image.
    if !args.shared_image_store {
        if let Err(e) = tap_images(&args.data_dir) {
            tracing::warn!("this node cannot run the fleet manager's taps: {e:#}");
        }
    }
    let shutdown = tapestry_runtime::shutdown::on_signals()?;
    let node_name = args.agent.node_name.clone().unwrap_or_else(hostname);
    let credentials = crate::join::Join::new(
        server,
        &ca,
        Some(token),
        &args.data_dir,
        &node_name,
        node_ip,
    )
    .credentials(shutdown.clone())
    .await?;
    let mut agent = args.agent.clone();
    agent.node_name = Some(node_name);
    // A joining node does not know the cluster's service range;
    // --cluster-dns tells it when that is not the default.
    agent.cluster_dns = agent
        .cluster_dns
        .or(default_cluster_dns(DEFAULT_SERVICE_CIDR));
    let config = agent_config(
        &agent,
        args.data_dir,
        node_ip,
        ca,
        Some(credentials.serving),
        args.stop_pods_on_exit,
        &args.cluster_cidr,
    )?;
    let running = tapestry_kubelet::start(config, credentials.client, shutdown).await?;
    tracing::info!(kubelet_api = %running.addr, "node agent ready");
    running.wait().await;
    Ok(())
}

/// Images of the `tap-agent` and `aggregator` programs installed beside
/// this one, in the node's image store. Every node agent builds them, so
/// the fleet manager's pods (pull policy Never) run on nodes that join later.
pub fn tap_images(data_dir: &std::path::Path) -> Result<(String, String)> {
    let exe = std::env::current_exe().context("locating the tapestry program")?;
    let dir = exe
        .parent()
        .context("the tapestry program has no directory")?;
    let store = tapestry_kubelet::images::ImageStore::open(&data_dir.join("images"))?;
    let version = env!("CARGO_PKG_VERSION");
    let image = |name: &str| -> Result<String> {
        let program = dir.join(name);
        anyhow::ensure!(
            program.is_file(),
            "{} not found (build it: cargo build -p tapestry-{name})",
            program.display()
        );
        store.build_program_image(&format!("tapestry/{name}"), version, &program)
    };
    Ok((image("tap-agent")?, image("aggregator")?))
}
