//! `fleet-manager serve`: the REST API for tap policies and tools, and the
//! controllers that deploy the taps and report on them, against any
//! Kubernetes API server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tapestry_fleet_manager::{tls, Config, Workloads};
use tokio_util::sync::CancellationToken;

// The allocator of the `tapestry` binary, in which the fleet manager also
// runs: requests allocate many short-lived JSON values on one thread and
// free them on another, which jemalloc's per-thread caches serve cheaply.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "fleet-manager", version, about = "Tapestry's fleet manager")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the REST API and keep every node tapped.
    Serve(Box<ServeArgs>),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The cluster's kubeconfig (default: in-cluster credentials, else
    /// KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Where the REST API listens (HTTPS).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Tokens the REST API accepts (kube-apiserver's token-file format);
    /// without it tokens are checked with the cluster (TokenReview).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serving certificate (PEM); with --tls-key. Without them a
    /// self-signed pair is made once and kept in --cert-dir.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where the self-signed certificate is kept.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/tapestry-fleet-manager"
    )]
    cert_dir: PathBuf,
    /// The tap-agent image deployed on every node.
    #[arg(
        long,
        value_name = "IMAGE",
        default_value = "tapestry/tap-agent:latest"
    )]
    tap_agent_image: String,
    /// The aggregator image.
    #[arg(
        long,
        value_name = "IMAGE",
        default_value = "tapestry/aggregator:latest"
    )]
    aggregator_image: String,
    /// When nodes pull the images: Always, IfNotPresent or Never.
    #[arg(long, default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: String,
    /// A kubeconfig the tap-agents use (kept in a Secret); default: their
    /// ServiceAccount.
    #[arg(long, value_name = "FILE")]
    tap_agent_kubeconfig: Option<PathBuf>,
    /// A kubeconfig the aggregator uses (kept in a Secret); default: its
    /// ServiceAccount.
    #[arg(long, value_name = "FILE")]
    aggregator_kubeconfig: Option<PathBuf>,
    /// Serve the API only; deploy neither taps nor the aggregator.
    #[arg(long)]
    no_deploy: bool,
    /// Seconds between policy status updates.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=60))]
    status_period: u64,
}

fn read(path: &Option<PathBuf>) -> Result<Option<String>> {
    path.as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()
}

async fn serve(args: ServeArgs) -> Result<()> {
    let client = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using {}", path.display()))?;
            kube::Client::try_from(config)?
        }
        None => kube::Client::try_default()
            .await
            .context("no cluster credentials (give --kubeconfig)")?,
    };
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => tls::Identity::from_files(cert, key)?,
        _ => {
            let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            if !args.listen.ip().is_unspecified() {
                names.push(args.listen.ip().to_string());
            }
            let identity = tls::Identity::self_signed_in(&args.cert_dir, &names)?;
            eprintln!(
                "serving certificate: {}",
                args.cert_dir.join("fleet-manager.crt").display()
            );
            identity
        }
    };
    let workloads = (!args.no_deploy)
        .then(|| -> Result<Workloads> {
            Ok(Workloads {
                tap_agent_image: args.tap_agent_image.clone(),
                aggregator_image: args.aggregator_image.clone(),
                image_pull_policy: args.image_pull_policy.clone(),
                tap_agent_kubeconfig: read(&args.tap_agent_kubeconfig)?,
                aggregator_kubeconfig: read(&args.aggregator_kubeconfig)?,
            })
        })
        .transpose()?;
    let stop_signal = tapestry_runtime::shutdown::on_signals()?;
    let shutdown = CancellationToken::new();
    let running = tapestry_fleet_manager::start(
        client,
        Config {
            listen: args.listen,
            tls: identity,
            token_file: args.token_file.clone(),
            workloads,
            status_period: Duration::from_secs(args.status_period),
        },
        shutdown.clone(),
    )
    .await?;
    println!("listening on https://{}", running.addr);
    stop_signal.cancelled().await;
    shutdown.cancel();
    running.wait().await;
    Ok(())
}

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let Cli { command } = Cli::parse();
    let result = match command {
        Command::Serve(args) => serve(*args).await,
    };
    if let Err(e) = result {
        eprintln!("fleet-manager: {e:#}");
        std::process::exit(1);
    }
}
