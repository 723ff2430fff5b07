//! Node lifecycle: a node whose kubelet stopped heartbeating (neither its
//! Lease nor its Ready condition renewed within the grace period) turns
//! Ready=Unknown and gets the `node.kubernetes.io/unreachable` taints
//! (`not-ready` when the kubelet reports Ready=False); its pods are marked
//! not ready. Pods on a node with NoExecute taints they do not tolerate, or
//! tolerate only for `tolerationSeconds`, are evicted when that time is up,
//! so their controllers start replacements elsewhere.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use tapestry_runtime::ignore_not_found;

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

fn ready_status(n: &Node) -> Option<String> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// The newest sign of life: Lease renewal or Ready heartbeat.
fn last_heartbeat(ctx: &Ctx, n: &Node) -> Option<Timestamp> {
    let lease = ctx
        .leases
        .get(Some("kube-node-lease"), &n.name_any())
        .and_then(|l| l.spec.as_ref()?.renew_time.as_ref().map(|t| t.0));
    let status = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0));
    lease.max(status)
}

pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let started = Timestamp::now();
    let grace = ctx.config.node_monitor_grace_period;
    let mut tick = tokio::time::interval(ctx.config.node_monitor_period);
    // Nodes marked unreachable by this process, and when (for events).
    let mut marked: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Timestamp::now();
        for node in ctx.nodes.store.state() {
            if let Err(e) = monitor(&ctx, &node, now, started, grace, &mut marked).await {
                tracing::debug!(node = %node.name_any(), "node lifecycle: {e}");
            }
            if let Err(e) = evict(&ctx, &node, now).await {
                tracing::debug!(node = %node.name_any(), "taint eviction: {e}");
            }
        }
    }
}

async fn monitor(
    ctx: &Ctx,
    node: &Node,
    now: Timestamp,
    started: Timestamp,
    grace: Duration,
    marked: &mut HashMap<String, Instant>,
) -> anyhow::Result<()> {
    let name = node.name_any();
    let api: Api<Node> = Api::all(ctx.client.clone());
    // A controller that just took over gives every node a full grace period.
    let last = last_heartbeat(ctx, node).unwrap_or(started).max(started);
    let silent = now.as_millisecond() - last.as_millisecond() > grace.as_millis() as i64;
    let ready = ready_status(node);
    if silent && ready.as_deref() != Some("Unknown") {
        let conditions: Vec<serde_json::Value> = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let mut v = serde_json::to_value(&c).unwrap_or_default();
                v["status"] = json!("Unknown");
                v["reason"] = json!("NodeStatusUnknown");
                v["message"] = json!("Kubelet stopped posting node status.");
                v["lastTransitionTime"] = json!(now.to_string());
                v
            })
            .collect();
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conditions}})),
        )
        .await?;
        marked.insert(name.clone(), Instant::now());
        ctx.recorder.record(
            node,
            false,
            "NodeNotReady",
            format!("Node {name} status is now: NodeNotReady"),
        );
        mark_pods_not_ready(ctx, &name).await;
        return Ok(());
    }
    // The taints follow the Ready condition.
    let wanted: Option<&str> = match ready.as_deref() {
        Some("True") => None,
        Some("False") => Some(NOT_READY),
        _ if silent || ready.as_deref() == Some("Unknown") => Some(UNREACHABLE),
        _ => None,
    };
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let ours = |t: &Taint| t.key == UNREACHABLE || t.key == NOT_READY;
    let have: Vec<&Taint> = taints.iter().filter(|t| ours(t)).collect();
    let matches = match wanted {
        None => have.is_empty(),
        Some(k) => have.len() == 2 && have.iter().all(|t| t.key == k),
    };
    if !matches {
        let mut next: Vec<Taint> = taints.iter().filter(|t| !ours(t)).cloned().collect();
        if let Some(k) = wanted {
            for effect in ["NoSchedule", "NoExecute"] {
                next.push(Taint {
                    key: k.into(),
                    effect: effect.into(),
                    value: None,
                    time_added: Some(Time(now)),
                });
            }
        } else if marked.remove(&name).is_some() {
            ctx.recorder.record(
                node,
                false,
                "NodeReady",
                format!("Node {name} status is now: NodeReady"),
            );
        }
        let patch = json!({"metadata": {"resourceVersion": node.resource_version()}, "spec": {"taints": next}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(())
}

async fn mark_pods_not_ready(ctx: &Ctx, node: &str) {
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .store
        .state_filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node));
    for p in pods {
        let conditions: Vec<serde_json::Value> = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let mut v = serde_json::to_value(&c).unwrap_or_default();
                if c.type_ == "Ready" && c.status == "True" {
                    v["status"] = json!("False");
                    v["lastTransitionTime"] = json!(Timestamp::now().to_string());
                }
                v
            })
            .collect();
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
        let patch = json!({"status": {"conditions": conditions}});
        if let Err(e) = api
            .patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            tracing::debug!(pod = %p.name_any(), "marking not ready: {e}");
        }
    }
}

/// When the pod must leave the node: None if it tolerates every NoExecute
/// taint forever.
fn eviction_deadline(pod: &Pod, taints: &[&Taint], now: Timestamp) -> Option<Timestamp> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[]);
    let mut deadline: Option<Timestamp> = None;
    for taint in taints {
        let matching: Vec<_> = tolerations
            .iter()
            .filter(|t| crate::util::tolerates(std::slice::from_ref(*t), taint))
            .collect();
        let added = taint.time_added.as_ref().map(|t| t.0).unwrap_or(now);
        let at = if matching.is_empty() {
            Some(now)
        } else if matching.iter().any(|t| t.toleration_seconds.is_none()) {
            None
        } else {
            let secs = matching
                .iter()
                .filter_map(|t| t.toleration_seconds)
                .min()
                .unwrap_or(0)
                .max(0);
            Some(Timestamp::from_second(added.as_second() + secs).unwrap_or(now))
        };
        if let Some(at) = at {
            deadline = Some(deadline.map_or(at, |d| d.min(at)));
        }
    }
    deadline
}

async fn evict(ctx: &Ctx, node: &Node, now: Timestamp) -> anyhow::Result<()> {
    let taints: Vec<&Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoExecute")
        .collect();
    if taints.is_empty() {
        return Ok(());
    }
    let name = node.name_any();
    let pods = ctx.pods.store.state_filter(|p| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
            && p.metadata.deletion_timestamp.is_none()
    });
    for p in pods {
        let Some(deadline) = eviction_deadline(&p, &taints, now) else {
            continue;
        };
        if deadline > now {
            continue;
        }
        let ns = p.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        ignore_not_found(api.delete(&p.name_any(), &DeleteParams::default()).await)?;
        ctx.recorder.record(
            p.as_ref(),
            true,
            "Evicted",
            format!(
                "Marking for deletion Pod {ns}/{} (NoExecute taint on node {name})",
                p.name_any()
            ),
        );
    }
    Ok(())
}
