//! Control-plane benchmark: cold start, idle memory, request latency and
//! watch fan-out of `tapestry server`, measured through a real Kubernetes
//! client (kube-rs) over HTTPS.
//!
//! `cargo build --release -p tapestry && target/release/tapestry-bench`
//!
//! `TAPESTRY_BENCH_ONLY=create|get|list` measures that operation alone;
//! `TAPESTRY_BENCH_ONLY=crd` only custom resources against ConfigMaps and
//! the installation of 200 CRDs; `TAPESTRY_BENCH_ONLY=rbac` what RBAC
//! costs a user's creates and lists (RBAC against AlwaysAllow, same run).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../bench_support.rs"]
mod bench_support;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, GetParams, ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams};
use kube::Client;

use bench_support::{client, cpu_ticks, free_port, rss_kib, tapestry_binary, ticks_to_ms};

const COLD_START_RUNS: usize = 5;
const REQUESTS_PER_LEVEL: usize = 20_000;
/// Requests each client sends before measuring: connections are open and
/// warm, as they are for a long-running client.
const WARMUP_PER_CLIENT: usize = 20;
const WATCHERS: usize = 1000;
const FANOUT_WRITES: usize = 20;

struct Server {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start a server on a fresh data directory; returns it with the time from
/// spawn to the first successful /readyz.
async fn start() -> Result<(Server, Duration, Client)> {
    start_with(&[]).await
}

async fn start_with(extra: &[&str]) -> Result<(Server, Duration, Client)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let started = Instant::now();
    let child = Command::new(tapestry_binary()?)
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning tapestry server")?;
    let server = Server { child, dir };
    let kubeconfig = server.dir.path().join("kubeconfig");
    let deadline = started + Duration::from_secs(30);
    loop {
        if kubeconfig.exists() {
            if let Ok(c) = client(&kubeconfig).await {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                if c.request_text(req).await.is_ok_and(|t| t == "ok") {
                    return Ok((server, started.elapsed(), c));
                }
            }
        }
        if Instant::now() > deadline {
            bail!("server not ready within 30s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn configmap(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("key".to_string(), "x".repeat(256))])),
        ..Default::default()
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[derive(Clone, Copy)]
enum Op {
    Create,
    Get,
    List,
}

/// What a load runs against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    ConfigMap,
    /// The custom resource of [`WIDGET_CRD`]: the same 256-byte payload,
    /// pruned, defaulted and validated by its schema and a CEL rule.
    Widget,
}

impl Kind {
    fn collection(self, namespace: &str) -> String {
        match self {
            Kind::ConfigMap => format!("/api/v1/namespaces/{namespace}/configmaps"),
            Kind::Widget => format!("/apis/bench.example.com/v1/namespaces/{namespace}/widgets"),
        }
    }

    fn object(self, name: &str) -> Result<Vec<u8>> {
        Ok(match self {
            Kind::ConfigMap => serde_json::to_vec(&configmap(name))?,
            Kind::Widget => serde_json::to_vec(&serde_json::json!({
                "apiVersion": "bench.example.com/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"payload": "x".repeat(256), "replicas": 3, "maxReplicas": 5, "color": "blue"},
            }))?,
        })
    }
}

/// A custom resource as operators define them: typed fields with bounds,
/// an enum, a default, a CEL rule, status and scale subresources, columns.
const WIDGET_CRD: &str = r#"{
  "apiVersion": "apiextensions.k8s.io/v1",
  "kind": "CustomResourceDefinition",
  "metadata": {"name": "widgets.bench.example.com"},
  "spec": {
    "group": "bench.example.com",
    "scope": "Namespaced",
    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
    "versions": [{
      "name": "v1", "served": true, "storage": true,
      "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}},
      "additionalPrinterColumns": [{"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"}],
      "schema": {"openAPIV3Schema": {
        "type": "object",
        "properties": {
          "spec": {
            "type": "object",
            "required": ["payload"],
            "x-kubernetes-validations": [{"rule": "self.replicas <= self.maxReplicas", "message": "replicas above maxReplicas"}],
            "properties": {
              "payload": {"type": "string", "maxLength": 4096},
              "replicas": {"type": "integer", "minimum": 0},
              "maxReplicas": {"type": "integer", "minimum": 0, "default": 10},
              "color": {"type": "string", "enum": ["red", "green", "blue"]}
            }
          },
          "status": {"type": "object", "properties": {"replicas": {"type": "integer"}}}
        }
      }}
    }]
  }
}"#;

struct Level {
    latency: Histogram<u64>,
    per_second: f64,
    /// CPU time per request, in µs: (server, client).
    cpu_per_request: (f64, f64),
}

/// Run `REQUESTS_PER_LEVEL` operations from `clients` concurrent tasks,
/// after each task's warm-up requests.
///
/// The client shares the two cores with the server, so it sends kube-rs's
/// requests but keeps each response as text instead of decoding it into
/// typed objects (which took more CPU than the server's side of a list);
/// every response is still checked: a 2xx status, and a list holds exactly
/// the 100 seed objects.
#[allow(clippy::too_many_arguments)]
async fn load(
    client: &Client,
    server_pid: u32,
    kind: Kind,
    namespace: &str,
    op: Op,
    clients: usize,
    tag: &str,
) -> Result<Level> {
    let per_client = REQUESTS_PER_LEVEL / clients;
    let url = kind.collection(namespace);
    // Every task finishes its warm-up before any is timed.
    let warmed = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        let request = kube::core::Request::new(url.clone());
        let tag = tag.to_string();
        let warmed = warmed.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let mut waited = false;
            let run = async {
                for i in 0..WARMUP_PER_CLIENT + per_client {
                    if i == WARMUP_PER_CLIENT {
                        warmed.wait().await;
                        waited = true;
                    }
                    let req = match op {
                        Op::Create => request.create(
                            &PostParams::default(),
                            kind.object(&format!("{tag}-{c}-{i}"))?,
                        )?,
                        Op::Get => {
                            request.get(&format!("seed-{}", i % 100), &GetParams::default())?
                        }
                        Op::List => request.list(&ListParams::default())?,
                    };
                    let t = Instant::now();
                    let body = client.request_text(req).await?;
                    if i >= WARMUP_PER_CLIENT {
                        h.record(t.elapsed().as_micros() as u64).ok();
                    }
                    if matches!(op, Op::List) {
                        let items = body.matches(r#""name":"seed-"#).count();
                        if items != 100 {
                            bail!("a list returned {items} seed objects, not 100");
                        }
                    }
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            // A client that failed during its warm-up still lets the
            // others (and the timer) past the barrier: its error is the
            // run's answer, not a hang.
            if !waited {
                warmed.wait().await;
            }
            run.map(|()| h)
        }));
    }
    warmed.wait().await;
    let server_before = cpu_ticks(server_pid).0;
    let client_before = cpu_ticks(std::process::id()).0;
    let started = Instant::now();
    let mut latency = Histogram::<u64>::new(3)?;
    for t in tasks {
        latency.add(t.await??)?;
    }
    let elapsed = started.elapsed();
    let requests = (per_client * clients) as f64;
    // In µs per request.
    let per_request = |ticks: u64| ticks_to_ms(ticks) * 1000.0 / requests;
    Ok(Level {
        latency,
        per_second: requests / elapsed.as_secs_f64(),
        cpu_per_request: (
            per_request(cpu_ticks(server_pid).0.saturating_sub(server_before)),
            per_request(
                cpu_ticks(std::process::id())
                    .0
                    .saturating_sub(client_before),
            ),
        ),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    // 1,000 watch connections need more than the default 1,024 descriptors.
    let limit = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: setrlimit only reads the struct passed by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        eprintln!("warning: could not raise the open-file limit");
    }

    let only = std::env::var("TAPESTRY_BENCH_ONLY").ok();
    if only.as_deref() == Some("rbac") {
        return rbac_cost().await;
    }
    println!("## Control plane (tapestry server)\n");
    let mut starts = Vec::new();
    for _ in 0..COLD_START_RUNS {
        let (_server, took, _) = start().await?;
        starts.push(took);
    }
    starts.sort();
    let cold = starts[starts.len() / 2];
    let (server, _, client) = start().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(server.child.id())?;
    println!("| measure | tapestry | target | target / tapestry |");
    println!("|---|---:|---:|---:|");
    println!(
        "| cold start to /readyz (median of {COLD_START_RUNS}) | {:.0} ms | 300 ms | {:.1}× |",
        cold.as_secs_f64() * 1000.0,
        0.3 / cold.as_secs_f64()
    );
    println!(
        "| idle RSS | {:.1} MiB | 40 MiB | {:.1}× |",
        rss as f64 / 1024.0,
        40.0 * 1024.0 / rss as f64
    );

    seed(&client, &["bench", "fanout"]).await?;
    if only.as_deref() == Some("crd") {
        custom_resources(&client, &server).await?;
        return Ok(());
    }
    println!(
        "\n| operation | clients | req/s | p50 | p99 | p99 target | target / p99 | server CPU/req | client CPU/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, op) in [
        ("create", Op::Create),
        ("get", Op::Get),
        ("list (100 objects)", Op::List),
    ] {
        if only.as_deref().is_some_and(|o| !name.starts_with(o)) {
            continue;
        }
        for clients in [1, 16, 64] {
            let namespace = if matches!(op, Op::Create) {
                "default"
            } else {
                "bench"
            };
            let tag = format!("{}{clients}", name.len());
            let level = load(
                &client,
                server.child.id(),
                Kind::ConfigMap,
                namespace,
                op,
                clients,
                &tag,
            )
            .await?;
            let h = &level.latency;
            println!(
                "| {name} | {clients} | {:.0} | {:.2} ms | {:.2} ms | 10 ms | {:.1}× | {:.0} µs | {:.0} µs |",
                level.per_second,
                ms(h, 0.5),
                ms(h, 0.99),
                10.0 / ms(h, 0.99),
                level.cpu_per_request.0,
                level.cpu_per_request.1,
            );
        }
    }
    if only.is_some() {
        return Ok(());
    }

    // Watch fan-out: every watcher must see each write; we time the last one.
    let fan: Api<ConfigMap> = Api::namespaced(client.clone(), "fanout");
    let rv = fan
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, String, Instant)>(WATCHERS * 4);
    let ready = Arc::new(tokio::sync::Barrier::new(WATCHERS + 1));
    for w in 0..WATCHERS {
        let fan = fan.clone();
        let tx = tx.clone();
        let rv = rv.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let stream = fan.watch(&WatchParams::default().timeout(290), &rv).await;
            ready.wait().await;
            let Ok(stream) = stream else { return };
            let mut stream = stream.boxed();
            while let Some(Ok(ev)) = stream.next().await {
                if let WatchEvent::Added(cm) = ev {
                    let _ = tx
                        .send((w, cm.metadata.name.unwrap_or_default(), Instant::now()))
                        .await;
                }
            }
        });
    }
    ready.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut fanout = Histogram::<u64>::new(3)?;
    for i in 0..FANOUT_WRITES {
        let name = format!("fan-{i}");
        let written = Instant::now();
        fan.create(&PostParams::default(), &configmap(&name))
            .await?;
        let mut seen = 0;
        let mut last = written;
        let deadline = written + Duration::from_secs(30);
        while seen < WATCHERS {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((_, n, at))) if n == name => {
                    seen += 1;
                    last = last.max(at);
                }
                Ok(Some(_)) => {}
                _ => bail!("only {seen} of {WATCHERS} watchers saw {name} within 30s"),
            }
        }
        fanout.record(last.duration_since(written).as_micros() as u64)?;
    }
    println!("\n| watch fan-out ({WATCHERS} watchers, {FANOUT_WRITES} writes) | p50 | p99 | p99 target | target / p99 |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| write → last watcher | {:.1} ms | {:.1} ms | 50 ms | {:.1}× |",
        ms(&fanout, 0.5),
        ms(&fanout, 0.99),
        50.0 / ms(&fanout, 0.99)
    );
    custom_resources(&client, &server).await?;
    drop(server);
    Ok(())
}

/// Creates `namespaces`, then the 100 ConfigMaps that reads find in
/// `bench` (creates go elsewhere, so lists stay 100 objects long).
async fn seed(client: &Client, namespaces: &[&str]) -> Result<()> {
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for ns in namespaces {
        ns_api
            .create(&PostParams::default(), &namespace(ns))
            .await?;
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "bench");
    for i in 0..100 {
        api.create(&PostParams::default(), &configmap(&format!("seed-{i}")))
            .await?;
    }
    Ok(())
}

fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Roles and RoleBindings stored besides the ones that matter: half in
/// each namespace the load runs in, so every decision passes them (the
/// worst place for them).
const RBAC_OBJECTS: usize = 1000;

/// What RBAC costs a user: ConfigMap creates and 100-object lists at 64
/// clients by a user bound to `edit`, against a server deciding by RBAC
/// with 1,000 Roles and 1,000 RoleBindings stored and against one started
/// with `--authorization-mode AlwaysAllow` holding the same objects,
/// alternating, two rounds.
async fn rbac_cost() -> Result<()> {
    let mut sides = Vec::new();
    for mode in ["RBAC", "AlwaysAllow"] {
        let (server, _, admin) = start_with(&["--authorization-mode", mode]).await?;
        seed(&admin, &["bench"]).await?;
        for i in 0..RBAC_OBJECTS {
            let ns = ["bench", "default"][i % 2];
            let role: Role = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("role-{i}"), "namespace": ns},
                "rules": [{"apiGroups": [""], "resources": ["configmaps", "pods"], "verbs": ["get", "list"]}],
            }))?;
            Api::<Role>::namespaced(admin.clone(), ns)
                .create(&PostParams::default(), &role)
                .await?;
            let binding = role_binding(
                &format!("binding-{i}"),
                ns,
                "Role",
                &format!("role-{i}"),
                &format!("user-{i}"),
            );
            Api::<RoleBinding>::namespaced(admin.clone(), ns)
                .create(&PostParams::default(), &binding)
                .await?;
        }
        for ns in ["bench", "default"] {
            Api::<RoleBinding>::namespaced(admin.clone(), ns)
                .create(
                    &PostParams::default(),
                    &role_binding("bench-edit", ns, "ClusterRole", "edit", "bench"),
                )
                .await?;
        }
        let out = Command::new(tapestry_binary()?)
            .args(["user", "add", "bench", "--data-dir"])
            .arg(server.dir.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "tapestry user add: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let kubeconfig = String::from_utf8(out.stdout)?.trim().to_string();
        let user = client(std::path::Path::new(&kubeconfig)).await?;
        // The server reads the token file again within a second.
        let deadline = Instant::now() + Duration::from_secs(10);
        let cms: Api<ConfigMap> = Api::namespaced(user.clone(), "bench");
        while cms.list(&ListParams::default()).await.is_err() {
            if Instant::now() > deadline {
                bail!("{mode}: the bench user cannot list ConfigMaps");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sides.push((mode, server, user));
    }
    println!("## What RBAC costs ({RBAC_OBJECTS} Roles and {RBAC_OBJECTS} RoleBindings stored; a user bound to edit)\n");
    println!("| round | operation | mode | p50 | p99 | server CPU/req |");
    println!("|---|---|---|---:|---:|---:|");
    let mut p99 = BTreeMap::<(&str, &str), Vec<f64>>::new();
    for round in 0..2 {
        for (op_name, op, ns) in [
            ("create", Op::Create, "default"),
            ("list (100 objects)", Op::List, "bench"),
        ] {
            for (mode, server, user) in &sides {
                let tag = format!("r{round}{}", mode[..1].to_lowercase());
                let level =
                    load(user, server.child.id(), Kind::ConfigMap, ns, op, 64, &tag).await?;
                let h = &level.latency;
                p99.entry((op_name, mode)).or_default().push(ms(h, 0.99));
                println!(
                    "| {round} | {op_name} | {mode} | {:.2} ms | {:.2} ms | {:.0} µs |",
                    ms(h, 0.5),
                    ms(h, 0.99),
                    level.cpu_per_request.0
                );
            }
        }
    }
    println!("\n| operation | p99 RBAC / p99 AlwaysAllow, per round | target |");
    println!("|---|---|---:|");
    for op_name in ["create", "list (100 objects)"] {
        let ratios: Vec<String> = p99[&(op_name, "RBAC")]
            .iter()
            .zip(&p99[&(op_name, "AlwaysAllow")])
            .map(|(on, off)| format!("{:.3}", on / off))
            .collect();
        println!("| {op_name} | {} | ≤ 1.05 |", ratios.join(", "));
    }
    Ok(())
}

fn role_binding(name: &str, ns: &str, role_kind: &str, role: &str, user: &str) -> RoleBinding {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .expect("a RoleBinding")
}

/// Custom resources against ConfigMaps in the same run (creates and
/// 100-object lists at 64 clients, alternating, two rounds), then 200 CRDs
/// installed with kubectl: time to all Established and discoverable, and
/// the server's memory per CRD.
async fn custom_resources(client: &Client, server: &Server) -> Result<()> {
    let crd: serde_json::Value = serde_json::from_str(WIDGET_CRD)?;
    let crds: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
            ),
            "customresourcedefinitions",
        ),
    );
    crds.create(&PostParams::default(), &serde_json::from_value(crd)?)
        .await?;
    wait_established(&crds, 1, Duration::from_secs(10)).await?;
    for i in 0..100 {
        let req = kube::core::Request::new(Kind::Widget.collection("bench")).create(
            &PostParams::default(),
            Kind::Widget.object(&format!("seed-{i}"))?,
        )?;
        client.request_text(req).await?;
    }
    println!("\n### Custom resources against ConfigMaps (64 clients, same run)\n");
    println!("| operation | round | ConfigMaps p50 | ConfigMaps p99 | custom resources p50 | custom resources p99 | CR p99 / CM p99 | target | CM server CPU/req | CR server CPU/req |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for round in 1..=2 {
        for (name, op, namespace) in [
            ("create", Op::Create, "default"),
            ("list (100 objects)", Op::List, "bench"),
        ] {
            let tag = format!("r{round}{}", name.len());
            let cm = load(
                client,
                server.child.id(),
                Kind::ConfigMap,
                namespace,
                op,
                64,
                &format!("cm{tag}"),
            )
            .await?;
            let cr = load(
                client,
                server.child.id(),
                Kind::Widget,
                namespace,
                op,
                64,
                &format!("cr{tag}"),
            )
            .await?;
            println!(
                "| {name} | {round} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} | ≤ 1.5 and < 10 ms | {:.0} µs | {:.0} µs |",
                ms(&cm.latency, 0.5),
                ms(&cm.latency, 0.99),
                ms(&cr.latency, 0.5),
                ms(&cr.latency, 0.99),
                ms(&cr.latency, 0.99) / ms(&cm.latency, 0.99),
                cm.cpu_per_request.0,
                cr.cpu_per_request.0,
            );
        }
    }

    // 200 CRDs as 40 operators would bring them: 5 kinds in each of 40 groups.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_kib(server.child.id())?;
    let mut manifest = String::new();
    for g in 0..40 {
        for k in 0..5 {
            let mut crd: serde_json::Value = serde_json::from_str(WIDGET_CRD)?;
            let group = format!("op{g}.bench.example.com");
            let plural = format!("things{k}");
            crd["metadata"]["name"] = serde_json::json!(format!("{plural}.{group}"));
            crd["spec"]["group"] = serde_json::json!(group);
            crd["spec"]["names"] =
                serde_json::json!({"plural": plural, "kind": format!("Thing{k}")});
            manifest.push_str(&serde_json::to_string(&crd)?);
            manifest.push('\n');
        }
    }
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), manifest)?;
    let kubeconfig = server.dir.path().join("kubeconfig");
    let applying = Instant::now();
    let out = Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args(["apply", "-f"])
        .arg(file.path())
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let applied = Instant::now();
    wait_established(&crds, 201, Duration::from_secs(60)).await?;
    let established = applied.elapsed();
    // In discovery: the aggregated document lists every new kind.
    loop {
        let req = http::Request::get("/apis")
            .header(
                http::header::ACCEPT,
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
            )
            .body(Vec::new())?;
        let doc = client.request_text(req).await?;
        if doc.matches("\"things").count() >= 200 {
            break;
        }
        if applied.elapsed() > Duration::from_secs(60) {
            bail!("200 CRDs not in discovery within 60s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let discoverable = applied.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(server.child.id())?;
    let per_crd = rss_after.saturating_sub(rss_before) as f64 / 200.0;
    println!("\n| 200 CRDs (40 groups × 5 kinds) | measured | target | target / measured |");
    println!("|---|---:|---:|---:|");
    println!(
        "| kubectl apply of all 200 | {:.2} s | | |",
        applied.duration_since(applying).as_secs_f64()
    );
    println!(
        "| last kubectl apply → all Established | {:.0} ms | 1000 ms | {:.1}× |",
        established.as_secs_f64() * 1000.0,
        1.0 / established.as_secs_f64()
    );
    println!(
        "| last kubectl apply → all in discovery | {:.0} ms | 1000 ms | {:.1}× |",
        discoverable.as_secs_f64() * 1000.0,
        1.0 / discoverable.as_secs_f64()
    );
    println!(
        "| server RSS growth per CRD | {per_crd:.0} KiB | 200 KiB | {:.1}× |",
        200.0 / per_crd
    );
    Ok(())
}

/// Wait until `count` CRDs are Established.
async fn wait_established(
    crds: &Api<kube::api::DynamicObject>,
    count: usize,
    limit: Duration,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let list = crds.list(&ListParams::default()).await?;
        let established = list
            .items
            .iter()
            .filter(|crd| {
                crd.data
                    .pointer("/status/conditions")
                    .and_then(|c| c.as_array())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Established" && c["status"] == "True")
                    })
            })
            .count();
        if established >= count {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("{established} of {count} CRDs established after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
