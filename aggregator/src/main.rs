use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tapestry_aggregator::cluster;
use tapestry_aggregator::config::{Config, PolicyConfig};
use tapestry_aggregator::replay;
use tapestry_aggregator::serve::{self, LiveOptions, ServeOptions, Source};
use tapestry_aggregator::sinks::pcap_over_ip::config::PcapOverIpConfig;
use tapestry_aggregator::sinks::{self, SinkConfig};
use tapestry_aggregator::transforms::dedup::DedupConfig;
use tapestry_aggregator::transforms::mask::MaskConfig;
use tapestry_aggregator::transforms::slice::SliceConfig;
use tapestry_aggregator::transforms::PipelineConfig;

/// Receives mirrored packets from taps; filters, dedups, slices, masks and
/// fans them out to security tools.
#[derive(Parser)]
#[command(name = "aggregator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive packets from taps and deliver them to tools.
    Serve(Box<ServeArgs>),
    /// Run a policy pipeline over a capture file.
    Replay(ReplayArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address for gRPC ingest from taps (and tool subscriptions).
    /// Loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: String,
    /// TLS on the gRPC port: this aggregator's certificate (PEM). Taps
    /// must then present a client certificate from --client-ca naming
    /// their node (CN tapestry:tap:NODE). Re-read when the file changes.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "client_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA that issues taps' client certificates (PEM; the cluster CA).
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Cluster mode: obtain the gRPC port's certificate through a
    /// CertificateSigningRequest (signer tapestry.io/aggregator-serving,
    /// approved for this pod's own addresses and its namespace's Service
    /// names) for the --tls-name names, and keep it with its key in FILE,
    /// renewed before it expires. Needs --client-ca.
    #[arg(long, value_name = "FILE", requires_all = ["client_ca", "tls_names"], conflicts_with_all = ["tls_cert", "tls_key", "config", "pcap_over_ip"])]
    tls_from_csr: Option<PathBuf>,
    /// A name (IP address or DNS name) the certificate of --tls-from-csr is
    /// for; repeat, or separate with commas.
    #[arg(
        long = "tls-name",
        value_name = "NAME",
        value_delimiter = ',',
        requires = "tls_from_csr"
    )]
    tls_names: Vec<String>,
    /// Serve gRPC in plaintext on a non-loopback address: any host that
    /// reaches the port can then send packets in any tap's name.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_from_csr"])]
    insecure: bool,
    /// Address for /metrics, /healthz and HTTP pcap streams.
    #[arg(long, default_value = "127.0.0.1:9090")]
    http: String,
    /// Serve the HTTP port over TLS too, with the gRPC port's certificate
    /// (tools' bearer tokens then never cross the network in the clear).
    #[arg(long)]
    http_tls: bool,
    /// Pipeline configuration (YAML: sinks and policies).
    #[arg(long, conflicts_with_all = ["kubeconfig", "in_cluster"])]
    config: Option<PathBuf>,
    /// Cluster mode: run the TapPolicy and TapTool objects of the cluster
    /// this kubeconfig reaches, following their changes live.
    #[arg(long, value_name = "FILE", conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Cluster mode with the pod's service account (or $KUBECONFIG).
    #[arg(long)]
    in_cluster: bool,
    /// Cluster mode: the host reported in tools' status.address when a
    /// listener binds an unspecified address (0.0.0.0, ::); default: the
    /// --http address when that is specific.
    #[arg(long, value_name = "HOST", env = "AGGREGATOR_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Cluster mode: how often changed status is written.
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    status_period: f64,
    /// Quick path: serve the filtered traffic over PCAP-over-IP on ADDR
    /// (`tshark -i TCP@HOST:PORT`).
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["kubeconfig", "in_cluster"])]
    pcap_over_ip: Option<String>,
    /// Quick path: a client network (CIDR) allowed to read the
    /// PCAP-over-IP stream besides loopback; repeat for more. PCAP-over-IP
    /// has no authentication, so without this only loopback clients are
    /// served.
    #[arg(long, value_name = "CIDR", requires = "pcap_over_ip")]
    pcap_over_ip_allow: Vec<tapestry_proto::policy::Cidr>,
    /// Quick path: serve the PCAP-over-IP stream over TLS with the gRPC
    /// port's certificate (for socat/stunnel clients).
    #[arg(long, requires = "pcap_over_ip")]
    pcap_over_ip_tls: bool,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

/// The transform flags shared by `replay` and `serve`'s quick path.
#[derive(Args, Clone)]
struct PipelineArgs {
    /// Filter expression in tcpdump (pcap-filter) syntax.
    #[arg(long, default_value = "")]
    filter: String,
    /// Keep only the first N bytes of each packet.
    #[arg(long, value_name = "N", conflicts_with = "slice_payload")]
    slice: Option<usize>,
    /// Keep the headers plus N bytes of payload.
    #[arg(long, value_name = "N")]
    slice_payload: Option<usize>,
    /// Drop the second copy of packets seen twice within the dedup window.
    #[arg(long)]
    dedup: bool,
    /// Dedup window in microseconds.
    #[arg(long, value_name = "US", default_value_t = 1000, requires = "dedup")]
    dedup_window_us: u64,
    /// Overwrite transport payload from this offset on with zeros.
    #[arg(long, value_name = "OFFSET")]
    mask_payload: Option<usize>,
}

impl PipelineArgs {
    fn config(&self) -> PipelineConfig {
        PipelineConfig {
            filter: self.filter.clone(),
            dedup: self.dedup.then(|| DedupConfig {
                window_us: self.dedup_window_us,
                ..DedupConfig::default()
            }),
            slice: self
                .slice
                .map(SliceConfig::Bytes)
                .or(self.slice_payload.map(SliceConfig::Payload)),
            mask: self.mask_payload.map(|o| MaskConfig {
                payload_offset: o,
                byte: 0,
            }),
        }
    }
}

#[derive(Args)]
struct ReplayArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Input capture (pcap or pcapng).
    #[arg(long, short = 'i')]
    input: PathBuf,
    /// Output file (pcapng).
    #[arg(long, short = 'o')]
    output: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replay(a) => run_replay(a),
        Command::Serve(a) => run_serve(*a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aggregator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_replay(a: ReplayArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let stats = replay::replay(&a.pipeline.config(), &a.input, &a.output)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} packets read, {} written, {} duplicates dropped, {:.0} packets/s",
        stats.read,
        stats.written,
        stats.duplicates,
        stats.read as f64 / secs.max(1e-9)
    );
    if let Some(t) = stats.truncated {
        anyhow::bail!("{}: {t}", a.input.display());
    }
    Ok(())
}

fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.kubeconfig.is_some() || a.in_cluster {
        return run_cluster(a);
    }
    let mut config = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let p = a.pipeline.config();
    // Reject a bad expression with libpcap's words before anything starts.
    tapestry_aggregator::bpf::Program::compile(
        &p.filter,
        tapestry_aggregator::bpf::LINKTYPE_ETHERNET,
        262_144,
    )
    .map_err(|e| anyhow::anyhow!("--filter: {}", e.message))?;
    match &a.pcap_over_ip {
        Some(addr) => {
            config.sinks.push(SinkConfig::PcapOverIp(PcapOverIpConfig {
                name: "pcap-over-ip".into(),
                listen: addr.clone(),
                allow: (!a.pcap_over_ip_allow.is_empty()).then(|| a.pcap_over_ip_allow.clone()),
                queue: sinks::default_queue(),
                client_queue: sinks::default_client_queue(),
                max_clients: sinks::default_max_clients(),
                snaplen: sinks::default_snaplen(),
                tls: a.pcap_over_ip_tls,
            }));
            config.policies.push(PolicyConfig {
                name: "command-line".into(),
                tap_policies: Vec::new(),
                filter: p.filter,
                dedup: p.dedup,
                slice: p.slice,
                mask: p.mask,
                sinks: vec!["pcap-over-ip".into()],
                groups: Vec::new(),
                queue: 1024,
                limits: None,
            });
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("command line: {e}"))?;
        }
        None if a.pipeline.filter.is_empty()
            && p.slice.is_none()
            && p.dedup.is_none()
            && p.mask.is_none() => {}
        None => anyhow::bail!(
            "--filter/--slice/--dedup/--mask-payload need --pcap-over-ip (or use --config)"
        ),
    }
    if a.config.is_none() && a.pcap_over_ip.is_none() {
        anyhow::bail!(
            "nothing to serve: give --config FILE and/or --pcap-over-ip ADDR, or --kubeconfig FILE / --in-cluster"
        );
    }
    if a.tls_from_csr.is_some() {
        anyhow::bail!("--tls-from-csr needs cluster mode (--kubeconfig or --in-cluster)");
    }
    let tls = ingest_tls(&a)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let stop_signal = tapestry_runtime::shutdown::on_signals()?;
        let running = serve::start(ServeOptions {
            grpc: a.grpc,
            http: a.http,
            source: Source::Config(config),
            tls,
            http_tls: a.http_tls,
        })
        .await?;
        announce(&running)?;
        stop_signal.cancelled().await;
        running.shutdown(STOP_INGEST_WITHIN).await;
        Ok(())
    })
}

/// Cluster mode: tools and policies from the API server, followed live.
fn run_cluster(a: ServeArgs) -> anyhow::Result<()> {
    if !a.pipeline.filter.is_empty()
        || a.pipeline.slice.is_some()
        || a.pipeline.slice_payload.is_some()
        || a.pipeline.dedup
        || a.pipeline.mask_payload.is_some()
    {
        anyhow::bail!(
            "--filter/--slice/--dedup/--mask-payload do not apply in cluster mode: \
             each TapPolicy carries its own"
        );
    }
    let period = std::time::Duration::try_from_secs_f64(a.status_period)
        .ok()
        .filter(|p| !p.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--status-period: must be a positive number of seconds"))?;
    let tls = ingest_tls(&a)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let stop_signal = tapestry_runtime::shutdown::on_signals()?;
        let client = cluster::client(a.kubeconfig.as_deref()).await?;
        if let Some(file) = &a.tls_from_csr {
            let ask = tapestry_runtime::certificate::Ask {
                signer: tapestry_runtime::csr::AGGREGATOR_SERVING_SIGNER.into(),
                common_name: "tapestry:aggregator".into(),
                organizations: Vec::new(),
                names: a.tls_names.clone(),
                purpose: "server auth".into(),
                generate_name: "aggregator-".into(),
                expiration_seconds: Some(SERVING_CERTIFICATE_SECONDS),
            };
            tracing::info!(file = %file.display(), names = ?a.tls_names, "keeping the gRPC port's certificate");
            tapestry_runtime::certificate::keep(
                client.clone(),
                ask,
                file.clone(),
                tokio_util::sync::CancellationToken::new(),
            )
            .await
            .map_err(|e| e.context("the gRPC port's certificate"))?;
        }
        // Certified taps' pod identities are checked against where the
        // cluster says those pods run.
        let pods: Option<Arc<dyn tapestry_aggregator::sources::grpc::PodPlacement>> =
            match &tls {
                Some(_) => Some(Arc::new(
                    cluster::PodNodes::start(
                        client.clone(),
                        tokio_util::sync::CancellationToken::new(),
                    )
                    .await,
                )),
                None => None,
            };
        let running = serve::start(ServeOptions {
            grpc: a.grpc,
            http: a.http,
            tls,
            http_tls: a.http_tls,
            source: Source::Live(LiveOptions {
                status: Arc::new(cluster::status::KubeStatus::new(client.clone())),
                status_period: period,
                advertise_host: a.advertise_host,
                client: Some(client.clone()),
                pods,
            }),
        })
        .await?;
        announce(&running)?;
        let handle = running
            .cluster
            .clone()
            .ok_or_else(|| anyhow::anyhow!("cluster mode started without its reconciler"))?;
        tokio::select! {
            r = cluster::watch(client, handle.clone()) => r,
            _ = stop_signal.cancelled() => {
                running.stop_ingest(STOP_INGEST_WITHIN).await;
                // Tools reported not Ready before the listeners close, so
                // nobody is sent to a port that is about to go away.
                let stop = handle.apply(cluster::Change::Stop);
                let within = STOP_STATUS_WITHIN + tapestry_aggregator::serve::DRAIN_WITHIN;
                match tokio::time::timeout(within, stop).await {
                    Ok(Ok(())) => tracing::info!("stopping: tools reported not Ready"),
                    Ok(Err(e)) => tracing::warn!("stopping: {e}"),
                    Err(_) => tracing::warn!(
                        "stopping: the tools' status was not written within {STOP_STATUS_WITHIN:?}"
                    ),
                }
                Ok(())
            }
        }
    })
}

/// TLS for the gRPC port, or why plaintext is refused. Plaintext ingest
/// takes any sender's word for which tap and pods it speaks for, so it is
/// served without --insecure only on loopback, and always with a warning.
fn ingest_tls(a: &ServeArgs) -> anyhow::Result<Option<tapestry_aggregator::tls::TlsFiles>> {
    if let (Some(cert), Some(key), Some(client_ca)) = (&a.tls_cert, &a.tls_key, &a.client_ca) {
        return Ok(Some(tapestry_aggregator::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: client_ca.clone(),
        }));
    }
    if let (Some(file), Some(client_ca)) = (&a.tls_from_csr, &a.client_ca) {
        // Certificate and key in one file, obtained before serving.
        return Ok(Some(tapestry_aggregator::tls::TlsFiles {
            cert: file.clone(),
            key: file.clone(),
            client_ca: client_ca.clone(),
        }));
    }
    if a.client_ca.is_some() {
        anyhow::bail!("--client-ca needs --tls-cert and --tls-key, or --tls-from-csr");
    }
    let loopback = a
        .grpc
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|s| s.ip().is_loopback());
    if a.insecure {
        tracing::warn!(
            grpc = %a.grpc,
            "INSECURE: gRPC ingest is plaintext and unauthenticated: anyone who reaches {} can send packets in any tap's name and read tool subscriptions",
            a.grpc
        );
    } else if loopback {
        tracing::warn!(
            grpc = %a.grpc,
            "gRPC ingest is plaintext and unauthenticated (loopback only: any local process can send in a tap's name); give --tls-cert/--tls-key/--client-ca to authenticate taps"
        );
    } else {
        anyhow::bail!(
            "--grpc {}: refusing plaintext ingest on a non-loopback address: give --tls-cert, --tls-key and --client-ca so taps authenticate, or --insecure",
            a.grpc
        );
    }
    Ok(None)
}

/// The lifetime asked for the gRPC port's certificate (renewed at 70–90%).
const SERVING_CERTIFICATE_SECONDS: i32 = 24 * 3600;

/// How long a stopping aggregator waits for its tap streams to end with
/// their last acknowledgements.
const STOP_INGEST_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a stopping aggregator waits to report its tools not Ready.
const STOP_STATUS_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Machine-readable lines so scripts (and tests) can find the ports.
fn announce(running: &serve::Running) -> anyhow::Result<()> {
    use std::io::Write;
    println!("grpc {}", running.grpc);
    println!("http {}", running.http);
    for (name, addr) in &running.sinks {
        println!("sink {name} {addr}");
    }
    std::io::stdout().flush()?;
    tracing::info!(grpc = %running.grpc, http = %running.http, "aggregator serving");
    Ok(())
}
