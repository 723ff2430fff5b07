//! Policy status, as the fleet sees it: which pods and nodes each policy
//! selects, the packets its taps mirrored and lost (from their heartbeat
//! Leases), and a Ready condition that says what stands in the way (a
//! disabled policy, a stopped capture, a missing or failing tool, a node
//! whose tap is not connected). Events mark each change of that condition.
//!
//! The fleet manager owns these fields through server-side apply; the
//! aggregator owns what it counts (delivered per tool, dropped, stopped)
//! the same way, so the two never overwrite each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use tapestry_proto::crd::{Condition, TapPolicy, TapPolicyStatus};
use tapestry_proto::heartbeat::TapState;
use tapestry_runtime::events::Recorder;
use tokio_util::sync::CancellationToken;

use crate::api::objects::FIELD_MANAGER;
use crate::fleet::{tappable, Fleet, RenderedTap};
use crate::metrics::Metrics;

/// What the fleet manager writes of a policy's status.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub matched_pods: u64,
    pub matched_nodes: u64,
    pub captured_packets: u64,
    pub dropped_on_nodes: u64,
    pub ready: Condition,
}

/// Observe every policy: a pure function of what the informers hold.
pub fn observe(fleet: &Fleet, now: Timestamp) -> BTreeMap<String, (Arc<TapPolicy>, Observed)> {
    let policies = fleet.policies.store.state();
    // A pass runs after every burst of changes (thousands of tools being
    // created, say): without policies there is nothing to observe.
    if policies.is_empty() {
        return BTreeMap::new();
    }
    let taps = fleet.taps(now);
    let namespaces = fleet.namespace_labels();
    let node_labels: HashMap<String, BTreeMap<String, String>> = fleet
        .nodes
        .store
        .state()
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    let pods: Vec<_> = fleet.pods.store.state();
    // Only the tools some policy names.
    let tools: HashMap<String, Arc<tapestry_proto::crd::TapTool>> = policies
        .iter()
        .flat_map(|p| p.spec.tool_names())
        .filter_map(|name| Some((name.to_string(), fleet.tools.get(None, name)?)))
        .collect();
    let no_labels = BTreeMap::new();
    let mut out = BTreeMap::new();
    for policy in policies {
        let name = policy.name_any();
        let spec = &policy.spec;
        let mut matched_pods = 0;
        let mut nodes = BTreeSet::new();
        for pod in pods.iter().filter(|p| tappable(p)) {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
                continue;
            };
            let ns = pod.namespace().unwrap_or_default();
            if spec.selects_pod(
                &ns,
                namespaces.get(&ns),
                pod.labels(),
                node_labels.get(node).unwrap_or(&no_labels),
            ) {
                matched_pods += 1;
                nodes.insert(node.to_string());
            }
        }
        let (mut captured, mut dropped) = (0, 0);
        for tap in taps.values() {
            if let Some(c) = tap.tap.status.as_ref().and_then(|s| s.policies.get(&name)) {
                captured += c.captured;
                dropped += c.dropped;
            }
        }
        let (status, reason, message) = readiness(&policy, &nodes, &taps, &tools, matched_pods);
        let ready = Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: String::new(),
        };
        out.insert(
            name,
            (
                policy.clone(),
                Observed {
                    matched_pods,
                    matched_nodes: nodes.len() as u64,
                    captured_packets: captured,
                    dropped_on_nodes: dropped,
                    ready,
                },
            ),
        );
    }
    out
}

/// The Ready condition's status, reason and message.
fn readiness(
    policy: &TapPolicy,
    nodes: &BTreeSet<String>,
    taps: &BTreeMap<String, Arc<RenderedTap>>,
    tools: &HashMap<String, Arc<tapestry_proto::crd::TapTool>>,
    matched_pods: u64,
) -> (&'static str, &'static str, String) {
    if !policy.spec.enabled {
        return ("False", "Disabled", "the policy is disabled".into());
    }
    if let Some(stopped) = policy.status.as_ref().and_then(|s| s.stopped.as_ref()) {
        return ("False", "CaptureStopped", stopped.message.clone());
    }
    let names: BTreeSet<&str> = policy.spec.tool_names().collect();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|t| !tools.contains_key(*t))
        .collect();
    if !missing.is_empty() {
        return (
            "False",
            "ToolMissing",
            format!("no such tool: {}", missing.join(", ")),
        );
    }
    let failing: Vec<String> = names
        .iter()
        .filter_map(|t| {
            let ready = tools[*t]
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")?;
            (ready.status == "False").then(|| format!("{t}: {}", ready.message))
        })
        .collect();
    if !failing.is_empty() {
        return ("False", "ToolNotReady", failing.join("; "));
    }
    let untapped: Vec<&str> = nodes
        .iter()
        .filter(|n| {
            taps.get(*n)
                .is_none_or(|t| t.tap.tap != TapState::Connected)
        })
        .map(String::as_str)
        .collect();
    if !untapped.is_empty() {
        return (
            "False",
            "TapNotConnected",
            format!("no connected tap on node {}", untapped.join(", ")),
        );
    }
    if matched_pods == 0 {
        return (
            "True",
            "NoMatchingPods",
            "no running pod matches the policy yet".into(),
        );
    }
    (
        "True",
        "Tapping",
        format!(
            "tapping {} on {}",
            counted(matched_pods, "pod"),
            counted(nodes.len() as u64, "node")
        ),
    )
}

/// The status fields as applied, keeping the condition's transition time
/// while its status stays the same.
fn applied(policy: &TapPolicy, observed: &Observed, now: Timestamp) -> Value {
    let previous = policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let mut ready = observed.ready.clone();
    ready.last_transition_time = match previous {
        Some(p) if p.status == ready.status && !p.last_transition_time.is_empty() => {
            p.last_transition_time.clone()
        }
        // Seconds, as Kubernetes writes condition times.
        _ => Timestamp::from_second(now.as_second())
            .unwrap_or(now)
            .to_string(),
    };
    json!({
        "apiVersion": "tapestry.io/v1alpha1",
        "kind": "TapPolicy",
        "metadata": {"name": policy.name_any()},
        "status": {
            "observedGeneration": policy.metadata.generation,
            "matchedPods": observed.matched_pods,
            "matchedNodes": observed.matched_nodes,
            "capturedPackets": observed.captured_packets,
            "droppedOnNodes": observed.dropped_on_nodes,
            "conditions": [ready],
        }
    })
}

/// Whether the stored status already says what was observed.
fn up_to_date(policy: &TapPolicy, observed: &Observed) -> bool {
    let Some(s) = policy.status.as_ref() else {
        return false;
    };
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready");
    s.observed_generation == policy.metadata.generation
        && s.matched_pods == observed.matched_pods
        && s.matched_nodes == observed.matched_nodes
        && s.captured_packets == observed.captured_packets
        && s.dropped_on_nodes == observed.dropped_on_nodes
        && ready.is_some_and(|r| {
            r.status == observed.ready.status
                && r.reason == observed.ready.reason
                && r.message == observed.ready.message
        })
}

/// Keep every policy's status current until `shutdown`: every `period`,
/// and soon after a policy or tool changes.
pub async fn run(
    client: Client,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    period: Duration,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = fleet.ready() => {}
    }
    let api: Api<TapPolicy> = Api::all(client.clone());
    let recorder = Recorder::new(client, "tapestry-fleet-manager");
    // The Ready reason each policy was last reported with, for events.
    let mut reported: HashMap<String, String> = HashMap::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = fleet.changed.notified() => {
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let now = Timestamp::now();
        count_taps(&fleet, &metrics, now);
        let observed = observe(&fleet, now);
        reported.retain(|name, _| observed.contains_key(name));
        for (name, (policy, seen)) in observed {
            if reported.get(&name) != Some(&seen.ready.reason) {
                let warning = seen.ready.status != "True";
                let first = !reported.contains_key(&name);
                // A policy met already Ready is not news.
                if !(first && !warning && up_to_date(&policy, &seen)) {
                    recorder.record(
                        policy.as_ref(),
                        warning,
                        &seen.ready.reason,
                        seen.ready.message.clone(),
                    );
                }
                reported.insert(name.clone(), seen.ready.reason.clone());
            }
            if up_to_date(&policy, &seen) {
                continue;
            }
            let patch = applied(&policy, &seen, now);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api
                .patch_status(&name, &params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {
                    metrics.status_writes.inc();
                }
                Err(e) => {
                    metrics.status_errors.inc();
                    tracing::debug!(policy = %name, "writing status: {e}");
                }
            }
        }
    }
}

fn count_taps(fleet: &Fleet, metrics: &Metrics, now: Timestamp) {
    let mut counts: BTreeMap<&str, i64> = [("Connected", 0), ("Pending", 0), ("Disconnected", 0)]
        .into_iter()
        .collect();
    for tap in fleet.taps(now).values() {
        let state = match tap.tap.tap {
            TapState::Connected => "Connected",
            TapState::Pending => "Pending",
            TapState::Disconnected => "Disconnected",
        };
        *counts.entry(state).or_default() += 1;
    }
    for (state, n) in counts {
        metrics
            .taps
            .get_or_create(&crate::metrics::StateLabels {
                state: state.into(),
            })
            .set(n);
    }
}

/// A policy's status as the REST API shows it.
pub fn of(policy: &TapPolicy) -> TapPolicyStatus {
    policy.status.clone().unwrap_or_default()
}

/// "1 pod", "2 pods".
fn counted(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}
