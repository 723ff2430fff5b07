//! Tapestry's scheduler. It watches nodes and pods (and claims, volumes and
//! storage classes for pods' volumes, see [`volumes`]), keeps a cache of what
//! every node has left, and binds each pending pod of the default scheduler
//! through `pods/NAME/binding`, several binds in flight. A pod that fits
//! nowhere gets `PodScheduled=False` and a FailedScheduling event and waits
//! (with per-pod backoff) until the cluster changes.

pub mod filters;
pub mod volumes;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tapestry_controllers::util::{controller_ref, selects};
use tapestry_runtime::events::Recorder;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::filters::{
    allocatable, host_ports, hostname_anti_affinity, node_affinity_ok, node_ready, pod_requests,
    ports_conflict, untolerated_taint, Resources,
};

pub const DEFAULT_SCHEDULER: &str = "default-scheduler";
/// Binds in flight at once.
const BINDS_IN_FLIGHT: usize = 256;
/// Pods scheduled per turn of the loop before events are looked at again.
const BATCH: usize = 256;
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Unschedulable pods are retried at least this often even without a
/// cluster change.
const UNSCHEDULABLE_FLUSH: Duration = Duration::from_secs(60);

/// Counters exported for tests and benchmarks.
#[derive(Default)]
pub struct Stats {
    pub bound: AtomicU64,
    pub unschedulable: AtomicU64,
    pub bind_errors: AtomicU64,
}

/// What a bound (or assumed) pod takes from its node.
struct Placed {
    node: String,
    req: Resources,
    ports: Vec<(String, String, i32)>,
    owner: Option<String>,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Default)]
struct NodeInfo {
    node: Arc<Node>,
    /// What every placement checks first, read once per node update rather
    /// than from the node object for every pod.
    ready: bool,
    cordoned: bool,
    tainted: bool,
    alloc: Resources,
    used: Resources,
    ports: Vec<(String, String, i32)>,
    /// Pods per owning controller uid, for spreading.
    owners: HashMap<String, u32>,
    pods: HashSet<String>,
}

impl NodeInfo {
    fn set_node(&mut self, node: Node) {
        self.ready = node_ready(&node);
        let spec = node.spec.as_ref();
        self.cordoned = spec.and_then(|s| s.unschedulable) == Some(true);
        self.tainted = spec
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| !taints.is_empty());
        self.alloc = allocatable(&node);
        self.node = Arc::new(node);
    }
}

/// What a pod asks of a node, computed once per scheduling attempt.
struct Needs {
    req: Resources,
    ports: Vec<(String, String, i32)>,
    anti: Vec<(LabelSelector, HashSet<String>)>,
    volumes: Vec<volumes::Need>,
}

struct Unschedulable {
    attempts: u32,
    retry_at: Instant,
    since: Instant,
    message: String,
    /// The cluster changed since the last attempt: retry once the backoff
    /// is over.
    changed: bool,
}

struct Scheduler {
    client: Client,
    recorder: Recorder,
    stats: Arc<Stats>,
    /// By name: pods are offered the nodes in name order, round robin.
    nodes: BTreeMap<String, NodeInfo>,
    /// The last node the previous pod examined; the next starts after it.
    resume_after: String,
    placed: HashMap<String, Placed>,
    pending: HashMap<String, Arc<Pod>>,
    active: VecDeque<String>,
    queued: HashSet<String>,
    unschedulable: HashMap<String, Unschedulable>,
    in_flight: HashSet<String>,
    bind_tx: mpsc::Sender<(String, Result<(), kube::Error>)>,
    seen_pods: Option<HashSet<String>>,
    seen_nodes: Option<HashSet<String>>,
    /// Claims, volumes and classes (None: pods' claims are not looked at).
    volumes: Option<volumes::Volumes>,
    /// Claims to mark with the chosen node before binding, by pod key.
    select: HashMap<String, Vec<String>>,
}

fn pod_key(p: &Pod) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

fn wants_us(p: &Pod) -> bool {
    let spec = p.spec.as_ref();
    spec.and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n == DEFAULT_SCHEDULER)
        && spec
            .and_then(|s| s.node_name.as_deref())
            .is_none_or(str::is_empty)
}

fn finished(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// What about a node matters for placement (heartbeats do not).
fn node_fingerprint(n: &Node) -> String {
    let spec = n.spec.as_ref();
    format!(
        "{:?}|{:?}|{:?}|{:?}|{}",
        n.metadata.labels,
        spec.and_then(|s| s.taints.as_ref()),
        spec.and_then(|s| s.unschedulable),
        allocatable(n),
        node_ready(n)
    )
}

impl Scheduler {
    fn new(
        client: Client,
        stats: Arc<Stats>,
        bind_tx: mpsc::Sender<(String, Result<(), kube::Error>)>,
    ) -> Self {
        Scheduler {
            recorder: Recorder::new(client.clone(), DEFAULT_SCHEDULER),
            client,
            stats,
            nodes: BTreeMap::new(),
            resume_after: String::new(),
            placed: HashMap::new(),
            pending: HashMap::new(),
            active: VecDeque::new(),
            queued: HashSet::new(),
            unschedulable: HashMap::new(),
            in_flight: HashSet::new(),
            bind_tx,
            seen_pods: None,
            seen_nodes: None,
            volumes: None,
            select: HashMap::new(),
        }
    }

    fn cluster_changed(&mut self) {
        let now = Instant::now();
        // An idle scheduler does not wait out backoffs (kube-scheduler too
        // pops its backoff queue when nothing else is active): a pod that
        // waited for this change, such as a daemon for a node just turned
        // Ready, is placed at once.
        let idle = self.active.is_empty();
        let mut keys = Vec::new();
        for (k, u) in self.unschedulable.iter_mut() {
            if idle || u.retry_at <= now {
                keys.push(k.clone());
            } else {
                u.changed = true;
            }
        }
        for k in keys {
            self.enqueue(k);
        }
    }

    fn enqueue(&mut self, key: String) {
        if self.queued.insert(key.clone()) {
            self.active.push_back(key);
        }
    }

    fn place(&mut self, key: &str, pod: &Pod, node: &str) {
        if self.placed.get(key).is_some_and(|p| p.node == node) {
            return;
        }
        self.unplace(key);
        let placed = Placed {
            node: node.to_string(),
            req: pod_requests(pod),
            ports: host_ports(pod),
            owner: controller_ref(pod).map(|r| r.uid.clone()),
            namespace: pod.namespace().unwrap_or_default(),
            labels: pod.labels().clone(),
        };
        if let Some(info) = self.nodes.get_mut(node) {
            add_to(info, key, &placed);
        }
        self.placed.insert(key.to_string(), placed);
    }

    fn unplace(&mut self, key: &str) {
        if let Some(p) = self.placed.remove(key) {
            if let Some(info) = self.nodes.get_mut(&p.node) {
                info.used.cpu_milli -= p.req.cpu_milli;
                info.used.memory -= p.req.memory;
                info.used.pods -= p.req.pods;
                for port in &p.ports {
                    if let Some(i) = info.ports.iter().position(|x| x == port) {
                        info.ports.remove(i);
                    }
                }
                if let Some(o) = &p.owner {
                    if let Some(c) = info.owners.get_mut(o) {
                        *c = c.saturating_sub(1);
                    }
                }
                info.pods.remove(key);
            }
        }
    }

    fn on_pod(&mut self, pod: Pod, deleted: bool) {
        let key = pod_key(&pod);
        if let Some(seen) = self.seen_pods.as_mut() {
            seen.insert(key.clone());
        }
        if deleted || finished(&pod) {
            self.forget_pod(&key);
            self.cluster_changed();
            return;
        }
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        if let Some(node) = node {
            self.pending.remove(&key);
            self.unschedulable.remove(&key);
            self.place(&key, &pod, &node);
            return;
        }
        if !wants_us(&pod) || pod.metadata.deletion_timestamp.is_some() {
            self.pending.remove(&key);
            return;
        }
        if self.in_flight.contains(&key) {
            return;
        }
        let known = self.pending.contains_key(&key);
        self.pending.insert(key.clone(), Arc::new(pod));
        if !known {
            self.enqueue(key);
        }
    }

    fn forget_pod(&mut self, key: &str) {
        self.unplace(key);
        self.select.remove(key);
        self.pending.remove(key);
        self.unschedulable.remove(key);
    }

    fn on_node(&mut self, node: Node, deleted: bool) {
        let name = node.name_any();
        if let Some(seen) = self.seen_nodes.as_mut() {
            seen.insert(name.clone());
        }
        if deleted {
            self.nodes.remove(&name);
            return;
        }
        let changed = match self.nodes.get_mut(&name) {
            Some(info) => {
                let changed = node_fingerprint(&info.node) != node_fingerprint(&node);
                info.set_node(node);
                changed
            }
            None => {
                let mut info = NodeInfo::default();
                info.set_node(node);
                for (k, p) in self.placed.iter().filter(|(_, p)| p.node == name) {
                    add_to(&mut info, k, p);
                }
                self.nodes.insert(name.clone(), info);
                true
            }
        };
        if changed {
            self.cluster_changed();
        }
    }

    /// Why `node` cannot take `pod`, or None if it can.
    fn filter(&self, pod: &Pod, need: &Needs, info: &NodeInfo) -> Option<String> {
        let (req, ports, anti) = (&need.req, &need.ports, &need.anti);
        let node = &info.node;
        if !info.ready {
            return Some("node(s) were not ready".into());
        }
        if info.cordoned {
            let tolerations = pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.as_deref())
                .unwrap_or(&[]);
            let cordon = k8s_openapi::api::core::v1::Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            };
            if !filters::tolerates(tolerations, &cordon) {
                return Some("node(s) were unschedulable".into());
            }
        }
        if let Some(t) = info.tainted.then(|| untolerated_taint(pod, node)).flatten() {
            let v = t
                .value
                .as_deref()
                .map(|v| format!("={v}"))
                .unwrap_or_default();
            return Some(format!(
                "node(s) had untolerated taint {{{}{v}: {}}}",
                t.key, t.effect
            ));
        }
        if !node_affinity_ok(pod, node) {
            return Some("node(s) didn't match Pod's node affinity/selector".into());
        }
        if let Some(reason) = volumes::filter(&need.volumes, node) {
            return Some(reason.into());
        }
        if info.alloc.pods > 0 && info.used.pods + 1 > info.alloc.pods {
            return Some("Too many pods".into());
        }
        if req.cpu_milli > 0 && info.used.cpu_milli + req.cpu_milli > info.alloc.cpu_milli {
            return Some("Insufficient cpu".into());
        }
        if req.memory > 0 && info.used.memory + req.memory > info.alloc.memory {
            return Some("Insufficient memory".into());
        }
        if ports
            .iter()
            .any(|p| info.ports.iter().any(|q| ports_conflict(p, q)))
        {
            return Some("node(s) didn't have free ports for the requested pod ports".into());
        }
        if !anti.is_empty() {
            for k in &info.pods {
                let Some(p) = self.placed.get(k) else {
                    continue;
                };
                if anti
                    .iter()
                    .any(|(sel, nss)| nss.contains(&p.namespace) && selects(sel, &p.labels))
                {
                    return Some("node(s) didn't match pod anti-affinity rules".into());
                }
            }
        }
        None
    }

    fn score(&self, req: &Resources, owner: Option<&str>, info: &NodeInfo) -> i64 {
        // Least allocated: the share of cpu and memory left after placing.
        let left = |used: i64, want: i64, alloc: i64| -> i64 {
            if alloc <= 0 {
                return 0;
            }
            ((alloc - used - want).max(0) * 100) / alloc
        };
        let least = (left(info.used.cpu_milli, req.cpu_milli, info.alloc.cpu_milli)
            + left(info.used.memory, req.memory, info.alloc.memory))
            / 2;
        // Spreading: fewer pods of the same owner scores higher.
        let spread = match owner {
            Some(o) => 100 - (info.owners.get(o).copied().unwrap_or(0) as i64 * 20).min(100),
            None => 100,
        };
        least + spread * 2
    }

    /// How many feasible nodes to find before choosing (kube-scheduler's
    /// adaptive percentageOfNodesToScore).
    fn nodes_to_find(&self) -> usize {
        let n = self.nodes.len();
        if n <= 100 {
            return n;
        }
        let pct = (50 - n as i64 / 125).max(5) as usize;
        (n * pct / 100).max(100)
    }

    /// Try to place one pod: Ok(node) or Err(message).
    fn choose(&mut self, pod: &Pod) -> Result<String, String> {
        let n = self.nodes.len();
        if n == 0 {
            return Err("0/0 nodes are available: no nodes available to schedule pods.".into());
        }
        let claims = match &self.volumes {
            Some(v) => v.needs(pod),
            None => Ok(Vec::new()),
        };
        let need = Needs {
            req: pod_requests(pod),
            ports: host_ports(pod),
            anti: hostname_anti_affinity(pod),
            volumes: claims.map_err(|reason| format!("0/{n} nodes are available: {reason}."))?,
        };
        let owner = controller_ref(pod).map(|r| r.uid.clone());
        let want = self.nodes_to_find();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut best: Option<(i64, &str)> = None;
        let mut found = 0;
        // Walking the sorted map from where the last pod stopped needs no
        // lookup per node (hashing hundreds of names per pod showed in
        // profiles). Node names are never empty, so "" starts at the first
        // node.
        let last = self.resume_after.as_str();
        let after = self.nodes.range::<str, _>((Excluded(last), Unbounded));
        let before = self.nodes.range::<str, _>((Unbounded, Included(last)));
        let mut examined = last;
        for (name, info) in after.chain(before) {
            examined = name;
            match self.filter(pod, &need, info) {
                Some(reason) => *reasons.entry(reason).or_default() += 1,
                None => {
                    found += 1;
                    let s = self.score(&need.req, owner.as_deref(), info);
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, name));
                    }
                    if found >= want {
                        break;
                    }
                }
            }
        }
        let chosen = best.map(|(_, name)| name.to_string());
        self.resume_after = examined.to_string();
        let select = volumes::to_select(&need.volumes);
        if chosen.is_some() && !select.is_empty() {
            self.select.insert(pod_key(pod), select);
        }
        match chosen {
            Some(name) => Ok(name),
            None => {
                let mut parts: Vec<String> =
                    reasons.iter().map(|(r, c)| format!("{c} {r}")).collect();
                parts.sort();
                Err(format!("0/{n} nodes are available: {}.", parts.join(", ")))
            }
        }
    }

    fn schedule_batch(&mut self, slots: &Arc<tokio::sync::Semaphore>) {
        let mut done = 0;
        while done < BATCH {
            if slots.available_permits() == 0 {
                return;
            }
            let Some(key) = self.active.pop_front() else {
                return;
            };
            self.queued.remove(&key);
            let Some(pod) = self.pending.get(&key).cloned() else {
                continue;
            };
            if self.in_flight.contains(&key) {
                continue;
            }
            done += 1;
            match self.choose(&pod) {
                Ok(node) => {
                    self.unschedulable.remove(&key);
                    self.place(&key, &pod, &node);
                    self.in_flight.insert(key.clone());
                    self.bind(key, pod, node, slots.clone());
                }
                Err(message) => self.mark_unschedulable(key, &pod, message),
            }
        }
    }

    fn bind(&self, key: String, pod: Arc<Pod>, node: String, slots: Arc<tokio::sync::Semaphore>) {
        let Ok(permit) = slots.try_acquire_owned() else {
            return;
        };
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let tx = self.bind_tx.clone();
        let recorder = self.recorder.clone();
        let select = self.select.get(&key).cloned().unwrap_or_default();
        let client = self.client.clone();
        tokio::spawn(async move {
            // The node goes on the pod's delayed claims first, so their
            // volumes are made there.
            let ns = pod.namespace().unwrap_or_default();
            if let Err(e) = volumes::select_node(&client, &ns, &select, &node).await {
                drop(permit);
                let _ = tx.send((key, Err(e))).await;
                return;
            }
            let body = json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": pod.name_any(), "namespace": pod.namespace()},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node},
            });
            let result = api
                .create_subresource::<_, serde_json::Value>(
                    "binding",
                    &pod.name_any(),
                    &PostParams::default(),
                    &body,
                )
                .await
                .map(|_| ());
            if result.is_ok() {
                recorder.record(
                    pod.as_ref(),
                    false,
                    "Scheduled",
                    format!("Successfully assigned {key} to {node}"),
                );
            }
            drop(permit);
            let _ = tx.send((key, result)).await;
        });
    }

    fn mark_unschedulable(&mut self, key: String, pod: &Pod, message: String) {
        let now = Instant::now();
        let entry = self
            .unschedulable
            .entry(key.clone())
            .or_insert(Unschedulable {
                attempts: 0,
                retry_at: now,
                since: now,
                message: String::new(),
                changed: false,
            });
        entry.attempts += 1;
        entry.changed = false;
        let backoff = BACKOFF_INITIAL
            .saturating_mul(1 << entry.attempts.min(5).saturating_sub(1))
            .min(BACKOFF_MAX);
        entry.retry_at = now + backoff;
        if entry.message == message {
            return;
        }
        entry.message = message.clone();
        self.stats.unschedulable.fetch_add(1, Ordering::Relaxed);
        self.recorder
            .record(pod, true, "FailedScheduling", message.clone());
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let name = pod.name_any();
        let mut conditions: Vec<serde_json::Value> = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .filter(|c| c.type_ != "PodScheduled")
            .filter_map(|c| serde_json::to_value(c).ok())
            .collect();
        conditions.push(json!({
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": message, "lastProbeTime": null,
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        }));
        tokio::spawn(async move {
            let patch = json!({"status": {"conditions": conditions}});
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::debug!(pod = %name, "recording unschedulable condition: {e}");
            }
        });
    }

    fn on_bound(&mut self, key: String, result: Result<(), kube::Error>) {
        self.in_flight.remove(&key);
        self.select.remove(&key);
        match result {
            Ok(()) => {
                self.pending.remove(&key);
                self.stats.bound.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.bind_errors.fetch_add(1, Ordering::Relaxed);
                self.unplace(&key);
                // 404: the pod is gone; 409: someone else bound it. The
                // watch tells the rest; other failures are retried.
                if !tapestry_runtime::is_status(&e, 404) && !tapestry_runtime::is_status(&e, 409) {
                    tracing::warn!(pod = %key, "binding failed: {e}");
                    if self.pending.contains_key(&key) {
                        self.unschedulable.insert(
                            key,
                            Unschedulable {
                                attempts: 1,
                                retry_at: Instant::now() + BACKOFF_INITIAL,
                                since: Instant::now(),
                                message: String::new(),
                                changed: true,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Retry pods whose backoff ran out, and long-waiting ones.
    fn tick(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .unschedulable
            .iter()
            .filter(|(_, u)| {
                u.retry_at <= now
                    && (u.changed || u.message.is_empty() || now - u.since >= UNSCHEDULABLE_FLUSH)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            if let Some(u) = self.unschedulable.get_mut(&k) {
                u.since = now;
            }
            self.enqueue(k);
        }
    }
}

fn add_to(info: &mut NodeInfo, key: &str, p: &Placed) {
    info.used.cpu_milli += p.req.cpu_milli;
    info.used.memory += p.req.memory;
    info.used.pods += p.req.pods;
    info.ports.extend(p.ports.iter().cloned());
    if let Some(o) = &p.owner {
        *info.owners.entry(o.clone()).or_default() += 1;
    }
    info.pods.insert(key.to_string());
}

/// Run the scheduler until `shutdown`.
pub async fn run(client: Client, stats: Arc<Stats>, shutdown: CancellationToken) {
    let (bind_tx, mut bind_rx) = mpsc::channel(BINDS_IN_FLIGHT * 2);
    let mut s = Scheduler::new(client.clone(), stats, bind_tx);
    let slots = Arc::new(tokio::sync::Semaphore::new(BINDS_IN_FLIGHT));
    let volumes_changed = Arc::new(tokio::sync::Notify::new());
    let notify = volumes_changed.clone();
    let v = volumes::Volumes::start(&client, move || notify.notify_one(), shutdown.clone());
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = v.ready() => {}
    }
    s.volumes = Some(v);
    // Raw watches rather than tapestry-runtime informers: this task owns
    // the cache and applies each event, moved in whole, between batches of
    // binds, nodes first. An informer would keep every pod a second time in
    // its store and hand out references from its own task, so each of the
    // several events per scheduled pod would cost a deep copy and a
    // channel hop on the path that sets the scheduling throughput.
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff();
    let nodes = watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff();
    futures::pin_mut!(pods);
    futures::pin_mut!(nodes);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut nodes_synced = false;
    tracing::info!("scheduler running");
    loop {
        // Pods wait until the node list is complete, so the first pods are
        // not declared unschedulable against an empty cache.
        if nodes_synced && !s.active.is_empty() && slots.available_permits() > 0 {
            s.schedule_batch(&slots);
        }
        let work_left = nodes_synced && !s.active.is_empty() && slots.available_permits() > 0;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            Some(ev) = nodes.next() => match ev {
                Ok(Event::Apply(n) | Event::InitApply(n)) => s.on_node(n, false),
                Ok(Event::Delete(n)) => s.on_node(n, true),
                Ok(Event::Init) => s.seen_nodes = Some(HashSet::new()),
                Ok(Event::InitDone) => {
                    if let Some(seen) = s.seen_nodes.take() {
                        let gone: Vec<String> = s.nodes.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                        for g in gone {
                            s.nodes.remove(&g);
                        }
                    }
                    nodes_synced = true;
                    s.cluster_changed();
                }
                Err(e) => tracing::warn!("node watch: {e}"),
            },
            Some(ev) = pods.next() => match ev {
                Ok(Event::Apply(p) | Event::InitApply(p)) => s.on_pod(p, false),
                Ok(Event::Delete(p)) => s.on_pod(p, true),
                Ok(Event::Init) => s.seen_pods = Some(HashSet::new()),
                Ok(Event::InitDone) => {
                    if let Some(seen) = s.seen_pods.take() {
                        let gone: Vec<String> = s
                            .placed
                            .keys()
                            .chain(s.pending.keys())
                            .filter(|k| !seen.contains(*k))
                            .cloned()
                            .collect();
                        for g in gone {
                            s.forget_pod(&g);
                        }
                    }
                }
                Err(e) => tracing::warn!("pod watch: {e}"),
            },
            Some((key, result)) = bind_rx.recv() => s.on_bound(key, result),
            _ = volumes_changed.notified() => s.cluster_changed(),
            _ = tick.tick() => s.tick(),
            _ = std::future::ready(()), if work_left => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, NodeCondition, NodeStatus, PodSpec, ResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kube::api::ObjectMeta;

    /// A scheduler whose API calls all fail: `choose` never makes one.
    fn offline_scheduler() -> Scheduler {
        let service = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("offline"))
        });
        let client = Client::new(service, "default");
        Scheduler::new(client, Arc::default(), mpsc::channel(1).0)
    }

    fn ready_node(name: &str) -> Node {
        let alloc = [("cpu", "4"), ("memory", "8Gi"), ("pods", "110")]
            .map(|(k, v)| (k.to_string(), Quantity(v.into())));
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                allocatable: Some(alloc.into()),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn each_pod_scans_on_from_where_the_last_stopped_and_wraps_around() {
        let mut s = offline_scheduler();
        for i in 0..250 {
            s.on_node(ready_node(&format!("n{i:03}")), false);
        }
        // 250 nodes: kube-scheduler's adaptive share is 48%, 120 nodes.
        assert_eq!(s.nodes_to_find(), 120);
        let pod = Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        // Every node scores the same, so each pick is the first node its
        // scan examined.
        let picks: Vec<String> = (0..4).map(|_| s.choose(&pod).unwrap()).collect();
        assert_eq!(picks, ["n000", "n120", "n240", "n110"]);
        assert_eq!(s.resume_after, "n229");

        // A pod that fits nowhere makes a full scan: every node once,
        // including the one the scan resumed after.
        let mut huge = pod.clone();
        huge.spec.as_mut().unwrap().containers[0].resources = Some(ResourceRequirements {
            requests: Some([("cpu".to_string(), Quantity("100".into()))].into()),
            ..Default::default()
        });
        assert_eq!(
            s.choose(&huge).unwrap_err(),
            "0/250 nodes are available: 250 Insufficient cpu."
        );
        assert_eq!(s.resume_after, "n229");

        // The node to resume after is gone: the scan starts at the next one.
        s.on_node(ready_node("n229"), true);
        assert_eq!(s.choose(&pod).unwrap(), "n230");
    }
}
