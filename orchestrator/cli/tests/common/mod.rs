//! A `tapestry server` process and the machine's kubectl, as a user runs them.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tapestry_store::conformance::free_port;

pub struct Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// With `TAPESTRY_TEST_STORE=etcd`, each server keeps its objects in an
    /// etcd of its own, so the same end-to-end tests cover both backends.
    _etcd: Option<tapestry_store::conformance::EtcdServer>,
}

/// kubectl is a hard requirement of these tests: in CI its absence fails.
pub fn require_kubectl() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("kubectl is not installed; CI must provide it");
        }
        eprintln!("skipping: kubectl not found on PATH");
    }
    found
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut extra_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let on_etcd = std::env::var("TAPESTRY_TEST_STORE").is_ok_and(|v| v == "etcd");
        let etcd = (on_etcd && !extra_args.iter().any(|a| a.starts_with("--store"))).then(|| {
            tapestry_store::conformance::EtcdServer::start()
                .expect("TAPESTRY_TEST_STORE=etcd needs the etcd binary")
        });
        if let Some(etcd) = &etcd {
            extra_args.push(format!("--store={}", etcd.store_arg()));
        }
        let mut s = Server {
            dir,
            port: free_port(),
            child: None,
            extra_args,
            _etcd: etcd,
        };
        s.spawn();
        s
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Start the process and wait until it answers /readyz.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.kubeconfig());
        let child = Command::new(env!("CARGO_BIN_EXE_tapestry"))
            .arg("server")
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning tapestry server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.kubeconfig().exists() {
                let out = self.kubectl(&["get", "--raw", "/readyz"]);
                if out.status.success() {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("tapestry server exited early: {status}");
            }
            assert!(Instant::now() < deadline, "server not ready within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("server did not exit within 20s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        // A discovery cache per server: servers of earlier tests may have
        // had this port, and kubectl would map kinds from their cache.
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("KUBECTL_EXTERNAL_DIFF", "diff -u")
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args);
        cmd
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        let child = self
            .kubectl_cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        finish_within(child, args)
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .kubectl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing stdin");
        finish_within(child, args)
    }

    /// Run kubectl and return stdout, failing the test with stderr if it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn ok_stdin(&self, args: &[&str], input: &str) -> String {
        let out = self.kubectl_stdin(args, input);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run kubectl expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            !out.status.success(),
            "kubectl {} unexpectedly succeeded: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn admin_token(&self) -> String {
        let tokens = std::fs::read_to_string(self.dir.path().join("tokens.csv")).expect("tokens");
        tokens
            .lines()
            .find(|l| l.contains(",admin,"))
            .and_then(|l| l.split(',').next())
            .expect("admin token")
            .to_string()
    }

    /// curl against the server (HTTPS with the cluster CA).
    pub fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .arg("-sS")
            .arg("--cacert")
            .arg(self.dir.path().join("pki/ca.crt"))
            .args(args)
            .output()
            .expect("running curl")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `tapestry hollow` process: fake nodes joined to a server.
pub struct Hollow {
    child: Option<Child>,
}

impl Hollow {
    /// Start `count` hollow nodes named `prefix-0..` with fast heartbeats.
    pub fn start(server: &Server, prefix: &str, count: usize) -> Hollow {
        let child = Command::new(env!("CARGO_BIN_EXE_tapestry"))
            .arg("hollow")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(["--count", &count.to_string(), "--name-prefix", prefix])
            .args(["--heartbeat-interval", "1s", "--status-interval", "5s"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning tapestry hollow");
        Hollow { child: Some(child) }
    }

    /// Stop the process at once (no goodbye: heartbeats just stop).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Hollow {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The longest any one kubectl command of these tests may take (the longest
/// `--timeout` they pass is 90 s). Some kubectl commands wait without end by
/// default (`delete` waits up to a week for the object to go): past this the
/// command is killed and the test fails naming it, instead of hanging the run.
const KUBECTL_LIMIT: Duration = Duration::from_secs(180);

fn finish_within(child: Child, args: &[&str]) -> Output {
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(KUBECTL_LIMIT) {
        Ok(out) => out.expect("kubectl output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!(
                "kubectl {} did not finish within {} s; killed",
                args.join(" "),
                KUBECTL_LIMIT.as_secs()
            );
        }
    }
}

/// Poll `f` until it returns Some, failing the test with `what` after
/// `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
