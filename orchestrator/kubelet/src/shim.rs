//! The per-container monitor (`tapestry-shim`, or `tapestry container-shim`).
//!
//! A small process, in its own session, that outlives the node agent: it is
//! the child subreaper for the container's init, so it can `waitpid` for the
//! real exit status after `runc create` exits; it turns the container's
//! stdout/stderr into CRI-format log lines; and it records the outcome in
//! `exit.json` next to `started.json`. A restarted agent reads those files
//! to adopt running containers and learn how finished ones ended.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(clap::Args, Debug)]
pub struct ShimArgs {
    /// OCI runtime binary.
    #[arg(long)]
    pub runtime: PathBuf,
    /// The runtime's state root (`runc --root`).
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub bundle: PathBuf,
    /// CRI-format log file (appended to).
    #[arg(long)]
    pub log: PathBuf,
    /// Where started.json and exit.json are written.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The container's cgroup path (to tell an OOM kill from other SIGKILLs).
    #[arg(long)]
    pub cgroup: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Started {
    pub pid: i32,
    pub started_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Exited {
    pub exit_code: i32,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub finished_at: String,
    #[serde(default)]
    pub started_at: String,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

pub fn write_atomic(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec(value)?)?;
    fs::rename(&tmp, path)
}

/// Longest log line written whole; longer ones are split into partial
/// (`P`) records the way the CRI format expects.
const MAX_LINE: usize = 16 * 1024;

fn pump(reader: OwnedFd, stream: &'static str, log: Arc<Mutex<fs::File>>) {
    let mut r = BufReader::new(fs::File::from(reader));
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        let n = match r.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let full = buf[n - 1] == b'\n';
        if full {
            buf.pop();
        }
        let mut line = Vec::with_capacity(buf.len() + 48);
        line.extend_from_slice(now().as_bytes());
        line.push(b' ');
        line.extend_from_slice(stream.as_bytes());
        line.extend_from_slice(if full { b" F " } else { b" P " });
        line.extend_from_slice(&buf);
        line.push(b'\n');
        if let Ok(mut f) = log.lock() {
            let _ = f.write_all(&line);
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn runtime_error(state_dir: &Path) -> String {
    let text = fs::read_to_string(state_dir.join("runtime.log")).unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "error")
        .and_then(|v| v["msg"].as_str().map(str::to_string))
        .unwrap_or_else(|| "the OCI runtime failed to start the container".into())
}

fn oom_killed(cgroup: &str) -> bool {
    let v1 = crate::sys::memory_cgroup_dir(cgroup).join("memory.oom_control");
    let v2 = Path::new("/sys/fs/cgroup")
        .join(cgroup.trim_start_matches('/'))
        .join("memory.events");
    for p in [v1, v2] {
        if let Ok(text) = fs::read_to_string(p) {
            return text.lines().any(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            });
        }
    }
    false
}

fn runc(args: &ShimArgs) -> Command {
    let mut c = Command::new(&args.runtime);
    c.arg("--root")
        .arg(&args.root)
        .arg("--log")
        .arg(args.state_dir.join("runtime.log"))
        .arg("--log-format")
        .arg("json");
    c
}

/// Run the shim; returns the process exit code.
pub fn main(args: ShimArgs) -> i32 {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let finish = |exit: Exited| {
        let _ = write_atomic(&args.state_dir.join("exit.json"), &exit);
        crate::sys::release_memory_at(&crate::sys::memory_cgroup_dir(&args.cgroup));
        let _ = runc(&args)
            .args(["delete", "--force", &args.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    let log = match fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
    {
        Ok(f) => Arc::new(Mutex::new(f)),
        Err(e) => {
            finish(Exited {
                exit_code: 128,
                reason: "StartError".into(),
                message: format!("opening log {}: {e}", args.log.display()),
                finished_at: now(),
                started_at: String::new(),
            });
            return 1;
        }
    };
    let (Ok((out_r, out_w)), Ok((err_r, err_w))) = (pipe(), pipe()) else {
        return 1;
    };
    let (done_tx, done_rx) = mpsc::channel::<()>();
    for (reader, stream) in [(out_r, "stdout"), (err_r, "stderr")] {
        let log = log.clone();
        let done = done_tx.clone();
        std::thread::spawn(move || {
            pump(reader, stream, log);
            let _ = done.send(());
        });
    }
    drop(done_tx);
    let pid_file = args.state_dir.join("container.pid");
    // One `run --detach` instead of `create` + `start`: each runtime
    // invocation is a process launch, the largest per-pod cost in a burst.
    let ran = runc(&args)
        .arg("run")
        .arg("--detach")
        .arg("--bundle")
        .arg(&args.bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .status();
    let fail = |msg: String| Exited {
        exit_code: 128,
        reason: "StartError".into(),
        message: msg,
        finished_at: now(),
        started_at: String::new(),
    };
    if !ran.is_ok_and(|s| s.success()) {
        finish(fail(runtime_error(&args.state_dir)));
        return 1;
    }
    let Some(pid) = fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        finish(fail("the OCI runtime wrote no pid file".into()));
        return 1;
    };
    let started_at = now();
    let _ = write_atomic(
        &args.state_dir.join("started.json"),
        &Started {
            pid,
            started_at: started_at.clone(),
        },
    );
    let mut code = 255;
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if r == pid {
            code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue;
            };
            break;
        }
    }
    let oom = oom_killed(&args.cgroup);
    // The pid namespace is gone with its init, so the pipes close shortly;
    // do not wait forever on a descriptor leaked elsewhere.
    for _ in 0..2 {
        let _ = done_rx.recv_timeout(Duration::from_secs(2));
    }
    let reason = if oom {
        "OOMKilled"
    } else if code == 0 {
        "Completed"
    } else {
        "Error"
    };
    finish(Exited {
        exit_code: code,
        reason: reason.into(),
        message: String::new(),
        finished_at: now(),
        started_at,
    });
    0
}
