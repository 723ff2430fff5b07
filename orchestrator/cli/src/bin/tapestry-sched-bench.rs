//! Scheduler benchmark: `tapestry server` (API server, scheduler and
//! controllers in one process) with `tapestry hollow` nodes; creates bare
//! pods and measures, from a pod watch, the throughput from the first
//! create to the last binding and each pod's create→bound latency. Also
//! reports the resident memory of the control plane and of the hollow
//! nodes' process, and how the machine's CPU was shared while it ran.
//!
//! `cargo build --release -p tapestry && target/release/tapestry-sched-bench [--nodes 1000,5000] [--pods 10000]`

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../bench_support.rs"]
mod bench_support;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams};

use bench_support::{
    client, cpu_ticks, free_port, host_ticks, rss_kib, tapestry_binary, ticks_to_ms, HostTicks,
};

/// Creates in flight at once.
const CREATORS: usize = 32;

/// What the benchmark's watch reads of a pod. Decoding whole pods (managed
/// fields included) for four events per pod cost the shared CPUs more than
/// the measurement needs, as decoding each create's reply did.
#[derive(Clone, serde::Deserialize)]
struct WatchedPod {
    metadata: WatchedMeta,
    spec: Option<WatchedSpec>,
}

#[derive(Clone, serde::Deserialize)]
struct WatchedMeta {
    name: Option<String>,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
}

#[derive(Clone, serde::Deserialize)]
struct WatchedSpec {
    #[serde(rename = "nodeName")]
    node_name: Option<String>,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_mib(pid: u32) -> f64 {
    rss_kib(pid).map_or(0.0, |kib| kib as f64 / 1024.0)
}

struct Run {
    nodes: usize,
    pods: usize,
    pods_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    server_rss: f64,
    hollow_rss: f64,
    register_secs: f64,
    /// CPU milliseconds per pod from the first create to the last binding
    /// (the last pods' Running updates may come after it).
    server_cpu_ms: f64,
    hollow_cpu_ms: f64,
    /// The benchmark's own creates and watch, on the same two cores.
    bench_cpu_ms: f64,
    /// Shares of the machine's CPU time over the same window: the three
    /// processes above, everything else on this machine, what the
    /// hypervisor gave other guests, and idle (waiting for the disk
    /// included). Throughput moves with the host; these say how much of it
    /// this run had.
    cpu_ours: f64,
    cpu_others: f64,
    cpu_stolen: f64,
    cpu_idle: f64,
    cpu_iowait: f64,
}

async fn run(nodes: usize, pods: usize) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let bin = tapestry_binary()?;
    let server = Proc(
        Command::new(&bin)
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--cluster-cidr",
                "10.0.0.0/8",
                "--data-dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning tapestry server")?,
    );
    let kubeconfig = dir.path().join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        if Instant::now() > deadline {
            bail!("server did not write its kubeconfig");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = client(&kubeconfig).await?;

    let registering = Instant::now();
    let hollow = Proc(
        Command::new(&bin)
            .arg("hollow")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--count", &nodes.to_string(), "--name-prefix", "bench"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning tapestry hollow")?,
    );
    let node_api: Api<Node> = Api::all(client.clone());
    loop {
        let list = node_api.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|n| {
                n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some()
                    && n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
            })
            .count();
        if ready == nodes {
            break;
        }
        if registering.elapsed() > Duration::from_secs(600) {
            bail!("only {ready}/{nodes} nodes Ready after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let register_secs = registering.elapsed().as_secs_f64();
    eprintln!("{nodes} hollow nodes Ready after {register_secs:.1} s; creating {pods} pods");
    // Let the informers settle on the full node set.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ns_api: Api<Namespace> = Api::all(client.clone());
    ns_api
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("bench".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), "bench");

    // The watch records when each pod is first seen bound.
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let bound: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let rv = pod_api
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let pods_url = pod_api.resource_url().to_owned();
    let watch_client = client.clone();
    let b = bound.clone();
    let watcher = tokio::spawn(async move {
        let mut rv = rv;
        loop {
            let watch = kube::core::Request::new(&pods_url)
                .watch(&WatchParams::default().timeout(290), &rv)
                .map_err(kube::Error::BuildRequest);
            let stream = match watch {
                Ok(request) => watch_client.request_events::<WatchedPod>(request).await,
                Err(e) => Err(e),
            };
            let Ok(stream) = stream else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let p = match ev {
                    Ok(WatchEvent::Added(p) | WatchEvent::Modified(p)) => p,
                    _ => continue,
                };
                if let Some(v) = p.metadata.resource_version.clone() {
                    rv = v;
                }
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
                    b.entry(name).or_insert_with(Instant::now);
                    if b.len() >= pods {
                        return;
                    }
                }
            }
        }
    });

    // Each process's own CPU (not its children's), in clock ticks.
    let own_ticks = |pid: u32| cpu_ticks(pid).0;
    let (server_before, hollow_before, bench_before) = (
        own_ticks(server.0.id()),
        own_ticks(hollow.0.id()),
        own_ticks(std::process::id()),
    );
    let host_before = host_ticks();
    let first = Instant::now();
    let c = created.clone();
    let results: Vec<Result<()>> = futures::stream::iter(0..pods)
        .map(|i| {
            let api = pod_api.clone();
            let creator = client.clone();
            let c = c.clone();
            async move {
                let name = format!("p-{i}");
                let requests = [
                    ("cpu".to_string(), Quantity("10m".into())),
                    ("memory".to_string(), Quantity("16Mi".into())),
                ];
                let pod = Pod {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "c".into(),
                            image: Some("busybox".into()),
                            resources: Some(ResourceRequirements {
                                requests: Some(requests.into()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let request = kube::core::Request::new(api.resource_url())
                    .create(&PostParams::default(), serde_json::to_vec(&pod)?)?;
                c.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name, Instant::now());
                // Kept as text: a failed create is still an error.
                creator.request_text(request).await?;
                Ok(())
            }
        })
        .buffer_unordered(CREATORS)
        .collect()
        .await;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        return Err(e);
    }
    match tokio::time::timeout(Duration::from_secs(600), watcher).await {
        Ok(r) => r?,
        Err(_) => bail!("not every pod was bound within 10 minutes"),
    }
    let host_after = host_ticks();
    let used = |pid: u32, before: u64| own_ticks(pid).saturating_sub(before);
    let (server_ticks, hollow_ticks, bench_ticks) = (
        used(server.0.id(), server_before),
        used(hollow.0.id(), hollow_before),
        used(std::process::id(), bench_before),
    );
    let cpu_per_pod = |ticks: u64| ticks_to_ms(ticks) / pods as f64;
    let ours = server_ticks + hollow_ticks + bench_ticks;
    let host = HostTicks {
        busy: host_after.busy.saturating_sub(host_before.busy),
        stolen: host_after.stolen.saturating_sub(host_before.stolen),
        iowait: host_after.iowait.saturating_sub(host_before.iowait),
        total: host_after.total.saturating_sub(host_before.total).max(1),
    };
    let share = |ticks: u64| ticks as f64 / host.total as f64;
    let bound = bound.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let created = created.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last = bound.values().max().copied().unwrap_or(first);
    let mut hist = Histogram::<u64>::new(3)?;
    for (name, at) in &bound {
        if let Some(c) = created.get(name) {
            hist.record(at.saturating_duration_since(*c).as_micros() as u64)?;
        }
    }
    Ok(Run {
        nodes,
        pods,
        pods_per_sec: pods as f64 / last.duration_since(first).as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        server_rss: rss_mib(server.0.id()),
        hollow_rss: rss_mib(hollow.0.id()),
        register_secs,
        server_cpu_ms: cpu_per_pod(server_ticks),
        hollow_cpu_ms: cpu_per_pod(hollow_ticks),
        bench_cpu_ms: cpu_per_pod(bench_ticks),
        cpu_ours: share(ours),
        cpu_others: share(host.busy.saturating_sub(ours)),
        cpu_stolen: share(host.stolen),
        cpu_idle: share(
            host.total
                .saturating_sub(host.busy.max(ours))
                .saturating_sub(host.stolen),
        ),
        cpu_iowait: share(host.iowait),
    })
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

// One thread: the benchmark shares the two cores with what it measures, and
// a single-threaded runtime spends the least CPU on its own wake-ups.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let nodes: Vec<usize> = arg("--nodes")
        .unwrap_or_else(|| "1000,5000".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .context("--nodes: a comma-separated list of counts")
        })
        .collect::<Result<_>>()?;
    let pods: usize = arg("--pods")
        .map(|p| p.parse())
        .transpose()
        .context("--pods")?
        .unwrap_or(10_000);
    println!("| hollow nodes | pods | pods/s (first create → last bound) | ÷ 1,500 target | ÷ 680 kube-scheduler anchor | p50 create→bound | p99 create→bound | control-plane RSS | hollow process RSS | nodes Ready after | server CPU per pod | hollow CPU per pod | benchmark CPU per pod | machine CPU: ours / others / stolen / idle (waiting for disk) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in nodes {
        let r = run(n, pods).await?;
        println!(
            "| {} | {} | {:.0} | {:.2}× | {:.2}× | {:.0} ms | {:.0} ms | {:.0} MiB | {:.0} MiB | {:.1} s | {:.3} ms | {:.3} ms | {:.3} ms | {:.0}% / {:.0}% / {:.0}% / {:.0}% ({:.0}%) |",
            r.nodes,
            r.pods,
            r.pods_per_sec,
            r.pods_per_sec / 1500.0,
            r.pods_per_sec / 680.0,
            r.p50_ms,
            r.p99_ms,
            r.server_rss,
            r.hollow_rss,
            r.register_secs,
            r.server_cpu_ms,
            r.hollow_cpu_ms,
            r.bench_cpu_ms,
            100.0 * r.cpu_ours,
            100.0 * r.cpu_others,
            100.0 * r.cpu_stolen,
            100.0 * r.cpu_idle,
            100.0 * r.cpu_iowait
        );
    }
    Ok(())
}
