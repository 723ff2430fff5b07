//! Disruption controller: keeps each PodDisruptionBudget's status — the
//! pods it expects, how many must stay healthy, how many are, and so how
//! many may be evicted now. Percentages and `maxUnavailable` are taken of
//! the replicas the pods' controllers want (a Deployment through its
//! ReplicaSet, a ReplicaSet, ReplicationController or StatefulSet); a
//! count in `minAvailable` needs no controller. Pods an eviction let go
//! (`status.disruptedPods`) do not count as healthy until they are gone or
//! two minutes have passed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use serde_json::json;

use crate::replicaset::Replicated;
use crate::util::{controller_ref, is_ready, is_terminating, now, scaled};
use crate::Ctx;
use tapestry_runtime::disruption::{covers, DISRUPTION_TIMEOUT_SECS};
use tapestry_runtime::{is_status, key_of, split_key, Queue, Requeue};

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.budgets.on_change(move |b, _| q.add(key_of(b)));
    let q = queue.clone();
    let budgets = ctx.budgets.clone();
    ctx.pods.on_change(move |p, _| {
        let ns = p.namespace().unwrap_or_default();
        for b in budgets.list_in(&ns, |b| covers(b, p.labels())) {
            q.add(key_of(b.as_ref()));
        }
    });
}

/// The replicas the controller of `pod` wants, and that controller's
/// identity (so each counts once); a pod without one counts as itself.
fn scale_of(ctx: &Ctx, ns: &str, pod: &Pod) -> (String, i32) {
    let own = (format!("Pod/{}", pod.name_any()), 1);
    let Some(owner) = controller_ref(pod) else {
        return own;
    };
    let replicas = match owner.kind.as_str() {
        "ReplicaSet" => ctx.replicasets.get(Some(ns), &owner.name).map(|rs| {
            // A Deployment's ReplicaSets come and go in a rollout: the
            // Deployment's own count is the one that holds.
            let deployment = controller_ref(rs.as_ref())
                .filter(|d| d.kind == "Deployment")
                .and_then(|d| ctx.deployments.get(Some(ns), &d.name));
            match deployment {
                Some(d) => (
                    format!("Deployment/{}", d.name_any()),
                    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                ),
                None => (format!("ReplicaSet/{}", owner.name), rs.replicas()),
            }
        }),
        "ReplicationController" => {
            ctx.replicationcontrollers
                .get(Some(ns), &owner.name)
                .map(|rc| {
                    (
                        format!("ReplicationController/{}", owner.name),
                        rc.replicas(),
                    )
                })
        }
        "StatefulSet" => ctx.statefulsets.get(Some(ns), &owner.name).map(|s| {
            (
                format!("StatefulSet/{}", owner.name),
                s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            )
        }),
        _ => None,
    };
    replicas.unwrap_or(own)
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let Some(budget) = ctx.budgets.get(Some(ns), name) else {
        return Ok(Requeue::Done);
    };
    let spec = budget.spec.clone().unwrap_or_default();
    let pods = ctx.pods.list_in(ns, |p| covers(&budget, p.labels()));
    let expected_by_controllers = || -> i32 {
        let scales: BTreeMap<String, i32> = pods.iter().map(|p| scale_of(&ctx, ns, p)).collect();
        scales.values().sum()
    };
    let (expected, desired) = match (&spec.max_unavailable, &spec.min_available) {
        (Some(max), _) => {
            let expected = expected_by_controllers();
            let max = scaled(Some(max), expected, true, 0);
            (expected, (expected - max).max(0))
        }
        (None, Some(IntOrString::Int(n))) => (pods.len() as i32, *n),
        (None, Some(min)) => {
            let expected = expected_by_controllers();
            (expected, scaled(Some(min), expected, true, 0))
        }
        (None, None) => (pods.len() as i32, 0),
    };

    // Evicted pods stay disrupted until they are gone or time out.
    let t = now();
    let present: BTreeSet<String> = pods.iter().map(|p| p.name_any()).collect();
    let mut status = budget.status.clone().unwrap_or_default();
    let disrupted: BTreeMap<String, _> = status
        .disrupted_pods
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(pod, at)| {
            present.contains(pod) && t.as_second() - at.0.as_second() < DISRUPTION_TIMEOUT_SECS
        })
        .collect();
    let healthy = pods
        .iter()
        .filter(|p| {
            is_ready(p) && !is_terminating(p.as_ref()) && !disrupted.contains_key(&p.name_any())
        })
        .count() as i32;
    let allowed = if expected > 0 {
        (healthy - desired).max(0)
    } else {
        0
    };

    let before = serde_json::to_value(&status)?;
    status.observed_generation = budget.metadata.generation;
    status.expected_pods = expected;
    status.desired_healthy = desired;
    status.current_healthy = healthy;
    status.disruptions_allowed = allowed;
    let next_check = disrupted
        .values()
        .map(|at| DISRUPTION_TIMEOUT_SECS - (t.as_second() - at.0.as_second()))
        .min();
    status.disrupted_pods = (!disrupted.is_empty()).then_some(disrupted);
    let (condition, reason, message) = if allowed > 0 {
        ("True", "SufficientPods", "")
    } else {
        ("False", "InsufficientPods", "")
    };
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    match conditions
        .iter_mut()
        .find(|c| c.type_ == "DisruptionAllowed")
    {
        Some(c) if c.status == condition && c.reason == reason => {
            c.observed_generation = budget.metadata.generation;
        }
        Some(c) => {
            c.status = condition.into();
            c.reason = reason.into();
            c.message = message.into();
            c.last_transition_time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t);
            c.observed_generation = budget.metadata.generation;
        }
        None => conditions.push(serde_json::from_value(json!({
            "type": "DisruptionAllowed", "status": condition, "reason": reason,
            "message": message, "lastTransitionTime": t.to_string(),
            "observedGeneration": budget.metadata.generation,
        }))?),
    }
    if serde_json::to_value(&status)? != before {
        // A replace pinned to the version read: an eviction that spent a
        // disruption in between makes this a conflict, and the next pass
        // counts its pod as disrupted.
        let mut next = budget.as_ref().clone();
        next.status = Some(status);
        let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
        match api
            .replace_status(name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => return Ok(Requeue::After(Duration::from_millis(100))),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(match next_check {
        Some(secs) => Requeue::After(Duration::from_secs(secs.max(1) as u64)),
        None => Requeue::Done,
    })
}
