//! The live topology: tools (sinks) and policies, each keyed by name and
//! replaced on its own while everything else keeps running.
//!
//! ```text
//!              PolicyTable (Arc, replaced whole when policies come and go)
//!                   │
//! ingest ──try_send──► policy queue ─► policy worker: filter → dedup → slice
//! (per tap stream)     (bounded,       → mask → limits, then its Routes
//!                       drop counter)  (Arc, replaced whole; read per batch)
//!                                          │
//!                                          └──try_send──► tool queue ─► tool task ─► clients
//!                                             (bounded; drops counted        (Hub: a bounded
//!                                              per policy→tool arrow)         queue per client)
//! ```
//!
//! Every arrow is a bounded channel with a drop counter. What a change
//! touches:
//! - a tool added, changed or removed: only that tool's tasks stop and
//!   start, and only the routing tables of the policies naming it are
//!   replaced (so they let go of the old queue and take the new one);
//! - a policy's filter, dedup, slice or mask changed: the new pipeline is
//!   handed to its worker, which switches between two batches; its limits
//!   are updated in place; its tools by a new routing table. The policy
//!   loses no packet, and no other policy is touched;
//! - a policy added or removed: a new [`PolicyTable`] is published, which
//!   each tap stream picks up at its next batch; every other policy keeps
//!   its queue, worker and counters.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use crate::config::{Config, PolicyConfig};
use crate::event::{Batch, Packet};
use crate::limits::{Admit, Budget, StopReason, StopRecord};
use crate::metrics::{PolicyStats, RouteStats, SinkStats};
use crate::parse::Layers;
use crate::sinks::{RunningSink, SinkConfig, SinkContext, SinkHandle};
use crate::transforms::Pipeline;

/// What ingest needs to reach one policy.
pub struct PolicyInput {
    pub name: String,
    /// Bit of this policy in `Packet::policies`; fixed for its life.
    pub bit: u64,
    /// Tap policies it takes; empty = all traffic.
    pub tap_policies: Vec<String>,
    tx: mpsc::Sender<Batch>,
    pub stats: Arc<PolicyStats>,
}

impl PolicyInput {
    /// Offers a batch without waiting; a full queue drops and counts the
    /// packets that were this policy's.
    pub fn offer(&self, b: Batch) {
        if let Err(e) = self.tx.try_send(b) {
            let b = match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            };
            let mine = b.iter().filter(|p| p.policies & self.bit != 0).count();
            self.stats.dropped.add(mine as u64);
        }
    }
}

/// The policies ingest offers batches to at one moment.
#[derive(Default)]
pub struct PolicyTable {
    pub policies: Vec<Arc<PolicyInput>>,
}

/// Where ingest finds the current [`PolicyTable`].
#[derive(Default)]
pub struct IngestTable(RwLock<Arc<PolicyTable>>);

impl IngestTable {
    pub fn current(&self) -> Arc<PolicyTable> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn publish(&self, t: PolicyTable) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(t);
    }
}

/// Where a policy's packets go.
#[derive(Default)]
struct Routes {
    /// Tools that each receive every packet.
    each: Vec<Route>,
    /// Tool groups with at least one running member; each packet goes to
    /// one member by symmetric flow hash.
    groups: Vec<Vec<Route>>,
}

impl Routes {
    fn is_empty(&self) -> bool {
        self.each.is_empty() && self.groups.is_empty()
    }
}

struct Route {
    sink: SinkHandle,
    stats: Arc<RouteStats>,
}

impl Route {
    fn offer(&self, b: Batch) {
        let n = b.len() as u64;
        if self.sink.offer(b) {
            self.stats.delivered.add(n);
        } else {
            self.stats.dropped.add(n);
        }
    }
}

/// The part of a policy its worker and the topology share.
struct PolicyShared {
    name: Arc<str>,
    stats: Arc<PolicyStats>,
    routes: RwLock<Arc<Routes>>,
    /// A rebuilt pipeline, taken by the worker before its next batch.
    next_pipeline: Mutex<Option<Pipeline>>,
    has_next_pipeline: AtomicBool,
    /// Locked by the worker for one batch at a time, and by the topology
    /// to change limits or check the deadline.
    budget: Mutex<Budget>,
    /// Set once a limit is reached: nothing more is delivered.
    stopped: AtomicBool,
    /// Set when the policy is removed: the worker ends.
    retired: AtomicBool,
    /// Wakes whoever reaps stopped policies.
    stop_events: Arc<Notify>,
}

impl PolicyShared {
    fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_routes(&self, r: Routes) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r);
    }

    fn hand_over(&self, p: Pipeline) {
        *self.next_pipeline.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        self.has_next_pipeline.store(true, Ordering::Release);
    }

    fn budget(&self) -> std::sync::MutexGuard<'_, Budget> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the first stop; later ones change nothing.
    fn stop(&self, record: StopRecord) {
        let mut s = self.stats.stop.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            tracing::info!(policy = %self.name, reason = record.reason.as_str(), "policy stopped: {}", record.message);
            *s = Some(record);
            self.stopped.store(true, Ordering::Release);
            self.stop_events.notify_one();
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

struct PolicySlot {
    cfg: PolicyConfig,
    input: Arc<PolicyInput>,
    shared: Arc<PolicyShared>,
    worker: std::thread::JoinHandle<()>,
}

impl PolicySlot {
    /// Ends the worker: it leaves at its next wake-up, which the empty
    /// batch provides when the queue has room (a full queue wakes it soon
    /// anyway).
    fn retire(&self) {
        self.shared.retired.store(true, Ordering::Release);
        let _ = self.input.tx.try_send(Arc::new(Vec::new()));
    }
}

enum Tool {
    Running {
        cfg: SinkConfig,
        sink: RunningSink,
    },
    /// Could not start; kept so its metrics and status say why.
    Failed {
        cfg: SinkConfig,
        error: String,
        stats: Arc<SinkStats>,
    },
}

/// What the outside sees of one tool.
pub struct ToolView<'a> {
    pub cfg: &'a SinkConfig,
    /// Where it listens (PCAP-over-IP).
    pub address: Option<SocketAddr>,
    pub stats: &'a Arc<SinkStats>,
    /// Why it is not running.
    pub error: Option<&'a str>,
}

pub struct Topology {
    cx: SinkContext,
    ingest: Arc<IngestTable>,
    tools: HashMap<String, Tool>,
    policies: HashMap<String, PolicySlot>,
    /// Bits of `Packet::policies` no live policy holds.
    free_bits: u64,
    stop_events: Arc<Notify>,
}

impl Topology {
    pub fn new(cx: SinkContext) -> Topology {
        Topology {
            cx,
            ingest: Arc::default(),
            tools: HashMap::new(),
            policies: HashMap::new(),
            free_bits: u64::MAX,
            stop_events: Arc::default(),
        }
    }

    /// A topology running everything `cfg` names; any sink that cannot
    /// start or policy that cannot be built is an error.
    pub async fn from_config(cfg: &Config, cx: SinkContext) -> anyhow::Result<Topology> {
        cfg.validate()?;
        let mut t = Topology::new(cx);
        for s in &cfg.sinks {
            t.set_tool(s.clone()).await.map_err(anyhow::Error::msg)?;
        }
        for p in &cfg.policies {
            t.set_policy(p.clone())?;
        }
        Ok(t)
    }

    pub fn context(&self) -> &SinkContext {
        &self.cx
    }

    /// What ingest reads to find the policies.
    pub fn ingest_table(&self) -> Arc<IngestTable> {
        self.ingest.clone()
    }

    /// Notified whenever a policy reaches a limit.
    pub fn stop_events(&self) -> Arc<Notify> {
        self.stop_events.clone()
    }

    /// Starts, restarts or keeps the tool `cfg` describes. A tool whose
    /// settings are unchanged is left alone; a changed one is stopped
    /// first (so it can bind the same address again) and started anew.
    /// On error the tool stays known as failed, with the error.
    pub async fn set_tool(&mut self, cfg: SinkConfig) -> Result<(), String> {
        let name = cfg.common().name.to_string();
        if let Some(Tool::Running { cfg: old, .. }) = self.tools.get(&name) {
            if *old == cfg {
                return Ok(());
            }
        }
        self.stop_tool(&name).await;
        let built = match cfg.validate() {
            Ok(()) => cfg.build(&self.cx).await.map_err(|e| format!("{e:#}")),
            Err(e) => Err(format!("sink {name:?}: {e}")),
        };
        let result = match built {
            Ok(sink) => {
                self.tools.insert(name.clone(), Tool::Running { cfg, sink });
                Ok(())
            }
            Err(error) => {
                tracing::warn!(tool = %name, "{error}");
                let stats = Arc::new(SinkStats::default());
                stats.ready.store(false, Ordering::Relaxed);
                self.cx
                    .registry
                    .register_sink(&name, cfg.type_name(), stats.clone());
                self.tools.insert(
                    name.clone(),
                    Tool::Failed {
                        cfg,
                        error: error.clone(),
                        stats,
                    },
                );
                Err(error)
            }
        };
        self.reroute(&name);
        result
    }

    /// Stops and forgets a tool; policies naming it stop sending to it.
    pub async fn remove_tool(&mut self, name: &str) {
        self.stop_tool(name).await;
        self.reroute(name);
    }

    async fn stop_tool(&mut self, name: &str) {
        let Some(tool) = self.tools.remove(name) else {
            return;
        };
        // Policies let go of its queue first, so a file sink can finish.
        self.reroute(name);
        match tool {
            Tool::Running { sink, .. } => sink.stop(&self.cx).await,
            Tool::Failed { .. } => self.cx.registry.unregister_sink(name),
        }
    }

    pub fn tool(&self, name: &str) -> Option<ToolView<'_>> {
        Some(match self.tools.get(name)? {
            Tool::Running { cfg, sink } => ToolView {
                cfg,
                address: sink.address,
                stats: &sink.handle.stats,
                error: None,
            },
            Tool::Failed { cfg, error, stats } => ToolView {
                cfg,
                address: None,
                stats,
                error: Some(error),
            },
        })
    }

    /// Running tools' listening addresses, by name.
    pub fn listening(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<_> = self
            .tools
            .iter()
            .filter_map(|(n, t)| match t {
                Tool::Running { sink, .. } => sink.address.map(|a| (n.clone(), a)),
                Tool::Failed { .. } => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Starts the policy `cfg` describes, or brings a running one to it
    /// without stopping it: a new pipeline is handed to its worker, limits
    /// change in place (counts carry on), tools by a new routing table.
    /// On error nothing changes.
    pub fn set_policy(&mut self, cfg: PolicyConfig) -> anyhow::Result<()> {
        check_policy(&cfg)?;
        let Some(slot) = self.policies.get_mut(&cfg.name) else {
            return self.start_policy(cfg);
        };
        if slot.cfg == cfg {
            return Ok(());
        }
        let old = &slot.cfg;
        if old.pipeline() != cfg.pipeline() || old.groups.is_empty() != cfg.groups.is_empty() {
            slot.shared.hand_over(build_pipeline(&cfg)?);
        }
        if old.limits != cfg.limits {
            let mut budget = slot.shared.budget();
            budget.set_limits(cfg.limits.clone().unwrap_or_default());
            // Lowered below what was delivered: the run is over now.
            let done = budget.reached().map(|r| budget.stop_record(r));
            drop(budget);
            if let Some(r) = done {
                slot.shared.stop(r);
            }
            // A new duration may end the run sooner.
            self.stop_events.notify_one();
        }
        if old.sinks != cfg.sinks || old.groups != cfg.groups {
            slot.shared
                .set_routes(routes_for(&cfg, &self.tools, &slot.shared.stats));
        }
        let republish = old.tap_policies != cfg.tap_policies;
        if republish {
            slot.input = Arc::new(PolicyInput {
                name: cfg.name.clone(),
                bit: slot.input.bit,
                tap_policies: cfg.tap_policies.clone(),
                tx: slot.input.tx.clone(),
                stats: slot.input.stats.clone(),
            });
        }
        slot.cfg = cfg;
        if republish {
            self.publish();
        }
        Ok(())
    }

    fn start_policy(&mut self, cfg: PolicyConfig) -> anyhow::Result<()> {
        if self.free_bits == 0 {
            anyhow::bail!("policy {:?}: at most 64 policies can run at once", cfg.name);
        }
        let pipeline = build_pipeline(&cfg)?;
        let bit = 1u64 << self.free_bits.trailing_zeros();
        let stats = Arc::new(PolicyStats::default());
        let shared = Arc::new(PolicyShared {
            name: cfg.name.as_str().into(),
            routes: RwLock::new(Arc::new(routes_for(&cfg, &self.tools, &stats))),
            stats: stats.clone(),
            next_pipeline: Mutex::new(None),
            has_next_pipeline: AtomicBool::new(false),
            budget: Mutex::new(Budget::new(cfg.limits.clone().unwrap_or_default())),
            stopped: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            stop_events: self.stop_events.clone(),
        });
        let (tx, rx) = mpsc::channel(cfg.queue);
        let worker = PolicyWorker {
            shared: shared.clone(),
            bit,
            pipeline,
        };
        let worker = std::thread::Builder::new()
            .name(format!("policy-{}", cfg.name))
            .spawn(move || worker.run(rx))
            .map_err(|e| anyhow::anyhow!("policy {:?}: starting its worker: {e}", cfg.name))?;
        self.free_bits &= !bit;
        self.cx.registry.register_policy(&cfg.name, stats.clone());
        let input = Arc::new(PolicyInput {
            name: cfg.name.clone(),
            bit,
            tap_policies: cfg.tap_policies.clone(),
            tx,
            stats,
        });
        self.policies.insert(
            cfg.name.clone(),
            PolicySlot {
                cfg,
                input,
                shared,
                worker,
            },
        );
        self.publish();
        Ok(())
    }

    /// Stops and forgets a policy, and takes it out of the metrics.
    pub fn remove_policy(&mut self, name: &str) {
        if let Some(slot) = self.policies.remove(name) {
            self.free_bits |= slot.input.bit;
            slot.retire();
            self.publish();
        }
        self.cx.registry.unregister_policy(name);
    }

    pub fn policy_stats(&self, name: &str) -> Option<Arc<PolicyStats>> {
        self.policies.get(name).map(|s| s.shared.stats.clone())
    }

    /// When the next duration limit runs out.
    /// Delivers everything already taken in, then ends every policy and
    /// tool, waiting at most `within`: each policy's worker finishes its
    /// queue, then each tool its own (a file sink writes out and closes its
    /// file). Ingest must have stopped.
    pub async fn drain(&mut self, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        // Ingest lets go of the policies' queues; each worker ends once it
        // has taken its queue's last batch.
        self.ingest.publish(PolicyTable::default());
        let workers: Vec<std::thread::JoinHandle<()>> = self
            .policies
            .drain()
            .map(|(_, slot)| {
                self.free_bits |= slot.input.bit;
                slot.worker
            })
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        });
        if tokio::time::timeout_at(deadline, joined).await.is_err() {
            tracing::warn!("policies not drained within {within:?}; stopping the tools anyway");
        }
        for (_, tool) in self.tools.drain() {
            match tool {
                Tool::Running { sink, .. } => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    sink.drain(&self.cx, left.max(std::time::Duration::from_millis(1)))
                        .await
                }
                Tool::Failed { cfg, .. } => self.cx.registry.unregister_sink(cfg.common().name),
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.policies
            .values()
            .filter(|s| !s.shared.is_stopped())
            .filter_map(|s| s.shared.budget().deadline())
            .min()
    }

    /// Ends the policies whose limits ran out: they leave the ingest table
    /// and their workers end. Their counters stay in the metrics (with
    /// `policy_stopped` 1) until the policy is removed or started again.
    pub fn reap_stopped(&mut self) -> Vec<(String, StopRecord)> {
        let now = Instant::now();
        for s in self.policies.values() {
            let b = s.shared.budget();
            if !s.shared.is_stopped() && b.expired(now) {
                let r = b.stop_record(StopReason::Duration);
                drop(b);
                s.shared.stop(r);
            }
        }
        let stopped: Vec<String> = self
            .policies
            .iter()
            .filter(|(_, s)| s.shared.is_stopped())
            .map(|(n, _)| n.clone())
            .collect();
        let mut out = Vec::new();
        for name in stopped {
            if let Some(slot) = self.policies.remove(&name) {
                self.free_bits |= slot.input.bit;
                slot.retire();
                if let Some(r) = slot.shared.stats.stopped() {
                    out.push((name, r));
                }
            }
        }
        if !out.is_empty() {
            self.publish();
        }
        out
    }

    /// Replaces the routing tables of the policies that name `tool`.
    fn reroute(&self, tool: &str) {
        for slot in self.policies.values() {
            if names_tool(&slot.cfg, tool) {
                slot.shared
                    .set_routes(routes_for(&slot.cfg, &self.tools, &slot.shared.stats));
            }
        }
    }

    fn publish(&self) {
        let mut policies: Vec<_> = self.policies.values().map(|s| s.input.clone()).collect();
        policies.sort_by_key(|p| p.bit);
        self.ingest.publish(PolicyTable { policies });
    }
}

/// The checks `Config::validate` makes of one policy that do not depend on
/// other objects.
fn check_policy(p: &PolicyConfig) -> anyhow::Result<()> {
    if p.name.is_empty() {
        anyhow::bail!("policy name: must not be empty");
    }
    if p.queue == 0 {
        anyhow::bail!("policy {:?}: queue: must be at least 1", p.name);
    }
    if let Some(crate::transforms::slice::SliceConfig::Bytes(0)) = p.slice {
        anyhow::bail!("policy {:?}: slice.bytes: must be at least 1", p.name);
    }
    if let Some(l) = &p.limits {
        l.validate()
            .map_err(|e| anyhow::anyhow!("policy {:?}: limits.{e}", p.name))?;
    }
    Ok(())
}

fn build_pipeline(p: &PolicyConfig) -> anyhow::Result<Pipeline> {
    p.pipeline()
        .build(crate::bpf::LINKTYPE_ETHERNET, !p.groups.is_empty())
        .map_err(|e| anyhow::anyhow!("policy {:?}: filter: {}", p.name, e.message))
}

fn names_tool(p: &PolicyConfig, tool: &str) -> bool {
    p.sinks.iter().any(|s| s == tool)
        || p.groups.iter().any(|g| g.members.iter().any(|m| m == tool))
}

/// The routes of `p` over the tools running now. Counters are kept per
/// tool name across route changes, for every tool the policy names.
fn routes_for(p: &PolicyConfig, tools: &HashMap<String, Tool>, stats: &PolicyStats) -> Routes {
    let mut counters = stats.tools.lock().unwrap_or_else(|e| e.into_inner());
    let named: BTreeSet<&str> = p
        .sinks
        .iter()
        .chain(p.groups.iter().flat_map(|g| g.members.iter()))
        .map(String::as_str)
        .collect();
    counters.retain(|k, _| named.contains(k.as_str()));
    for n in &named {
        counters.entry(n.to_string()).or_default();
    }
    let route = |name: &String| match tools.get(name) {
        Some(Tool::Running { sink, .. }) => Some(Route {
            sink: sink.handle.clone(),
            stats: counters.get(name).cloned().unwrap_or_default(),
        }),
        _ => None,
    };
    Routes {
        each: p.sinks.iter().filter_map(route).collect(),
        groups: p
            .groups
            .iter()
            .map(|g| g.members.iter().filter_map(route).collect::<Vec<_>>())
            .filter(|g| !g.is_empty())
            .collect(),
    }
}

/// Runs one policy's transforms on a thread of its own: the work is CPU
/// bound, and dedup needs one ordered view of every tap's packets. Being
/// the only one counting its deliveries, it enforces limits exactly.
struct PolicyWorker {
    shared: Arc<PolicyShared>,
    bit: u64,
    pipeline: Pipeline,
}

impl PolicyWorker {
    fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        let stats = self.shared.stats.clone();
        let mut dups_seen = 0;
        while let Some(batch) = rx.blocking_recv() {
            if self.shared.retired.load(Ordering::Acquire) {
                break;
            }
            if self.shared.has_next_pipeline.swap(false, Ordering::AcqRel) {
                let next = self
                    .shared
                    .next_pipeline
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(p) = next {
                    self.pipeline = p;
                    dups_seen = 0;
                }
            }
            if self.shared.is_stopped() || batch.is_empty() {
                continue;
            }
            let routes = self.shared.routes();
            let mut budget = self.shared.budget();
            if budget.expired(Instant::now()) {
                let r = budget.stop_record(StopReason::Duration);
                drop(budget);
                self.shared.stop(r);
                continue;
            }
            let mut members: Vec<Vec<Vec<Packet>>> = routes
                .groups
                .iter()
                .map(|g| vec![Vec::new(); g.len()])
                .collect();
            let mut received = 0;
            let mut matched = 0;
            let mut bytes = 0;
            let mut stop = None;
            // A batch only this policy took is moved, not cloned: the
            // packets' shared buffer and interface are then not counted up
            // and down once per packet from two threads.
            let bit = self.bit;
            let mut all: Vec<Packet> = match Arc::try_unwrap(batch) {
                Ok(owned) => owned,
                Err(shared) => shared
                    .iter()
                    .filter(|p| p.policies & bit != 0)
                    .cloned()
                    .collect(),
            };
            // Kept in place: what passes is rewritten where it lies.
            let mut done = false;
            all.retain_mut(|p| {
                if done || p.policies & bit == 0 {
                    return false;
                }
                received += 1;
                let Some(v) = self.pipeline.process(&p.data, p.wire_len, p.ts_ns) else {
                    return false;
                };
                matched += 1;
                if routes.is_empty() {
                    // Nowhere to go (its tools are not running): not
                    // delivered, so not counted against the limits.
                    return false;
                }
                match budget.admit(v.keep) {
                    Admit::Deliver => {}
                    Admit::DeliverLast(r) => {
                        stop = Some(r);
                        done = true;
                    }
                    Admit::Refuse(r) => {
                        stop = Some(r);
                        done = true;
                        return false;
                    }
                }
                let flow_hash = (!routes.groups.is_empty()).then(|| match &v.layers {
                    Some(l) => l.symmetric_flow_hash(),
                    None => Layers::parse(&p.data).symmetric_flow_hash(),
                });
                match v.mask {
                    Some(_) => p.data = Bytes::from(crate::transforms::apply(&p.data, &v)),
                    None => p.data.truncate(v.keep),
                }
                bytes += p.data.len() as u64;
                p.policy = self.shared.name.clone();
                if let Some(h) = flow_hash {
                    for (g, m) in routes.groups.iter().zip(members.iter_mut()) {
                        m[(h % g.len() as u64) as usize].push(p.clone());
                    }
                }
                true
            });
            let stopped = stop.map(|r| budget.stop_record(r));
            drop(budget);
            stats.received.add(received);
            let dups = self.pipeline.dedup_stats().map_or(0, |s| s.duplicates);
            stats.duplicates.add(dups - dups_seen);
            stats.matched.add(matched + (dups - dups_seen));
            dups_seen = dups;
            if !all.is_empty() {
                stats.delivered.add(all.len() as u64);
                stats.bytes.add(bytes);
                let all: Batch = Arc::new(all);
                for r in &routes.each {
                    r.offer(all.clone());
                }
                for (g, m) in routes.groups.iter().zip(members) {
                    for (r, part) in g.iter().zip(m) {
                        if !part.is_empty() {
                            r.offer(Arc::new(part));
                        }
                    }
                }
            }
            if let Some(r) = stopped {
                self.shared.stop(r);
            }
        }
    }
}
