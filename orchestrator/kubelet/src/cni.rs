//! Pod networking: a pinned network namespace per pod, wired by the standard
//! CNI plugins run as processes (bridge + host-local on the node's podCIDR,
//! portmap when the pod asks for host ports, loopback).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::sys::{cstr, mount};

const NETWORK: &str = "tapestry";
const VERSION: &str = "1.0.0";

#[derive(Clone, Debug)]
pub struct Cni {
    pub bin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub pod_cidr: String,
    /// The node's pod bridge (one bridge per pod CIDR).
    pub bridge: String,
}

/// What a pod's sandbox got from CNI; kept on disk to tear it down later.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Attachment {
    pub netns: String,
    pub ip: String,
    pub host_veth: String,
    pub port_mappings: Vec<Value>,
    pub result: Value,
}

pub fn netns_path(uid: &str) -> PathBuf {
    Path::new("/run/netns").join(format!("tapestry-{uid}"))
}

/// Create a named network namespace exactly as `ip netns add` does (a
/// file under /run/netns, a shared mount point, the namespace bind-mounted
/// onto the file), without launching a process per pod.
fn create_netns(path: &Path) -> Result<()> {
    let dir = path.parent().context("netns path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir_c = cstr(dir)?;
    // Pods start in parallel: one at a time makes the directory a mount
    // point, so two never stack bind mounts on it.
    static SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let setup = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    let shared = || {
        mount(
            c"none",
            &dir_c,
            c"none",
            libc::MS_SHARED | libc::MS_REC,
            None,
        )
    };
    // Shared, so the namespaces stay visible from other mount namespaces;
    // a directory that is not a mount point yet is bound onto itself first.
    match shared() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            mount(&dir_c, &dir_c, c"none", libc::MS_BIND | libc::MS_REC, None)
                .and_then(|()| shared())
        }
        other => other,
    }
    .with_context(|| format!("making {} a shared mount", dir.display()))?;
    drop(setup);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let target = cstr(path)?;
    // unshare(CLONE_NEWNET) moves only the calling thread; a short-lived
    // thread keeps every other thread in the node's namespace.
    let made = std::thread::spawn(move || -> std::io::Result<()> {
        // SAFETY: unshare takes only flags.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        mount(
            c"/proc/thread-self/ns/net",
            &target,
            c"none",
            libc::MS_BIND,
            None,
        )
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("network namespace thread panicked")));
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made.with_context(|| format!("creating network namespace {}", path.display()))
}

/// Remove a namespace made by [`create_netns`] (or `ip netns add`).
fn delete_netns(path: &Path) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: a valid path; MNT_DETACH does not block on users still inside.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e).with_context(|| format!("unmounting {}", path.display()));
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

impl Cni {
    fn bridge_conf(&self) -> Value {
        json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.pod_cidr}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.state_dir.join("ipam"),
            },
        })
    }

    fn chain(&self, port_mappings: &[Value]) -> Vec<Value> {
        let mut plugins = vec![self.bridge_conf()];
        if !port_mappings.is_empty() {
            plugins.push(
                json!({"type": "portmap", "capabilities": {"portMappings": true},
                                "runtimeConfig": {"portMappings": port_mappings}}),
            );
        }
        plugins
    }

    async fn exec(
        &self,
        command: &str,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        conf: &Value,
    ) -> Result<Value> {
        let plugin = conf["type"].as_str().unwrap_or_default().to_string();
        let path = self.bin_dir.join(&plugin);
        let mut child = tokio::process::Command::new(&path)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running CNI plugin {}", path.display()))?;
        let mut stdin = child.stdin.take().context("plugin stdin")?;
        stdin.write_all(&serde_json::to_vec(conf)?).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        let parsed: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            let msg = parsed["msg"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
            bail!("CNI {plugin} {command}: {msg}");
        }
        Ok(parsed)
    }

    fn with_common(conf: &Value, prev: Option<&Value>) -> Value {
        let mut c = conf.clone();
        c["cniVersion"] = json!(VERSION);
        c["name"] = json!(NETWORK);
        if let Some(p) = prev.filter(|p| !p.is_null()) {
            c["prevResult"] = p.clone();
        }
        c
    }

    /// Create the pod's namespace and attach it. Idempotent per pod UID.
    pub async fn setup(&self, uid: &str, port_mappings: Vec<Value>) -> Result<Attachment> {
        let path = netns_path(uid);
        if !path.exists() {
            let p = path.clone();
            tokio::task::spawn_blocking(move || create_netns(&p)).await??;
        }
        let result = match self.add(uid, &path, &port_mappings).await {
            Ok(r) => r,
            Err(e) => {
                // Undo what part of the chain did, so a retry starts clean.
                let partial = Attachment {
                    port_mappings: port_mappings.clone(),
                    ..Attachment::default()
                };
                self.teardown(uid, Some(&partial)).await;
                return Err(e);
            }
        };
        let ip = result["ips"]
            .as_array()
            .and_then(|ips| ips.first())
            .and_then(|i| i["address"].as_str())
            .and_then(|a| a.split('/').next())
            .context("CNI result has no IP address")?
            .to_string();
        // The host end of the pair: no sandbox and not the bridge itself.
        let host_veth = result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| {
                i["sandbox"].as_str().unwrap_or("").is_empty()
                    && i["name"].as_str() != Some(self.bridge.as_str())
            })
            .and_then(|i| i["name"].as_str())
            .unwrap_or("")
            .to_string();
        Ok(Attachment {
            netns: path.display().to_string(),
            ip,
            host_veth,
            port_mappings,
            result,
        })
    }

    async fn add(&self, uid: &str, path: &Path, port_mappings: &[Value]) -> Result<Value> {
        let lo = json!({"cniVersion": VERSION, "name": "lo", "type": "loopback"});
        self.exec("ADD", uid, path, "lo", &lo).await?;
        let mut prev: Option<Value> = None;
        for conf in self.chain(port_mappings) {
            let conf = Self::with_common(&conf, prev.as_ref());
            prev = Some(self.exec("ADD", uid, path, "eth0", &conf).await?);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// Detach and remove the namespace; errors from plugins are logged, the
    /// namespace is removed regardless.
    pub async fn teardown(&self, uid: &str, attachment: Option<&Attachment>) {
        let path = netns_path(uid);
        let pm = attachment
            .map(|a| a.port_mappings.clone())
            .unwrap_or_default();
        let prev = attachment.map(|a| a.result.clone());
        for conf in self.chain(&pm).iter().rev() {
            let conf = Self::with_common(conf, prev.as_ref());
            if let Err(e) = self.exec("DEL", uid, &path, "eth0", &conf).await {
                tracing::warn!(pod_uid = uid, error = %e, "CNI DEL failed");
            }
        }
        if path.exists() {
            if let Err(e) = delete_netns(&path) {
                tracing::warn!(pod_uid = uid, error = %format!("{e:#}"), "removing netns failed");
            }
        }
    }
}
