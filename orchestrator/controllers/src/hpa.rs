//! Horizontal pod autoscaler controller: every sync period, each
//! HorizontalPodAutoscaler's target is resized from its pods' resource use
//! as read from the resource metrics API (`metrics.k8s.io`), by
//! Kubernetes' algorithm: for a Resource metric, the pods' usage over
//! their requests (Utilization) or per pod (AverageValue) against the
//! target gives a ratio; within a 10% tolerance nothing changes,
//! otherwise the ratio times the pods measured, rounded up. Pods without
//! metrics or not yet Ready are counted so as to damp the change (as 0%
//! on a scale-up, 100% on a scale-down), never to cause one. The largest
//! proposal over the metrics is stabilized over recent recommendations
//! (behavior windows), limited by the rate policies and kept within
//! [minReplicas, maxReplicas].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use k8s_openapi::api::autoscaling::v2::{
    HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerCondition,
    HorizontalPodAutoscalerStatus, MetricSpec, MetricStatus, MetricValueStatus,
    ResourceMetricStatus,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

use crate::util::is_ready;
use crate::Ctx;
use tapestry_apimachinery::quantity::{format_milli, milli_of, parse_milli};
use tapestry_runtime::{is_status, key_of, lock, split_key, Queue, Requeue};

/// A ratio this close to 1 changes nothing (Kubernetes'
/// `--horizontal-pod-autoscaler-tolerance`).
pub const TOLERANCE: f64 = 0.1;
/// Recommendations and scale events kept per autoscaler at most.
const MAX_HISTORY: usize = 512;
/// Pods considered per autoscaler at most.
const MAX_PODS: usize = 10_000;

/// What the controller remembers of each autoscaler between syncs.
#[derive(Default)]
pub struct State {
    recommendations: Vec<(DateTime<Utc>, i32)>,
    /// Replica changes it made, up (positive) and down (negative).
    events: Vec<(DateTime<Utc>, i32)>,
    last_sync: Option<(DateTime<Utc>, Option<i64>)>,
}

pub type States = Mutex<HashMap<String, State>>;

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.hpas.on_change(move |h, _| q.add(key_of(h)));
}

/// One pod's share of a resource metric.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Being deleted or failed: left out entirely.
    pub ignored: bool,
    /// Ready (only CPU looks at it: a starting pod's CPU is not its load).
    pub ready: bool,
    /// Sum of the containers' requests, in milli-units.
    pub request: i64,
    /// Sum of the containers' usage, in milli-units; None: no metrics.
    pub usage: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Percent of the pods' requests.
    Utilization(i64),
    /// Milli-units per pod.
    AverageValue(i64),
}

/// A metric's proposal and what was measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub replicas: i32,
    /// Percent of request over the pods measured (Utilization targets).
    pub utilization: Option<i64>,
    /// Milli-units per pod measured.
    pub average: i64,
}

/// The usage ratio of `counted` pods: `(ratio, utilization %, average)`.
fn ratio(counted: &[(i64, i64)], target: Target) -> Result<(f64, Option<i64>, i64), String> {
    // Per-pod values are user quantities: saturate rather than overflow.
    let usage = counted
        .iter()
        .fold(0i64, |sum, (u, _)| sum.saturating_add(*u));
    let n = counted.len() as i64;
    if n == 0 {
        return Err("did not receive metrics for targeted pods (pods might be unready)".into());
    }
    match target {
        Target::Utilization(t) => {
            let requests = counted
                .iter()
                .fold(0i64, |sum, (_, r)| sum.saturating_add(*r));
            if requests <= 0 {
                return Err("no metrics returned matched known pods".into());
            }
            let utilization = usage.saturating_mul(100) / requests;
            Ok((
                utilization as f64 / t.max(1) as f64,
                Some(utilization),
                usage / n,
            ))
        }
        Target::AverageValue(t) => {
            Ok((usage as f64 / (t.max(1) as f64 * n as f64), None, usage / n))
        }
    }
}

/// Kubernetes' replica calculation for one resource metric. `current` is
/// the target's desired replica count (its scale's spec).
pub fn replicas_for(
    current: i32,
    samples: &[Sample],
    target: Target,
    tolerance: f64,
) -> Result<Proposal, String> {
    let live: Vec<&Sample> = samples.iter().filter(|s| !s.ignored).collect();
    if samples.is_empty() {
        return Err("no pods returned by selector while calculating replica count".into());
    }
    let measured: Vec<(i64, i64)> = live
        .iter()
        .filter(|s| s.ready)
        .filter_map(|s| s.usage.map(|u| (u, s.request)))
        .collect();
    let unready = live
        .iter()
        .filter(|s| !s.ready && s.usage.is_some())
        .count();
    let missing: Vec<i64> = live
        .iter()
        .filter(|s| s.usage.is_none())
        .map(|s| s.request)
        .collect();
    let (usage_ratio, utilization, average) = ratio(&measured, target)?;
    let proposal = |replicas: i32| Proposal {
        replicas,
        utilization,
        average,
    };
    let up_with_unready = unready > 0 && usage_ratio > 1.0;
    if !up_with_unready && missing.is_empty() {
        if (1.0 - usage_ratio).abs() <= tolerance {
            return Ok(proposal(current));
        }
        return Ok(proposal(ceil(usage_ratio * measured.len() as f64)));
    }
    // Pods without metrics count as using their whole request on a
    // scale-down and nothing on a scale-up; unready pods as nothing on a
    // scale-up: both damp the change.
    let mut counted = measured.clone();
    let full = |request: i64| match target {
        Target::Utilization(_) => request,
        Target::AverageValue(t) => t,
    };
    if usage_ratio < 1.0 {
        counted.extend(missing.iter().map(|r| (full(*r), *r)));
    } else if usage_ratio > 1.0 {
        counted.extend(missing.iter().map(|r| (0, *r)));
    }
    if up_with_unready {
        counted.extend(
            live.iter()
                .filter(|s| !s.ready && s.usage.is_some())
                .map(|s| (0, s.request)),
        );
    }
    let (new_ratio, _, _) = ratio(&counted, target)?;
    if (1.0 - new_ratio).abs() <= tolerance
        || (usage_ratio < 1.0 && new_ratio > 1.0)
        || (usage_ratio > 1.0 && new_ratio < 1.0)
    {
        return Ok(proposal(current));
    }
    let replicas = ceil(new_ratio * counted.len() as f64);
    if (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current) {
        return Ok(proposal(current));
    }
    Ok(proposal(replicas))
}

fn ceil(x: f64) -> i32 {
    let c = x.ceil();
    if c.is_nan() || c < 0.0 {
        0
    } else if c > i32::MAX as f64 {
        i32::MAX
    } else {
        c as i32
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Select {
    Max,
    Min,
    Disabled,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PolicyKind {
    Pods,
    Percent,
    /// kube-controller-manager's rule for autoscalers without
    /// `spec.behavior`: up to twice the replicas, or 4, whichever is more.
    DoubleOrFour,
}

/// One direction's behaviour: stabilization window and rate policies.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    pub window: i64,
    pub select: Select,
    /// (kind, value, period seconds)
    pub policies: Vec<(PolicyKind, i64, i64)>,
}

impl Rules {
    /// The spec's rules, or Kubernetes' defaults for what it leaves out
    /// (`down_window` is the controller's downscale stabilization).
    pub fn of(spec: Option<&HPAScalingRules>, up: bool, down_window: i64) -> Rules {
        let mut rules = if up {
            Rules {
                window: 0,
                select: Select::Max,
                policies: vec![(PolicyKind::Pods, 4, 15), (PolicyKind::Percent, 100, 15)],
            }
        } else {
            Rules {
                window: down_window,
                select: Select::Max,
                policies: vec![(PolicyKind::Percent, 100, 15)],
            }
        };
        let Some(spec) = spec else {
            return rules;
        };
        if let Some(w) = spec.stabilization_window_seconds {
            rules.window = i64::from(w);
        }
        rules.select = match spec.select_policy.as_deref() {
            Some("Min") => Select::Min,
            Some("Disabled") => Select::Disabled,
            _ => Select::Max,
        };
        if let Some(p) = spec.policies.as_ref().filter(|p| !p.is_empty()) {
            rules.policies = p
                .iter()
                .map(|p| {
                    let kind = if p.type_ == "Pods" {
                        PolicyKind::Pods
                    } else {
                        PolicyKind::Percent
                    };
                    (kind, i64::from(p.value), i64::from(p.period_seconds))
                })
                .collect();
        }
        rules
    }

    /// The rules of an autoscaler without `spec.behavior`, as
    /// kube-controller-manager applies them: scale up to max(2×, 4) at once,
    /// scale down to the highest recommendation of the downscale window.
    pub fn without_behavior(up: bool, down_window: i64) -> Rules {
        if up {
            Rules {
                window: 0,
                select: Select::Max,
                policies: vec![(PolicyKind::DoubleOrFour, 0, 0)],
            }
        } else {
            Rules {
                window: down_window,
                select: Select::Max,
                policies: vec![(PolicyKind::Percent, 100, 0)],
            }
        }
    }

    fn longest_period(&self) -> i64 {
        self.policies.iter().map(|p| p.2).max().unwrap_or(0)
    }
}

/// Why a proposal was not taken as it was.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Held {
    ScaleUpStabilized,
    ScaleDownStabilized,
    ScaleUpLimit,
    ScaleDownLimit,
    TooManyReplicas,
    TooFewReplicas,
}

/// Stabilize `proposal` over the recommendations of the windows (the
/// lowest of the scale-up window, the highest of the scale-down window
/// bound it), then record it.
pub fn stabilize(
    history: &mut Vec<(DateTime<Utc>, i32)>,
    now: DateTime<Utc>,
    current: i32,
    proposal: i32,
    up: &Rules,
    down: &Rules,
) -> (i32, Option<Held>) {
    let up_cutoff = now - chrono::Duration::seconds(up.window);
    let down_cutoff = now - chrono::Duration::seconds(down.window);
    let mut up_bound = proposal;
    let mut down_bound = proposal;
    for (at, rec) in history.iter() {
        if *at > up_cutoff {
            up_bound = up_bound.min(*rec);
        }
        if *at > down_cutoff {
            down_bound = down_bound.max(*rec);
        }
    }
    let oldest = up_cutoff.min(down_cutoff);
    history.retain(|(at, _)| *at >= oldest);
    history.push((now, proposal));
    if history.len() > MAX_HISTORY {
        let cut = history.len() - MAX_HISTORY;
        history.drain(..cut);
    }
    let stabilized = current.max(up_bound).min(down_bound);
    let limit = if stabilized == proposal {
        None
    } else if stabilized > proposal {
        Some(Held::ScaleDownStabilized)
    } else {
        Some(Held::ScaleUpStabilized)
    };
    (stabilized, limit)
}

/// The replicas at the start of a policy's period: the changes made
/// within it, up and down, taken back (as Kubernetes counts them for both
/// directions' limits).
fn period_start(
    current: i64,
    events: &[(DateTime<Utc>, i32)],
    now: DateTime<Utc>,
    period: i64,
) -> i64 {
    let cutoff = now - chrono::Duration::seconds(period);
    let changed: i64 = events
        .iter()
        .filter(|(at, _)| *at > cutoff)
        .map(|(_, d)| i64::from(*d))
        .sum();
    current - changed
}

/// The most replicas the up policies allow now, given the changes made
/// within their periods.
fn up_limit(current: i32, events: &[(DateTime<Utc>, i32)], now: DateTime<Utc>, r: &Rules) -> i64 {
    let current = i64::from(current);
    if r.select == Select::Disabled {
        return current;
    }
    let mut out = if r.select == Select::Min {
        i64::MAX
    } else {
        i64::MIN
    };
    for &(kind, value, period) in &r.policies {
        let start = period_start(current, events, now, period);
        let proposed = match kind {
            PolicyKind::Pods => start + value,
            PolicyKind::Percent => (start as f64 * (1.0 + value as f64 / 100.0)).ceil() as i64,
            PolicyKind::DoubleOrFour => start.saturating_mul(2).max(4),
        };
        out = if r.select == Select::Min {
            out.min(proposed)
        } else {
            out.max(proposed)
        };
    }
    out
}

/// The fewest replicas the down policies allow now.
fn down_limit(current: i32, events: &[(DateTime<Utc>, i32)], now: DateTime<Utc>, r: &Rules) -> i64 {
    let current = i64::from(current);
    if r.select == Select::Disabled {
        return current;
    }
    let mut out = if r.select == Select::Min {
        i64::MIN
    } else {
        i64::MAX
    };
    for &(kind, value, period) in &r.policies {
        let start = period_start(current, events, now, period);
        let proposed = match kind {
            PolicyKind::Pods => start - value,
            PolicyKind::Percent => (start as f64 * (1.0 - value as f64 / 100.0)) as i64,
            PolicyKind::DoubleOrFour => 0,
        };
        // "Max" is the largest change: the fewest replicas.
        out = if r.select == Select::Min {
            out.max(proposed)
        } else {
            out.min(proposed)
        };
    }
    out
}

/// Apply the rate policies and the [min, max] bounds to `desired`.
pub fn limit_rate(
    current: i32,
    desired: i32,
    (min, max): (i32, i32),
    events: &[(DateTime<Utc>, i32)],
    now: DateTime<Utc>,
    up: &Rules,
    down: &Rules,
) -> (i32, Option<Held>) {
    if desired > current {
        let rate = up_limit(current, events, now, up).max(i64::from(current));
        let allowed = rate.min(i64::from(max)) as i32;
        if desired > allowed {
            let why = if rate < i64::from(max) {
                Held::ScaleUpLimit
            } else {
                Held::TooManyReplicas
            };
            return (allowed, Some(why));
        }
        (desired, None)
    } else if desired < current {
        let rate = down_limit(current, events, now, down).min(i64::from(current));
        let allowed = rate.max(i64::from(min)) as i32;
        if desired < allowed {
            let why = if rate > i64::from(min) {
                Held::ScaleDownLimit
            } else {
                Held::TooFewReplicas
            };
            return (allowed, Some(why));
        }
        (desired, None)
    } else if desired > max {
        (max, Some(Held::TooManyReplicas))
    } else if desired < min {
        (min, Some(Held::TooFewReplicas))
    } else {
        (desired, None)
    }
}

/// Record a change of the replica count for the rate policies, forgetting
/// changes older than every period.
pub fn record_change(
    events: &mut Vec<(DateTime<Utc>, i32)>,
    now: DateTime<Utc>,
    change: i32,
    up: &Rules,
    down: &Rules,
) {
    let keep = up.longest_period().max(down.longest_period());
    let cutoff = now - chrono::Duration::seconds(keep);
    events.retain(|(at, _)| *at > cutoff);
    events.push((now, change));
    if events.len() > MAX_HISTORY {
        let cut = events.len() - MAX_HISTORY;
        events.drain(..cut);
    }
}

/// The samples of `resource` for `pods`: usage from `usage` (pod name →
/// resource → milli), requests from the containers. A container without
/// a request fails a Utilization target, as in Kubernetes.
pub fn samples(
    pods: &[Pod],
    usage: &BTreeMap<String, BTreeMap<String, i64>>,
    resource: &str,
    need_requests: bool,
) -> Result<Vec<Sample>, String> {
    let mut out = Vec::with_capacity(pods.len());
    for pod in pods {
        let name = pod.name_any();
        let mut request = 0i64;
        for c in pod.spec.as_ref().map(|s| &s.containers[..]).unwrap_or(&[]) {
            let r = c
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get(resource))
                .and_then(|q| parse_milli(&q.0));
            match r {
                Some(r) => request = request.saturating_add(r.min(i64::MAX as i128) as i64),
                None if need_requests => {
                    return Err(format!(
                        "missing request for {resource} in container {} of Pod {name}",
                        c.name
                    ))
                }
                None => {}
            }
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        // A pending pod is unready whatever its metrics (as in Kubernetes):
        // it counts as using nothing on a scale-up and not at all otherwise.
        let pending = phase == Some("Pending");
        out.push(Sample {
            ignored: pod.metadata.deletion_timestamp.is_some() || phase == Some("Failed"),
            ready: !pending && (resource != "cpu" || is_ready(pod)),
            request,
            usage: if pending {
                Some(0)
            } else {
                usage.get(&name).and_then(|u| u.get(resource)).copied()
            },
        });
    }
    Ok(out)
}

/// Pod name → resource → usage (milli) from a PodMetrics list.
fn usage_of(list: &[DynamicObject]) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for m in list {
        let per = out.entry(m.name_any()).or_default();
        let containers = m.data.get("containers").and_then(|c| c.as_array());
        for c in containers.into_iter().flatten() {
            let Some(usage) = c.get("usage").and_then(|u| u.as_object()) else {
                continue;
            };
            for (res, q) in usage {
                if let Some(v) = milli_of(q) {
                    let v = v.clamp(0, i64::MAX as i128) as i64;
                    let e = per.entry(res.clone()).or_insert(0);
                    *e = e.saturating_add(v);
                }
            }
        }
    }
    out
}

/// Set a condition, keeping its transition time when its status stays.
fn set_condition(
    conditions: &mut Vec<HorizontalPodAutoscalerCondition>,
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
    now: &Time,
) {
    let status = if ok { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(now.clone());
            }
            c.status = status.into();
            c.reason = Some(reason.into());
            c.message = Some(message);
        }
        None => conditions.push(HorizontalPodAutoscalerCondition {
            type_: kind.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_transition_time: Some(now.clone()),
        }),
    }
}

/// Whether the last status already reported this failure: its warning
/// events are recorded once per change, not on every sync (Kubernetes'
/// recorder folds repeats into one event's count).
fn reported(
    before: &HorizontalPodAutoscalerStatus,
    kind: &str,
    reason: &str,
    message: &str,
) -> bool {
    before.conditions.iter().flatten().any(|c| {
        c.type_ == kind
            && c.status == "False"
            && c.reason.as_deref() == Some(reason)
            && c.message.as_deref() == Some(message)
    })
}

/// The served resource a scaleTargetRef names.
async fn target_resource(ctx: &Ctx, api_version: &str, kind: &str) -> Option<ApiResource> {
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let known = |g: &str, k: &str| -> Option<ApiResource> {
        let (group, plural) = match (g, k) {
            ("apps", "Deployment") => ("apps", "deployments"),
            ("apps", "ReplicaSet") => ("apps", "replicasets"),
            ("apps", "StatefulSet") => ("apps", "statefulsets"),
            ("", "ReplicationController") => ("", "replicationcontrollers"),
            _ => return None,
        };
        let version = "v1";
        Some(ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: if group.is_empty() {
                version.into()
            } else {
                format!("{group}/{version}")
            },
            kind: k.into(),
            plural: plural.into(),
        })
    };
    if let Some(r) = known(group, kind) {
        return Some(r);
    }
    let all = crate::namespace::namespaced_resources(ctx).await.ok()?;
    all.iter()
        .find(|r| {
            r.group == group && r.kind == kind && (version.is_empty() || r.version == version)
        })
        .or_else(|| all.iter().find(|r| r.group == group && r.kind == kind))
        .cloned()
}

/// A metric's description in events and conditions, as Kubernetes words it.
fn describe(resource: &str, utilization: bool) -> String {
    if utilization {
        format!("{resource} resource utilization (percentage of request)")
    } else {
        format!("{resource} resource")
    }
}

/// Result of one metric: its proposal, status entry and description.
type Computed = Result<(i32, MetricStatus, String), String>;

fn compute_metric(
    current: i32,
    spec: &MetricSpec,
    pods: &[Pod],
    usage: &BTreeMap<String, BTreeMap<String, i64>>,
) -> Computed {
    let Some(src) = spec.resource.as_ref().filter(|_| spec.type_ == "Resource") else {
        return Err(format!(
            "metrics of type {} are not served by this autoscaler (only Resource)",
            spec.type_
        ));
    };
    let name = src.name.as_str();
    let target = match (&src.target.average_utilization, &src.target.average_value) {
        (Some(u), _) => Target::Utilization(i64::from(*u)),
        (None, Some(v)) => Target::AverageValue(
            parse_milli(&v.0)
                .filter(|v| *v > 0)
                .map(|v| v.min(i64::MAX as i128) as i64)
                .ok_or_else(|| format!("invalid averageValue {}", v.0))?,
        ),
        _ => return Err(format!("invalid target for {name}")),
    };
    let utilization = matches!(target, Target::Utilization(_));
    let what = if utilization {
        format!("{name} utilization")
    } else {
        format!("{name} usage")
    };
    let fail = |e: String| format!("failed to get {what}: {e}");
    let samples = samples(pods, usage, name, utilization).map_err(fail)?;
    let p = replicas_for(current, &samples, target, TOLERANCE).map_err(fail)?;
    let status = MetricStatus {
        type_: "Resource".into(),
        resource: Some(ResourceMetricStatus {
            name: name.into(),
            current: MetricValueStatus {
                average_utilization: p.utilization.map(|u| u.clamp(0, i32::MAX as i64) as i32),
                average_value: Some(Quantity(format_milli(i128::from(p.average), name != "cpu"))),
                value: None,
            },
        }),
        ..Default::default()
    };
    Ok((p.replicas, status, describe(name, utilization)))
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let Some(hpa) = ctx.hpas.get(Some(ns), name) else {
        lock(&ctx.hpa_states).remove(&key);
        return Ok(Requeue::Done);
    };
    let period = ctx.config.hpa_sync_period;
    let period_chrono = chrono::Duration::from_std(period).unwrap_or(chrono::Duration::seconds(15));
    let now = ctx.config.clock.now();
    let generation = hpa.metadata.generation;
    // Once per sync period (and at once when the spec changes), not on
    // every status write of its own.
    if let Some((at, gen)) = lock(&ctx.hpa_states).get(&key).and_then(|s| s.last_sync) {
        let since = now - at;
        let slack = chrono::Duration::milliseconds(500);
        if gen == generation && since + slack < period_chrono && since >= chrono::Duration::zero() {
            let left = (period_chrono - since).to_std().unwrap_or(period);
            return Ok(Requeue::After(left));
        }
    }
    lock(&ctx.hpa_states)
        .entry(key.clone())
        .or_default()
        .last_sync = Some((now, generation));

    let stamp = Time(
        k8s_openapi::jiff::Timestamp::from_millisecond(now.timestamp_millis())
            .unwrap_or_else(|_| crate::util::now()),
    );
    let spec = hpa.spec.clone().unwrap_or_default();
    let before = hpa.status.clone().unwrap_or_default();
    let mut status = HorizontalPodAutoscalerStatus {
        observed_generation: generation,
        ..before.clone()
    };
    let mut conditions = status.conditions.take().unwrap_or_default();
    let reference = &spec.scale_target_ref;
    let min = spec.min_replicas.unwrap_or(1);
    let max = spec.max_replicas;
    let down_window = ctx.config.hpa_downscale_stabilization.as_secs() as i64;
    let (up_rules, down_rules) = match spec.behavior.as_ref() {
        Some(b) => (
            Rules::of(b.scale_up.as_ref(), true, down_window),
            Rules::of(b.scale_down.as_ref(), false, down_window),
        ),
        None => (
            Rules::without_behavior(true, down_window),
            Rules::without_behavior(false, down_window),
        ),
    };

    let resource = target_resource(
        &ctx,
        reference.api_version.as_deref().unwrap_or(""),
        &reference.kind,
    )
    .await;
    let scale = match resource {
        None => Err(format!(
            "no resource of kind {} in {}",
            reference.kind,
            reference.api_version.as_deref().unwrap_or("")
        )),
        Some(ar) => Api::<DynamicObject>::namespaced_with(ctx.client.clone(), ns, &ar)
            .get_scale(&reference.name)
            .await
            .map(|s| (ar, s))
            .map_err(|e| e.to_string()),
    };
    let (ar, scale) = match scale {
        Ok(s) => s,
        Err(e) => {
            let msg =
                format!("the HPA controller was unable to get the target's current scale: {e}");
            if !reported(&before, "AbleToScale", "FailedGetScale", &msg) {
                ctx.recorder.record(hpa.as_ref(), true, "FailedGetScale", e);
            }
            set_condition(
                &mut conditions,
                "AbleToScale",
                false,
                "FailedGetScale",
                msg,
                &stamp,
            );
            status.conditions = Some(conditions);
            write_status(&ctx, &hpa, ns, status, &before).await?;
            return Ok(Requeue::After(period));
        }
    };
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    status.current_replicas = Some(scale.status.as_ref().map_or(0, |s| s.replicas));
    let selector = scale
        .status
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();

    let mut reason = String::new();
    let mut limit = None;
    let desired = if current == 0 && min != 0 {
        set_condition(
            &mut conditions,
            "ScalingActive",
            false,
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero".into(),
            &stamp,
        );
        0
    } else if current > max {
        reason = "Current number of replicas above Spec.MaxReplicas".into();
        limit = Some(Held::TooManyReplicas);
        max
    } else if current < min {
        reason = "Current number of replicas below Spec.MinReplicas".into();
        limit = Some(Held::TooFewReplicas);
        min
    } else if selector.is_empty() {
        let msg = "the HPA target's scale is missing a selector";
        if !reported(&before, "ScalingActive", "InvalidSelector", msg) {
            ctx.recorder.record(
                hpa.as_ref(),
                true,
                "SelectorRequired",
                "selector is required".into(),
            );
        }
        set_condition(
            &mut conditions,
            "ScalingActive",
            false,
            "InvalidSelector",
            "the HPA target's scale is missing a selector".into(),
            &stamp,
        );
        current
    } else {
        let lp = ListParams::default()
            .labels(&selector)
            .limit(MAX_PODS as u32);
        let pods: Vec<Pod> = match Api::<Pod>::namespaced(ctx.client.clone(), ns)
            .list(&lp)
            .await
        {
            Ok(l) => l.items,
            Err(e) => return Err(e.into()),
        };
        let metrics_ar = ApiResource {
            group: "metrics.k8s.io".into(),
            version: "v1beta1".into(),
            api_version: "metrics.k8s.io/v1beta1".into(),
            kind: "PodMetrics".into(),
            plural: "pods".into(),
        };
        let usage = match Api::<DynamicObject>::namespaced_with(ctx.client.clone(), ns, &metrics_ar)
            .list(&ListParams::default().labels(&selector))
            .await
        {
            Ok(l) => Ok(usage_of(&l.items)),
            Err(e) => Err(format!(
                "unable to fetch metrics from resource metrics API: {e}"
            )),
        };
        let specs = spec.metrics.clone().unwrap_or_default();
        let mut proposal: Option<(i32, String)> = None;
        let mut current_metrics = Vec::new();
        let mut errors = Vec::new();
        for m in &specs {
            let computed = match &usage {
                Ok(usage) => compute_metric(current, m, &pods, usage),
                // The metrics API failing is what the user should read,
                // not "no metrics for the pods".
                Err(e) => Err(
                    match m.resource.as_ref().filter(|_| m.type_ == "Resource") {
                        Some(r) => format!("unable to get metrics for resource {}: {e}", r.name),
                        None => e.clone(),
                    },
                ),
            };
            match computed {
                Ok((replicas, st, what)) => {
                    current_metrics.push(st);
                    if proposal.as_ref().is_none_or(|(r, _)| replicas > *r) {
                        proposal = Some((replicas, what));
                    }
                }
                Err(e) => {
                    // An empty status keeps the metrics' positions, which
                    // kubectl and the TARGETS column pair with the spec's.
                    current_metrics.push(MetricStatus {
                        type_: String::new(),
                        ..Default::default()
                    });
                    errors.push(e);
                }
            }
        }
        status.current_metrics = (!current_metrics.is_empty()).then_some(current_metrics);
        // No proposal, or one that would scale down while a metric could
        // not be read: keep the current count.
        let unusable = match &proposal {
            None => true,
            Some((r, _)) => !errors.is_empty() && *r < current,
        };
        if let Some(first) = errors.first() {
            let msg = format!("the HPA was unable to compute the replica count: {first}");
            if !reported(&before, "ScalingActive", "FailedGetResourceMetric", &msg) {
                ctx.recorder
                    .record(hpa.as_ref(), true, "FailedGetResourceMetric", first.clone());
                ctx.recorder.record(
                    hpa.as_ref(),
                    true,
                    "FailedComputeMetricsReplicas",
                    format!(
                        "invalid metrics ({} invalid out of {}), first error is: {first}",
                        errors.len(),
                        specs.len()
                    ),
                );
            }
            set_condition(
                &mut conditions,
                "ScalingActive",
                false,
                "FailedGetResourceMetric",
                msg,
                &stamp,
            );
        }
        match proposal {
            Some((replicas, what)) if !unusable => {
                if errors.is_empty() {
                    set_condition(
                        &mut conditions,
                        "ScalingActive",
                        true,
                        "ValidMetricFound",
                        format!("the HPA was able to successfully calculate a replica count from {what}"),
                        &stamp,
                    );
                }
                // Kubernetes names the metric on a scale-up only.
                reason = if replicas > current {
                    format!("{what} above target")
                } else {
                    "All metrics below target".into()
                };
                let mut states = lock(&ctx.hpa_states);
                let st = states.entry(key.clone()).or_default();
                let (stable, why) = stabilize(
                    &mut st.recommendations,
                    now,
                    current,
                    replicas,
                    &up_rules,
                    &down_rules,
                );
                let (bounded, rate_why) = limit_rate(
                    current,
                    stable,
                    (min, max),
                    &st.events,
                    now,
                    &up_rules,
                    &down_rules,
                );
                limit = rate_why.or(why);
                bounded
            }
            _ => current,
        }
    };

    // AbleToScale and ScalingLimited follow the decision.
    match limit {
        Some(Held::ScaleDownStabilized) => set_condition(
            &mut conditions,
            "AbleToScale",
            true,
            "ScaleDownStabilized",
            "recent recommendations were higher than current one, applying the highest recent recommendation".into(),
            &stamp,
        ),
        Some(Held::ScaleUpStabilized) => set_condition(
            &mut conditions,
            "AbleToScale",
            true,
            "ScaleUpStabilized",
            "recent recommendations were lower than current one, applying the lowest recent recommendation".into(),
            &stamp,
        ),
        _ => set_condition(
            &mut conditions,
            "AbleToScale",
            true,
            "ReadyForNewScale",
            "recommended size matches current size".into(),
            &stamp,
        ),
    }
    let (limited, why, message) = match limit {
        Some(Held::TooManyReplicas) => (
            true,
            "TooManyReplicas",
            "the desired replica count is more than the maximum replica count",
        ),
        Some(Held::TooFewReplicas) => (
            true,
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count",
        ),
        Some(Held::ScaleUpLimit) => (
            true,
            "ScaleUpLimit",
            "the desired replica count is increasing faster than the maximum scale rate",
        ),
        Some(Held::ScaleDownLimit) => (
            true,
            "ScaleDownLimit",
            "the desired replica count is decreasing faster than the maximum scale rate",
        ),
        _ => (
            false,
            "DesiredWithinRange",
            "the desired count is within the acceptable range",
        ),
    };
    set_condition(
        &mut conditions,
        "ScalingLimited",
        limited,
        why,
        message.into(),
        &stamp,
    );

    if desired != current {
        let api = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), ns, &ar);
        let patch = json!({"spec": {"replicas": desired}});
        match api
            .patch_scale(
                &reference.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(
                    "{key}: {} {} → {desired} ({reason})",
                    reference.kind,
                    reference.name
                );
                ctx.recorder.record(
                    hpa.as_ref(),
                    false,
                    "SuccessfulRescale",
                    format!("New size: {desired}; reason: {reason}"),
                );
                set_condition(
                    &mut conditions,
                    "AbleToScale",
                    true,
                    "SucceededRescale",
                    format!("the HPA controller was able to update the target scale to {desired}"),
                    &stamp,
                );
                status.last_scale_time = Some(stamp.clone());
                let mut states = lock(&ctx.hpa_states);
                let st = states.entry(key.clone()).or_default();
                record_change(
                    &mut st.events,
                    now,
                    desired - current,
                    &up_rules,
                    &down_rules,
                );
            }
            Err(e) => {
                ctx.recorder.record(
                    hpa.as_ref(),
                    true,
                    "FailedRescale",
                    format!("New size: {desired}; reason: {reason}; error: {e}"),
                );
                set_condition(
                    &mut conditions,
                    "AbleToScale",
                    false,
                    "FailedUpdateScale",
                    format!("the HPA controller was unable to update the target scale: {e}"),
                    &stamp,
                );
                status.desired_replicas = current;
                status.conditions = Some(conditions);
                write_status(&ctx, &hpa, ns, status, &before).await?;
                return Ok(Requeue::After(period));
            }
        }
    }
    status.desired_replicas = desired;
    status.conditions = Some(conditions);
    write_status(&ctx, &hpa, ns, status, &before).await?;
    Ok(Requeue::After(period))
}

async fn write_status(
    ctx: &Ctx,
    hpa: &HorizontalPodAutoscaler,
    ns: &str,
    status: HorizontalPodAutoscalerStatus,
    before: &HorizontalPodAutoscalerStatus,
) -> anyhow::Result<()> {
    if &status == before {
        return Ok(());
    }
    let mut next = hpa.clone();
    next.status = Some(status);
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    match api
        .replace_status(&hpa.name_any(), &PostParams::default(), &next)
        .await
    {
        Ok(_) => Ok(()),
        // Changed meanwhile: the next sync writes it again.
        Err(e) if is_status(&e, 409) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;

    fn start() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-10T07:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn pod(usage: Option<i64>) -> Sample {
        Sample {
            ignored: false,
            ready: true,
            request: 100,
            usage,
        }
    }

    #[test]
    fn utilization_ratio_and_tolerance() {
        let at = |u: i64, n: usize| vec![pod(Some(u)); n];
        // 2 pods at 100% of a 50% target: 4 pods.
        let p = replicas_for(2, &at(100, 2), Target::Utilization(50), TOLERANCE).unwrap();
        assert_eq!((p.replicas, p.utilization, p.average), (4, Some(100), 100));
        // 54% against 50% is within the tolerance: unchanged.
        let p = replicas_for(3, &at(54, 3), Target::Utilization(50), TOLERANCE).unwrap();
        assert_eq!(p.replicas, 3);
        // 56% is not: ceil(1.12 × 3) = 4.
        let p = replicas_for(3, &at(56, 3), Target::Utilization(50), TOLERANCE).unwrap();
        assert_eq!(p.replicas, 4);
        // Idle pods scale down: ceil(0.1 × 4) = 1.
        let p = replicas_for(4, &at(5, 4), Target::Utilization(50), TOLERANCE).unwrap();
        assert_eq!(p.replicas, 1);
        // Average value: 300m per pod against 100m: three times the pods.
        let p = replicas_for(2, &at(300, 2), Target::AverageValue(100), TOLERANCE).unwrap();
        assert_eq!((p.replicas, p.utilization, p.average), (6, None, 300));
    }

    #[test]
    fn missing_and_unready_pods_damp_the_change() {
        // Scale-down with a pod lacking metrics: it counts as 100%, so
        // 2 idle + 1 unknown gives ceil(((0+0+100)/300)/0.5 × 3) = 2, not 1.
        let samples = vec![pod(Some(0)), pod(Some(0)), pod(None)];
        let p = replicas_for(3, &samples, Target::Utilization(50), TOLERANCE).unwrap();
        assert_eq!(p.replicas, 2);
        // Only missing metrics besides one pod at target: nothing moves.
        let samples = vec![pod(Some(50)), pod(None), pod(None)];
        assert_eq!(
            replicas_for(3, &samples, Target::Utilization(50), TOLERANCE)
                .unwrap()
                .replicas,
            3
        );
        // Scale-up with missing metrics: they count as 0%: 200% on one pod
        // of two is 100% of the two → 4.
        let samples = vec![pod(Some(200)), pod(None)];
        let p = replicas_for(2, &samples, Target::Utilization(50), TOLERANCE).unwrap();
        assert_eq!(p.replicas, 4);
        // An unready pod on a scale-up counts as 0%.
        let mut unready = pod(Some(500));
        unready.ready = false;
        let samples = vec![pod(Some(100)), unready];
        let p = replicas_for(2, &samples, Target::Utilization(50), TOLERANCE).unwrap();
        assert_eq!(p.replicas, 2, "(100+0)/200 = 50%: at target");
        // No metrics at all: an error, never a scale-down.
        assert!(replicas_for(3, &[pod(None)], Target::Utilization(50), TOLERANCE).is_err());
        assert!(replicas_for(3, &[], Target::Utilization(50), TOLERANCE).is_err());
        // Ignored pods do not count.
        let mut gone = pod(Some(1000));
        gone.ignored = true;
        let p = replicas_for(
            1,
            &[pod(Some(50)), gone],
            Target::Utilization(50),
            TOLERANCE,
        )
        .unwrap();
        assert_eq!(p.replicas, 1);
    }

    #[test]
    fn a_missing_request_fails_utilization() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [{"name": "burn", "image": "busybox"}]},
            "status": {"phase": "Running"}}))
        .unwrap();
        let usage = BTreeMap::from([(
            "web-1".to_string(),
            BTreeMap::from([("cpu".to_string(), 50)]),
        )]);
        assert_eq!(
            samples(std::slice::from_ref(&p), &usage, "cpu", true).unwrap_err(),
            "missing request for cpu in container burn of Pod web-1"
        );
        let s = samples(&[p], &usage, "cpu", false).unwrap();
        assert_eq!(s[0].usage, Some(50));
        assert!(!s[0].ready, "no Ready condition");
    }

    #[test]
    fn pending_pods_hold_a_scale_up_back_and_never_cause_a_scale_down() {
        let pod = |name: &str, phase: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"containers": [{"name": "c", "image": "busybox",
                    "resources": {"requests": {"cpu": "100m"}}}]},
                "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True"}]}}))
            .unwrap()
        };
        let pods = [
            pod("a", "Running"),
            pod("b", "Running"),
            pod("c", "Pending"),
            pod("d", "Pending"),
        ];
        let usage = BTreeMap::from([
            ("a".to_string(), BTreeMap::from([("cpu".to_string(), 75)])),
            ("b".to_string(), BTreeMap::from([("cpu".to_string(), 75)])),
        ]);
        let s = samples(&pods, &usage, "cpu", true).unwrap();
        assert!(s[2..].iter().all(|s| !s.ready && !s.ignored));
        // 150% of a 50% target on the two running pods, two pending: counted
        // as idle, (75+75)/400 = 37.5%: below target while the load is
        // above it, so nothing moves (dropping them would give 3 of 4).
        let p = replicas_for(4, &s, Target::Utilization(50), TOLERANCE).unwrap();
        assert_eq!(p.replicas, 4);
    }

    #[test]
    fn scale_down_waits_for_the_window() {
        let clock = Clock::manual(start());
        let up = Rules::of(None, true, 300);
        let mut down = Rules::of(None, false, 300);
        down.window = 60;
        let mut history = Vec::new();
        // High recommendations, then low ones: held at the highest of the
        // last 60 s, then let go.
        assert_eq!(
            stabilize(&mut history, clock.now(), 1, 5, &up, &down),
            (5, None)
        );
        clock.advance(chrono::Duration::seconds(15));
        assert_eq!(
            stabilize(&mut history, clock.now(), 5, 1, &up, &down),
            (5, Some(Held::ScaleDownStabilized))
        );
        clock.advance(chrono::Duration::seconds(30));
        assert_eq!(stabilize(&mut history, clock.now(), 5, 1, &up, &down).0, 5);
        clock.advance(chrono::Duration::seconds(30));
        assert_eq!(
            stabilize(&mut history, clock.now(), 5, 1, &up, &down),
            (1, None)
        );
        assert!(history.len() <= 4, "old recommendations are dropped");
        // A scale-up window holds scale-ups at the lowest recent one.
        let mut up = up;
        up.window = 60;
        let mut history = vec![(clock.now(), 2)];
        clock.advance(chrono::Duration::seconds(15));
        assert_eq!(
            stabilize(&mut history, clock.now(), 2, 6, &up, &down),
            (2, Some(Held::ScaleUpStabilized))
        );
    }

    #[test]
    fn without_behavior_scale_up_doubles_or_adds_to_four() {
        let clock = Clock::manual(start());
        let up = Rules::without_behavior(true, 300);
        let down = Rules::without_behavior(false, 300);
        let now = clock.now();
        assert_eq!(
            limit_rate(1, 20, (1, 50), &[], now, &up, &down),
            (4, Some(Held::ScaleUpLimit))
        );
        assert_eq!(
            limit_rate(3, 20, (1, 50), &[], now, &up, &down),
            (6, Some(Held::ScaleUpLimit))
        );
        // A change just made does not hold the next one back.
        assert_eq!(
            limit_rate(6, 20, (1, 50), &[(now, 3)], now, &up, &down),
            (12, Some(Held::ScaleUpLimit))
        );
        // Down: straight to the proposal, bounded by min only.
        assert_eq!(limit_rate(10, 2, (1, 50), &[], now, &up, &down), (2, None));
        assert_eq!(down.window, 300);
    }

    #[test]
    fn both_directions_count_against_a_period() {
        let clock = Clock::manual(start());
        let up = Rules::of(None, true, 0);
        let down = Rules::of(None, false, 0);
        let now = clock.now();
        // 10 → 5 a moment ago: the period started at 10, so up to 20.
        assert_eq!(
            limit_rate(5, 40, (1, 50), &[(now, -5)], now, &up, &down),
            (20, Some(Held::ScaleUpLimit))
        );
    }

    #[test]
    fn rate_policies_limit_each_period() {
        let clock = Clock::manual(start());
        let up = Rules::of(None, true, 300);
        let down = Rules::of(None, false, 300);
        let mut events = Vec::new();
        // Default up: max(+4 pods, +100%) per 15 s: 1 → 5, then 5 → 10.
        assert_eq!(
            limit_rate(1, 20, (1, 50), &events, clock.now(), &up, &down),
            (5, Some(Held::ScaleUpLimit))
        );
        record_change(&mut events, clock.now(), 4, &up, &down);
        clock.advance(chrono::Duration::seconds(5));
        // Within the same period the change already made counts.
        assert_eq!(
            limit_rate(5, 20, (1, 50), &events, clock.now(), &up, &down),
            (5, Some(Held::ScaleUpLimit))
        );
        clock.advance(chrono::Duration::seconds(11));
        assert_eq!(
            limit_rate(5, 20, (1, 50), &events, clock.now(), &up, &down),
            (10, Some(Held::ScaleUpLimit))
        );
        // maxReplicas bounds it.
        assert_eq!(
            limit_rate(5, 20, (1, 8), &events, clock.now(), &up, &down),
            (8, Some(Held::TooManyReplicas))
        );
        // A Pods policy of 1 per 60 s with Min.
        let slow = Rules {
            window: 0,
            select: Select::Min,
            policies: vec![(PolicyKind::Pods, 1, 60), (PolicyKind::Percent, 100, 15)],
        };
        assert_eq!(
            limit_rate(4, 1, (1, 10), &[], clock.now(), &up, &slow),
            (3, Some(Held::ScaleDownLimit))
        );
        // Disabled: no change in that direction.
        let off = Rules {
            select: Select::Disabled,
            ..Rules::of(None, false, 300)
        };
        assert_eq!(
            limit_rate(4, 1, (1, 10), &[], clock.now(), &up, &off),
            (4, Some(Held::ScaleDownLimit))
        );
        // Default down: 100% per 15 s, floored at minReplicas.
        assert_eq!(
            limit_rate(4, 0, (2, 10), &[], clock.now(), &up, &down),
            (2, Some(Held::TooFewReplicas))
        );
    }

    #[test]
    fn rules_come_from_the_spec_or_kubernetes_defaults() {
        assert_eq!(Rules::of(None, false, 120).window, 120);
        let spec: HPAScalingRules = serde_json::from_value(json!({
            "stabilizationWindowSeconds": 10, "selectPolicy": "Min",
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}]}))
        .unwrap();
        assert_eq!(
            Rules::of(Some(&spec), false, 300),
            Rules {
                window: 10,
                select: Select::Min,
                policies: vec![(PolicyKind::Pods, 2, 30)],
            }
        );
    }

    #[test]
    fn pod_metrics_are_summed_per_pod() {
        let list: Vec<DynamicObject> = serde_json::from_value(json!([
            {"apiVersion": "metrics.k8s.io/v1beta1", "kind": "PodMetrics",
             "metadata": {"name": "a"}, "containers": [
                {"name": "x", "usage": {"cpu": "250m", "memory": "1Mi"}},
                {"name": "y", "usage": {"cpu": "1", "memory": "bogus"}}]}]))
        .unwrap();
        let u = usage_of(&list);
        assert_eq!(u["a"]["cpu"], 1250);
        assert_eq!(u["a"]["memory"], 1024 * 1024 * 1000);
    }
}
