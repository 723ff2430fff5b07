//! `tapestry`: the orchestrator's single binary.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tapestry_apiserver::ServerConfig;
use tapestry_store::{EtcdStore, RedbStore, Store};

mod control;
mod hollow;
mod image;
mod join;
mod kubeclient;
mod local;
mod node;
mod up;

// The API server allocates and frees many small JSON values per request,
// often on another thread than the one that allocated them. jemalloc hands
// out blocks from a per-thread cache without reading the (often cold)
// block itself: under the scheduler benchmark the allocator's share of the
// server's CPU is 5%, against 22% with mimalloc (and glibc's malloc, before
// that, took half of the server's CPU). It costs the idle node agent about
// 2.7 MiB more RSS than mimalloc did.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tapestry",
    version,
    about = "A compact container orchestrator with traffic visibility built in"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: API server on an embedded store.
    Server(ServerArgs),
    /// Run kubemark-style fake nodes (no containers) for scale tests.
    Hollow(hollow::HollowArgs),
    /// Run a local cluster on this machine: control plane and node agent,
    /// and with --nodes N more nodes, each in a network namespace.
    Up(up::UpArgs),
    /// Run a node agent that joins an existing control plane, or add or
    /// remove a node of the local cluster.
    Node(NodeCommand),
    /// Stop the local cluster of a data directory; nothing it made remains.
    Down(local::DownArgs),
    /// Manage the node's image store.
    Image(image::ImageArgs),
    /// Give a person a credential: `tapestry user add NAME --group G`
    /// writes a kubeconfig for them (what they may do is up to RBAC).
    User(UserCommand),
    /// Bootstrap tokens nodes join with (`tapestry node --token-file`).
    Token(TokenCommand),
    /// Per-container monitor started by the node agent.
    #[command(hide = true)]
    ContainerShim(tapestry_kubelet::shim::ShimArgs),
}

#[derive(clap::Args)]
struct UserCommand {
    #[command(subcommand)]
    action: UserAction,
}

#[derive(Subcommand)]
enum UserAction {
    /// Add a user with a bearer token to the server's token file (read
    /// again by a running server within a second) and write a kubeconfig.
    Add {
        name: String,
        /// A group the user is in (repeatable), e.g. `--group developers`.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The server's data directory.
        #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path)]
        data_dir: PathBuf,
        /// Where to write the kubeconfig [default: DATA_DIR/users/NAME.kubeconfig].
        #[arg(long)]
        output: Option<PathBuf>,
        /// A client certificate (CN = NAME, O = the groups) from the
        /// cluster CA instead of a token: nothing is stored on the server,
        /// and it is valid until it expires.
        #[arg(long)]
        cert: bool,
        /// How long the certificate is valid.
        #[arg(long, default_value_t = 365, requires = "cert",
              value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
    },
}

#[derive(clap::Args)]
struct TokenCommand {
    #[command(subcommand)]
    action: TokenAction,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Mint a bootstrap token and print it: a node given it joins the
    /// cluster and gets certificates of its own; the token itself can only
    /// ask for those, and stops working after --ttl.
    Create {
        /// How long the token is valid, e.g. 2h or 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The server's data directory (its admin kubeconfig is used).
        #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path)]
        data_dir: PathBuf,
    },
}

async fn create_token(ttl: std::time::Duration, data_dir: &std::path::Path) -> Result<()> {
    use tapestry_apiserver::bootstraptokens;
    let ttl = bounded_ttl(ttl)?;
    let client = kubeclient::client_from(&data_dir.join("kubeconfig")).await?;
    let token = bootstraptokens::generate();
    let expires = std::time::SystemTime::now() + ttl;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        bootstraptokens::secret(&token, expires.into(), "made with tapestry token create"),
    )?;
    let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, bootstraptokens::NAMESPACE);
    api.create(&kube::api::PostParams::default(), &secret)
        .await
        .context("storing the token")?;
    println!("{token}");
    Ok(())
}

/// A token lifetime between a minute and a year.
fn bounded_ttl(ttl: std::time::Duration) -> Result<std::time::Duration> {
    const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
    if ttl < std::time::Duration::from_secs(60) || ttl > YEAR {
        anyhow::bail!("--ttl must be between 1m and 365d");
    }
    Ok(ttl)
}

fn add_user(
    name: &str,
    groups: &[String],
    data_dir: &std::path::Path,
    output: Option<PathBuf>,
    credential: tapestry_apiserver::pki::Credential,
) -> Result<()> {
    let out = match output {
        Some(o) => o,
        None => {
            let dir = data_dir.join("users");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            dir.join(format!("{name}.kubeconfig"))
        }
    };
    tapestry_apiserver::pki::add_user(data_dir, name, groups, credential, &out)?;
    println!("{}", out.display());
    Ok(())
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct NodeCommand {
    #[command(subcommand)]
    action: Option<local::NodeAction>,
    #[command(flatten)]
    agent: node::NodeArgs,
}

/// Data directories are made absolute once: container bundles and the
/// kubeconfig record paths that are resolved from other directories.
pub(crate) fn absolute_path(arg: &str) -> Result<PathBuf, String> {
    std::path::absolute(arg).map_err(|e| format!("{arg}: {e}"))
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Where the store, certificates, tokens and the admin kubeconfig live.
    #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path)]
    data_dir: PathBuf,
    /// Address to serve the Kubernetes API on (HTTPS).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Store backend: the embedded store in the data directory (the
    /// default), or `etcd://HOST:PORT[,HOST:PORT...]` for an etcd cluster
    /// that several servers can share.
    #[arg(long, value_parser = parse_store)]
    store: Option<StoreArg>,
    /// TLS to etcd: the CA of its serving certificate (PEM).
    #[arg(long, requires_all = ["etcd_certfile", "etcd_keyfile", "store"])]
    etcd_cafile: Option<PathBuf>,
    /// The client certificate presented to etcd (`--client-cert-auth`).
    #[arg(long, requires_all = ["etcd_cafile", "etcd_keyfile"])]
    etcd_certfile: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, requires_all = ["etcd_cafile", "etcd_certfile"])]
    etcd_keyfile: Option<PathBuf>,
    /// IPv4 range ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// How long store history is kept for watches and exact-version lists.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    compaction_interval: Duration,
    /// Extra DNS names or IPs for the serving certificate.
    #[arg(long = "tls-san")]
    tls_sans: Vec<String>,
    /// The address other members of the cluster reach this server on,
    /// listed in the `kubernetes` Service's endpoints [default: the
    /// --listen address, or 127.0.0.1 when that is 0.0.0.0].
    #[arg(long)]
    advertise_address: Option<IpAddr>,
    /// How long a server that stopped renewing its lease (it died) stays in
    /// the `kubernetes` Service's endpoints; it renews every third of this.
    #[arg(long, default_value = "15s", value_parser = parse_lease_duration)]
    endpoint_lease_duration: Duration,
    /// RBAC (roles and bindings decide every request) or AlwaysAllow
    /// (every authenticated request is allowed).
    #[arg(long, default_value = "RBAC", value_parser = ["RBAC", "AlwaysAllow"])]
    authorization_mode: String,
    /// How often the resource metrics API (metrics.k8s.io, `kubectl top`,
    /// autoscaling) scrapes every kubelet; CPU is the rate between the
    /// last two scrapes.
    #[arg(long, default_value = "15s", value_parser = parse_metric_resolution)]
    metric_resolution: Duration,
    #[command(flatten)]
    control: control::ControlArgs,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// At least a second: renewals, every third of it, must outpace the
/// store's round trips.
fn parse_lease_duration(arg: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(arg).map_err(|e| format!("{arg:?}: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{arg:?}: must be at least 1s"));
    }
    Ok(d)
}

/// A metrics resolution: at least a second (metrics-server's bound is 10 s;
/// shorter periods are for tests and tight autoscaling).
pub(crate) fn parse_metric_resolution(arg: &str) -> Result<Duration, String> {
    parse_lease_duration(arg)
}

#[derive(Clone, Debug)]
enum StoreArg {
    Etcd(Vec<String>),
}

fn parse_store(arg: &str) -> Result<StoreArg, String> {
    let Some(endpoints) = arg.strip_prefix("etcd://") else {
        return Err(format!(
            "{arg:?}: expected etcd://HOST:PORT[,HOST:PORT...] (the embedded store needs no flag)"
        ));
    };
    let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    if let Some(bad) = endpoints.iter().find(|e| {
        e.rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    }) {
        return Err(format!("{arg:?}: endpoint {bad:?} is not HOST:PORT"));
    }
    Ok(StoreArg::Etcd(endpoints))
}

/// The files of `--etcd-cafile/--etcd-certfile/--etcd-keyfile`, read.
fn etcd_tls(args: &ServerArgs) -> Result<Option<tapestry_store::EtcdTls>> {
    let (Some(ca), Some(cert), Some(key)) =
        (&args.etcd_cafile, &args.etcd_certfile, &args.etcd_keyfile)
    else {
        return Ok(None);
    };
    let read = |flag: &str, p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("--{flag} {}", p.display()))
    };
    Ok(Some(tapestry_store::EtcdTls {
        ca_pem: read("etcd-cafile", ca)?,
        cert_pem: read("etcd-certfile", cert)?,
        key_pem: read("etcd-keyfile", key)?,
    }))
}

async fn server(args: ServerArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let store: Arc<dyn Store> = match &args.store {
        Some(StoreArg::Etcd(endpoints)) => Arc::new(
            EtcdStore::connect_with(endpoints, etcd_tls(&args)?)
                .await
                .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?,
        ),
        None => {
            // Closed off before the store file is made in it.
            tapestry_apiserver::pki::secure_data_dir(&args.data_dir)?;
            let path = args.data_dir.join("store.redb");
            Arc::new(
                RedbStore::open(&path)
                    .with_context(|| format!("opening store {}", path.display()))?,
            )
        }
    };
    let shutdown = tapestry_runtime::shutdown::on_signals()?;
    let running = tapestry_apiserver::start(
        ServerConfig {
            service_cidr: args.service_cidr,
            compaction_interval: args.compaction_interval,
            extra_sans: args.tls_sans,
            advertise_address: args.advertise_address,
            endpoint_lease_duration: args.endpoint_lease_duration,
            always_allow: args.authorization_mode == "AlwaysAllow",
            metric_resolution: args.metric_resolution,
            ..ServerConfig::new(args.data_dir.clone(), args.listen)
        },
        store,
        shutdown.clone(),
    )
    .await?;
    control::start(&running, args.control, &args.data_dir, shutdown).await?;
    tracing::info!(addr = %running.addr, kubeconfig = %running.kubeconfig.display(), "API server ready");
    println!("kubeconfig: {}", running.kubeconfig.display());
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Command::ContainerShim(args) = cli.command {
        // One monitor per container: kept small, without the async runtime.
        std::process::exit(tapestry_kubelet::shim::main(args));
    }
    let mut runtime = match &cli.command {
        Command::Hollow(args) if args.worker_threads == 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Command::Hollow(args) => {
            let mut threads = tokio::runtime::Builder::new_multi_thread();
            threads.worker_threads(usize::from(args.worker_threads));
            threads
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(cli: Cli) {
    init_tracing();
    let result = match cli.command {
        Command::Server(args) => server(args).await,
        Command::Hollow(args) => match tapestry_runtime::shutdown::on_signals() {
            Ok(token) => hollow::run(args, token).await,
            Err(e) => Err(e.into()),
        },
        Command::Up(args) => up::run(args).await,
        Command::Node(NodeCommand {
            action: Some(action),
            ..
        }) => local::node_action(action).await,
        Command::Node(NodeCommand { agent, .. }) => node::run(agent).await,
        Command::Down(args) => local::down(args).await,
        Command::Image(args) => image::run(args),
        Command::User(UserCommand {
            action:
                UserAction::Add {
                    name,
                    groups,
                    data_dir,
                    output,
                    cert,
                    days,
                },
        }) => {
            let credential = match cert {
                true => tapestry_apiserver::pki::Credential::Certificate { days },
                false => tapestry_apiserver::pki::Credential::Token,
            };
            add_user(&name, &groups, &data_dir, output, credential)
        }
        Command::Token(TokenCommand {
            action: TokenAction::Create { ttl, data_dir },
        }) => create_token(ttl, &data_dir).await,
        Command::ContainerShim(args) => std::process::exit(tapestry_kubelet::shim::main(args)),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
