use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tapestry_aggregator::config::{Config, PolicyConfig};
use tapestry_aggregator::replay;
use tapestry_aggregator::serve::{self, ServeOptions};
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
    Serve(ServeArgs),
    /// Run a policy pipeline over a capture file.
    Replay(ReplayArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address for gRPC ingest from taps (and tool subscriptions).
    #[arg(long, default_value = "0.0.0.0:50051")]
    grpc: String,
    /// Address for /metrics, /healthz and HTTP pcap streams.
    #[arg(long, default_value = "127.0.0.1:9090")]
    http: String,
    /// Pipeline configuration (YAML: sinks and policies).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Quick path: serve the filtered traffic over PCAP-over-IP on ADDR
    /// (`tshark -i TCP@HOST:PORT`).
    #[arg(long, value_name = "ADDR")]
    pcap_over_ip: Option<String>,
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
        Command::Serve(a) => run_serve(a),
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
                queue: sinks::default_queue(),
                client_queue: sinks::default_client_queue(),
                snaplen: sinks::default_snaplen(),
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
        anyhow::bail!("nothing to serve: give --config FILE and/or --pcap-over-ip ADDR");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let running = serve::start(ServeOptions {
            grpc: a.grpc,
            http: a.http,
            config,
        })
        .await?;
        // Machine-readable lines so scripts (and tests) can find the ports.
        println!("grpc {}", running.grpc);
        println!("http {}", running.http);
        for (name, addr) in &running.sinks {
            println!("sink {name} {addr}");
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        tracing::info!(grpc = %running.grpc, http = %running.http, "aggregator serving");
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
