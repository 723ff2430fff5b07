//! Runs what the TapPolicy and TapTool objects say, one change at a time,
//! on the live [`Topology`]: the watchers (or a test) send [`Change`]s
//! through a [`ClusterHandle`]; a single task applies them, reaps policies
//! that reached a limit and publishes the status snapshot.
//!
//! When a policy runs: it is enabled, its spec maps to a valid pipeline,
//! and it is not stopped. A stop (a limit reached here, or `status.stopped`
//! found on the object when this aggregator first sees it, e.g. after a
//! restart) holds until the spec changes (a higher `metadata.generation`
//! or a different spec: limits raised, disabled and enabled again); the
//! policy then runs anew with fresh counts and its `stopped` is removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tapestry_proto::crd::{Stopped, TapPolicy, TapPolicySpec, TapTool};
use tokio::sync::{mpsc, oneshot, watch};

use super::mapping;
use super::status::{Kind, Snapshot, StatusKey};
use crate::limits::{rfc3339, StopRecord};
use crate::metrics::PolicyStats;
use crate::sinks::SinkConfig;
use crate::topology::Topology;

/// Changes waiting for the reconciler; senders wait when it is full.
const CHANGE_QUEUE: usize = 64;

/// How often a tool that could not start is tried again.
const RETRY_FAILED_TOOLS: Duration = Duration::from_secs(10);

/// One observed change, as the watchers report it.
#[derive(Debug, Clone)]
pub enum Change {
    Policy(Box<TapPolicy>),
    PolicyDeleted(String),
    /// Every policy there is (after a list): others are gone.
    Policies(Vec<TapPolicy>),
    Tool(Box<TapTool>),
    ToolDeleted(String),
    /// Every tool there is (after a list): others are gone.
    Tools(Vec<TapTool>),
    /// The process is stopping: every tool is reported not Ready (no
    /// clients, no address) so nobody connects to a listener about to
    /// close; then everything taken in is delivered and every tool ended
    /// (see [`crate::topology::Topology::drain`]); done once that status
    /// is written.
    Stop,
}

/// How the watchers (and tests) feed the reconciler.
#[derive(Clone)]
pub struct ClusterHandle {
    tx: mpsc::Sender<(Change, oneshot::Sender<()>)>,
}

impl ClusterHandle {
    /// Applies one change; returns once it is in effect.
    pub async fn apply(&self, change: Change) -> anyhow::Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((change, done))
            .await
            .map_err(|_| anyhow::anyhow!("the reconciler has stopped"))?;
        wait.await
            .map_err(|_| anyhow::anyhow!("the reconciler has stopped"))
    }
}

/// How clients reach what the aggregator serves, for `status.address`.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// Reported in place of an unspecified listening address (`0.0.0.0`,
    /// `::`), e.g. the node's address. Without it, the HTTP listener's
    /// address stands in when that one is specific (as when it binds the
    /// node's address on the host network).
    pub advertise_host: Option<String>,
    /// Whether the HTTP port speaks TLS (`https://` addresses).
    pub http_tls: bool,
}

impl Endpoints {
    fn reach(&self, a: SocketAddr) -> String {
        if !a.ip().is_unspecified() {
            return a.to_string();
        }
        let host = match &self.advertise_host {
            Some(h) => h.clone(),
            None if !self.http.ip().is_unspecified() => self.http.ip().to_string(),
            None => return a.to_string(),
        };
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", a.port())
        } else {
            format!("{host}:{}", a.port())
        }
    }
}

/// A policy held stopped, with the spec it stopped under.
struct HeldStop {
    generation: Option<i64>,
    spec: TapPolicySpec,
}

#[derive(Default)]
struct PolicyRecord {
    uid: Option<String>,
    generation: Option<i64>,
    spec: TapPolicySpec,
    held: Option<HeldStop>,
    /// The counters of its run in this process (current, or ended by a
    /// limit); absent while it does not run.
    stats: Option<Arc<PolicyStats>>,
}

struct ToolRecord {
    /// (status, reason, message) of the Ready condition.
    ready: (bool, &'static str, String),
    since: SystemTime,
}

pub struct Reconciler {
    topology: Topology,
    endpoints: Endpoints,
    policies: HashMap<String, PolicyRecord>,
    tools: BTreeMap<String, ToolRecord>,
    stopping: bool,
}

impl Reconciler {
    /// A reconciler over `topology` and the handle that feeds it; run it
    /// with [`Reconciler::run`].
    pub fn new(
        topology: Topology,
        endpoints: Endpoints,
    ) -> (
        Reconciler,
        ClusterHandle,
        mpsc::Receiver<(Change, oneshot::Sender<()>)>,
    ) {
        let (tx, rx) = mpsc::channel(CHANGE_QUEUE);
        (
            Reconciler {
                topology,
                endpoints,
                policies: HashMap::new(),
                tools: BTreeMap::new(),
                stopping: false,
            },
            ClusterHandle { tx },
            rx,
        )
    }

    /// Applies changes, reaps stopped policies and publishes a status
    /// snapshot every `period` (and at once when a policy stops), until
    /// every handle is gone or [`Change::Stop`]. Returns the stop's
    /// completion, to be signalled once its last snapshot is written.
    pub async fn run(
        mut self,
        mut changes: mpsc::Receiver<(Change, oneshot::Sender<()>)>,
        status: watch::Sender<Arc<Snapshot>>,
        period: Duration,
    ) -> Option<oneshot::Sender<()>> {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_retry = Instant::now() + RETRY_FAILED_TOOLS;
        loop {
            let deadline = self.topology.next_deadline();
            let stops = self.topology.stop_events();
            tokio::select! {
                c = changes.recv() => {
                    // Every handle gone: nothing left to do.
                    let (change, done) = c?;
                    if matches!(change, Change::Stop) {
                        self.stop();
                        status.send_replace(Arc::new(self.snapshot()));
                        self.topology.drain(crate::serve::DRAIN_WITHIN).await;
                        return Some(done);
                    }
                    self.reap();
                    self.apply(change).await;
                    let _ = done.send(());
                }
                _ = stops.notified() => {
                    self.reap();
                    status.send_replace(Arc::new(self.snapshot()));
                }
                _ = sleep_until(deadline) => {
                    self.reap();
                    status.send_replace(Arc::new(self.snapshot()));
                }
                _ = tick.tick() => {
                    if Instant::now() >= next_retry {
                        next_retry = Instant::now() + RETRY_FAILED_TOOLS;
                        self.retry_failed_tools().await;
                    }
                    status.send_replace(Arc::new(self.snapshot()));
                }
            }
        }
    }

    async fn apply(&mut self, change: Change) {
        match change {
            Change::Policy(p) => self.on_policy(&p),
            Change::PolicyDeleted(name) => self.forget_policy(&name),
            Change::Policies(all) => {
                let live: BTreeSet<String> =
                    all.iter().filter_map(|p| p.metadata.name.clone()).collect();
                let gone: Vec<String> = self
                    .policies
                    .keys()
                    .filter(|n| !live.contains(*n))
                    .cloned()
                    .collect();
                for n in gone {
                    self.forget_policy(&n);
                }
                for p in &all {
                    self.on_policy(p);
                }
            }
            Change::Stop => self.stop(),
            Change::Tool(t) => self.on_tool(&t).await,
            Change::ToolDeleted(name) => self.forget_tool(&name).await,
            Change::Tools(all) => {
                let live: BTreeSet<String> =
                    all.iter().filter_map(|t| t.metadata.name.clone()).collect();
                let gone: Vec<String> = self
                    .tools
                    .keys()
                    .filter(|n| !live.contains(*n))
                    .cloned()
                    .collect();
                for n in gone {
                    self.forget_tool(&n).await;
                }
                for t in &all {
                    self.on_tool(t).await;
                }
            }
        }
    }

    fn on_policy(&mut self, p: &TapPolicy) {
        let Some(name) = p.metadata.name.clone() else {
            tracing::warn!("a TapPolicy without a name: ignored");
            return;
        };
        let uid = p.metadata.uid.clone();
        let first_sight = self.policies.get(&name).is_none_or(|r| r.uid != uid);
        if first_sight {
            // A new object (or one re-created under the same name).
            self.topology.remove_policy(&name);
            let held = p
                .status
                .as_ref()
                .is_some_and(|s| s.stopped.is_some())
                .then(|| HeldStop {
                    generation: p.metadata.generation,
                    spec: p.spec.clone(),
                });
            self.policies.insert(
                name.clone(),
                PolicyRecord {
                    uid,
                    held,
                    ..PolicyRecord::default()
                },
            );
        }
        let Some(rec) = self.policies.get_mut(&name) else {
            return;
        };
        rec.generation = p.metadata.generation;
        rec.spec = p.spec.clone();
        if let Some(h) = &rec.held {
            let newer = matches!((p.metadata.generation, h.generation), (Some(now), Some(then)) if now > then);
            if newer || p.spec != h.spec {
                tracing::info!(policy = %name, "spec changed since the policy stopped: running it again");
                rec.held = None;
                rec.stats = None;
                self.topology.remove_policy(&name);
            }
        }
        if rec.held.is_some() {
            return;
        }
        if !p.spec.enabled {
            self.topology.remove_policy(&name);
            rec.stats = None;
            return;
        }
        let started = mapping::policy_config(p)
            .and_then(|cfg| self.topology.set_policy(cfg).map_err(|e| format!("{e:#}")));
        match started {
            Ok(()) => rec.stats = self.topology.policy_stats(&name),
            Err(e) => {
                tracing::warn!(policy = %name, "not running: {e}");
                self.topology.remove_policy(&name);
                rec.stats = None;
            }
        }
    }

    fn forget_policy(&mut self, name: &str) {
        self.topology.remove_policy(name);
        self.policies.remove(name);
    }

    /// Takes the policies that reached a limit out of the topology and
    /// holds them stopped.
    fn reap(&mut self) {
        for (name, _) in self.topology.reap_stopped() {
            if let Some(rec) = self.policies.get_mut(&name) {
                rec.held = Some(HeldStop {
                    generation: rec.generation,
                    spec: rec.spec.clone(),
                });
            }
        }
    }

    async fn on_tool(&mut self, t: &TapTool) {
        let Some(name) = t.metadata.name.clone() else {
            tracing::warn!("a TapTool without a name: ignored");
            return;
        };
        let ready = match mapping::sink_config(t) {
            Ok(cfg) => self.start_tool(cfg).await,
            Err(e) => {
                tracing::warn!(tool = %name, "not running: {e}");
                self.topology.remove_tool(&name).await;
                (false, "InvalidSpec", e)
            }
        };
        self.set_ready(&name, ready);
    }

    async fn start_tool(&mut self, cfg: SinkConfig) -> (bool, &'static str, String) {
        match self.topology.set_tool(cfg).await {
            Ok(()) => (true, "Serving", String::new()),
            Err(e) => (false, "StartFailed", e),
        }
    }

    async fn retry_failed_tools(&mut self) {
        let failed: Vec<String> = self
            .tools
            .iter()
            .filter(|(_, r)| !r.ready.0 && r.ready.1 == "StartFailed")
            .map(|(n, _)| n.clone())
            .collect();
        for name in failed {
            let Some(cfg) = self.topology.tool(&name).map(|v| v.cfg.clone()) else {
                continue;
            };
            let ready = self.start_tool(cfg).await;
            self.set_ready(&name, ready);
        }
    }

    fn set_ready(&mut self, name: &str, ready: (bool, &'static str, String)) {
        match self.tools.get_mut(name) {
            Some(r) => {
                if r.ready.0 != ready.0 {
                    r.since = SystemTime::now();
                }
                r.ready = ready;
            }
            None => {
                self.tools.insert(
                    name.to_string(),
                    ToolRecord {
                        ready,
                        since: SystemTime::now(),
                    },
                );
            }
        }
    }

    fn stop(&mut self) {
        self.stopping = true;
        let names: Vec<String> = self.tools.keys().cloned().collect();
        for name in names {
            self.set_ready(
                &name,
                (
                    false,
                    "AggregatorStopped",
                    "the aggregator serving this tool stopped".into(),
                ),
            );
        }
    }

    async fn forget_tool(&mut self, name: &str) {
        self.topology.remove_tool(name).await;
        self.tools.remove(name);
    }

    /// Every status field this aggregator owns, per object.
    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::new();
        for (name, rec) in &self.policies {
            if let Some(stats) = &rec.stats {
                s.insert(
                    StatusKey {
                        kind: Kind::TapPolicy,
                        name: name.clone(),
                    },
                    policy_status(stats),
                );
            }
        }
        for (name, rec) in &self.tools {
            s.insert(
                StatusKey {
                    kind: Kind::TapTool,
                    name: name.clone(),
                },
                self.tool_status(name, rec),
            );
        }
        s
    }

    fn tool_status(&self, name: &str, rec: &ToolRecord) -> Value {
        let (ok, reason, message) = &rec.ready;
        let mut condition = json!({
            "type": "Ready",
            "status": if *ok { "True" } else { "False" },
            "reason": reason,
            "lastTransitionTime": rfc3339(rec.since),
        });
        if !message.is_empty() {
            condition["message"] = json!(message);
        }
        let mut status = json!({ "conditions": [condition] });
        let serving = self.topology.tool(name).filter(|v| v.error.is_none());
        if let Some(view) = serving.filter(|_| !self.stopping) {
            let st = view.stats;
            status["clients"] = json!(st.clients.load(std::sync::atomic::Ordering::Relaxed));
            status["deliveredPackets"] = json!(st.packets.get());
            status["dropped"] =
                json!(st.dropped.get() + st.client_dropped.get() + st.write_failed.get());
            let address = match view.cfg {
                SinkConfig::PcapOverIp(_) => view.address.map(|a| self.endpoints.reach(a)),
                SinkConfig::Http(_) => Some(format!(
                    "{}://{}/v1/tools/{name}/pcap",
                    if self.endpoints.http_tls {
                        "https"
                    } else {
                        "http"
                    },
                    self.endpoints.reach(self.endpoints.http)
                )),
                SinkConfig::Grpc(_) => Some(self.endpoints.reach(self.endpoints.grpc)),
                SinkConfig::PcapngFile(f) => Some(f.directory.display().to_string()),
                SinkConfig::Vxlan(v) => Some(v.remote.clone()),
            };
            if let Some(a) = address {
                status["address"] = json!(a);
            }
        }
        status
    }
}

/// A policy's owned status fields: packets per tool, packets lost, and
/// why it stopped.
fn policy_status(stats: &PolicyStats) -> Value {
    let delivered: BTreeMap<String, u64> = stats
        .tools
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(t, r)| (t.clone(), r.delivered.get()))
        .collect();
    let mut status = json!({ "delivered": delivered, "dropped": stats.lost() });
    if let Some(r) = stats.stopped() {
        status["stopped"] = json!(stopped_status(&r));
    }
    status
}

fn stopped_status(r: &StopRecord) -> Stopped {
    Stopped {
        reason: r.reason.as_str().to_string(),
        message: r.message.clone(),
        at: r.at_rfc3339(),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::SinkContext;

    fn endpoints() -> Endpoints {
        Endpoints {
            http: "127.0.0.1:9090".parse().unwrap(),
            grpc: "127.0.0.1:50051".parse().unwrap(),
            advertise_host: None,
            http_tls: false,
        }
    }

    fn reconciler() -> Reconciler {
        Reconciler::new(Topology::new(SinkContext::default()), endpoints()).0
    }

    fn policy(generation: i64, spec: Value, stopped: bool) -> TapPolicy {
        let mut p = json!({
            "apiVersion": "tapestry.io/v1alpha1",
            "kind": "TapPolicy",
            "metadata": {"name": "p", "uid": "u1", "generation": generation},
            "spec": spec,
        });
        if stopped {
            p["status"] = json!({"stopped": {"reason": "MaxPackets", "message": "m", "at": "2025-01-01T00:00:00Z"}});
        }
        serde_json::from_value(p).unwrap()
    }

    fn runs(r: &Reconciler) -> bool {
        r.topology.policy_stats("p").is_some()
    }

    #[test]
    fn a_policy_runs_while_enabled_and_valid() {
        let mut r = reconciler();
        r.on_policy(&policy(1, json!({"tools": ["t"]}), false));
        assert!(runs(&r));
        r.on_policy(&policy(2, json!({"enabled": false, "tools": ["t"]}), false));
        assert!(!runs(&r));
        r.on_policy(&policy(3, json!({"tools": ["t"]}), false));
        assert!(runs(&r));
        r.on_policy(&policy(4, json!({"filter": "tcp portt 1"}), false));
        assert!(!runs(&r), "an invalid spec does not run");
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(r.apply(Change::PolicyDeleted("p".into())));
        assert!(r.policies.is_empty());
    }

    #[test]
    fn a_stop_found_on_first_sight_holds_until_the_spec_changes() {
        let mut r = reconciler();
        r.on_policy(&policy(3, json!({"tools": ["t"]}), true));
        assert!(!runs(&r), "stopped before this aggregator started");
        r.on_policy(&policy(3, json!({"tools": ["t"]}), true));
        assert!(!runs(&r), "the same spec stays stopped");
        r.on_policy(&policy(4, json!({"tools": ["t"]}), true));
        assert!(runs(&r), "a new generation runs again");
        // The status still says stopped until our next write: it must not
        // stop the run that just started.
        r.on_policy(&policy(4, json!({"tools": ["t"]}), true));
        assert!(runs(&r));
    }

    #[test]
    fn without_generations_a_different_spec_restarts_a_stop() {
        let mut r = reconciler();
        let mut p = policy(1, json!({"tools": ["t"]}), true);
        p.metadata.generation = None;
        r.on_policy(&p);
        assert!(!runs(&r));
        p.spec.filter = "udp".into();
        r.on_policy(&p);
        assert!(runs(&r));
    }

    #[test]
    fn unspecified_addresses_are_reported_as_the_advertised_host() {
        let e = |http: &str, h: Option<&str>| Endpoints {
            http: http.parse().unwrap(),
            grpc: "127.0.0.1:50051".parse().unwrap(),
            advertise_host: h.map(String::from),
            http_tls: false,
        };
        let any = "0.0.0.0:1".parse().unwrap();
        assert_eq!(e("0.0.0.0:9090", None).reach(any), "0.0.0.0:1");
        assert_eq!(e("0.0.0.0:9090", Some("10.0.0.5")).reach(any), "10.0.0.5:1");
        assert_eq!(
            e("0.0.0.0:9090", Some("fd00::5")).reach("[::]:1".parse().unwrap()),
            "[fd00::5]:1"
        );
        assert_eq!(
            e("192.0.2.4:9090", None).reach(any),
            "192.0.2.4:1",
            "the node's address"
        );
        assert_eq!(
            e("0.0.0.0:9090", Some("10.0.0.5")).reach("127.0.0.1:7".parse().unwrap()),
            "127.0.0.1:7"
        );
    }
}
