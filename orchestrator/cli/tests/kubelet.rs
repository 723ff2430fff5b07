//! End-to-end: `tapestry up` runs real containers (runc, CNI, overlayfs)
//! and kubectl drives them — logs, exec, restarts, volumes, deletion with
//! cleanup, and adoption after the agent is SIGKILLed. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tapestry_store::conformance::free_port;

const NODE: &str = "e2e-node";
const POD_CIDR: &str = "10.245.7.0/24";

fn tapestry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tapestry"))
}

/// Root, runc, the CNI plugins, busybox-static and kubectl; in CI their
/// absence fails the test, elsewhere it skips.
fn prerequisites() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for p in [
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/loopback",
        "/bin/busybox",
    ] {
        if !Path::new(p).exists() {
            missing.push(p.to_string());
        }
    }
    if !Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        missing.push("kubectl".into());
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("kubelet end-to-end tests need: {}", missing.join(", "));
    }
    eprintln!("skipping: missing {}", missing.join(", "));
    false
}

/// A busybox root filesystem: the static binary and its applet links.
fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    for d in ["etc", "tmp", "proc", "sys", "dev", "var/www"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("var/www/index.html"), "hello from a pod\n").unwrap();
}

/// `busybox:local` in the image store of `data_dir`, built from a rootfs
/// made under `scratch`.
fn build_busybox_image(scratch: &Path, data_dir: &Path) {
    let rootfs = scratch.join("rootfs");
    busybox_rootfs(&rootfs);
    let out = tapestry()
        .args(["image", "build", "busybox:local", "--rootfs"])
        .arg(&rootfs)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    kubelet_port: u16,
    child: Option<Child>,
    /// The node's name, pod CIDR and bridge (tests running side by side
    /// need their own).
    net: (&'static str, &'static str, &'static str),
}

const NET: (&str, &str, &str) = (NODE, POD_CIDR, "tpe2e0");

impl Cluster {
    fn start() -> Cluster {
        Self::start_as(NET)
    }

    fn start_as(net: (&'static str, &'static str, &'static str)) -> Cluster {
        let mut c = Cluster {
            net,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            kubelet_port: free_port(),
            child: None,
        };
        c.spawn();
        c
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.kubeconfig());
        let started = Instant::now();
        let mut child = tapestry()
            .arg("up")
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--kubelet-port", &self.kubelet_port.to_string()])
            .args(["--name", self.net.0, "--pod-cidr", self.net.1])
            .args(["--bridge", self.net.2])
            // The node agent under test alone: no taps or aggregator pods.
            .arg("--no-fleet-manager")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning tapestry up");
        // `kubeconfig: PATH` is printed once the node agent runs.
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert!(
            line.starts_with("kubeconfig: "),
            "unexpected first line {line:?}"
        );
        eprintln!("tapestry up ready in {:?}", started.elapsed());
        self.child = Some(child);
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .env("KUBECONFIG", self.kubeconfig())
            .args(args)
            .output()
            .expect("kubectl")
    }

    fn ok(&self, args: &[&str]) -> String {
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

    fn apply(&self, yaml: &str) {
        let mut child = Command::new("kubectl")
            .env("KUBECONFIG", self.kubeconfig())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn jsonpath(&self, pod: &str, path: &str) -> String {
        self.ok(&["get", "pod", pod, "-o", &format!("jsonpath={{{path}}}")])
    }

    /// Wait until `f` holds, showing the pod on failure.
    fn wait_for(&self, what: &str, secs: u64, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let pods = self.kubectl(&["get", "pods", "-o", "yaml"]);
        panic!(
            "timed out waiting for {what}\n{}",
            String::from_utf8_lossy(&pods.stdout)
        );
    }

    fn wait_running(&self, pod: &str) {
        self.wait_for(&format!("{pod} Running and ready"), 30, || {
            self.jsonpath(pod, ".status.phase") == "Running"
                && self
                    .jsonpath(pod, ".status.containerStatuses[*].ready")
                    .split(' ')
                    .all(|r| r == "true")
        });
    }

    /// Wait for the node to be Ready, and put `busybox:local` in its image
    /// store.
    fn node_ready_with_busybox(&self) {
        let node = self.net.0;
        self.wait_for("node Ready", 20, || {
            let out = self.kubectl(&[
                "get",
                "node",
                node,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            String::from_utf8_lossy(&out.stdout) == "True"
        });
        build_busybox_image(self.dir.path(), self.dir.path());
    }

    fn sigkill(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if c.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        panic!("tapestry up did not stop within 30s of SIGTERM");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn pod_yaml(name: &str, body: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {NODE}\n{body}"
    )
}

fn http_get(ip: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("{ip}:{port}").parse().ok()?,
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn leftovers(uid: &str) -> Vec<String> {
    let mut found = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    if String::from_utf8_lossy(&netns.stdout).contains(uid) {
        found.push("netns".into());
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    if mounts.contains(uid) {
        found.push("mounts".into());
    }
    if Path::new(&format!("/sys/fs/cgroup/memory/tapestry/pod{uid}")).exists() {
        found.push("cgroup".into());
    }
    found
}

#[test]
fn image_store_cli() {
    if !Path::new("/bin/busybox").exists() {
        if std::env::var_os("CI").is_some() {
            panic!("busybox-static is required");
        }
        eprintln!("skipping: no /bin/busybox");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs);
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let out = tapestry()
            .arg("image")
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = run(&[
        "build",
        "bb:1",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--cmd",
        "sh",
    ]);
    assert!(ok, "{out}");
    // An OCI image layout archive made by hand: one layer, one config.
    let oci = dir.path().join("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256")).unwrap();
    let layer = dir.path().join("layer.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let sha = |p: &Path| {
        let out = Command::new("sha256sum").arg(p).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let layer_sha = sha(&layer);
    std::fs::copy(&layer, oci.join("blobs/sha256").join(&layer_sha)).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["httpd","-f"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_sha}"]}}}}"#
    );
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, &config).unwrap();
    let config_sha = sha(&config_path);
    std::fs::copy(&config_path, oci.join("blobs/sha256").join(&config_sha)).unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_sha}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_sha}","size":{}}}]}}"#,
        config.len(),
        std::fs::metadata(&layer).unwrap().len()
    );
    let manifest_path = dir.path().join("manifest.json");
    std::fs::write(&manifest_path, &manifest).unwrap();
    let manifest_sha = sha(&manifest_path);
    std::fs::copy(&manifest_path, oci.join("blobs/sha256").join(&manifest_sha)).unwrap();
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        oci.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_sha}","size":{},"annotations":{{"io.containerd.image.name":"docker.io/library/web:2"}}}}]}}"#, manifest.len()),
    )
    .unwrap();
    let archive = dir.path().join("web.tar");
    assert!(Command::new("tar")
        .arg("-C")
        .arg(&oci)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap()
        .success());
    let (ok, out) = run(&["import", archive.to_str().unwrap()]);
    assert!(ok && out.contains("imported web:2"), "{out}");
    let (ok, out) = run(&["ls"]);
    assert!(ok && out.contains("bb:1") && out.contains("web:2"), "{out}");
    let (ok, out) = run(&["rm", "web:2"]);
    assert!(ok, "{out}");
    let (_, out) = run(&["ls"]);
    assert!(!out.contains("web:2"), "{out}");
    let (ok, out) = run(&["rm", "nope:1"]);
    assert!(!ok && out.contains("not found"), "{out}");
    let (ok, out) = run(&["import", rootfs.join("bin/busybox").to_str().unwrap()]);
    assert!(!ok, "importing a non-archive must fail: {out}");
}

#[test]
fn single_node_cluster_runs_real_containers() {
    if !prerequisites() {
        return;
    }
    let mut c = Cluster::start();
    // The node registers Ready with its capacity and a lease.
    c.wait_for("node Ready", 20, || {
        let out = c.kubectl(&[
            "get",
            "node",
            NODE,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        String::from_utf8_lossy(&out.stdout) == "True"
    });
    assert!(!c
        .ok(&["get", "node", NODE, "-o", "jsonpath={.status.capacity.cpu}"])
        .is_empty());
    c.ok(&["get", "lease", "-n", "kube-node-lease", NODE]);

    // A missing image is reported, not retried silently.
    c.apply(&pod_yaml(
        "missing",
        "  containers:\n  - name: c\n    image: nothere:1\n",
    ));
    c.wait_for("ErrImagePull", 20, || {
        let r = c.jsonpath(
            "missing",
            ".status.containerStatuses[0].state.waiting.reason",
        );
        r == "ErrImagePull" || r == "ImagePullBackOff"
    });
    assert!(c
        .jsonpath(
            "missing",
            ".status.containerStatuses[0].state.waiting.message"
        )
        .contains("nothere:1"));

    build_busybox_image(c.dir.path(), c.dir.path());

    // A web server pod, reachable on its pod IP from the host.
    c.ok(&[
        "run",
        "web",
        "--image=busybox:local",
        &format!("--overrides={{\"spec\":{{\"nodeName\":\"{NODE}\"}}}}"),
        "--",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/var/www",
    ]);
    c.wait_running("web");
    let ip = c.jsonpath("web", ".status.podIP");
    assert!(ip.starts_with("10.245.7."), "pod IP {ip:?}");
    let veth = c.jsonpath("web", ".metadata.annotations.tapestry\\.io/host-veth");
    assert!(veth.starts_with("veth"), "host veth annotation {veth:?}");
    let mut page = None;
    c.wait_for("http from the pod", 10, || {
        page = http_get(&ip, 8080);
        page.is_some()
    });
    assert!(page.unwrap().contains("hello from a pod"));
    let conds = c.jsonpath("web", ".status.conditions[*].type");
    for t in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert!(conds.contains(t), "conditions {conds}");
    }

    // exec: plain, exit codes, stdin, and a terminal.
    assert!(c.ok(&["exec", "web", "--", "ls", "/"]).contains("var"));
    let out = c.kubectl(&["exec", "web", "--", "sh", "-c", "exit 3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("script")
        .args([
            "-qec",
            "kubectl exec -it web -- sh -c 'tty && echo in-a-tty'",
            "/dev/null",
        ])
        .env("KUBECONFIG", c.kubeconfig())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/dev/pts/") && text.contains("in-a-tty"),
        "{text}"
    );

    // Logs: tail, follow, previous; restarts with back-off.
    c.apply(&pod_yaml(
        "counter",
        "  containers:\n  - name: c\n    image: busybox:local\n    command: [sh, -c, 'for i in 1 2 3; do echo line $i; done; sleep 1; exit 1']\n",
    ));
    c.wait_for("a restart", 30, || {
        c.jsonpath("counter", ".status.containerStatuses[0].restartCount")
            .parse::<u32>()
            .unwrap_or(0)
            >= 1
    });
    assert_eq!(
        c.ok(&["logs", "counter", "--tail=1"])
            .trim_end()
            .lines()
            .last(),
        Some("line 3")
    );
    c.wait_for("CrashLoopBackOff", 20, || {
        c.jsonpath(
            "counter",
            ".status.containerStatuses[0].state.waiting.reason",
        ) == "CrashLoopBackOff"
    });
    assert_eq!(
        c.jsonpath(
            "counter",
            ".status.containerStatuses[0].lastState.terminated.exitCode"
        ),
        "1"
    );
    assert!(c
        .ok(&["logs", "counter", "--previous"])
        .contains("line 1\nline 2\nline 3\n"));
    c.apply(&pod_yaml(
        "ticker",
        "  containers:\n  - name: c\n    image: busybox:local\n    command: [sh, -c, 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done']\n",
    ));
    c.wait_running("ticker");
    let out = Command::new("timeout")
        .args(["3", "kubectl", "logs", "-f", "ticker"])
        .env("KUBECONFIG", c.kubeconfig())
        .output()
        .unwrap();
    let ticks = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("tick"))
        .count();
    assert!(ticks >= 8, "follow delivered {ticks} lines");
    let out = Command::new("timeout")
        .args(["3", "kubectl", "attach", "ticker"])
        .env("KUBECONFIG", c.kubeconfig())
        .output()
        .unwrap();
    let ticks = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("tick"))
        .count();
    assert!(ticks >= 5, "attach delivered {ticks} lines");

    // ConfigMap and Secret as env and files; emptyDir shared by two containers.
    c.ok(&[
        "create",
        "configmap",
        "cfg",
        "--from-literal=greeting=hello",
        "--from-literal=file.txt=from-a-configmap",
    ]);
    c.ok(&[
        "create",
        "secret",
        "generic",
        "sec",
        "--from-literal=password=s3cret",
    ]);
    c.apply(&pod_yaml(
        "vols",
        r#"  volumes:
  - name: shared
    emptyDir: {}
  - name: cfg
    configMap: {name: cfg}
  - name: sec
    secret: {secretName: sec}
  initContainers:
  - name: init
    image: busybox:local
    command: [sh, -c, 'echo from-init > /shared/init']
    volumeMounts: [{name: shared, mountPath: /shared}]
  containers:
  - name: writer
    image: busybox:local
    command: [sh, -c, 'echo "$GREETING $PASSWORD" > /shared/env; sleep 3600']
    env:
    - name: GREETING
      valueFrom: {configMapKeyRef: {name: cfg, key: greeting}}
    - name: PASSWORD
      valueFrom: {secretKeyRef: {name: sec, key: password}}
    volumeMounts: [{name: shared, mountPath: /shared}]
  - name: reader
    image: busybox:local
    command: [sleep, "3600"]
    envFrom: [{configMapRef: {name: cfg}, prefix: CFG_}]
    volumeMounts:
    - {name: shared, mountPath: /data}
    - {name: cfg, mountPath: /etc/cfg}
    - {name: sec, mountPath: /etc/sec}
"#,
    ));
    c.wait_running("vols");
    c.wait_for("shared file", 10, || {
        let out = c.kubectl(&[
            "exec",
            "vols",
            "-c",
            "reader",
            "--",
            "cat",
            "/data/env",
            "/data/init",
        ]);
        String::from_utf8_lossy(&out.stdout) == "hello s3cret\nfrom-init\n"
    });
    assert_eq!(
        c.ok(&[
            "exec",
            "vols",
            "-c",
            "reader",
            "--",
            "cat",
            "/etc/cfg/file.txt",
            "/etc/sec/password"
        ]),
        "from-a-configmaps3cret"
    );
    assert!(c
        .ok(&["exec", "vols", "-c", "reader", "--", "env"])
        .contains("CFG_greeting=hello"));
    assert_eq!(
        c.jsonpath(
            "vols",
            ".status.initContainerStatuses[0].state.terminated.reason"
        ),
        "Completed"
    );

    // Probes: readiness gates Ready; a failing liveness probe restarts.
    // The web container also publishes a hostPort (CNI portmap).
    let host_port = free_port();
    c.apply(&pod_yaml(
        "probed",
        &r#"  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:local
    command: [sh, -c, 'touch /tmp/healthy; sleep 3600']
    livenessProbe:
      exec: {command: [test, -f, /tmp/healthy]}
      periodSeconds: 1
      failureThreshold: 2
    readinessProbe:
      exec: {command: [test, -f, /tmp/ready]}
      periodSeconds: 1
  - name: web
    image: busybox:local
    command: [httpd, -f, -p, "8081", -h, /var/www]
    ports: [{containerPort: 8081, hostPort: HOST_PORT}]
    readinessProbe:
      httpGet: {path: /, port: 8081}
      periodSeconds: 1
"#
        .replace("HOST_PORT", &host_port.to_string()),
    ));
    c.wait_for("probed running", 30, || {
        c.jsonpath("probed", ".status.phase") == "Running"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.jsonpath(
            "probed",
            ".status.containerStatuses[?(@.name==\"c\")].ready"
        ),
        "false"
    );
    assert_eq!(
        c.jsonpath("probed", ".status.conditions[?(@.type==\"Ready\")].status"),
        "False"
    );
    c.ok(&["exec", "probed", "-c", "c", "--", "touch", "/tmp/ready"]);
    c.wait_running("probed");
    let page = http_get("127.0.0.1", host_port).unwrap_or_default();
    assert!(
        page.contains("hello from a pod"),
        "hostPort {host_port}: {page:?}"
    );
    c.ok(&["exec", "probed", "-c", "c", "--", "rm", "/tmp/healthy"]);
    c.wait_for("liveness restart", 30, || {
        c.jsonpath(
            "probed",
            ".status.containerStatuses[?(@.name==\"c\")].restartCount",
        ) == "1"
    });

    // A memory limit breach is reported as OOMKilled.
    c.apply(&pod_yaml(
        "hog",
        "  restartPolicy: Never\n  containers:\n  - name: c\n    image: busybox:local\n    command: [dd, if=/dev/zero, of=/dev/null, bs=64M, count=1]\n    resources: {limits: {memory: 16Mi}}\n",
    ));
    c.wait_for("OOMKilled", 30, || {
        c.jsonpath("hog", ".status.phase") == "Failed"
    });
    assert_eq!(
        c.jsonpath(
            "hog",
            ".status.containerStatuses[0].state.terminated.reason"
        ),
        "OOMKilled"
    );
    assert_eq!(
        c.jsonpath(
            "hog",
            ".status.containerStatuses[0].state.terminated.exitCode"
        ),
        "137"
    );

    // SIGKILL the whole process: containers keep running, and the new
    // agent adopts them instead of starting duplicates.
    let started = c.jsonpath(
        "web",
        ".status.containerStatuses[0].state.running.startedAt",
    );
    let web_uid = c.jsonpath("web", ".metadata.uid");
    assert_eq!(count_shims(&web_uid), 1);
    c.sigkill();
    assert!(
        http_get(&ip, 8080).is_some(),
        "the pod must survive its agent"
    );
    c.spawn();
    std::thread::sleep(Duration::from_secs(3));
    c.wait_running("web");
    assert_eq!(
        c.jsonpath(
            "web",
            ".status.containerStatuses[0].state.running.startedAt"
        ),
        started
    );
    assert_eq!(
        c.jsonpath("web", ".status.containerStatuses[0].restartCount"),
        "0"
    );
    assert_eq!(count_shims(&web_uid), 1, "containers were duplicated");

    // hostNetwork + privileged sees the node's interfaces.
    c.apply(&pod_yaml(
        "hostnet",
        "  hostNetwork: true\n  containers:\n  - name: c\n    image: busybox:local\n    command: [sleep, '3600']\n    securityContext: {privileged: true}\n",
    ));
    c.wait_running("hostnet");
    let links = c.ok(&["exec", "hostnet", "--", "ip", "link"]);
    assert!(
        links.contains(&veth),
        "host veth {veth} not visible from a hostNetwork pod: {links}"
    );

    // The kubelet API serves the API server alone: a client certificate
    // the cluster CA signed for anyone else is refused.
    let node_ip = c.ok(&[
        "get",
        "node",
        NODE,
        "-o",
        "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
    ]);
    let pki = c.dir.path().join("pki");
    let other = c.dir.path().join("someone");
    let signed = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'basicConstraints=CA:FALSE\\nkeyUsage=digitalSignature\\nextendedKeyUsage=clientAuth\\n' > {o}.ext && \
             openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=someone \
               -keyout {o}.key 2>/dev/null | openssl x509 -req -CA {p}/ca.crt -CAkey {p}/ca.key \
               -extfile {o}.ext -days 1 -out {o}.crt 2>&1",
            o = other.display(),
            p = pki.display()
        ))
        .output()
        .unwrap();
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stdout)
    );
    let kubelet_get = |cert: &Path, key: &Path| {
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--cert"])
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg(format!("https://{node_ip}:{}/healthz", c.kubelet_port))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        kubelet_get(&other.with_extension("crt"), &other.with_extension("key")),
        "403"
    );
    assert_eq!(
        kubelet_get(
            &pki.join("apiserver-kubelet-client.crt"),
            &pki.join("apiserver-kubelet-client.key")
        ),
        "200"
    );

    // What in-cluster clients read: the pod's service account token, the
    // cluster CA and its namespace, and where the API server is.
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let token = c.ok(&["exec", "web", "--", "cat", &format!("{sa}/token")]);
    let ca = c.ok(&["exec", "web", "--", "cat", &format!("{sa}/ca.crt")]);
    assert_eq!(
        ca,
        std::fs::read_to_string(c.dir.path().join("pki/ca.crt")).unwrap()
    );
    assert_eq!(
        c.ok(&["exec", "web", "--", "cat", &format!("{sa}/namespace")]),
        "default"
    );
    let env = c.ok(&["exec", "web", "--", "env"]);
    let cluster_ip = c.ok(&[
        "get",
        "service",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert!(
        env.contains(&format!("KUBERNETES_SERVICE_HOST={cluster_ip}\n"))
            && env.contains("KUBERNETES_SERVICE_PORT=443\n"),
        "{env}"
    );
    let whoami = |token: &str| {
        Command::new("kubectl")
            .args(["--server", &format!("https://127.0.0.1:{}", c.port)])
            .arg("--certificate-authority")
            .arg(c.dir.path().join("pki/ca.crt"))
            .args([
                "--token",
                token,
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ])
            .env("KUBECONFIG", "/dev/null")
            .output()
            .unwrap()
    };
    let me = whoami(&token);
    assert_eq!(
        String::from_utf8_lossy(&me.stdout),
        "system:serviceaccount:default:default",
        "{}",
        String::from_utf8_lossy(&me.stderr)
    );
    let mounted = c.ok(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        &format!("touch {sa}/x 2>&1; echo $?"),
    ]);
    assert_ne!(mounted.trim(), "0", "the token volume is read-only");
    use std::os::unix::fs::PermissionsExt;
    let kubelet_dir = std::fs::metadata(c.dir.path().join("kubelet")).unwrap();
    assert_eq!(
        kubelet_dir.permissions().mode() & 0o777,
        0o700,
        "pods' secrets and tokens are root's alone on the host"
    );

    // Deletion: SIGTERM, grace, then gone with everything it had.
    let uid = c.jsonpath("web", ".metadata.uid");
    let t = Instant::now();
    c.ok(&["delete", "pod", "web", "--grace-period=2"]);
    assert!(t.elapsed() < Duration::from_secs(15));
    c.wait_for("web gone", 15, || {
        !c.kubectl(&["get", "pod", "web"]).status.success()
    });
    assert!(
        leftovers(&uid).is_empty(),
        "left behind: {:?}",
        leftovers(&uid)
    );
    let links = Command::new("ip")
        .args(["link", "show", &veth])
        .output()
        .unwrap();
    assert!(!links.status.success(), "veth {veth} still exists");
    assert!(
        !whoami(&token).status.success(),
        "the token of a deleted pod still works"
    );

    // With the scheduler and controllers of `tapestry up`: a Deployment's
    // replicas are real containers serving on their pod IPs.
    c.ok(&[
        "create",
        "deployment",
        "d3",
        "--image=busybox:local",
        "--replicas=3",
        "--",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/var/www",
    ]);
    c.ok(&["rollout", "status", "deployment/d3", "--timeout=90s"]);
    let ips = c.ok(&[
        "get",
        "pods",
        "-l",
        "app=d3",
        "--field-selector=status.phase=Running",
        "-o",
        "jsonpath={.items[*].status.podIP}",
    ]);
    let ips: Vec<&str> = ips.split_whitespace().collect();
    assert_eq!(ips.len(), 3, "{ips:?}");
    for ip in &ips {
        c.wait_for("replica serving", 20, || {
            http_get(ip, 8080).is_some_and(|page| page.contains("hello from a pod"))
        });
    }
    c.ok(&["delete", "deployment", "d3"]);

    // Stopping the cluster stops every pod and cleans up.
    let uids: Vec<String> = c
        .ok(&["get", "pods", "-o", "jsonpath={.items[*].metadata.uid}"])
        .split_whitespace()
        .map(String::from)
        .collect();
    c.terminate();
    for uid in uids {
        assert!(
            leftovers(&uid).is_empty(),
            "pod {uid} left behind {:?}",
            leftovers(&uid)
        );
    }
    // The node's bridge outlives its pods by design; this test's goes.
    let _ = Command::new("ip").args(["link", "del", "tpe2e0"]).status();
}

/// Container monitors of one pod (their command line names the pod's UID).
fn count_shims(uid: &str) -> usize {
    // `tapestry-shim`, or `tapestry container-shim` without it.
    let pattern = format!("shim .*--id {uid}-");
    let out = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// `tapestry node` joins a separately running `tapestry server` with the
/// node token; logs and exec reach its kubelet (self-signed serving
/// certificate, client certificate checked against the cluster CA).
#[test]
fn node_joins_a_server() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = tapestry()
        .arg("server")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    // The cluster owns the server from here: it is stopped however the test ends.
    let c = Cluster {
        dir,
        port,
        kubelet_port: 0,
        child: Some(server),
        net: NET,
    };
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert!(line.starts_with("kubeconfig: "));
    let node_dir = c.dir.path().join("node");
    build_busybox_image(c.dir.path(), &node_dir);
    let kubelet_port = free_port().to_string();
    let token_file = c.dir.path().join("node-token");
    let ca_file = c.dir.path().join("pki/ca.crt");
    let start_node = || {
        Reap(
            tapestry()
                .arg("node")
                .args(["--server", &format!("https://127.0.0.1:{port}")])
                .arg("--token-file")
                .arg(&token_file)
                .arg("--ca-file")
                .arg(&ca_file)
                .arg("--data-dir")
                .arg(&node_dir)
                .args(["--name", "joined", "--kubelet-port", &kubelet_port])
                .args(["--pod-cidr", "10.245.8.0/24", "--bridge", "tpe2e1"])
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    };
    let mut node = start_node();
    c.wait_for("joined node Ready", 20, || {
        let out = c.kubectl(&[
            "get",
            "node",
            "joined",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        String::from_utf8_lossy(&out.stdout) == "True"
    });
    c.ok(&["create", "secret", "generic", "used", "--from-literal=k=v"]);
    c.ok(&[
        "create",
        "secret",
        "generic",
        "unused",
        "--from-literal=k=v",
    ]);
    c.apply("apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\nspec:\n  nodeName: joined\n  terminationGracePeriodSeconds: 1\n  volumes:\n  - name: s\n    secret:\n      secretName: used\n  containers:\n  - name: c\n    image: busybox:local\n    command: [sh, -c, 'echo hello from joined; sleep 3600']\n    volumeMounts:\n    - name: s\n      mountPath: /s\n");
    c.wait_running("hello");
    c.wait_for("log line", 10, || {
        c.ok(&["logs", "hello"]) == "hello from joined\n"
    });
    assert_eq!(c.ok(&["exec", "hello", "--", "hostname"]), "hello\n");
    node_credentials_are_its_own(&c, &node_dir, &kubelet_port);
    // A pod removed while its node agent is down (SIGKILL) is cleaned up
    // when the agent comes back: containers, netns, mounts, cgroups.
    let uid = c.jsonpath("hello", ".metadata.uid");
    assert_eq!(count_shims(&uid), 1);
    node.0.kill().unwrap();
    node.0.wait().unwrap();
    c.ok(&["delete", "pod", "hello", "--force", "--grace-period=0"]);
    node = start_node();
    c.wait_for("orphan cleaned up", 20, || {
        leftovers(&uid).is_empty() && count_shims(&uid) == 0
    });
    unsafe { libc::kill(node.0.id() as i32, libc::SIGTERM) };
    let _ = node.0.wait();
    drop(c);
    let _ = Command::new("ip").args(["link", "del", "tpe2e1"]).status();
}

/// The node joined with the bootstrap token and speaks with certificates
/// of its own, which let it do what its pods need and nothing more; the
/// API server talks only to the kubelet its certificate names.
fn node_credentials_are_its_own(c: &Cluster, node_dir: &Path, kubelet_port: &str) {
    use std::os::unix::fs::PermissionsExt;
    let pem = node_dir.join("kubelet/pki/kubelet-client.pem");
    let mode = std::fs::metadata(&pem).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", pem.display());
    let csrs = c.ok(&["get", "csr"]);
    let issued: Vec<&str> = csrs
        .lines()
        .filter(|l| l.contains("Approved,Issued"))
        .collect();
    assert!(
        issued.iter().any(|l| l.contains("system:bootstrap:")
            && l.contains("kubernetes.io/kube-apiserver-client-kubelet"))
            && issued
                .iter()
                .any(|l| l.contains("system:node:joined")
                    && l.contains("kubernetes.io/kubelet-serving")),
        "{csrs}"
    );
    let kubeconfig = c.dir.path().join("node-kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: node\n  user:\n    client-certificate: {p}\n    client-key: {p}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: node\ncurrent-context: c\n",
            c.port,
            c.dir.path().join("pki/ca.crt").display(),
            p = pem.display()
        ),
    )
    .unwrap();
    let as_node = |args: &[&str]| {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", &kubeconfig)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, whoami) = as_node(&["auth", "whoami"]);
    assert!(
        ok && whoami.contains("system:node:joined") && whoami.contains("system:nodes"),
        "{whoami}"
    );
    // Its pod's Secret, and no other.
    let (ok, out) = as_node(&["get", "secret", "used"]);
    assert!(ok, "{out}");
    let (ok, out) = as_node(&["get", "secret", "unused"]);
    assert!(
        !ok && out.contains(r#"User "system:node:joined" cannot get resource "secrets" in API group "" in the namespace "default""#),
        "{out}"
    );
    let (ok, out) = as_node(&["get", "secrets"]);
    assert!(!ok && out.contains("forbidden"), "{out}");
    // Another node, and a pod bound to it.
    c.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: other\n");
    c.apply("apiVersion: v1\nkind: Pod\nmetadata:\n  name: elsewhere\nspec:\n  nodeName: other\n  containers:\n  - name: c\n    image: busybox:local\n");
    let (ok, out) = as_node(&["label", "node", "other", "taken=yes"]);
    assert!(!ok && out.contains("forbidden"), "{out}");
    let (ok, out) = as_node(&["label", "node", "joined", "mine=yes"]);
    assert!(ok, "{out}");
    let (ok, out) = as_node(&["delete", "pod", "elsewhere", "--wait=false"]);
    assert!(
        !ok && out.contains(r#"node "joined" can only modify pods bound to it"#),
        "{out}"
    );
    let (ok, out) = as_node(&["delete", "node", "other"]);
    assert!(!ok && out.contains("forbidden"), "{out}");
    // Renewal: the node gets its own client certificate again at once,
    // never one for another node.
    let request = |name: &str, common_name: &str| {
        let key = c.dir.path().join(format!("{name}.key"));
        let csr = c.dir.path().join(format!("{name}.csr"));
        let out = Command::new("openssl")
            .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-subj"])
            .arg(format!("/O=system:nodes/CN={common_name}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let b64 = Command::new("base64")
            .arg("-w0")
            .arg(&csr)
            .output()
            .unwrap();
        let yaml = c.dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &yaml,
            format!(
                "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata:\n  name: {name}\nspec:\n  request: {}\n  signerName: kubernetes.io/kube-apiserver-client-kubelet\n  usages: [digital signature, client auth]\n",
                String::from_utf8_lossy(&b64.stdout)
            ),
        )
        .unwrap();
        let (ok, out) = as_node(&["create", "-f", yaml.to_str().unwrap()]);
        assert!(ok, "{out}");
    };
    request("renewal", "system:node:joined");
    request("theft", "system:node:other");
    c.wait_for("the renewal issued", 10, || {
        !c.ok(&[
            "get",
            "csr",
            "renewal",
            "-o",
            "jsonpath={.status.certificate}",
        ])
        .is_empty()
    });
    std::thread::sleep(Duration::from_secs(1));
    let theft = c.ok(&["get", "csr", "theft"]);
    assert!(theft.contains("Pending"), "{theft}");
    // Were "other" to claim this node's address, the API server would not
    // take this kubelet for it.
    c.ok(&[
        "patch",
        "node",
        "other",
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(
            r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"127.0.0.1"}}],"daemonEndpoints":{{"kubeletEndpoint":{{"Port":{kubelet_port}}}}}}}}}"#
        ),
    ]);
    let out = c.kubectl(&["logs", "elsewhere"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(r#"not "system:node:other""#),
        "{err}"
    );
    c.ok(&["delete", "pod", "elsewhere", "--force", "--grace-period=0"]);
    c.ok(&["delete", "node", "other"]);
}

/// The joined node agent, killed if the test fails before stopping it, so
/// it does not hold its bridge and pod range for the next run.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A claim of the default class (`local-path`): the scheduler places its
/// first pod, the controller provisions a directory volume on that node,
/// what the pod writes outlives it and a new pod reads it; deleting the
/// claim removes the volume and its directory. A pod whose claim is not
/// bound waits in ContainerCreating.
#[test]
fn local_path_volumes_keep_data_across_pods() {
    if !prerequisites() {
        return;
    }
    let net = ("e2e-volumes", "10.245.9.0/24", "tpe2e2");
    let c = Cluster::start_as(net);
    let node = net.0;
    c.node_ready_with_busybox();
    let sc = c.ok(&["get", "sc", "--no-headers"]);
    assert!(sc.starts_with("local-path (default)"), "{sc}");

    let claim = |name: &str, class: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  accessModes: [ReadWriteOnce]\n{class}  resources:\n    requests:\n      storage: 10Mi\n"
        )
    };
    let pod = |name: &str, claim: &str, script: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{extra}  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: busybox:local\n    command: [sh, -c, '{script}']\n    volumeMounts: [{{name: d, mountPath: /data}}]\n  volumes:\n  - name: d\n    persistentVolumeClaim: {{claimName: {claim}}}\n"
        )
    };
    let claim_field =
        |name: &str, path: &str| c.ok(&["get", "pvc", name, "-o", &format!("jsonpath={{{path}}}")]);

    // Without a volume, a pod already on the node waits for its claim.
    c.apply(&claim("nothing", "  storageClassName: \"\"\n"));
    c.apply(&pod(
        "waiting",
        "nothing",
        "true",
        &format!("  nodeName: {node}\n"),
    ));
    c.wait_for("the pod waiting for its claim", 30, || {
        c.jsonpath(
            "waiting",
            ".status.containerStatuses[0].state.waiting.reason",
        ) == "ContainerCreating"
    });
    assert_eq!(c.jsonpath("waiting", ".status.phase"), "Pending");
    assert!(c
        .jsonpath(
            "waiting",
            ".status.containerStatuses[0].state.waiting.message"
        )
        .contains("persistentvolumeclaim \"nothing\" is not bound yet"));
    c.ok(&["delete", "pod", "waiting", "--wait=false"]);

    // The default class waits for the first consumer, then provisions.
    c.apply(&claim("data", ""));
    assert_eq!(claim_field("data", ".spec.storageClassName"), "local-path");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(claim_field("data", ".status.phase"), "Pending");
    c.apply(&pod(
        "writer",
        "data",
        "echo kept > /data/file && sleep 3600",
        "",
    ));
    c.wait_running("writer");
    assert_eq!(claim_field("data", ".status.phase"), "Bound");
    assert_eq!(
        claim_field(
            "data",
            ".metadata.annotations.volume\\.kubernetes\\.io/selected-node"
        ),
        node
    );
    let pv = claim_field("data", ".spec.volumeName");
    let path = c.ok(&["get", "pv", &pv, "-o", "jsonpath={.spec.local.path}"]);
    assert!(path.ends_with(&format!("/volumes/{pv}")), "{path}");
    let file = Path::new(&path).join("file");
    c.wait_for("the file written", 10, || {
        std::fs::read_to_string(&file).is_ok_and(|s| s == "kept\n")
    });
    c.ok(&["delete", "pod", "writer"]);
    assert!(file.exists(), "the data outlives its pod");

    // Read-only as the pod asks: it reads, and cannot write.
    c.apply(&pod(
        "reader",
        "data, readOnly: true",
        "cat /data/file && ! touch /data/other 2>/dev/null",
        "",
    ));
    c.wait_for("the reader done", 30, || {
        c.jsonpath("reader", ".status.phase") == "Succeeded"
    });
    assert_eq!(c.ok(&["logs", "reader"]), "kept\n");
    c.ok(&["delete", "pod", "reader"]);

    // Reclaim policy Delete: the volume goes, and its directory with it.
    c.ok(&["delete", "pvc", "data"]);
    c.wait_for("the volume deleted", 30, || {
        !c.kubectl(&["get", "pv", &pv]).status.success()
    });
    assert!(!Path::new(&path).exists(), "{path} removed");
    c.ok(&["delete", "pvc", "nothing"]);
    drop(c);
    let _ = Command::new("ip").args(["link", "del", net.2]).output();
}

/// A StatefulSet of three with a claim template of the default class
/// (`local-path`): its pods start in order, each once the one before is
/// Ready, each on a volume of its own that it writes its name into once;
/// a deleted `web-1` comes back as a new pod on the same volume, data
/// kept; scaling down to one removes `web-2` and `web-1` and keeps their
/// claims, volumes and data.
#[test]
fn statefulset_pods_keep_their_volumes_on_a_real_node() {
    if !prerequisites() {
        return;
    }
    let net = ("e2e-sets", "10.245.10.0/24", "tpe2e3");
    let mut c = Cluster::start_as(net);
    c.node_ready_with_busybox();
    // Each start appends the pod's UID to /data/uids; only the first pod
    // on the volume writes /data/id. Ready once /data/id is written, and
    // not before two seconds: a pod made before the one before it were
    // Ready would show in the timestamps, which count whole seconds.
    c.apply(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
spec:
  serviceName: web
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: c
        image: busybox:local
        command: [sh, -c, '[ -f /data/id ] || hostname > /data/id; echo $POD_UID >> /data/uids; exec sleep 3600']
        env:
        - name: POD_UID
          valueFrom: {fieldRef: {fieldPath: metadata.uid}}
        readinessProbe:
          exec: {command: [test, -s, /data/id]}
          initialDelaySeconds: 2
          periodSeconds: 1
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 10Mi}}
"#,
    );

    /// One pod of the set as `kubectl get` shows it.
    #[derive(Debug)]
    struct SetPod {
        name: String,
        uid: String,
        created: String,
        ready: bool,
        ready_since: String,
        deleting: bool,
    }
    let pods = || -> Vec<SetPod> {
        let out = c.ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} \
             {.metadata.creationTimestamp} {.status.conditions[?(@.type==\"Ready\")].status} \
             {.status.conditions[?(@.type==\"Ready\")].lastTransitionTime} \
             {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ]);
        let mut pods: Vec<SetPod> = out
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                assert_eq!(f.len(), 6, "{l:?}");
                SetPod {
                    name: f[0].into(),
                    uid: f[1].into(),
                    created: f[2].into(),
                    ready: f[3] == "True",
                    ready_since: f[4].into(),
                    deleting: !f[5].is_empty(),
                }
            })
            .collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    };
    let names = |pods: &[SetPod]| pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    let all_ready = |pods: &[SetPod], want: &[&str]| {
        names(pods) == want && pods.iter().all(|p| p.ready && !p.deleting)
    };
    let time = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t).unwrap_or_else(|e| panic!("time {t:?}: {e}"))
    };
    let read = |pod: &str, file: &str| c.ok(&["exec", pod, "--", "cat", file]);
    let claims = || {
        c.ok(&[
            "get",
            "pvc",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.spec.volumeName}{\"\\n\"}{end}",
        ])
    };
    // The host directory of a claim's volume.
    let volume_dir = |claim: &str| {
        let pv = c.ok(&["get", "pvc", claim, "-o", "jsonpath={.spec.volumeName}"]);
        PathBuf::from(c.ok(&["get", "pv", &pv, "-o", "jsonpath={.spec.local.path}"]))
    };

    let all = ["web-0", "web-1", "web-2"];
    let mut first = Vec::new();
    c.wait_for("web-0, web-1 and web-2 Ready", 120, || {
        first = pods();
        all_ready(&first, &all)
    });
    // OrderedReady: each pod made once the one before it was Ready.
    for w in first.windows(2) {
        let (before, next) = (&w[0], &w[1]);
        assert!(
            time(&before.ready_since) > time(&before.created),
            "{} Ready before its readiness delay: {first:?}",
            before.name
        );
        assert!(
            time(&next.created) >= time(&before.ready_since),
            "{} made before {} was Ready: {first:?}",
            next.name,
            before.name
        );
    }
    // A volume each, of the default class, holding the pod's name.
    let bound = claims();
    let rows: Vec<Vec<&str>> = bound.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(rows.len(), 3, "{bound}");
    for (row, pod) in rows.iter().zip(&first) {
        assert_eq!(row[0], format!("data-{}", pod.name), "{bound}");
        assert_eq!(row[1], "Bound", "{bound}");
        assert_eq!(
            c.ok(&[
                "get",
                "pvc",
                row[0],
                "-o",
                "jsonpath={.spec.storageClassName}"
            ]),
            "local-path"
        );
        assert_eq!(read(&pod.name, "/data/id"), format!("{}\n", pod.name));
        assert_eq!(read(&pod.name, "/data/uids"), format!("{}\n", pod.uid));
        let on_host = volume_dir(row[0]).join("id");
        assert_eq!(
            std::fs::read_to_string(&on_host).unwrap(),
            format!("{}\n", pod.name),
            "{}",
            on_host.display()
        );
    }
    let distinct: std::collections::HashSet<&str> = rows.iter().map(|r| r[2]).collect();
    assert_eq!(distinct.len(), 3, "a volume each: {bound}");

    // A deleted web-1 comes back, a new pod on the same volume. Not
    // `--wait`: kubectl's wait looks web-1 up by name, and a new web-1 made
    // meanwhile would look to it like the old one still there.
    let old = &first[1];
    c.ok(&["delete", "pod", "web-1", "--wait=false"]);
    let mut again = Vec::new();
    c.wait_for("a new web-1 Ready", 90, || {
        again = pods();
        all_ready(&again, &all) && again[1].uid != old.uid
    });
    assert_eq!(again[0].uid, first[0].uid, "web-0 untouched");
    assert_eq!(again[2].uid, first[2].uid, "web-2 untouched");
    assert_eq!(read("web-1", "/data/id"), "web-1\n");
    assert_eq!(
        read("web-1", "/data/uids"),
        format!("{}\n{}\n", old.uid, again[1].uid),
        "the new web-1 started on the old one's volume"
    );
    assert_eq!(claims(), bound, "the same claims on the same volumes");

    // Scaling down removes web-2 and web-1; their claims and data stay.
    c.ok(&["scale", "statefulset", "web", "--replicas=1"]);
    c.wait_for("web-0 alone", 60, || {
        let now = pods();
        names(&now) == ["web-0"] && now[0].ready
    });
    assert_eq!(pods()[0].uid, first[0].uid, "web-0 untouched");
    assert_eq!(claims(), bound, "the claims kept, Bound to their volumes");
    for pod in ["web-1", "web-2"] {
        let on_host = volume_dir(&format!("data-{pod}")).join("id");
        assert_eq!(
            std::fs::read_to_string(&on_host).unwrap(),
            format!("{pod}\n"),
            "{}",
            on_host.display()
        );
    }
    assert_eq!(read("web-0", "/data/id"), "web-0\n");

    // Stopping the cluster takes the pods' network namespaces and mounts.
    let uids: Vec<String> = c
        .ok(&[
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={.items[*].metadata.uid}",
        ])
        .split_whitespace()
        .map(String::from)
        .chain([old.uid.clone(), first[2].uid.clone()])
        .collect();
    c.terminate();
    for uid in uids {
        assert!(
            leftovers(&uid).is_empty(),
            "pod {uid} left behind {:?}",
            leftovers(&uid)
        );
    }
    drop(c);
    let _ = Command::new("ip").args(["link", "del", net.2]).output();
}
