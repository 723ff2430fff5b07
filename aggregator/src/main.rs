use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tapestry_aggregator::replay;
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
    /// Run a policy pipeline over a capture file.
    Replay(ReplayArgs),
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
