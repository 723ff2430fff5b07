//! DaemonSet controller: one pod on every eligible node (nodes added later
//! included). Pods are pinned to their node with required node affinity on
//! `metadata.name` and placed by the scheduler, as in Kubernetes. A changed
//! template rolls out node by node within `maxUnavailable`; each template
//! is recorded as a ControllerRevision (`kubectl rollout history|undo`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    Toleration,
};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::util::{
    controlled_by, controller_ref, is_active, is_available, is_ready, now, owner_ref, scaled,
    template_hash, tolerates,
};
use crate::Ctx;
use tapestry_runtime::{ignore_not_found, key_of, split_key, Queue, Requeue};

use crate::history::{self, REVISION_LABEL as HASH_LABEL};

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.daemonsets.on_change(move |d, _| q.add(key_of(d)));
    let q = queue.clone();
    ctx.pods.on_change(move |p, _| {
        if let Some(r) = controller_ref(p).filter(|r| r.kind == "DaemonSet") {
            q.add(format!("{}/{}", p.namespace().unwrap_or_default(), r.name));
        }
    });
    // Any node change may change where daemons belong.
    let q = queue.clone();
    let dss = ctx.daemonsets.clone();
    ctx.nodes.on_change(move |_, _| {
        for d in dss.store.state() {
            q.add(key_of(d.as_ref()));
        }
    });
}

/// Tolerations every daemon pod gets, so daemons keep running on nodes
/// that are unhealthy or cordoned.
fn daemon_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

/// Whether a daemon pod of this template belongs on `node`.
fn eligible(template: &Pod, node: &Node) -> bool {
    let spec = template.spec.as_ref();
    if let Some(sel) = spec.and_then(|s| s.node_selector.as_ref()) {
        let labels = node.metadata.labels.as_ref();
        if sel
            .iter()
            .any(|(k, v)| labels.and_then(|l| l.get(k)) != Some(v))
        {
            return false;
        }
    }
    let mut tolerations = spec.and_then(|s| s.tolerations.clone()).unwrap_or_default();
    tolerations.extend(daemon_tolerations());
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(&tolerations, t))
}

/// The node a daemon pod is for: its nodeName, or its pinning affinity.
fn target_node(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(n.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let Some(ds) = ctx.daemonsets.get(Some(ns), name) else {
        return Ok(Requeue::Done);
    };
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Requeue::Done);
    }
    let spec = ds.spec.clone().unwrap_or_default();
    let hash = template_hash(&spec.template);
    let template = Pod {
        metadata: spec.template.metadata.clone().unwrap_or_default(),
        spec: spec.template.spec.clone(),
        status: None,
    };
    let uid = ds.uid().unwrap_or_default();
    let pods = ctx
        .pods
        .list_in(ns, |p| controlled_by(p, &uid) && is_active(p));
    let live: Vec<String> = pods
        .iter()
        .filter_map(|p| Some(format!("{name}-{}", p.labels().get(HASH_LABEL)?)))
        .collect();
    history::record(
        &ctx,
        ds.as_ref(),
        &spec.template,
        &spec.selector.match_labels.clone().unwrap_or_default(),
        spec.revision_history_limit.unwrap_or(10),
        &live.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in &pods {
        if let Some(n) = target_node(p) {
            by_node.entry(n).or_default().push(p.clone());
        }
    }
    let nodes = ctx.nodes.store.state();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let satisfied = ctx
        .rs_expectations
        .satisfied(&format!("ds/{key}"), ns, &ctx.pods);
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let t = now();

    let mut desired = 0;
    let mut current = 0;
    let mut misscheduled = 0;
    let mut ready = 0;
    let mut available = 0;
    let mut updated = 0;
    let mut to_create = Vec::new();
    let mut to_delete: Vec<String> = Vec::new();
    let mut old_pods = Vec::new();
    let mut unavailable = 0;
    let node_names: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
    for node in &nodes {
        let n = node.name_any();
        let here = by_node.get(&n).cloned().unwrap_or_default();
        if eligible(&template, node) {
            desired += 1;
            if here.is_empty() {
                to_create.push(n.clone());
                unavailable += 1;
                continue;
            }
            current += 1;
            // One daemon per node: extras go (the oldest stays).
            let mut here = here;
            here.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|c| c.0));
            for extra in here.iter().skip(1) {
                to_delete.push(extra.name_any());
            }
            let p = &here[0];
            let is_new = p.labels().get(HASH_LABEL) == Some(&hash);
            if is_new {
                updated += 1;
            } else {
                old_pods.push(p.clone());
            }
            if is_ready(p) {
                ready += 1;
            }
            if is_available(p, min_ready, t) {
                available += 1;
            } else {
                unavailable += 1;
            }
        } else if !here.is_empty() {
            misscheduled += 1;
            to_delete.extend(here.iter().map(|p| p.name_any()));
        }
    }
    // Pods for nodes that no longer exist.
    for (n, ps) in &by_node {
        if !node_names.contains(n) {
            to_delete.extend(ps.iter().map(|p| p.name_any()));
        }
    }
    // Rolling update: replace old pods while unavailability stays within
    // maxUnavailable.
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        != Some("OnDelete");
    if rolling && satisfied {
        let max_unavailable = scaled(
            spec.update_strategy
                .as_ref()
                .and_then(|s| s.rolling_update.as_ref())
                .and_then(|r| r.max_unavailable.as_ref()),
            desired,
            false,
            1,
        )
        .max(1);
        let mut budget = max_unavailable - unavailable;
        // Unavailable old pods can go at once.
        for p in &old_pods {
            if !is_available(p, min_ready, t) {
                to_delete.push(p.name_any());
            }
        }
        for p in old_pods.iter().filter(|p| is_available(p, min_ready, t)) {
            if budget <= 0 {
                break;
            }
            to_delete.push(p.name_any());
            budget -= 1;
        }
    }
    if satisfied {
        let mut adds = HashSet::new();
        for n in &to_create {
            let pod = daemon_pod(&ds, &spec.template, &hash, n);
            match api.create(&PostParams::default(), &pod).await {
                Ok(p) => {
                    ctx.recorder.record(
                        ds.as_ref(),
                        false,
                        "SuccessfulCreate",
                        format!("Created pod: {}", p.name_any()),
                    );
                    adds.insert(p.name_any());
                }
                Err(e) => {
                    ctx.recorder.record(
                        ds.as_ref(),
                        true,
                        "FailedCreate",
                        format!("Error creating: {e}"),
                    );
                    // Expect the pods already created, so a retry does
                    // not create them again.
                    ctx.rs_expectations
                        .set(&format!("ds/{key}"), adds, HashSet::new());
                    return Err(e.into());
                }
            }
        }
        for p in &to_delete {
            ignore_not_found(api.delete(p, &DeleteParams::default()).await)?;
            ctx.recorder.record(
                ds.as_ref(),
                false,
                "SuccessfulDelete",
                format!("Deleted pod: {p}"),
            );
        }
        ctx.rs_expectations.set(
            &format!("ds/{key}"),
            adds,
            to_delete.iter().cloned().collect(),
        );
    }
    let status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": current,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "numberAvailable": available,
        "numberUnavailable": (desired - available).max(0),
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.metadata.generation,
    });
    let cur = serde_json::to_value(ds.status.clone().unwrap_or_default())?;
    let changed = status
        .as_object()
        .into_iter()
        .flatten()
        .any(|(k, v)| cur.get(k).unwrap_or(&json!(0)) != v);
    if changed {
        let dsapi: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), ns);
        dsapi
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
    }
    if ready > available {
        return Ok(Requeue::After(Duration::from_secs(1)));
    }
    Ok(Requeue::Done)
}

fn daemon_pod(
    ds: &DaemonSet,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    hash: &str,
    node: &str,
) -> Pod {
    let tm = template.metadata.clone().unwrap_or_default();
    let mut labels = tm.labels.unwrap_or_default();
    labels.insert(HASH_LABEL.into(), hash.into());
    let mut spec = template.spec.clone().unwrap_or_default();
    let pin = NodeSelectorTerm {
        match_fields: Some(vec![NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![node.into()]),
        }]),
        match_expressions: None,
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let na = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    na.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![pin],
    });
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for t in daemon_tolerations() {
        if !tolerations
            .iter()
            .any(|x| x.key == t.key && x.effect == t.effect)
        {
            tolerations.push(t);
        }
    }
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", ds.name_any())),
            labels: Some(labels),
            annotations: tm.annotations,
            owner_references: Some(vec![owner_ref(ds)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}
