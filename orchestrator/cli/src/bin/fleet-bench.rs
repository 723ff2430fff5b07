//! Fleet-manager benchmark: its REST API against the Kubernetes API it is a
//! face over, its idle memory, and its node view with thousands of tapped
//! nodes.
//!
//! `cargo build --release -p tapestry -p tapestry-fleet-manager && target/release/fleet-bench`
//!
//! 1. REST POST and GET of tools at 64 clients, against the same objects
//!    written and read directly as custom resources on the API server.
//! 2. The fleet manager's resident memory when idle.
//! 3. `FLEET_BENCH_NODES` (default 5,000) hollow nodes, each with a tap
//!    heartbeat Lease renewed every 5 s by a simulator: `/v1/nodes` latency
//!    against listing the Nodes on the API server, and the fleet manager's
//!    memory.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../bench_support.rs"]
mod bench_support;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use kube::Client;
use serde_json::json;

use bench_support::{client, cpu_ticks, free_port, rss_kib, tapestry_binary, ticks_to_ms};

const CLIENTS: usize = 64;
const REQUESTS: usize = 10_000;
const WARMUP_PER_CLIENT: usize = 10;
const NODE_LISTS: usize = 200;
const HEARTBEAT: Duration = Duration::from_secs(5);

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn wait_for(what: &str, mut ready: impl AsyncFnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready().await {
        if Instant::now() > deadline {
            bail!("{what}: not ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `requests` requests from `clients` tasks; `request(i)` makes the i-th.
async fn load(
    client: &Client,
    clients: usize,
    requests: usize,
    request: Arc<dyn Fn(usize) -> http::Request<Vec<u8>> + Send + Sync>,
) -> Result<(Histogram<u64>, f64)> {
    let per_client = requests / clients;
    let warmed = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        let request = request.clone();
        let warmed = warmed.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            for i in 0..WARMUP_PER_CLIENT + per_client {
                if i == WARMUP_PER_CLIENT {
                    warmed.wait().await;
                }
                let req = request(c * (WARMUP_PER_CLIENT + per_client) + i);
                let t = Instant::now();
                client.request_text(req).await?;
                if i >= WARMUP_PER_CLIENT {
                    h.record(t.elapsed().as_micros() as u64).ok();
                }
            }
            Ok::<_, anyhow::Error>(h)
        }));
    }
    warmed.wait().await;
    let started = Instant::now();
    let mut latency = Histogram::<u64>::new(3)?;
    for t in tasks {
        latency.add(t.await??)?;
    }
    let per_second = (per_client * clients) as f64 / started.elapsed().as_secs_f64();
    Ok((latency, per_second))
}

fn row(what: &str, ours: &(Histogram<u64>, f64), anchor: &(Histogram<u64>, f64)) {
    println!(
        "{what:<28} fleet manager p50 {:>6.2} ms p99 {:>6.2} ms {:>7.0}/s | API server p50 {:>6.2} ms p99 {:>6.2} ms {:>7.0}/s | p99 ratio {:.2}",
        ms(&ours.0, 0.5),
        ms(&ours.0, 0.99),
        ours.1,
        ms(&anchor.0, 0.5),
        ms(&anchor.0, 0.99),
        anchor.1,
        ms(&ours.0, 0.99) / ms(&anchor.0, 0.99),
    );
}

/// CPU the fleet manager and the API server spend over a phase: unlike
/// latency on two shared cores, it does not move with what else runs.
struct CpuMeter {
    pids: (u32, u32),
    start: (u64, u64),
}

impl CpuMeter {
    fn start(fleet_manager: u32, server: u32) -> Self {
        CpuMeter {
            pids: (fleet_manager, server),
            start: (cpu_ticks(fleet_manager).0, cpu_ticks(server).0),
        }
    }

    /// Microseconds per request: (fleet manager, API server).
    fn per_request(&self, requests: usize) -> (f64, f64) {
        let per = |pid, start| ticks_to_ms(cpu_ticks(pid).0 - start) * 1000.0 / requests as f64;
        (
            per(self.pids.0, self.start.0),
            per(self.pids.1, self.start.1),
        )
    }
}

fn cpu_row(through: (f64, f64), direct: (f64, f64)) {
    println!(
        "{:<28} fleet manager {:>5.0} us + API server {:>5.0} us per request | API server {:>5.0} us",
        "  CPU per request", through.0, through.1, direct.1
    );
}

fn tool(name: &str) -> serde_json::Value {
    json!({"name": name, "type": "http", "snaplen": 128})
}

#[tokio::main]
async fn main() -> Result<()> {
    let nodes: usize = std::env::var("FLEET_BENCH_NODES")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("FLEET_BENCH_NODES")?
        .unwrap_or(5000);
    let tapestry = tapestry_binary()?;
    let fleet_manager = tapestry.with_file_name("fleet-manager");
    if !fleet_manager.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p tapestry-fleet-manager`",
            fleet_manager.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let api_port = free_port()?;
    let server = Process(
        Command::new(&tapestry)
            .args(["server", "--listen", &format!("127.0.0.1:{api_port}")])
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning tapestry server")?,
    );
    let admin_kubeconfig = data.join("kubeconfig");
    wait_for("the API server", async || {
        match client(&admin_kubeconfig).await {
            Ok(c) => c
                .request_text(http::Request::get("/readyz").body(Vec::new()).unwrap())
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await?;
    let api = client(&admin_kubeconfig).await?;

    let fm_port = free_port()?;
    let certs = dir.path().join("certs");
    let fm = Process(
        Command::new(&fleet_manager)
            .args([
                "serve",
                "--no-deploy",
                "--listen",
                &format!("127.0.0.1:{fm_port}"),
            ])
            .arg("--kubeconfig")
            .arg(data.join("credentials/fleet-manager.kubeconfig"))
            .arg("--token-file")
            .arg(data.join("tokens.csv"))
            .arg("--cert-dir")
            .arg(&certs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning fleet-manager")?,
    );
    let fm_pid = fm.0.id();
    // A kubeconfig for the REST API: its certificate, the admin's token.
    let admin_token = std::fs::read_to_string(data.join("tokens.csv"))?
        .lines()
        .find(|l| l.contains(",admin,"))
        .and_then(|l| l.split(',').next())
        .context("no admin token")?
        .to_string();
    let fm_kubeconfig = dir.path().join("fleet-manager.kubeconfig");
    wait_for("the fleet manager's certificate", async || {
        certs.join("fleet-manager.crt").exists()
    })
    .await?;
    std::fs::write(
        &fm_kubeconfig,
        tapestry_apiserver::pki::kubeconfig(
            &format!("https://127.0.0.1:{fm_port}"),
            &std::fs::read_to_string(certs.join("fleet-manager.crt"))?,
            "admin",
            &admin_token,
        ),
    )?;
    let rest = client(&fm_kubeconfig).await?;
    wait_for("the fleet manager", async || {
        rest.request_text(http::Request::get("/v1/tools").body(Vec::new()).unwrap())
            .await
            .is_ok()
    })
    .await?;
    // At rest: CRDs installed, informers synced, nothing asked of it yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "fleet manager idle RSS at start: {:.1} MiB (target < 30)",
        rss_kib(fm_pid)? as f64 / 1024.0
    );

    println!("== REST against the Kubernetes API, {CLIENTS} clients, {REQUESTS} requests each");
    let server_pid = server.0.id();
    let cpu = CpuMeter::start(fm_pid, server_pid);
    let rest_create = load(
        &rest,
        CLIENTS,
        REQUESTS,
        Arc::new(|i| {
            http::Request::post("/v1/tools")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&tool(&format!("rest-{i}"))).unwrap())
                .unwrap()
        }),
    )
    .await?;
    let rest_create_cpu = cpu.per_request(REQUESTS + CLIENTS * WARMUP_PER_CLIENT);
    let cpu = CpuMeter::start(fm_pid, server_pid);
    let direct_create = load(
        &api,
        CLIENTS,
        REQUESTS,
        Arc::new(|i| {
            let body = json!({
                "apiVersion": "tapestry.io/v1alpha1", "kind": "TapTool",
                "metadata": {"name": format!("direct-{i}")},
                "spec": {"type": "http", "snaplen": 128},
            });
            http::Request::post("/apis/tapestry.io/v1alpha1/taptools")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).unwrap())
                .unwrap()
        }),
    )
    .await?;
    let direct_create_cpu = cpu.per_request(REQUESTS + CLIENTS * WARMUP_PER_CLIENT);
    row("POST a tool", &rest_create, &direct_create);
    cpu_row(rest_create_cpu, direct_create_cpu);
    let cpu = CpuMeter::start(fm_pid, server_pid);
    let rest_get = load(
        &rest,
        CLIENTS,
        REQUESTS,
        Arc::new(|i| {
            http::Request::get(format!("/v1/tools/rest-{}", i % 100))
                .body(Vec::new())
                .unwrap()
        }),
    )
    .await?;
    let rest_get_cpu = cpu.per_request(REQUESTS + CLIENTS * WARMUP_PER_CLIENT);
    let cpu = CpuMeter::start(fm_pid, server_pid);
    let direct_get = load(
        &api,
        CLIENTS,
        REQUESTS,
        Arc::new(|i| {
            http::Request::get(format!(
                "/apis/tapestry.io/v1alpha1/taptools/direct-{}",
                i % 100
            ))
            .body(Vec::new())
            .unwrap()
        }),
    )
    .await?;
    let direct_get_cpu = cpu.per_request(REQUESTS + CLIENTS * WARMUP_PER_CLIENT);
    row("GET a tool", &rest_get, &direct_get);
    cpu_row(rest_get_cpu, direct_get_cpu);

    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "fleet manager idle RSS 5 s after the load: {:.1} MiB (target < 30)",
        rss_kib(fm_pid)? as f64 / 1024.0
    );

    if nodes == 0 {
        return Ok(());
    }
    println!("== {nodes} hollow nodes with tap heartbeats every {HEARTBEAT:?}");
    let _hollow = Process(
        Command::new(&tapestry)
            .args(["hollow", "--count", &nodes.to_string()])
            .arg("--kubeconfig")
            .arg(&admin_kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning tapestry hollow")?,
    );
    let started = Instant::now();
    let node_api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(api.clone());
    wait_for("the hollow nodes", async || {
        node_api
            .list_metadata(&Default::default())
            .await
            .is_ok_and(|l| l.items.len() >= nodes)
    })
    .await?;
    println!(
        "{nodes} nodes registered in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let names: Vec<String> = node_api
        .list_metadata(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let renewals = Arc::new(AtomicU64::new(0));
    let _heartbeats = heartbeats(api.clone(), names, renewals.clone());
    // Two rounds of heartbeats, so every node has reported.
    tokio::time::sleep(HEARTBEAT * 2 + Duration::from_secs(2)).await;
    let connected = rest
        .request_text(http::Request::get("/v1/nodes").body(Vec::new())?)
        .await?
        .matches(r#""tap":"Connected""#)
        .count();
    println!(
        "{connected} of {nodes} taps Connected; {} heartbeats written",
        renewals.load(Ordering::Relaxed)
    );
    let rest_nodes = load(
        &rest,
        1,
        NODE_LISTS,
        Arc::new(|_| http::Request::get("/v1/nodes").body(Vec::new()).unwrap()),
    )
    .await?;
    let direct_nodes = load(
        &api,
        1,
        NODE_LISTS,
        Arc::new(|_| {
            http::Request::get("/api/v1/nodes")
                .body(Vec::new())
                .unwrap()
        }),
    )
    .await?;
    row("list every node", &rest_nodes, &direct_nodes);
    println!(
        "fleet manager RSS with {nodes} nodes: {:.1} MiB (target < 200)",
        rss_kib(fm_pid)? as f64 / 1024.0
    );
    Ok(())
}

/// A tap heartbeat for every node, renewed every [`HEARTBEAT`] by 32
/// writers, with a status annotation like a tap's.
fn heartbeats(
    client: Client,
    nodes: Vec<String>,
    renewals: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let writers = 32;
    let nodes = Arc::new(nodes);
    (0..writers)
        .map(|w| {
            let client = client.clone();
            let nodes = nodes.clone();
            let renewals = renewals.clone();
            tokio::spawn(async move {
                let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
                    kube::Api::namespaced(client, tapestry_proto::heartbeat::NAMESPACE);
                let params = kube::api::PatchParams::apply("fleet-bench").force();
                loop {
                    let round = Instant::now();
                    for node in nodes.iter().skip(w).step_by(writers) {
                        let name = tapestry_proto::heartbeat::lease_name(node);
                        let status = json!({
                            "version": "bench", "podsTapped": 3, "interfaces": ["veth1", "veth2", "veth3"],
                            "policies": {"web": {"pods": 3, "seen": 1000, "captured": 500, "dropped": 0}},
                            "dropped": 0, "connected": true,
                        });
                        let lease = json!({
                            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                            "metadata": {"name": name, "annotations": {
                                tapestry_proto::heartbeat::STATUS_ANNOTATION: status.to_string()}},
                            "spec": {
                                "holderIdentity": node,
                                "leaseDurationSeconds": HEARTBEAT.as_secs() * 3,
                                "renewTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                            },
                        });
                        if api
                            .patch(&name, &params, &kube::api::Patch::Apply(&lease))
                            .await
                            .is_ok()
                        {
                            renewals.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(HEARTBEAT.saturating_sub(round.elapsed())).await;
                }
            })
        })
        .collect()
}
