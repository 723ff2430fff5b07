//! Node benchmark: `tapestry up` to the first pod Running, pod startup
//! latency (create → Running, seen through a watch) for 50 pods on one
//! node created at once and for 50 created at a steady 10 per second, the
//! idle memory of a node agent, and `tapestry up --nodes 3` to every node
//! Ready. Real containers: needs root, runc, the CNI plugins and
//! busybox-static.
//!
//! `cargo build --release -p tapestry && sudo target/release/kubelet-bench`
//! (`KUBELET_BENCH_ONLY=local`: the local cluster's start alone;
//! `KUBELET_BENCH_ONLY=statefulset`: a StatefulSet of 10 with a
//! local-path claim each, created to all Running, against a Deployment of
//! 10 without volumes, on one node)

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../bench_support.rs"]
mod bench_support;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams, WatchEvent, WatchParams};

use bench_support::{client, cpu_ticks, free_port, rss_kib, tapestry_binary};

const PODS: usize = 50;
/// The steady round creates one pod per PACE (10 pods/s), as Kubernetes'
/// density tests measure startup latency apart from saturation.
const PACE: Duration = Duration::from_millis(100);
const NODE: &str = "bench-node";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so `tapestry up` stops its pods and cleans up.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn busybox_image(bin: &Path, data: &Path) -> Result<()> {
    let rootfs = data.join("bench-rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("busybox-static is required")?;
    for applet in ["sh", "sleep", "httpd"] {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
    }
    let st = Command::new(bin)
        .args(["image", "build", "busybox:bench", "--rootfs"])
        .arg(&rootfs)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("tapestry image build failed");
    }
    Ok(())
}

fn pod(name: &str) -> Result<Pod> {
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use kube::api::ObjectMeta;
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some([("bench".to_string(), "1".to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.to_string()),
            termination_grace_period_seconds: Some(1),
            containers: vec![Container {
                name: "c".into(),
                image: Some("busybox:bench".into()),
                command: Some(vec!["sleep".into(), "3600".into()]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    })
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

async fn wait_running(pods: &Api<Pod>, name: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pods.get_opt(name).await?.as_ref().is_some_and(running) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("pod {name} not Running within {timeout:?}")
}

/// Create `PODS` pods named `{prefix}{i}`, back to back or one per `pace`,
/// and record each one's create → Running time from a watch opened first.
async fn startup_latencies(
    pods: &Api<Pod>,
    node_pid: u32,
    prefix: &str,
    pace: Option<Duration>,
) -> Result<Histogram<u64>> {
    let rv = pods
        .get("first")
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut stream = pods
        .watch(&WatchParams::default().labels("bench=1"), &rv)
        .await?
        .boxed();
    // KUBELET_BENCH_TRACE=1: each pod's create and Running times, and the
    // CPU the node used.
    let trace = std::env::var_os("KUBELET_BENCH_TRACE").is_some();
    let cpu_before = cpu_ticks(node_pid);
    let began = Instant::now();
    let mut created = std::collections::HashMap::new();
    let mut hist = Histogram::<u64>::new(3)?;
    let mut record = |p: Pod, created: &mut std::collections::HashMap<String, Instant>| {
        let name = p.metadata.name.clone().unwrap_or_default();
        if !running(&p) {
            return Ok(());
        }
        let Some(t) = created.remove(&name) else {
            return Ok(());
        };
        if trace {
            eprintln!(
                "{name} created +{:?} running +{:?}",
                t - began,
                began.elapsed()
            );
        }
        hist.record(t.elapsed().as_micros() as u64)
    };
    for i in 0..PODS {
        let name = format!("{prefix}{i}");
        if let Some(pace) = pace {
            // Take the events in between so each is timed when it arrives.
            let next = began + pace * i as u32;
            while let Ok(Some(ev)) = tokio::time::timeout_at(next.into(), stream.next()).await {
                if let WatchEvent::Modified(p) | WatchEvent::Added(p) = ev? {
                    record(p, &mut created)?;
                }
            }
        }
        created.insert(name.clone(), Instant::now());
        pods.create(&PostParams::default(), &pod(&name)?).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !created.is_empty() && Instant::now() < deadline {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        let Ok(Some(ev)) = ev else { continue };
        if let WatchEvent::Modified(p) | WatchEvent::Added(p) = ev? {
            record(p, &mut created)?;
        }
    }
    if !created.is_empty() {
        bail!("{} pods never became Running", created.len());
    }
    if trace {
        let after = cpu_ticks(node_pid);
        eprintln!(
            "{:?}: node CPU {} ticks, its reaped children {} ticks",
            began.elapsed(),
            after.0.saturating_sub(cpu_before.0),
            after.1.saturating_sub(cpu_before.1),
        );
    }
    Ok(hist)
}

/// `tapestry up` on `data` with free ports and these arguments; its
/// standard output piped, its log dropped.
fn up_command(bin: &Path, data: &Path, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(bin);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{}", free_port()?)])
        .args(["--kubelet-port", &free_port()?.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    Ok(cmd)
}

/// `tapestry up` as one node (`NODE` on bridge tpbench0) on `data`,
/// returned once it has printed its kubeconfig, with a client for it.
async fn start_node(bin: &Path, data: &Path) -> Result<(Proc, kube::Client)> {
    let mut child = up_command(
        bin,
        data,
        &[
            "--name",
            NODE,
            "--pod-cidr",
            "10.246.0.0/24",
            "--bridge",
            "tpbench0",
        ],
    )?
    .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let up = Proc(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let kubeconfig = line
        .trim()
        .strip_prefix("kubeconfig: ")
        .context("no kubeconfig line")?
        .to_string();
    Ok((up, client(Path::new(&kubeconfig)).await?))
}

/// `tapestry up` → first pod Running, then two rounds of pod startup
/// latency: a burst, and pods created at a steady pace.
async fn up_and_pods(
    bin: &Path,
) -> Result<(Duration, Duration, Histogram<u64>, Histogram<u64>, u64)> {
    let dir = tempfile::tempdir()?;
    busybox_image(bin, dir.path())?;
    let t0 = Instant::now();
    let (up, client) = start_node(bin, dir.path()).await?;
    let ready = t0.elapsed();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("first")?).await?;
    wait_running(&pods, "first", Duration::from_secs(30)).await?;
    let first = t0.elapsed();

    let pid = up.0.id();
    let burst = startup_latencies(&pods, pid, "b", None).await?;
    let paced = startup_latencies(&pods, pid, "s", Some(PACE)).await?;
    let rss_with_pods = rss_kib(pid)?;
    drop(up);
    Ok((ready, first, burst, paced, rss_with_pods))
}

/// A node agent joined to a separate control plane, idle.
async fn idle_agent(bin: &Path) -> Result<(u64, u64)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut server = Command::new(bin)
        .arg("server")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = server.stdout.take().context("stdout")?;
    let server = Proc(server);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let node_dir = dir.path().join("node");
    let node = Proc(
        Command::new(bin)
            .arg("node")
            .args(["--server", &format!("https://127.0.0.1:{port}")])
            .arg("--token-file")
            .arg(dir.path().join("node-token"))
            .arg("--ca-file")
            .arg(dir.path().join("pki/ca.crt"))
            .arg("--data-dir")
            .arg(&node_dir)
            .args([
                "--name",
                "idle-node",
                "--kubelet-port",
                &free_port()?.to_string(),
                "--bridge",
                "tpbench1",
                "--pod-cidr",
                "10.246.1.0/24",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let client = client(&dir.path().join("kubeconfig")).await?;
    let nodes: Api<Node> = Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.get_opt("idle-node").await?.is_none() {
        if Instant::now() > deadline {
            bail!("node agent did not register");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settle past the first heartbeats.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let out = (rss_kib(node.0.id())?, rss_kib(server.0.id())?);
    drop(node);
    drop(server);
    Ok(out)
}

/// Runs of `tapestry up --nodes 3` measured.
const LOCAL_RUNS: usize = 5;

/// `tapestry up --nodes 3` on a fresh data directory, from spawning it to
/// its line saying every node is Ready (the control plane, node 1 in this
/// network namespace, two nodes in namespaces of their own); `up` stops
/// (SIGTERM) before the next run.
fn local_cluster_start(bin: &Path) -> Result<Vec<Duration>> {
    let mut times = Vec::new();
    for _ in 0..LOCAL_RUNS {
        let dir = tempfile::tempdir()?;
        let t0 = Instant::now();
        let mut child = up_command(
            bin,
            dir.path(),
            &[
                "--nodes",
                "3",
                "--name",
                "bench-local",
                "--no-fleet-manager",
                "--bridge",
                "tpbench2",
                "--cluster-cidr",
                "10.235.0.0/16",
                "--underlay-cidr",
                "10.236.0.0/24",
                "--underlay-bridge",
                "tpbench-ul",
            ],
        )?
        .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let up = Proc(child);
        let mut ready = None;
        // Up to its last line, the kubeconfig's.
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            if line.starts_with("3 nodes Ready") {
                ready = Some(t0.elapsed());
            }
            if line.starts_with("kubeconfig: ") {
                break;
            }
        }
        times.push(ready.context("tapestry up --nodes 3 stopped before its nodes were Ready")?);
        drop(up);
    }
    times.sort();
    Ok(times)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Pods of the StatefulSet and of the Deployment it is measured against.
const SET_PODS: usize = 10;

/// Create `manifest` (a StatefulSet or Deployment of `SET_PODS` pods
/// labelled `app=NAME`) and wait until all its pods are Running; how long.
async fn create_to_running(client: &kube::Client, manifest: serde_json::Value) -> Result<Duration> {
    use kube::api::{DynamicObject, ListParams};
    use kube::discovery::ApiResource;
    let kind = manifest["kind"].as_str().unwrap_or_default().to_string();
    let app = manifest["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let resource = ApiResource {
        group: "apps".into(),
        version: "v1".into(),
        api_version: "apps/v1".into(),
        kind: kind.clone(),
        plural: format!("{}s", kind.to_lowercase()),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let object: DynamicObject = serde_json::from_value(manifest)?;
    let t0 = Instant::now();
    api.create(&PostParams::default(), &object).await?;
    let deadline = t0 + Duration::from_secs(300);
    loop {
        let list = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await?;
        if list.items.iter().filter(|p| running(p)).count() == SET_PODS {
            return Ok(t0.elapsed());
        }
        if Instant::now() > deadline {
            bail!("{kind} {app}: not all {SET_PODS} pods Running within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A StatefulSet of `SET_PODS` (OrderedReady, a claim of the default
/// local-path class per pod) against a Deployment of `SET_PODS` without
/// volumes, on one real node.
async fn statefulset_vs_deployment(bin: &Path) -> Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    busybox_image(bin, dir.path())?;
    let (up, client) = start_node(bin, dir.path()).await?;
    let template = |app: &str| {
        serde_json::json!({"metadata": {"labels": {"app": app}},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": "busybox:bench",
                                     "command": ["sleep", "3600"]}]}})
    };
    let deployment = create_to_running(
        &client,
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "plain"},
            "spec": {"replicas": SET_PODS, "selector": {"matchLabels": {"app": "plain"}},
                     "template": template("plain")}}),
    )
    .await?;
    // The set runs on a node as idle as the Deployment had it.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), "default");
    deployments
        .delete("plain", &kube::api::DeleteParams::foreground())
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pods
        .list(&kube::api::ListParams::default().labels("app=plain"))
        .await?
        .items
        .is_empty()
    {
        if Instant::now() > deadline {
            bail!("the Deployment's pods did not go within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut set_template = template("db");
    set_template["spec"]["containers"][0]["volumeMounts"] =
        serde_json::json!([{"name": "data", "mountPath": "/data"}]);
    let set = create_to_running(
        &client,
        serde_json::json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db"},
            "spec": {"replicas": SET_PODS, "serviceName": "db",
                     "selector": {"matchLabels": {"app": "db"}},
                     "template": set_template,
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                        "spec": {"accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": "64Mi"}}}}]}}),
    )
    .await?;
    drop(up);
    Ok((set, deployment))
}

#[tokio::main]
async fn main() -> Result<()> {
    let bin = tapestry_binary()?;
    if std::env::var("KUBELET_BENCH_ONLY").as_deref() == Ok("statefulset") {
        let (set, deployment) = statefulset_vs_deployment(&bin).await?;
        println!(
            "| StatefulSet of {SET_PODS} with local-path claims, create to all Running (OrderedReady) | {} | Deployment of {SET_PODS} without volumes, same run: {} | {:.2}× |",
            ms(set),
            ms(deployment),
            set.as_secs_f64() / deployment.as_secs_f64()
        );
        return Ok(());
    }
    let local = local_cluster_start(&bin)?;
    let local_row = format!(
        "| `tapestry up --nodes 3` to all nodes Ready (median of {LOCAL_RUNS}; {}–{}) | {} | 3000 ms | {:.1}× |",
        ms(local[0]),
        ms(local[LOCAL_RUNS - 1]),
        ms(local[LOCAL_RUNS / 2]),
        3.0 / local[LOCAL_RUNS / 2].as_secs_f64()
    );
    if std::env::var("KUBELET_BENCH_ONLY").as_deref() == Ok("local") {
        println!("{local_row}");
        return Ok(());
    }
    let (ready, first, burst, paced, rss_up) = up_and_pods(&bin).await?;
    let at = |h: &Histogram<u64>, q: f64| Duration::from_micros(h.value_at_quantile(q));
    let (agent_rss, server_rss) = idle_agent(&bin).await?;
    println!("| measure | tapestry | target | target / tapestry |");
    println!("|---|---:|---:|---:|");
    println!(
        "| `tapestry up` to kubeconfig printed | {} | — | — |",
        ms(ready)
    );
    println!(
        "| `tapestry up` to first pod Running | {} | 3000 ms | {:.1}× |",
        ms(first),
        3.0 / first.as_secs_f64()
    );
    for (round, h) in [("created at once", &burst), ("created 10/s", &paced)] {
        println!(
            "| pod startup p50 ({PODS} pods {round}, one node) | {} | — | — |",
            ms(at(h, 0.5))
        );
        let p99 = at(h, 0.99);
        println!(
            "| pod startup p99 ({PODS} pods {round}, one node) | {} | 1000 ms (SLO 5000 ms) | {:.1}× |",
            ms(p99),
            1.0 / p99.as_secs_f64()
        );
    }
    println!("| node agent idle RSS (`tapestry node`) | {:.1} MiB | 30 MiB (k3s agent: 275 MB) | {:.1}× |", agent_rss as f64 / 1024.0, 30.0 * 1024.0 / agent_rss.max(1) as f64);
    println!(
        "| API server RSS next to it (`tapestry server`) | {:.1} MiB | — | — |",
        server_rss as f64 / 1024.0
    );
    println!(
        "| `tapestry up` RSS with {} pods running | {:.1} MiB | — | — |",
        2 * PODS + 1,
        rss_up as f64 / 1024.0
    );
    println!("{local_row}");
    Ok(())
}
