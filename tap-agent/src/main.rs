//! `tap-agent`: see `tap-agent --help` and tap-agent/README.md.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand};
use tapestry_proto::policy::{FilterRule, TapPolicy, MAX_SNAPLEN};
use tapestry_tap_agent::{
    agent::{self, RunConfig, TargetSource},
    aggregator_service::{self, ServiceRef},
    bpf::{self, AttachMode},
    filter::PolicySpec,
    heartbeat::Heartbeat,
    kube_source::{self, ClusterSource, PolicySource},
    ring::BatchLimits,
    selection::Policy,
    status::StatusBoard,
    targets::Desired,
};

#[derive(Parser)]
#[command(
    name = "tap-agent",
    version,
    about = "Mirror packets of chosen interfaces out of the kernel (TC eBPF) and stream them to a Tapestry aggregator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tap interfaces of this network namespace and stream their packets.
    Run(Box<RunArgs>),
    /// Remove tapestry programs left on any interface by an earlier run, then exit.
    Cleanup,
}

#[derive(Args)]
#[command(group(ArgGroup::new("cluster").args(["kubeconfig", "in_cluster"])))]
struct RunArgs {
    /// Interface to tap, ingress and egress (repeatable).
    #[arg(
        long = "iface",
        value_name = "IFACE",
        required_unless_present_any = ["kubeconfig", "in_cluster"],
        conflicts_with = "cluster"
    )]
    ifaces: Vec<String>,
    /// Cluster mode through this kubeconfig: tap the host-side veths of the
    /// pods of --node that the TapPolicy objects (or --policy-file) select,
    /// following pods, policies, namespaces and node labels as they change.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Cluster mode with the configuration the environment gives (the pod's
    /// service account in a cluster, else KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    in_cluster: bool,
    /// Aggregator gRPC endpoint.
    #[arg(
        long,
        value_name = "http://HOST:PORT",
        required_unless_present = "aggregator_service",
        conflicts_with = "aggregator_service"
    )]
    aggregator: Option<String>,
    /// TLS to the aggregator (https:// URLs): this tap's client
    /// certificate (PEM), CN tapestry:tap:NODE, issued by the CA the
    /// aggregator trusts. Read at every connection, so it can be renewed.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA that issued the aggregator's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Cluster modes: obtain this tap's client certificate through a
    /// CertificateSigningRequest (signer tapestry.io/tap-client, CN
    /// tapestry:tap:NODE; approved for a pod on that node) and keep it,
    /// with its key, in FILE, renewed before it expires. Needs --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "cluster"], conflicts_with_all = ["tls_cert", "tls_key"])]
    tls_from_csr: Option<PathBuf>,
    /// The aggregator's Service (cluster modes): connect to one of its ready
    /// endpoints from its EndpointSlices, following them as they change.
    /// PORT is the port's name or number as the EndpointSlices list it.
    #[arg(long, value_name = "NAMESPACE/NAME:PORT", value_parser = parse_service, requires = "cluster")]
    aggregator_service: Option<ServiceRef>,
    /// Namespace of the heartbeat Lease `tap-<node>` (cluster modes).
    #[arg(long, value_name = "NAMESPACE", default_value = tapestry_proto::heartbeat::NAMESPACE)]
    lease_namespace: String,
    /// Seconds between heartbeats; the Lease lasts three periods.
    #[arg(long, value_name = "SECONDS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=5))]
    heartbeat_period: u64,
    /// Policies from a JSON file (an array of TapPolicy: name, namespace,
    /// selector, rules, snaplen) instead of --rule/--snaplen with --iface
    /// (selectors are ignored), or instead of the TapPolicy objects in
    /// cluster mode.
    #[arg(long, alias = "policies", value_name = "FILE", conflicts_with_all = ["rules", "snaplen"])]
    policy_file: Option<std::path::PathBuf>,
    /// Bytes kept of each packet (default: whole packets, up to 64 KiB GSO super-packets).
    #[arg(long, value_name = "N", value_parser = parse_snaplen)]
    snaplen: Option<u32>,
    /// Pre-filter rule, e.g. proto=tcp,port=80,cidr=10.0.0.0/8,dir=both. Repeatable;
    /// a packet is kept if it matches any rule; no rule keeps everything.
    #[arg(long = "rule", value_name = "RULE", value_parser = parse_rule)]
    rules: Vec<FilterRule>,
    /// Where /metrics and /healthz are served.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Ring buffer size in bytes (rounded up to a power of two).
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u32).range(4096..=(1 << 30)))]
    ring_size: u32,
    /// Bytes waiting in the ring before the kernel wakes the reader (it also polls every 5 ms).
    #[arg(long, default_value_t = 256 << 10)]
    wakeup_bytes: u32,
    /// Batches the send queue holds before dropping (each ≤ --batch-packets and ≤ 1 MiB).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    queue_batches: u64,
    /// Packets per batch.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=65536))]
    batch_packets: u64,
    /// How programs are attached.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    attach_mode: AttachMode,
    /// This tap's id in the stream's Hello (default: the host name).
    #[arg(long)]
    tap_id: Option<String>,
    /// Node name in the stream's Hello (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
}

fn parse_snaplen(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_SNAPLEN).contains(&n) => Ok(n),
        _ => Err(format!("must be a number between 1 and {MAX_SNAPLEN}")),
    }
}

fn parse_service(s: &str) -> Result<ServiceRef, String> {
    s.parse()
}

fn parse_rule(s: &str) -> Result<FilterRule, String> {
    s.parse::<FilterRule>().map_err(|e| format!("`{s}`: {e}"))
}

/// Reads and validates a JSON array of TapPolicy; errors name the file,
/// the policy and the field.
fn read_policies(path: &std::path::Path) -> anyhow::Result<Vec<TapPolicy>> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--policy-file {}", path.display()))?;
    let policies: Vec<TapPolicy> = serde_json::from_str(&text).with_context(|| {
        format!(
            "--policy-file {}: not a valid JSON array of TapPolicy",
            path.display()
        )
    })?;
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in policies.iter().enumerate() {
        p.validate().map_err(|e| {
            anyhow::anyhow!("--policy-file {}: [{i}] ({}): {e}", path.display(), p.name)
        })?;
        if !names.insert(p.name.clone()) {
            anyhow::bail!(
                "--policy-file {}: [{i}].name: `{}` is used twice",
                path.display(),
                p.name
            );
        }
    }
    if policies.is_empty() {
        anyhow::bail!("--policy-file {}: no policies", path.display());
    }
    Ok(policies)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Cleanup => bpf::sweep_stale().map(|s| {
            println!(
                "removed {} TCX link(s) and {} clsact filter(s)",
                s.tcx_links, s.clsact_filters
            );
        }),
        Cmd::Run(a) => {
            let a = *a;
            let file_policies = match &a.policy_file {
                None => None,
                Some(path) => match read_policies(path) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        eprintln!("tap-agent: error: {e:#}");
                        return ExitCode::from(2);
                    }
                },
            };
            keep_batch_memory();
            // One thread: the ring reader, the shipper and the metrics
            // server take turns. Two workers cost a futex wakeup and a
            // migration per batch handed from reader to shipper.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run(a, file_policies)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tap-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Batches are allocated and freed a MiB at a time. By default glibc
/// maps each from the kernel and unmaps it after, so every batch's pages
/// are faulted in and zeroed again; from the heap they are reused. The
/// heap still shrinks once more than 64 MiB lies free at its top (after
/// the queue filled while the aggregator was away).
fn keep_batch_memory() {
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Wires the sources of one run (static or cluster) and runs the agent.
/// The lifetime asked for a tap's client certificate (renewed at 70–90%).
const TAP_CERTIFICATE_SECONDS: i32 = 24 * 3600;

/// Obtain this tap's certificate (and keep renewing it), retrying while it
/// is refused or not approved; the reason shows in the tap's status.
async fn keep_certificate(
    client: kube::Client,
    ask: tapestry_runtime::certificate::Ask,
    file: PathBuf,
    board: Arc<StatusBoard>,
) {
    tracing::info!(file = %file.display(), identity = %ask.common_name, "keeping this tap's client certificate");
    loop {
        let kept = tapestry_runtime::certificate::keep(
            client.clone(),
            ask.clone(),
            file.clone(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        match kept {
            Ok(()) => {
                board.set_problems("certificate", vec![]);
                return;
            }
            Err(e) => {
                let msg = format!("no client certificate for the aggregator yet: {e:#}");
                tracing::warn!("{msg}");
                board.set_problems("certificate", vec![msg]);
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

async fn run(a: RunArgs, file_policies: Option<Vec<TapPolicy>>) -> anyhow::Result<()> {
    let node = a.node.clone().unwrap_or_else(hostname);
    let tap_id = a.tap_id.clone().unwrap_or_else(hostname);
    let board = Arc::new(StatusBoard::default());
    let client = if a.in_cluster || a.kubeconfig.is_some() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Some(match &a.kubeconfig {
            Some(kc) => kube_source::client(kc).await?,
            None => kube_source::inferred_client().await?,
        })
    } else {
        None
    };
    let tls = match (&a.tls_cert, &a.tls_key, &a.tls_from_csr, &a.tls_ca, &client) {
        (Some(cert), Some(key), _, Some(ca), _) => Some(agent::ClientTls {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        }),
        (_, _, Some(file), Some(ca), Some(client)) => {
            let ask = tapestry_runtime::certificate::Ask {
                signer: tapestry_runtime::csr::TAP_CLIENT_SIGNER.into(),
                common_name: tapestry_proto::identity::tap_user(&node),
                organizations: vec![tapestry_proto::identity::TAPS_GROUP.into()],
                names: Vec::new(),
                purpose: "client auth".into(),
                generate_name: format!("tap-{node}-"),
                expiration_seconds: Some(TAP_CERTIFICATE_SECONDS),
            };
            // Tapping starts at once; the shipper connects once the
            // certificate is there (what it captures meanwhile queues).
            tokio::spawn(keep_certificate(
                client.clone(),
                ask,
                file.clone(),
                board.clone(),
            ));
            Some(agent::ClientTls {
                cert: file.clone(),
                key: file.clone(),
                ca: ca.clone(),
            })
        }
        (None, None, None, Some(_), _) => {
            anyhow::bail!("--tls-ca needs --tls-cert and --tls-key, or --tls-from-csr")
        }
        _ => None,
    };
    let aggregators = match (&a.aggregator, &a.aggregator_service, &client) {
        (Some(url), _, _) => {
            agent::check_url(url, tls.is_some())?;
            tokio::sync::watch::channel(vec![url.clone()]).1
        }
        (None, Some(service), Some(client)) => {
            let (tx, rx) = tokio::sync::watch::channel(Vec::new());
            tokio::spawn(aggregator_service::watch_endpoints(
                client.clone(),
                service.clone(),
                tx,
                board.clone(),
                if tls.is_some() { "https" } else { "http" },
            ));
            rx
        }
        _ => anyhow::bail!("--aggregator-service needs --kubeconfig or --in-cluster"),
    };
    let (targets, heartbeat) = match client {
        None => {
            let policies = match &file_policies {
                Some(p) => p.iter().map(|p| Policy::from_file(p).kernel).collect(),
                None => vec![PolicySpec {
                    name: "cli".into(),
                    rules: a.rules.clone(),
                    snaplen: a.snaplen,
                }],
            };
            (
                TargetSource::Static {
                    interfaces: a.ifaces.clone(),
                    policies,
                },
                None,
            )
        }
        Some(client) => {
            let (tx, rx) = tokio::sync::watch::channel(Desired::default());
            let source = ClusterSource {
                client: client.clone(),
                node: node.clone(),
                policies: match &file_policies {
                    Some(p) => PolicySource::File(p.iter().map(Policy::from_file).collect()),
                    None => PolicySource::Cluster,
                },
                out: tx,
                board: board.clone(),
            };
            tokio::spawn(source.run());
            let heartbeat = Heartbeat {
                client,
                namespace: a.lease_namespace.clone(),
                node: node.clone(),
                tap_id: tap_id.clone(),
                period: Duration::from_secs(a.heartbeat_period),
            };
            (TargetSource::Dynamic(rx), Some(heartbeat))
        }
    };
    agent::run(RunConfig {
        targets,
        aggregators,
        heartbeat,
        board,
        metrics_addr: a.metrics_addr,
        ring_bytes: a.ring_size,
        wakeup_bytes: a.wakeup_bytes,
        queue_batches: a.queue_batches as usize,
        batch: BatchLimits {
            max_packets: a.batch_packets as usize,
            max_bytes: 1 << 20,
            max_age: Duration::from_millis(20),
        },
        mode: a.attach_mode,
        tls,
        tap_id,
        node,
    })
    .await
}
