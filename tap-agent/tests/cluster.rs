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
use tapestry_proto::tap::v1::Direction;

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
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns, "kubectl", "--kubeconfig"]);
        command.arg(self.kubeconfig());
        run_kubectl(command, args, stdin)
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

/// Run `command` (kubectl with its kubeconfig) with `args`, feeding
/// `stdin`; its stdout, or None if it failed.
fn run_kubectl(mut command: Command, args: &[&str], stdin: Option<&str>) -> Option<String> {
    let mut child = command
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

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A one-node `tapestry up` cluster on this machine (its own bridge and pod
/// range), stopped with SIGTERM so it removes its pods.
struct LocalCluster {
    child: Child,
    dir: PathBuf,
}

const TEST_BRIDGE: &str = "tptap0";

impl LocalCluster {
    fn start(binary: &Path, dir: &Path) -> LocalCluster {
        // A busybox image from Debian's static busybox.
        let rootfs = dir.join("rootfs");
        for d in ["bin", "etc", "tmp", "var/www"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "httpd"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("var/www/index.html"), "tapped page\n").unwrap();
        let built = Command::new(binary)
            .args(["image", "build", "busybox:local", "--rootfs"])
            .arg(&rootfs)
            .arg("--data-dir")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let log = std::fs::File::create(dir.join("up.log")).unwrap();
        let child = Command::new(binary)
            .arg("up")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--kubelet-port", &free_port().to_string()])
            .args(["--name", "tapnode", "--bridge", TEST_BRIDGE])
            .args([
                "--pod-cidr",
                "10.251.0.0/24",
                "--cluster-cidr",
                "10.251.0.0/16",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let cluster = LocalCluster {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster
            .kubectl(&["get", "--raw", "/readyz"], None)
            .is_none()
        {
            assert!(Instant::now() < deadline, "tapestry up did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Option<String> {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(self.dir.join("kubeconfig"));
        run_kubectl(command, args, stdin)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["link", "del", TEST_BRIDGE])
            .status();
    }
}

/// The whole path on a real node: the kubelet of `tapestry up` runs a web
/// pod and records its host veth, the agent (cluster mode) finds it through
/// the API and taps it, and an HTTP exchange with the pod arrives at the
/// receiver in both directions, named after the pod.
#[test]
fn pods_run_by_the_node_agent_are_tapped() {
    if !require_root("pods_run_by_the_node_agent_are_tapped") {
        return;
    }
    let _g = serial();
    let Some(binary) = ApiServer::binary() else {
        if std::env::var_os("CI").is_some() {
            panic!("the tapestry binary is not built: run `cargo build -p tapestry` (cargo test --workspace builds it)");
        }
        eprintln!("skipping: tapestry binary not built (cargo build -p tapestry)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(&binary, dir.path());
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "httpd", "image": "busybox:local",
                                 "command": ["httpd", "-f", "-p", "8080", "-h", "/var/www"]}]}
    });
    cluster
        .kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()))
        .expect("kubectl apply");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ip, veth) = loop {
        let fields = cluster
            .kubectl(
                &["get", "pod", "web", "-o",
                  "jsonpath={.status.phase} {.status.podIP} {.metadata.annotations.tapestry\\.io/host-veth}"],
                None,
            )
            .unwrap_or_default();
        let f: Vec<&str> = fields.split_whitespace().collect();
        if f.len() == 3 && f[0] == "Running" {
            break (f[1].to_string(), f[2].to_string());
        }
        assert!(Instant::now() < deadline, "web pod not running: {fields:?}");
        std::thread::sleep(Duration::from_millis(200));
    };

    let grpc_port = free_port();
    let server = Server::start(&rt, HOST_NETNS, grpc_port);
    let policies = dir.path().join("policies.json");
    std::fs::write(
        &policies,
        r#"[{"name": "web", "namespace": "default", "selector": {"matchLabels": {"app": "web"}}}]"#,
    )
    .unwrap();
    let agent = Agent::start(
        HOST_NETNS,
        dir.path(),
        &[
            "--kubeconfig",
            dir.path().join("kubeconfig").to_str().unwrap(),
            "--node",
            "tapnode",
            "--policy-file",
            policies.to_str().unwrap(),
            "--aggregator",
            &format!("http://127.0.0.1:{grpc_port}"),
        ],
    );
    agent.wait_for("web's veth tapped", Duration::from_secs(20), || {
        latest_sources(&server) == [(veth.clone(), "web".to_string())]
    });

    // An HTTP exchange with the pod, from the node.
    let page = (0..50)
        .find_map(|attempt| {
            if attempt > 0 {
                // httpd may still be binding; a refused connect fails at once.
                std::thread::sleep(Duration::from_millis(200));
            }
            let mut s = std::net::TcpStream::connect((ip.as_str(), 8080)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(s, "GET / HTTP/1.0\r\nHost: web\r\n\r\n").ok()?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).ok()?;
            Some(out)
        })
        .expect("the web pod answers on its pod IP");
    assert!(page.contains("tapped page"), "{page}");
    let seen = |needle: &[u8], direction: i32| {
        let rec = server.sink.0.lock().unwrap();
        rec.batches
            .iter()
            .flat_map(|b| &b.packets)
            .any(|p| p.direction == direction && p.data.windows(needle.len()).any(|w| w == needle))
    };
    // The host veth's egress carries packets towards the pod (the request),
    // its ingress what the pod sends (the response).
    agent.wait_for(
        "request and response captured",
        Duration::from_secs(15),
        || {
            seen(b"GET / HTTP/1.0", Direction::Egress as i32)
                && seen(b"tapped page", Direction::Ingress as i32)
        },
    );
    assert!(agent.terminate());
    drop(cluster);
}
