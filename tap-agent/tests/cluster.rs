//! Cluster mode against a real Kubernetes API: a `tapestry server` process
//! in the test's network namespace, pods created and deleted with the
//! machine's kubectl. The agent watches the pods of its node with kube-rs
//! and taps the host veths of the pods its policies select, following pods
//! created and deleted later.

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::json;

/// A `tapestry server` process inside a network namespace.
struct ApiServer {
    ns: String,
    dir: PathBuf,
    child: Child,
}

impl ApiServer {
    /// The `tapestry` binary sits next to this test's directory in the
    /// target dir; `cargo test --workspace` builds it.
    fn binary() -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let path = exe.parent()?.parent()?.join("tapestry");
        path.exists().then_some(path)
    }

    fn start(ns: &str, dir: &Path, binary: &Path) -> ApiServer {
        let dir = dir.join("apiserver");
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(binary)
            .args(["server", "--listen", "127.0.0.1:6443", "--data-dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tapestry server");
        let server = ApiServer {
            ns: ns.to_string(),
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.kubectl(&["get", "--raw", "/readyz"], None).is_none() {
            assert!(
                Instant::now() < deadline,
                "tapestry server did not get ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Run kubectl in the server's namespace; None if it failed.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Option<String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "kubectl", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, manifest: &serde_json::Value) {
        let text = manifest.to_string();
        assert!(
            self.kubectl(&["apply", "-f", "-"], Some(&text)).is_some(),
            "kubectl apply failed for {text}"
        );
    }

    fn pod(name: &str, app: &str, node: &str, veth: &str) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app},
                         "annotations": {"tapestry.io/host-veth": veth}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let Some(binary) = ApiServer::binary() else {
        if std::env::var_os("CI").is_some() {
            panic!("the tapestry binary is not built: run `cargo build -p tapestry` (cargo test --workspace builds it)");
        }
        eprintln!("skipping: tapestry binary not built (cargo build -p tapestry)");
        return;
    };
    let api = ApiServer::start(&pair.a, dir.path(), &binary);
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    api.apply(&ApiServer::pod("web-1", "web", "n1", "vw1"));
    api.apply(&ApiServer::pod("db-1", "db", "n1", "vd1"));
    api.apply(&ApiServer::pod("web-9", "web", "n2", "vw9"));
    let kubeconfig = api.kubeconfig();
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
    api.apply(&ApiServer::pod("web-2", "web", "n1", "vw2"));
    agent.wait_for("web-2 tapped", Duration::from_secs(15), || {
        agent.metric("tapestry_tap_attached_interfaces") == 2
    });
    // Without a kubelet to confirm, a forced delete removes the pod at once.
    api.kubectl(
        &[
            "delete",
            "pod",
            "-n",
            "shop",
            "web-1",
            "--grace-period=0",
            "--force",
        ],
        None,
    )
    .expect("kubectl delete");
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
