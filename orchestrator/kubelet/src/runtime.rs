//! Containers through an OCI runtime (runc): an overlayfs rootfs from the
//! image's layers, a generated `config.json`, and a detached shim per
//! container (see [`crate::shim`]) whose state files survive the agent.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::shim::{Exited, Started};

#[derive(Clone, Debug)]
pub struct Runtime {
    pub binary: PathBuf,
    pub root: PathBuf,
    /// The container monitor: a program and its leading arguments.
    pub shim: Vec<std::ffi::OsString>,
}

/// A bind mount into the container.
#[derive(Clone, Debug)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// Everything the OCI spec of one container is made from.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    /// None: the host's network namespace.
    pub netns: Option<String>,
    pub cgroup: String,
    pub mounts: Vec<BindMount>,
    pub memory_limit: Option<i64>,
    pub cpu_millis_limit: Option<i64>,
    pub cpu_millis_request: Option<i64>,
    pub privileged: bool,
    pub add_caps: Vec<String>,
    pub drop_caps: Vec<String>,
}

/// Observed state of one container attempt.
#[derive(Clone, Debug)]
pub enum State {
    /// Created, not yet reported started by the shim.
    Starting,
    Running(Started),
    Exited(Exited),
}

const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability the running kernel knows, for privileged containers.
fn all_caps() -> Vec<String> {
    const NAMES: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    // Index = capability number; only what our own bounding set holds can
    // be granted (the agent may itself run with a reduced set).
    let bounding = bounding_set();
    NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bounding & (1u64 << i) != 0)
        .map(|(_, n)| format!("CAP_{n}"))
        .collect()
}

fn bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

fn cap_name(c: &str) -> String {
    let c = c.to_ascii_uppercase();
    if c.starts_with("CAP_") {
        c
    } else {
        format!("CAP_{c}")
    }
}

/// The OCI runtime spec (config.json) of one container.
pub fn oci_spec(spec: &ContainerSpec, rootfs: &Path) -> Value {
    let mut caps: Vec<String> = if spec.privileged {
        all_caps()
    } else {
        DEFAULT_CAPS.iter().map(|c| c.to_string()).collect()
    };
    for c in &spec.add_caps {
        let c = cap_name(c);
        if c == "CAP_ALL" {
            caps = all_caps();
        } else if !caps.contains(&c) {
            caps.push(c);
        }
    }
    let grantable = all_caps();
    caps.retain(|c| grantable.contains(c));
    for c in &spec.drop_caps {
        let c = cap_name(c);
        if c == "CAP_ALL" {
            caps.clear();
        }
        caps.retain(|x| *x != c);
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": if spec.privileged { json!(["nosuid", "noexec", "nodev"]) } else { json!(["nosuid", "noexec", "nodev", "ro"]) }}),
    ];
    for m in &spec.mounts {
        let mut options = vec!["rbind", "rprivate"];
        if m.read_only {
            options.push("ro");
        }
        mounts.push(json!({"destination": m.destination, "type": "bind",
                           "source": m.source, "options": options}));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "mount"}),
    ];
    if let Some(path) = &spec.netns {
        namespaces.push(json!({"type": "network", "path": path}));
        namespaces.push(json!({"type": "uts"}));
    }
    let mut resources = json!({"devices": [{"allow": spec.privileged, "access": "rwm"}]});
    if let Some(limit) = spec.memory_limit {
        resources["memory"] = json!({"limit": limit});
    }
    let mut cpu = serde_json::Map::new();
    if let Some(m) = spec.cpu_millis_limit {
        cpu.insert("quota".into(), json!(m * 100));
        cpu.insert("period".into(), json!(100_000));
    }
    if let Some(m) = spec.cpu_millis_request {
        cpu.insert("shares".into(), json!((m * 1024 / 1000).max(2)));
    }
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": spec.cgroup,
        "resources": resources,
    });
    if !spec.privileged {
        linux["maskedPaths"] = json!([
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
            "/sys/devices/virtual/powercap"
        ]);
        linux["readonlyPaths"] = json!([
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger"
        ]);
    }
    let mut doc = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": spec.uid, "gid": spec.gid},
            "args": spec.args,
            "env": spec.env,
            "cwd": if spec.cwd.is_empty() { "/" } else { spec.cwd.as_str() },
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": false,
        },
        "root": {"path": rootfs, "readonly": false},
        "mounts": mounts,
        "linux": linux,
    });
    if spec.netns.is_some() && !spec.hostname.is_empty() {
        doc["hostname"] = json!(spec.hostname);
    }
    doc
}

/// Mount the container's root: the image layers read-only under a
/// private writable upper directory.
pub fn mount_rootfs(layers: &[PathBuf], dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let upper = dir.join("upper");
    let work = dir.join("work");
    for d in [&rootfs, &upper, &work] {
        fs::create_dir_all(d)?;
    }
    if is_mountpoint(&rootfs) {
        return Ok(rootfs);
    }
    if layers.is_empty() {
        bail!("image has no layers");
    }
    let lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|l| l.display().to_string())
        .collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    let data = std::ffi::CString::new(data)?;
    crate::sys::mount(
        c"overlay",
        &crate::sys::cstr(&rootfs)?,
        c"overlay",
        0,
        Some(&data),
    )
    .context("mounting overlay rootfs")?;
    Ok(rootfs)
}

/// Whether something is mounted at `path`: its device differs from its
/// parent's (true of overlay and bind mounts of other filesystems). Cheaper
/// than scanning mountinfo, which grows with every running container.
fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(parent) = path.parent() else {
        return true;
    };
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(p), Ok(q)) => p.dev() != q.dev(),
        _ => false,
    }
}

/// Unmount everything at or below `dir` (deepest first).
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(str::to_string)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.clone()) {
            // SAFETY: a valid path; MNT_DETACH never blocks on busy mounts.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                tracing::warn!(mount = %p, error = %std::io::Error::last_os_error(), "unmount failed");
            }
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn alive(pid: i32) -> bool {
    // A zombie has exited; its reaper (the shim) is about to record it.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

impl Runtime {
    pub fn new(binary: PathBuf, root: PathBuf, shim: Vec<std::ffi::OsString>) -> Result<Runtime> {
        anyhow::ensure!(!shim.is_empty(), "no container monitor program given");
        fs::create_dir_all(&root)?;
        Ok(Runtime { binary, root, shim })
    }

    /// Write the bundle and start the shim, which creates and starts the
    /// container. Returns once the shim reported started or exited.
    pub async fn start(
        &self,
        id: &str,
        attempt_dir: &Path,
        rootfs: &Path,
        spec: &ContainerSpec,
        log: &Path,
    ) -> Result<State> {
        fs::create_dir_all(attempt_dir)?;
        if let Some(parent) = log.parent() {
            fs::create_dir_all(parent)?;
        }
        let bundle = attempt_dir.join("bundle");
        fs::create_dir_all(&bundle)?;
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&oci_spec(spec, rootfs))?,
        )?;
        let mut cmd = tokio::process::Command::new(&self.shim[0]);
        cmd.args(&self.shim[1..])
            .arg("--runtime")
            .arg(&self.binary)
            .arg("--root")
            .arg(&self.root)
            .arg("--id")
            .arg(id)
            .arg("--bundle")
            .arg(&bundle)
            .arg("--log")
            .arg(log)
            .arg("--state-dir")
            .arg(attempt_dir)
            .arg("--cgroup")
            .arg(&spec.cgroup)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group keeps terminal signals and the hang-up of
        // the agent's job away from the shim. Unlike setsid in a pre_exec
        // hook this lets the standard library use posix_spawn: a fork of
        // the agent would copy its page tables and make it take a
        // copy-on-write fault on every page it touches afterwards.
        cmd.process_group(0);
        let mut child = cmd.spawn().context("starting container shim")?;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        for _ in 0..400 {
            match self.state(attempt_dir) {
                State::Starting => tokio::time::sleep(Duration::from_millis(10)).await,
                s => return Ok(s),
            }
        }
        bail!("container {id} did not start within 4s")
    }

    pub fn state(&self, attempt_dir: &Path) -> State {
        if let Some(e) = read_json::<Exited>(&attempt_dir.join("exit.json")) {
            return State::Exited(e);
        }
        match read_json::<Started>(&attempt_dir.join("started.json")) {
            Some(s) if alive(s.pid) => State::Running(s),
            Some(s) => {
                // Give the shim a moment to write exit.json.
                std::thread::sleep(Duration::from_millis(20));
                match read_json::<Exited>(&attempt_dir.join("exit.json")) {
                    Some(e) => State::Exited(e),
                    None => State::Exited(Exited {
                        exit_code: 255,
                        reason: "Unknown".into(),
                        message: "the container's monitor disappeared".into(),
                        finished_at: crate::shim::now(),
                        started_at: s.started_at,
                    }),
                }
            }
            None => State::Starting,
        }
    }

    async fn runc(&self, args: &[&str]) -> Result<std::process::Output> {
        tokio::process::Command::new(&self.binary)
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running the OCI runtime")
    }

    pub async fn kill(&self, id: &str, signal: &str) {
        let _ = self.runc(&["kill", id, signal]).await;
    }

    pub async fn delete(&self, id: &str) {
        let _ = self.runc(&["delete", "--force", id]).await;
    }

    /// Container ids the runtime knows.
    pub async fn list(&self) -> Vec<String> {
        let Ok(out) = self.runc(&["list", "--format", "json"]).await else {
            return Vec::new();
        };
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_string))
            .collect()
    }

    /// A `runc exec` command for `args` inside container `id`.
    pub fn exec_command(&self, id: &str, args: &[String], tty: bool) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root).arg("exec");
        if tty {
            // runc makes the container's own pty and relays it to the
            // caller's terminal (our pty), resizing on SIGWINCH.
            cmd.arg("--tty").arg("--env").arg("TERM=xterm");
        }
        cmd.arg(id).args(args);
        cmd
    }
}
