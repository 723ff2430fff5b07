//! Cluster mode against a Kubernetes API: the agent watches the pods of its
//! node with kube-rs and taps the host veths of the pods its policies
//! select, following pods created and deleted later.
//!
//! The API here is a minimal stand-in serving only what a pod watch uses
//! (list + watch of core/v1 pods over plain HTTP); everything else — the
//! agent, kube-rs, the kernel attachments, the gRPC stream — is real.

mod common;

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Query, State},
    routing::get,
    Router,
};
use common::*;
use serde_json::{json, Value};
use tokio::sync::broadcast;

#[derive(Clone)]
struct FakeApi {
    pods: Arc<Mutex<Vec<Value>>>,
    rv: Arc<Mutex<u64>>,
    events: broadcast::Sender<String>,
}

impl FakeApi {
    fn pod(name: &str, app: &str, node: &str, veth: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                         "labels": {"app": app},
                         "annotations": {"tapestry.io/host-veth": veth}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running"}
        })
    }

    fn next_rv(&self) -> String {
        let mut rv = self.rv.lock().unwrap();
        *rv += 1;
        rv.to_string()
    }

    fn apply(&self, kind: &str, mut pod: Value) {
        pod["metadata"]["resourceVersion"] = json!(self.next_rv());
        let name = pod["metadata"]["name"].clone();
        let mut pods = self.pods.lock().unwrap();
        pods.retain(|p| p["metadata"]["name"] != name);
        if kind != "DELETED" {
            pods.push(pod.clone());
        }
        let _ = self
            .events
            .send(json!({"type": kind, "object": pod}).to_string() + "\n");
    }
}

async fn pods(
    State(api): State<FakeApi>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    // The agent asks for its node's pods only.
    let node = q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .unwrap_or("")
        .to_string();
    let on_node = move |p: &Value| p["spec"]["nodeName"] == node.as_str();
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let mut rx = api.events.subscribe();
        let stream = async_stream(
            move |tx: tokio::sync::mpsc::Sender<Result<String, Infallible>>| async move {
                while let Ok(ev) = rx.recv().await {
                    let v: Value = serde_json::from_str(&ev).unwrap();
                    if on_node(&v["object"]) && tx.send(Ok(ev)).await.is_err() {
                        break;
                    }
                }
            },
        );
        return axum::response::Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let items: Vec<Value> = api
        .pods
        .lock()
        .unwrap()
        .iter()
        .filter(|p| on_node(p))
        .cloned()
        .collect();
    let rv = api.rv.lock().unwrap().to_string();
    axum::Json(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": rv}, "items": items}))
        .into_response_ext()
}

trait IntoResponseExt {
    fn into_response_ext(self) -> axum::response::Response;
}

impl<T: axum::response::IntoResponse> IntoResponseExt for T {
    fn into_response_ext(self) -> axum::response::Response {
        self.into_response()
    }
}

/// A stream fed by a spawned task.
fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<String, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<String, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn latest_sources(server: &Server) -> Vec<(String, String)> {
    let rec = server.sink.0.lock().unwrap();
    rec.batches
        .iter()
        .rev()
        .find_map(|b| b.hello.as_ref())
        .map(|h| {
            h.sources
                .iter()
                .map(|s| {
                    (
                        s.interface.clone(),
                        s.pod.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn policy_taps_selected_pods_and_follows_them() {
    if !require_root("policy_taps_selected_pods_and_follows_them") {
        return;
    }
    let _g = serial();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    // Host-side veths of three pods of node n1 (their peers stay in `a` too).
    for v in ["vw1", "vw2", "vd1"] {
        sh(&format!("ip -n {a} link add {v} type veth peer name {v}p && ip -n {a} link set {v} up && ip -n {a} link set {v}p up", a = pair.a));
    }
    let api = FakeApi {
        pods: Arc::new(Mutex::new(vec![])),
        rv: Arc::new(Mutex::new(100)),
        events: broadcast::channel(64).0,
    };
    api.apply("ADDED", FakeApi::pod("web-1", "web", "n1", "vw1"));
    api.apply("ADDED", FakeApi::pod("db-1", "db", "n1", "vd1"));
    api.apply("ADDED", FakeApi::pod("web-9", "web", "n2", "vw9"));
    let listener = in_netns(&pair.a, || {
        let l = std::net::TcpListener::bind("127.0.0.1:6443").unwrap();
        l.set_nonblocking(true).unwrap();
        l
    });
    let app = Router::new()
        .route("/api/v1/pods", get(pods))
        .with_state(api.clone());
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(l, app).await.unwrap();
    });
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:6443\n\
         users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
    )
    .unwrap();
    let policies = dir.path().join("policies.json");
    std::fs::write(
        &policies,
        r#"[{"name": "web", "namespace": "shop", "selector": {"matchLabels": {"app": "web"}}}]"#,
    )
    .unwrap();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node",
            "n1",
            "--policy-file",
            policies.to_str().unwrap(),
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
        ],
    );
    agent.wait_for("web-1 tapped", Duration::from_secs(15), || {
        latest_sources(&server) == [("vw1".to_string(), "web-1".to_string())]
    });
    assert_eq!(agent.metric("tapestry_tap_attached_interfaces"), 1);

    // A pod created later is tapped; a deleted one is detached.
    api.apply("ADDED", FakeApi::pod("web-2", "web", "n1", "vw2"));
    agent.wait_for("web-2 tapped", Duration::from_secs(15), || {
        agent.metric("tapestry_tap_attached_interfaces") == 2
    });
    api.apply("DELETED", FakeApi::pod("web-1", "web", "n1", "vw1"));
    agent.wait_for("web-1 detached", Duration::from_secs(15), || {
        agent.metric("tapestry_tap_attached_interfaces") == 1
    });
    // The stream's Hello now names web-2's veth and identity only.
    agent.wait_for("hello naming web-2", Duration::from_secs(10), || {
        latest_sources(&server) == [("vw2".to_string(), "web-2".to_string())]
    });
    assert!(agent.terminate());
    assert_eq!(tapestry_attachments(&pair.a), Vec::<String>::new());
}
