//! One worker per pod: sandbox, init containers, containers with restart
//! policy and back-off, probes, status, and graceful termination.
//!
//! Everything a worker needs to resume lives on disk under
//! `kubelet/pods/UID/` (the sandbox's CNI result, each container attempt's
//! shim state files and logs), so a restarted agent adopts what runs.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cni::Attachment;
use crate::probe::{self, ProbeState};
use crate::runtime::{self, BindMount, ContainerSpec, State};
use crate::shim::Exited;
use crate::tokens::Tokens;
use crate::{Kubelet, PodEntry};

const TICK: Duration = Duration::from_millis(500);
const BACKOFF_BASE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Grace period cap when the agent itself stops every pod on exit.
const EXIT_GRACE: Duration = Duration::from_secs(3);
pub const HOST_VETH_ANNOTATION: &str = "tapestry.io/host-veth";

enum Desired {
    Pod(Arc<Pod>),
    /// The pod is no longer bound here (deleted for good, or unbound).
    Gone,
}

pub struct Worker {
    tx: watch::Sender<Desired>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    pub fn spawn(kubelet: Arc<Kubelet>, pod: Arc<Pod>, shutdown: CancellationToken) -> Worker {
        let (tx, rx) = watch::channel(Desired::Pod(pod));
        let task = tokio::spawn(run(kubelet, rx, shutdown));
        Worker { tx, task }
    }

    pub fn update(&self, pod: Arc<Pod>) {
        let _ = self.tx.send(Desired::Pod(pod));
    }

    pub fn gone(&self) {
        let _ = self.tx.send(Desired::Gone);
    }

    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn join(self) {
        let _ = self.task.await;
    }
}

pub fn container_id(uid: &str, name: &str, attempt: u32) -> String {
    format!("{uid}-{name}-{attempt}")
}

/// Paths of one pod on disk.
#[derive(Clone)]
pub struct PodDirs {
    pub root: PathBuf,
}

impl PodDirs {
    pub fn new(kubelet: &Kubelet, uid: &str) -> PodDirs {
        PodDirs {
            root: kubelet.pods_dir.join(uid),
        }
    }
    pub fn attempt(&self, name: &str, attempt: u32) -> PathBuf {
        self.root
            .join("containers")
            .join(name)
            .join(attempt.to_string())
    }
    pub fn log(&self, name: &str, attempt: u32) -> PathBuf {
        self.root
            .join("logs")
            .join(name)
            .join(format!("{attempt}.log"))
    }
    /// Attempts made so far for a container, oldest first.
    pub fn attempts(&self, name: &str) -> Vec<u32> {
        let mut v: Vec<u32> = fs::read_dir(self.root.join("containers").join(name))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }
    pub fn sandbox(&self) -> PathBuf {
        self.root.join("sandbox.json")
    }
}

/// Per-container memory of a worker (the rest is on disk).
#[derive(Default)]
struct ContainerMem {
    waiting: Option<(String, String)>,
    image_failures: u32,
    next_image_try: Option<Instant>,
    liveness: ProbeState,
    readiness: ProbeState,
    startup: ProbeState,
    /// Attempt the probe states belong to.
    probed_attempt: Option<u32>,
    image_id: String,
}

struct PodWorker {
    kubelet: Arc<Kubelet>,
    dirs: PodDirs,
    uid: String,
    sandbox: Option<Attachment>,
    containers: HashMap<String, ContainerMem>,
    last_status: Value,
    start_time: Option<String>,
    /// Why the sandbox could not be made (shown on waiting containers).
    sandbox_error: Option<String>,
    /// The host-veth annotation has been written.
    annotated: bool,
    next_sandbox_try: Option<Instant>,
    /// The service account tokens of the pod's projected volumes.
    tokens: Tokens,
}

async fn run(kubelet: Arc<Kubelet>, mut rx: watch::Receiver<Desired>, shutdown: CancellationToken) {
    let first = match &*rx.borrow() {
        Desired::Pod(p) => p.clone(),
        Desired::Gone => return,
    };
    let uid = first.metadata.uid.clone().unwrap_or_default();
    let dirs = PodDirs::new(&kubelet, &uid);
    let key = format!(
        "{}/{}",
        first.metadata.namespace.as_deref().unwrap_or("default"),
        first.metadata.name.as_deref().unwrap_or_default()
    );
    let sandbox = fs::read(dirs.sandbox())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut w = PodWorker {
        kubelet: kubelet.clone(),
        dirs,
        uid: uid.clone(),
        sandbox,
        containers: HashMap::new(),
        last_status: Value::Null,
        start_time: first
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.to_string()),
        sandbox_error: None,
        annotated: false,
        next_sandbox_try: None,
        tokens: Tokens::default(),
    };
    if let Some(spec) = &first.spec {
        let entry = PodEntry {
            uid: uid.clone(),
            containers: spec.containers.iter().map(|c| c.name.clone()).collect(),
            init_containers: spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| c.name.clone())
                .collect(),
        };
        if let Ok(mut idx) = kubelet.index.lock() {
            idx.insert(key.clone(), entry);
        }
    }
    loop {
        let desired = match &*rx.borrow_and_update() {
            Desired::Pod(p) => Some(p.clone()),
            Desired::Gone => None,
        };
        match desired {
            None => {
                w.terminate(None, Duration::from_secs(2)).await;
                w.teardown().await;
                break;
            }
            Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                let grace = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .unwrap_or(30)
                    .max(0) as u64;
                // A node stopping its pods does not wait out long grace
                // periods of pods that were already being deleted.
                let stopping_node = tokio::select! {
                    _ = w.terminate(Some(&pod), Duration::from_secs(grace)) => false,
                    _ = shutdown.cancelled(), if kubelet.config.stop_pods_on_exit => true,
                };
                if stopping_node {
                    w.terminate(Some(&pod), EXIT_GRACE).await;
                }
                w.teardown().await;
                w.delete_from_api(&pod).await;
                break;
            }
            Some(pod) => {
                let _turn = if w.nothing_started() {
                    tokio::select! {
                        turn = kubelet.pod_starts.acquire() => turn.ok(),
                        // Deleted or changed while waiting: look again.
                        changed = rx.changed() => if changed.is_err() { break } else { continue },
                        _ = shutdown.cancelled() => break,
                    }
                } else {
                    None
                };
                if let Err(e) = w.sync(&pod).await {
                    tracing::warn!(pod = %key, error = %format!("{e:#}"), "pod sync failed");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                if kubelet.config.stop_pods_on_exit {
                    w.terminate(None, EXIT_GRACE).await;
                    w.teardown().await;
                }
                break;
            }
            changed = rx.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    if let Ok(mut idx) = kubelet.index.lock() {
        if idx.get(&key).is_some_and(|e| e.uid == uid) {
            idx.remove(&key);
        }
    }
}

fn restart_allowed(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

fn backoff(restarts: u32) -> Duration {
    if restarts == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (restarts - 1).min(8);
    (BACKOFF_BASE * factor).min(BACKOFF_MAX)
}

fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

fn secs(t: &str) -> String {
    parse_time(t)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

fn terminated_json(e: &Exited, id: &str) -> Value {
    let mut t = json!({"exitCode": e.exit_code, "reason": e.reason,
                       "finishedAt": secs(&e.finished_at), "containerID": format!("runc://{id}")});
    if !e.started_at.is_empty() {
        t["startedAt"] = json!(secs(&e.started_at));
    }
    if !e.message.is_empty() {
        t["message"] = json!(e.message);
    }
    t
}

impl PodWorker {
    fn state_of(&self, name: &str) -> Option<(u32, State)> {
        let attempt = *self.dirs.attempts(name).last()?;
        Some((
            attempt,
            self.kubelet
                .runtime
                .state(&self.dirs.attempt(name, attempt)),
        ))
    }

    async fn sync(&mut self, pod: &Pod) -> Result<()> {
        let spec = pod.spec.as_ref().context("pod without spec")?;
        if self.start_time.is_none() {
            self.start_time =
                Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        }
        let host_network = spec.host_network.unwrap_or(false);
        if !host_network && self.sandbox.is_none() {
            let ports: Vec<Value> = spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    let hp = p.host_port.filter(|h| *h > 0)?;
                    Some(json!({"hostPort": hp, "containerPort": p.container_port,
                                "protocol": p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase()}))
                })
                .collect();
            if self.next_sandbox_try.is_some_and(|t| Instant::now() < t) {
                return self.report(pod, false).await;
            }
            fs::create_dir_all(&self.dirs.root)?;
            match self.kubelet.cni.setup(&self.uid, ports).await {
                Ok(att) => {
                    fs::write(self.dirs.sandbox(), serde_json::to_vec(&att)?)?;
                    self.sandbox = Some(att);
                    self.sandbox_error = None;
                    self.next_sandbox_try = None;
                }
                Err(e) => {
                    let msg = format!("failed to create pod sandbox: {e:#}");
                    if self.sandbox_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(pod_uid = %self.uid, error = %msg, "pod sandbox");
                    }
                    self.sandbox_error = Some(msg);
                    self.next_sandbox_try = Some(Instant::now() + Duration::from_secs(5));
                    return self.report(pod, false).await;
                }
            }
        }
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        // Init containers run to completion one after another.
        let mut initialized = true;
        for c in spec.init_containers.iter().flatten() {
            match self.state_of(&c.name) {
                Some((_, State::Exited(e))) if e.exit_code == 0 => continue,
                Some((_, State::Running(_) | State::Starting)) => {
                    initialized = false;
                    break;
                }
                Some((attempt, State::Exited(e))) => {
                    initialized = false;
                    if policy != "Never" {
                        self.maybe_restart(pod, c, attempt, &e).await;
                    }
                    break;
                }
                None => {
                    initialized = false;
                    self.start(pod, c, 0).await;
                    break;
                }
            }
        }
        if initialized {
            for c in &spec.containers {
                match self.state_of(&c.name) {
                    None => self.start(pod, c, 0).await,
                    Some((attempt, State::Exited(e))) => {
                        if restart_allowed(&policy, e.exit_code) {
                            self.maybe_restart(pod, c, attempt, &e).await;
                        }
                    }
                    Some((attempt, State::Running(_))) => self.probe(pod, c, attempt).await,
                    Some((_, State::Starting)) => {}
                }
            }
        }
        // Tokens are kept fresh while containers may read them.
        if self.tokens.due(pod) && self.any_running(spec) {
            self.tokens
                .refresh(&self.kubelet, pod, &self.dirs.root)
                .await;
        }
        self.report(pod, initialized).await
    }

    fn any_running(&self, spec: &k8s_openapi::api::core::v1::PodSpec) -> bool {
        let init = spec.init_containers.iter().flatten();
        init.chain(&spec.containers)
            .any(|c| matches!(self.state_of(&c.name), Some((_, State::Running(_)))))
    }

    /// A pod this agent has not yet set up. Adopted pods have a sandbox or
    /// container attempts on disk.
    fn nothing_started(&self) -> bool {
        self.sandbox.is_none()
            && self.containers.is_empty()
            && !self.dirs.root.join("containers").exists()
    }

    /// The host-veth annotation the pod still lacks, if any. It travels
    /// with the next status write rather than costing a write of its own.
    fn missing_annotation(&self, pod: &Pod) -> Option<String> {
        if self.annotated {
            return None;
        }
        let veth = self.sandbox.as_ref().map(|s| s.host_veth.as_str())?;
        let current = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(HOST_VETH_ANNOTATION));
        (!veth.is_empty() && current.map(String::as_str) != Some(veth)).then(|| veth.to_string())
    }

    async fn maybe_restart(&mut self, pod: &Pod, c: &Container, attempt: u32, e: &Exited) {
        let restarts = attempt + 1;
        let wait = backoff(attempt);
        let finished = parse_time(&e.finished_at).unwrap_or_else(chrono::Utc::now);
        let elapsed = (chrono::Utc::now() - finished).to_std().unwrap_or_default();
        if elapsed < wait {
            let mem = self.containers.entry(c.name.clone()).or_default();
            mem.waiting = Some((
                "CrashLoopBackOff".into(),
                format!(
                    "back-off {}s restarting failed container={} pod={}_{}({})",
                    wait.as_secs(),
                    c.name,
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    pod.metadata.namespace.as_deref().unwrap_or_default(),
                    self.uid
                ),
            ));
            return;
        }
        self.start(pod, c, restarts).await;
    }

    /// Start attempt `attempt` of container `c`; failures become a waiting
    /// reason on the container's status.
    async fn start(&mut self, pod: &Pod, c: &Container, attempt: u32) {
        let mem = self.containers.entry(c.name.clone()).or_default();
        if mem.next_image_try.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match self.try_start(pod, c, attempt).await {
            Ok(()) => {
                let mem = self.containers.entry(c.name.clone()).or_default();
                mem.waiting = None;
                mem.image_failures = 0;
                mem.next_image_try = None;
            }
            Err(StartError::Image(reason, msg)) => {
                let mem = self.containers.entry(c.name.clone()).or_default();
                mem.image_failures += 1;
                let reason = if mem.image_failures > 1 && reason == "ErrImagePull" {
                    "ImagePullBackOff".to_string()
                } else {
                    reason
                };
                mem.next_image_try =
                    Some(Instant::now() + backoff(mem.image_failures).min(Duration::from_secs(60)));
                mem.waiting = Some((reason, msg));
            }
            Err(StartError::Config(msg)) => {
                let mem = self.containers.entry(c.name.clone()).or_default();
                mem.waiting = Some(("CreateContainerConfigError".into(), msg));
            }
            Err(StartError::Volume(msg)) => {
                let mem = self.containers.entry(c.name.clone()).or_default();
                let message = format!("Unable to attach or mount volumes: {msg}");
                // One event per new reason, not one per retry.
                if mem.waiting.as_ref().is_none_or(|(_, m)| *m != message) {
                    self.kubelet
                        .recorder
                        .record(pod, true, "FailedMount", message.clone());
                }
                mem.waiting = Some(("ContainerCreating".into(), message));
                // Claims bind in seconds; no need to ask every tick.
                mem.next_image_try = Some(Instant::now() + Duration::from_secs(2));
            }
            Err(StartError::Runtime(msg)) => {
                tracing::warn!(container = %c.name, error = %msg, "starting container failed");
                let mem = self.containers.entry(c.name.clone()).or_default();
                mem.waiting = Some(("CreateContainerError".into(), msg));
            }
        }
    }

    async fn try_start(
        &mut self,
        pod: &Pod,
        c: &Container,
        attempt: u32,
    ) -> Result<(), StartError> {
        let kubelet = self.kubelet.clone();
        let image_ref = c.image.clone().unwrap_or_default();
        let policy = c.image_pull_policy.clone().unwrap_or_default();
        let rec = kubelet
            .images
            .get(&image_ref)
            .map_err(|e| StartError::Runtime(format!("{e:#}")))?;
        let Some(rec) = rec else {
            let (reason, how) = if policy == "Never" {
                ("ErrImageNeverPull", "imagePullPolicy is Never and")
            } else {
                ("ErrImagePull", "images come only from the node's store:")
            };
            return Err(StartError::Image(
                reason.into(),
                format!(
                    "image {:?} not found: {how} add it with `tapestry image import` or `tapestry image build` on node {}",
                    crate::images::normalize(&image_ref),
                    kubelet.config.node_name
                ),
            ));
        };
        let image_cfg = kubelet
            .images
            .config(&rec)
            .map_err(|e| StartError::Runtime(format!("{e:#}")))?;
        self.containers.entry(c.name.clone()).or_default().image_id = rec.config.clone();
        let layers = {
            let images_rec = rec.clone();
            let k = kubelet.clone();
            tokio::task::spawn_blocking(move || k.images.layer_dirs(&images_rec))
                .await
                .map_err(|e| StartError::Runtime(e.to_string()))?
                .map_err(|e| StartError::Runtime(format!("{e:#}")))?
        };
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| StartError::Config("pod without spec".into()))?;
        let pod_ip = self.pod_ip();
        let vols = crate::volumes::prepare(&kubelet, pod, &self.dirs.root, &mut self.tokens)
            .await
            .map_err(|e| match e.downcast_ref::<crate::localpath::NotReady>() {
                Some(waiting) => StartError::Volume(waiting.0.clone()),
                None => StartError::Config(format!("{e:#}")),
            })?;
        let env = crate::volumes::env(&kubelet, pod, c, &image_cfg, &pod_ip)
            .await
            .map_err(|e| StartError::Config(format!("{e:#}")))?;
        // What the kubelet writes from API data is read-only in containers,
        // as in Kubernetes: a container cannot alter its token or plant
        // links where the kubelet writes. So is a claim mounted read-only.
        let api_data: HashSet<&str> = spec
            .volumes
            .iter()
            .flatten()
            .filter(|v| {
                v.config_map.is_some()
                    || v.secret.is_some()
                    || v.downward_api.is_some()
                    || v.projected.is_some()
                    // A claim the pod asks for read-only.
                    || v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.read_only == Some(true))
            })
            .map(|v| v.name.as_str())
            .collect();
        let mut mounts = Vec::new();
        for vm in c.volume_mounts.iter().flatten() {
            let Some(src) = vols.get(&vm.name) else {
                return Err(StartError::Config(format!(
                    "spec.containers[{}].volumeMounts: volume {:?} is not defined in spec.volumes",
                    c.name, vm.name
                )));
            };
            let source = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sp) if !sp.contains("..") => {
                    let p = src.join(sp);
                    if !p.exists() {
                        let _ = fs::create_dir_all(&p);
                    }
                    p
                }
                Some(sp) => {
                    return Err(StartError::Config(format!(
                        "volumeMounts[{}].subPath {sp:?} must not contain '..'",
                        vm.name
                    )))
                }
                None => src.clone(),
            };
            mounts.push(BindMount {
                source,
                destination: vm.mount_path.clone(),
                read_only: vm.read_only.unwrap_or(false) || api_data.contains(vm.name.as_str()),
            });
        }
        let host_network = spec.host_network.unwrap_or(false);
        let config = &kubelet.config;
        let host_resolv = fs::read_to_string(&config.resolv_conf).unwrap_or_default();
        let resolv = crate::volumes::resolv_conf(
            pod,
            config.cluster_dns,
            &config.cluster_domain,
            &host_resolv,
        );
        if host_network {
            mounts.push(BindMount {
                source: PathBuf::from("/etc/hosts"),
                destination: "/etc/hosts".into(),
                read_only: true,
            });
            if resolv.is_none() {
                mounts.push(BindMount {
                    source: kubelet.config.resolv_conf.clone(),
                    destination: "/etc/resolv.conf".into(),
                    read_only: true,
                });
            }
        }
        let own_ip = (!host_network).then_some(pod_ip.as_str());
        let etc = crate::volumes::etc_files(pod, &self.dirs.root, own_ip, resolv)
            .map_err(|e| StartError::Runtime(format!("{e:#}")))?;
        for (name, path) in etc {
            mounts.push(BindMount {
                source: path,
                destination: format!("/etc/{name}"),
                read_only: host_network,
            });
        }
        let mut args: Vec<String> = match (&c.command, &c.args) {
            (Some(cmd), args) => cmd
                .iter()
                .cloned()
                .chain(args.iter().flatten().cloned())
                .collect(),
            (None, Some(args)) => image_cfg
                .entrypoint
                .iter()
                .cloned()
                .chain(args.iter().cloned())
                .collect(),
            (None, None) => image_cfg
                .entrypoint
                .iter()
                .cloned()
                .chain(image_cfg.cmd.iter().cloned())
                .collect(),
        };
        let env_map: HashMap<String, String> = env
            .iter()
            .filter_map(|e| {
                e.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        args = args
            .iter()
            .map(|a| crate::volumes::expand(a, &env_map))
            .collect();
        if args.is_empty() {
            return Err(StartError::Config(format!(
                "container {:?}: no command specified and the image has none",
                c.name
            )));
        }
        let sc = c.security_context.as_ref();
        let psc = spec.security_context.as_ref();
        let (img_uid, img_gid) = parse_user(&image_cfg.user);
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or(psc.and_then(|s| s.run_as_user))
            .map(|u| u as u32)
            .unwrap_or(img_uid);
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or(psc.and_then(|s| s.run_as_group))
            .map(|g| g as u32)
            .unwrap_or(img_gid);
        let caps = sc.and_then(|s| s.capabilities.as_ref());
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        let memory_limit = match limits.and_then(|l| l.get("memory")) {
            Some(q) => Some(parse_bytes(&q.0).ok_or_else(|| {
                StartError::Config(format!(
                    "spec.containers[{}].resources.limits.memory: invalid quantity {:?}",
                    c.name, q.0
                ))
            })?),
            None => None,
        };
        let cpu_limit = limits
            .and_then(|l| l.get("cpu"))
            .and_then(|q| parse_millis(&q.0));
        let cpu_request = requests
            .and_then(|l| l.get("cpu"))
            .and_then(|q| parse_millis(&q.0));
        let id = container_id(&self.uid, &c.name, attempt);
        let cspec = ContainerSpec {
            args,
            env,
            cwd: c
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or(image_cfg.working_dir.clone()),
            uid,
            gid,
            hostname: spec
                .hostname
                .clone()
                .or(pod.metadata.name.clone())
                .unwrap_or_default(),
            netns: if host_network {
                None
            } else {
                self.sandbox.as_ref().map(|s| s.netns.clone())
            },
            cgroup: format!("/tapestry/pod{}/{}", self.uid, id),
            mounts,
            memory_limit,
            cpu_millis_limit: cpu_limit,
            cpu_millis_request: cpu_request,
            privileged: sc.and_then(|s| s.privileged).unwrap_or(false),
            add_caps: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
            drop_caps: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
        };
        let attempt_dir = self.dirs.attempt(&c.name, attempt);
        // The previous attempt's writable layer goes; its log stays for
        // `kubectl logs --previous`.
        if attempt > 0 {
            let prev = self.dirs.attempt(&c.name, attempt - 1);
            runtime::unmount_under(&prev);
            let _ = fs::remove_dir_all(prev.join("upper"));
            let _ = fs::remove_dir_all(prev.join("work"));
        }
        for old in self.dirs.attempts(&c.name) {
            if old + 2 <= attempt {
                let _ = fs::remove_dir_all(self.dirs.attempt(&c.name, old));
                let _ = fs::remove_file(self.dirs.log(&c.name, old));
            }
        }
        fs::create_dir_all(&attempt_dir).map_err(|e| StartError::Runtime(e.to_string()))?;
        let rootfs = runtime::mount_rootfs(&layers, &attempt_dir)
            .map_err(|e| StartError::Runtime(format!("{e:#}")))?;
        kubelet
            .runtime
            .start(
                &id,
                &attempt_dir,
                &rootfs,
                &cspec,
                &self.dirs.log(&c.name, attempt),
            )
            .await
            .map_err(|e| StartError::Runtime(format!("{e:#}")))?;
        Ok(())
    }

    fn pod_ip(&self) -> String {
        match &self.sandbox {
            Some(s) => s.ip.clone(),
            None => self.kubelet.config.node_ip.to_string(),
        }
    }

    async fn probe(&mut self, pod: &Pod, c: &Container, attempt: u32) {
        let id = container_id(&self.uid, &c.name, attempt);
        let ip = self.pod_ip();
        let kubelet = self.kubelet.clone();
        let mem = self.containers.entry(c.name.clone()).or_default();
        if mem.probed_attempt != Some(attempt) {
            mem.liveness = ProbeState::default();
            mem.readiness = ProbeState::default();
            mem.startup = ProbeState::default();
            mem.probed_attempt = Some(attempt);
        }
        let started_at = match kubelet.runtime.state(&self.dirs.attempt(&c.name, attempt)) {
            State::Running(s) => parse_time(&s.started_at),
            _ => None,
        };
        if let Some(p) = &c.startup_probe {
            if !mem.startup.succeeded_once {
                let failed = probe::step(&kubelet, &mut mem.startup, p, &id, &ip, started_at).await;
                if failed {
                    tracing::info!(container = %c.name, "startup probe failed; restarting");
                    self.kill_for_restart(pod, &id).await;
                }
                return;
            }
        }
        if let Some(p) = &c.readiness_probe {
            probe::step(&kubelet, &mut mem.readiness, p, &id, &ip, started_at).await;
        }
        if let Some(p) = &c.liveness_probe {
            if probe::step(&kubelet, &mut mem.liveness, p, &id, &ip, started_at).await {
                tracing::info!(container = %c.name, "liveness probe failed; restarting");
                self.kill_for_restart(pod, &id).await;
            }
        }
    }

    async fn kill_for_restart(&mut self, pod: &Pod, id: &str) {
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0) as u64;
        let rt = self.kubelet.runtime.clone();
        let id = id.to_string();
        rt.kill(&id, "TERM").await;
        // The kill completes in the background; the next syncs see the exit.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(grace.min(30))).await;
            rt.kill(&id, "KILL").await;
        });
    }

    fn container_status(&self, c: &Container, init: bool, policy: &str) -> (Value, bool, bool) {
        let mem = self.containers.get(&c.name);
        let image = c.image.clone().unwrap_or_default();
        let attempts = self.dirs.attempts(&c.name);
        let latest = attempts.last().copied();
        let mut st = json!({"name": c.name, "image": image,
                            "imageID": mem.map(|m| m.image_id.clone()).unwrap_or_default(),
                            "restartCount": latest.unwrap_or(0), "ready": false, "started": false});
        let mut running = false;
        let mut ready = false;
        if let Some(attempt) = latest {
            let id = container_id(&self.uid, &c.name, attempt);
            st["containerID"] = json!(format!("runc://{id}"));
            match self
                .kubelet
                .runtime
                .state(&self.dirs.attempt(&c.name, attempt))
            {
                State::Running(s) => {
                    running = true;
                    st["state"] = json!({"running": {"startedAt": secs(&s.started_at)}});
                    let started_ok =
                        c.startup_probe.is_none() || mem.is_some_and(|m| m.startup.succeeded_once);
                    st["started"] = json!(started_ok);
                    ready = started_ok
                        && (c.readiness_probe.is_none() || mem.is_some_and(|m| m.readiness.ok));
                }
                State::Exited(e) => {
                    let restarting = !init && restart_allowed(policy, e.exit_code);
                    match mem.and_then(|m| m.waiting.clone()).filter(|_| restarting) {
                        Some((reason, message)) => {
                            st["state"] =
                                json!({"waiting": {"reason": reason, "message": message}});
                            st["lastState"] = json!({"terminated": terminated_json(&e, &id)});
                        }
                        None => st["state"] = json!({"terminated": terminated_json(&e, &id)}),
                    }
                }
                State::Starting => {
                    st["state"] = json!({"waiting": {"reason": "ContainerCreating"}})
                }
            }
            if attempt > 0 && st.get("lastState").is_none() {
                if let State::Exited(e) = self
                    .kubelet
                    .runtime
                    .state(&self.dirs.attempt(&c.name, attempt - 1))
                {
                    st["lastState"] = json!({"terminated": terminated_json(&e, &container_id(&self.uid, &c.name, attempt - 1))});
                }
            }
        } else {
            let (reason, message) = mem.and_then(|m| m.waiting.clone()).unwrap_or_else(|| {
                (
                    if init {
                        "PodInitializing"
                    } else {
                        "ContainerCreating"
                    }
                    .into(),
                    self.sandbox_error.clone().unwrap_or_default(),
                )
            });
            let mut w = json!({"reason": reason});
            if !message.is_empty() {
                w["message"] = json!(message);
            }
            st["state"] = json!({"waiting": w});
        }
        st["ready"] = json!(ready);
        (st, running, ready)
    }

    async fn report(&mut self, pod: &Pod, initialized: bool) -> Result<()> {
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        let mut statuses = Vec::new();
        let mut all_ready = true;
        let mut any_running = false;
        let mut all_terminated = true;
        let mut any_failed = false;
        for c in &spec.containers {
            let (st, running, ready) = self.container_status(c, false, &policy);
            all_ready &= ready;
            any_running |= running;
            match st
                .pointer("/state/terminated/exitCode")
                .and_then(Value::as_i64)
            {
                Some(code) => any_failed |= code != 0,
                None => all_terminated = false,
            }
            statuses.push(st);
        }
        let mut init_statuses = Vec::new();
        let mut init_failed = false;
        for c in spec.init_containers.iter().flatten() {
            let (st, _, _) = self.container_status(c, true, &policy);
            if policy == "Never"
                && st
                    .pointer("/state/terminated/exitCode")
                    .and_then(Value::as_i64)
                    .is_some_and(|c| c != 0)
            {
                init_failed = true;
            }
            init_statuses.push(st);
        }
        let phase = if init_failed {
            "Failed"
        } else if !initialized {
            "Pending"
        } else if all_terminated && !spec.containers.is_empty() {
            let will_restart = statuses.iter().any(|s| {
                let code = s
                    .pointer("/state/terminated/exitCode")
                    .and_then(Value::as_i64)
                    .unwrap_or(0) as i32;
                restart_allowed(&policy, code)
            });
            match (will_restart, any_failed) {
                (true, _) => "Running",
                (false, true) => "Failed",
                (false, false) => "Succeeded",
            }
        } else if any_running || statuses.iter().any(|s| s.get("lastState").is_some()) {
            "Running"
        } else {
            "Pending"
        };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let prev_conds: HashMap<String, (String, String)> = self.last_status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c["type"].as_str()?.to_string(),
                    (
                        c["status"].as_str()?.to_string(),
                        c["lastTransitionTime"].as_str()?.to_string(),
                    ),
                ))
            })
            .collect();
        let cond = |t: &str, ok: bool| {
            let status = if ok { "True" } else { "False" };
            let since = match prev_conds.get(t) {
                Some((s, when)) if s == status => when.clone(),
                _ => now.clone(),
            };
            json!({"type": t, "status": status, "lastProbeTime": null, "lastTransitionTime": since})
        };
        let ready = all_ready && initialized && phase == "Running";
        let pod_ip = self.pod_ip();
        let host_ip = self.kubelet.config.node_ip.to_string();
        let status = json!({
            "phase": phase,
            "conditions": [cond("PodReadyToStartContainers", self.sandbox.is_some() || spec.host_network == Some(true)),
                           cond("Initialized", initialized), cond("Ready", ready),
                           cond("ContainersReady", all_ready && initialized), cond("PodScheduled", true)],
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
            "initContainerStatuses": init_statuses,
            "qosClass": qos_class(spec),
        });
        let veth = self.missing_annotation(pod);
        let annotating = veth.is_some();
        if status == self.last_status && !annotating {
            return Ok(());
        }
        let api: Api<Pod> = Api::namespaced(
            self.kubelet.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let mut patch = json!({"status": status});
        if let Some(veth) = veth {
            patch["metadata"] = json!({"annotations": {HOST_VETH_ANNOTATION: veth}});
        }
        api.patch_status(
            pod.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .context("updating pod status")?;
        self.annotated |= annotating;
        self.last_status = status;
        Ok(())
    }

    /// Stop every container: SIGTERM, wait up to `grace`, then SIGKILL.
    async fn terminate(&mut self, pod: Option<&Pod>, grace: Duration) {
        let mut running = Vec::new();
        let names: Vec<String> = fs::read_dir(self.dirs.root.join("containers"))
            .map(|rd| {
                rd.filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        for name in names {
            if let Some((attempt, State::Running(_) | State::Starting)) = self.state_of(&name) {
                let id = container_id(&self.uid, &name, attempt);
                self.kubelet.runtime.kill(&id, "TERM").await;
                running.push((name, attempt, id));
            }
        }
        if running.is_empty() {
            return;
        }
        tracing::info!(pod_uid = %self.uid, containers = running.len(), grace_s = grace.as_secs(), pod = ?pod.and_then(|p| p.metadata.name.clone()), "stopping pod");
        let all_exited = |w: &PodWorker| {
            running.iter().all(|(n, a, _)| {
                matches!(
                    w.kubelet.runtime.state(&w.dirs.attempt(n, *a)),
                    State::Exited(_)
                )
            })
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !all_exited(self) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !all_exited(self) {
            for (_, _, id) in &running {
                self.kubelet.runtime.kill(id, "KILL").await;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !all_exited(self) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Remove the sandbox, mounts, cgroups and the pod's directory.
    async fn teardown(&mut self) {
        teardown_pod(&self.kubelet, &self.uid, self.sandbox.as_ref()).await;
        self.sandbox = None;
    }

    async fn delete_from_api(&self, pod: &Pod) {
        let api: Api<Pod> = Api::namespaced(
            self.kubelet.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api
            .delete(pod.metadata.name.as_deref().unwrap_or_default(), &dp)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(error = %e, "deleting terminated pod failed"),
        }
    }
}

enum StartError {
    Image(String, String),
    Config(String),
    /// A volume not mountable yet (its claim is not bound): the pod waits.
    Volume(String),
    Runtime(String),
}

fn qos_class(spec: &k8s_openapi::api::core::v1::PodSpec) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in &spec.containers {
        let r = c.resources.as_ref();
        let limits = r.and_then(|r| r.limits.as_ref());
        let requests = r.and_then(|r| r.requests.as_ref());
        any |= limits.is_some_and(|l| !l.is_empty()) || requests.is_some_and(|l| !l.is_empty());
        for res in ["cpu", "memory"] {
            let l = limits.and_then(|l| l.get(res));
            let q = requests.and_then(|q| q.get(res)).or(l);
            if l.is_none() || q != l {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        _ => "Burstable",
    }
}

fn parse_user(user: &str) -> (u32, u32) {
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid = u.parse().unwrap_or(0);
    (uid, g.parse().unwrap_or(0))
}

/// A Kubernetes quantity in bytes ("64Mi", "1G", "1e9", "512").
pub fn parse_bytes(q: &str) -> Option<i64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("m", 1e-3),
    ];
    for (s, mul) in suffixes {
        if let Some(n) = q.strip_suffix(s) {
            return n.parse::<f64>().ok().map(|v| (v * mul).ceil() as i64);
        }
    }
    q.parse::<f64>().ok().map(|v| v.ceil() as i64)
}

/// CPU quantity in millicores ("500m", "1", "0.25").
pub fn parse_millis(q: &str) -> Option<i64> {
    let q = q.trim();
    match q.strip_suffix('m') {
        Some(n) => n.parse::<i64>().ok(),
        None => q.parse::<f64>().ok().map(|v| (v * 1000.0).ceil() as i64),
    }
}

fn remove_cgroups(uid: &str) {
    let Ok(rd) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        let pod = root.join("tapestry").join(format!("pod{uid}"));
        if let Ok(children) = fs::read_dir(&pod) {
            for c in children.flatten() {
                if c.file_type().is_ok_and(|t| t.is_dir()) {
                    crate::sys::release_memory_at(&c.path());
                    let _ = fs::remove_dir(c.path());
                }
            }
        }
        crate::sys::release_memory_at(&pod);
        let _ = fs::remove_dir(&pod);
    }
}

/// Remove the (empty) `/tapestry` parent cgroups once no pod is left.
pub fn remove_parent_cgroups() {
    let Ok(rd) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        // rmdir fails (and changes nothing) while pods remain.
        let _ = fs::remove_dir(root.join("tapestry"));
    }
}

/// Tear down whatever a pod left on this node.
pub async fn teardown_pod(kubelet: &Kubelet, uid: &str, sandbox: Option<&Attachment>) {
    let root = kubelet.pods_dir.join(uid);
    // Containers the runtime still knows (e.g. a shim that died).
    for id in kubelet.runtime.list().await {
        if id.starts_with(uid) {
            kubelet.runtime.kill(&id, "KILL").await;
            kubelet.runtime.delete(&id).await;
        }
    }
    let stored: Option<Attachment> = fs::read(root.join("sandbox.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let sandbox = sandbox.cloned().or(stored);
    if sandbox.is_some() || crate::cni::netns_path(uid).exists() {
        kubelet.cni.teardown(uid, sandbox.as_ref()).await;
    }
    runtime::unmount_under(&root);
    remove_cgroups(uid);
    if let Err(e) = fs::remove_dir_all(&root) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %root.display(), error = %e, "removing pod directory failed");
        }
    }
}

/// Pods on disk that the API server no longer binds here are removed.
pub async fn clean_orphans(kubelet: &Kubelet, known: &HashSet<String>) {
    let Ok(rd) = fs::read_dir(&kubelet.pods_dir) else {
        return;
    };
    let on_disk: Vec<String> = rd
        .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
        .collect();
    for uid in on_disk {
        if known.contains(&uid) {
            continue;
        }
        tracing::info!(pod_uid = %uid, "removing orphaned pod");
        let root = kubelet.pods_dir.join(&uid);
        // Stop its containers before tearing the sandbox down.
        for name in fs::read_dir(root.join("containers"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = name.file_name().to_string_lossy().to_string();
            let dirs = PodDirs { root: root.clone() };
            if let Some(a) = dirs.attempts(&name).last() {
                kubelet
                    .runtime
                    .kill(&container_id(&uid, &name, *a), "KILL")
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        teardown_pod(kubelet, &uid, None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("64Mi"), Some(64 << 20));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_millis("500m"), Some(500));
        assert_eq!(parse_millis("1.5"), Some(1500));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(20), Duration::from_secs(300));
    }

    #[test]
    fn restart_policies() {
        assert!(restart_allowed("Always", 0));
        assert!(!restart_allowed("OnFailure", 0));
        assert!(restart_allowed("OnFailure", 1));
        assert!(!restart_allowed("Never", 1));
    }
}
