//! `tap-agent`: see `tap-agent --help` and tap-agent/README.md.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tapestry_proto::policy::{FilterRule, TapPolicy, MAX_SNAPLEN};
use tapestry_tap_agent::{
    agent::{self, RunConfig, TargetSource},
    bpf::{self, AttachMode},
    filter::PolicySpec,
    kube_source,
    ring::BatchLimits,
    targets::TargetSet,
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
struct RunArgs {
    /// Interface to tap, ingress and egress (repeatable).
    #[arg(
        long = "iface",
        value_name = "IFACE",
        required_unless_present = "kubeconfig",
        conflicts_with = "kubeconfig"
    )]
    ifaces: Vec<String>,
    /// Cluster mode: watch the pods of --node through this kubeconfig and tap
    /// the host-side veths (annotation tapestry.io/host-veth) of the pods the
    /// --policy-file policies select, following pods as they come and go.
    #[arg(long, value_name = "FILE", requires = "policy_file")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Aggregator gRPC endpoint.
    #[arg(long, value_name = "http://HOST:PORT")]
    aggregator: String,
    /// Policies from a JSON file (an array of TapPolicy: name, rules, snaplen;
    /// selectors apply to pods in cluster mode and are ignored for --iface).
    /// Instead of --rule/--snaplen.
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
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65536))]
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
            let (policies, tap_policies) = match &a.policy_file {
                None => (
                    vec![PolicySpec {
                        name: "cli".into(),
                        rules: a.rules.clone(),
                        snaplen: a.snaplen,
                    }],
                    vec![],
                ),
                Some(path) => match read_policies(path) {
                    Ok(p) => (tapestry_tap_agent::pods::policy_specs(&p), p),
                    Err(e) => {
                        eprintln!("tap-agent: error: {e:#}");
                        return ExitCode::from(2);
                    }
                },
            };
            let node = a.node.clone().unwrap_or_else(hostname);
            let kubeconfig = a.kubeconfig.clone();
            let cfg = RunConfig {
                targets: TargetSource::Static(a.ifaces),
                aggregator: a.aggregator,
                policies,
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
                tap_id: a.tap_id.unwrap_or_else(hostname),
                node: node.clone(),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async move {
                        let mut cfg = cfg;
                        if let Some(kc) = kubeconfig {
                            let _ = rustls::crypto::ring::default_provider().install_default();
                            let client = kube_source::client(&kc).await?;
                            let (tx, rx) = tokio::sync::watch::channel(TargetSet::new());
                            let policies = std::sync::Arc::new(tap_policies);
                            tokio::spawn(async move {
                                if let Err(e) =
                                    kube_source::watch_pods(client, node, policies, tx).await
                                {
                                    tracing::error!("{e:#}");
                                }
                            });
                            cfg.targets = TargetSource::Dynamic(rx);
                        }
                        agent::run(cfg).await
                    })
                })
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
