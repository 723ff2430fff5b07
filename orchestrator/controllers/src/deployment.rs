//! Deployment controller: one ReplicaSet per pod template (named
//! `<deployment>-<pod-template-hash>`, revision in
//! `deployment.kubernetes.io/revision`), rolled with RollingUpdate
//! (maxSurge/maxUnavailable) or Recreate, old ReplicaSets kept up to
//! `revisionHistoryLimit`, and status/conditions that `kubectl rollout
//! status` reads.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use crate::util::{
    controlled_by, controller_ref, is_active, is_available, is_ready, now, owner_ref,
    same_template, scaled, template_hash,
};
use crate::Ctx;
use tapestry_runtime::{key_of, split_key, Queue, Requeue};

const REVISION: &str = "deployment.kubernetes.io/revision";

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.deployments.on_change(move |d, _| q.add(key_of(d)));
    let q = queue.clone();
    ctx.replicasets.on_change(move |rs, _| {
        if let Some(r) = controller_ref(rs).filter(|r| r.kind == "Deployment") {
            q.add(format!("{}/{}", rs.namespace().unwrap_or_default(), r.name));
        }
    });
    // Pod readiness drives availability, so pod changes wake the owner's
    // owner.
    let q = queue.clone();
    let rss = ctx.replicasets.clone();
    ctx.pods.on_change(move |p, _| {
        let Some(r) = controller_ref(p).filter(|r| r.kind == "ReplicaSet") else {
            return;
        };
        let ns = p.namespace().unwrap_or_default();
        if let Some(rs) = rss.get(Some(&ns), &r.name) {
            if let Some(d) = controller_ref(rs.as_ref()).filter(|r| r.kind == "Deployment") {
                q.add(format!("{ns}/{}", d.name));
            }
        }
    });
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

/// What the pods of one ReplicaSet look like right now.
struct Counts {
    active: i32,
    ready: i32,
    available: i32,
}

fn counts(pods: &[Arc<Pod>], rs: &ReplicaSet, min_ready: i32) -> Counts {
    let uid = rs.uid().unwrap_or_default();
    let t = now();
    let mine: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| controlled_by(p.as_ref(), &uid) && is_active(p))
        .collect();
    Counts {
        active: mine.len() as i32,
        ready: mine.iter().filter(|p| is_ready(p)).count() as i32,
        available: mine
            .iter()
            .filter(|p| is_available(p, min_ready, t))
            .count() as i32,
    }
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default().to_string();
    let Some(d) = ctx.deployments.get(Some(&ns), name) else {
        return Ok(Requeue::Done);
    };
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Requeue::Done);
    }
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let uid = d.uid().unwrap_or_default();
    let mut rss: Vec<Arc<ReplicaSet>> = ctx.replicasets.list_in(&ns, |rs| controlled_by(rs, &uid));
    rss.sort_by_key(|rs| revision(rs));
    let pods = ctx.pods.list_in(&ns, |p| {
        controller_ref(p).is_some_and(|r| r.kind == "ReplicaSet")
    });
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let max_revision = rss.iter().map(|r| revision(r)).max().unwrap_or(0);

    let new_rs = rss
        .iter()
        .find(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| same_template(t, &spec.template))
        })
        .cloned();
    let olds: Vec<Arc<ReplicaSet>> = rss
        .iter()
        .filter(|rs| new_rs.as_ref().is_none_or(|n| n.uid() != rs.uid()))
        .cloned()
        .collect();
    let paused = spec.paused == Some(true);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let (max_surge, max_unavailable) = if recreate {
        (0, replicas)
    } else {
        let ru = spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref());
        let surge = scaled(ru.and_then(|r| r.max_surge.as_ref()), replicas, true, 1);
        let mut unavail = scaled(
            ru.and_then(|r| r.max_unavailable.as_ref()),
            replicas,
            false,
            0,
        );
        if surge == 0 && unavail == 0 {
            unavail = 1;
        }
        (surge, unavail.min(replicas))
    };

    let mut new_rs = new_rs;
    if !paused {
        match &new_rs {
            None => {
                let old_total: i32 = olds.iter().map(|r| spec_replicas(r)).sum();
                let initial = if recreate || olds.is_empty() || old_total == 0 {
                    if recreate
                        && olds
                            .iter()
                            .any(|r| counts(&pods, r, 0).active > 0 || spec_replicas(r) > 0)
                    {
                        0
                    } else {
                        replicas
                    }
                } else {
                    (replicas + max_surge - old_total).clamp(0, replicas)
                };
                let created =
                    create_rs(&ctx, &d, &rs_api, initial, max_revision + 1, max_surge).await?;
                if initial > 0 {
                    scaled_event(&ctx, &d, &created.name_any(), 0, initial, true);
                }
                new_rs = Some(Arc::new(created));
            }
            Some(rs) if revision(rs) < max_revision => {
                // A rollback to an old template makes its ReplicaSet the
                // newest revision again.
                let patch = json!({"metadata": {"annotations": {REVISION: (max_revision + 1).to_string()}}});
                let updated = rs_api
                    .patch(
                        &rs.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(patch),
                    )
                    .await?;
                new_rs = Some(Arc::new(updated));
            }
            Some(_) => {}
        }
        let new = new_rs.clone().expect("new ReplicaSet exists here");
        if recreate {
            rollout_recreate(&ctx, &d, &rs_api, &new, &olds, &pods, replicas).await?;
        } else {
            rollout_rolling(
                &ctx,
                &d,
                &rs_api,
                &new,
                &olds,
                &pods,
                replicas,
                max_surge,
                max_unavailable,
                min_ready,
            )
            .await?;
        }
        cleanup_history(
            &rs_api,
            &olds,
            &pods,
            spec.revision_history_limit.unwrap_or(10),
        )
        .await?;
    }
    sync_status(
        &ctx,
        &d,
        new_rs.as_deref(),
        &rss,
        &pods,
        replicas,
        max_unavailable,
        min_ready,
        paused,
    )
    .await
}

async fn create_rs(
    ctx: &Ctx,
    d: &Deployment,
    api: &Api<ReplicaSet>,
    replicas: i32,
    revision: i64,
    max_surge: i32,
) -> anyhow::Result<ReplicaSet> {
    let spec = d.spec.clone().unwrap_or_default();
    let hash = template_hash(&spec.template);
    let mut template = spec.template.clone();
    let tm = template.metadata.get_or_insert_with(Default::default);
    tm.labels
        .get_or_insert_with(Default::default)
        .insert("pod-template-hash".into(), hash.clone());
    let mut selector: LabelSelector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert("pod-template-hash".into(), hash.clone());
    let mut labels = tm.labels.clone().unwrap_or_default();
    labels.insert("pod-template-hash".into(), hash.clone());
    let desired = spec.replicas.unwrap_or(1);
    let rs = ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}", d.name_any())),
            namespace: d.namespace(),
            labels: Some(labels),
            annotations: Some(
                [
                    (REVISION.to_string(), revision.to_string()),
                    (
                        "deployment.kubernetes.io/desired-replicas".into(),
                        desired.to_string(),
                    ),
                    (
                        "deployment.kubernetes.io/max-replicas".into(),
                        (desired + max_surge).to_string(),
                    ),
                ]
                .into(),
            ),
            owner_references: Some(vec![owner_ref(d)]),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    };
    match api.create(&PostParams::default(), &rs).await {
        Ok(rs) => Ok(rs),
        // Created by an earlier round whose watch event has not arrived.
        Err(e) if tapestry_runtime::is_status(&e, 409) => Ok(api.get(&rs.name_any()).await?),
        Err(e) => {
            ctx.recorder.record(
                d,
                true,
                "FailedCreate",
                format!("Failed to create new replica set: {e}"),
            );
            Err(e.into())
        }
    }
}

fn scaled_event(ctx: &Ctx, d: &Deployment, rs: &str, from: i32, to: i32, up: bool) {
    let verb = if up { "up" } else { "down" };
    ctx.recorder.record(
        d,
        false,
        "ScalingReplicaSet",
        format!("Scaled {verb} replica set {rs} from {from} to {to}"),
    );
}

async fn scale(
    ctx: &Ctx,
    d: &Deployment,
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    to: i32,
) -> anyhow::Result<()> {
    let from = spec_replicas(rs);
    if from == to {
        return Ok(());
    }
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let patch = json!({
        "metadata": {"annotations": {"deployment.kubernetes.io/desired-replicas": desired.to_string()}},
        "spec": {"replicas": to},
    });
    api.patch(
        &rs.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    scaled_event(ctx, d, &rs.name_any(), from, to, to > from);
    Ok(())
}

async fn rollout_recreate(
    ctx: &Ctx,
    d: &Deployment,
    api: &Api<ReplicaSet>,
    new: &ReplicaSet,
    olds: &[Arc<ReplicaSet>],
    pods: &[Arc<Pod>],
    replicas: i32,
) -> anyhow::Result<()> {
    for rs in olds {
        scale(ctx, d, api, rs, 0).await?;
    }
    // New pods start only once every old pod is gone.
    if olds.iter().any(|rs| counts(pods, rs, 0).active > 0) {
        return Ok(());
    }
    scale(ctx, d, api, new, replicas).await
}

#[allow(clippy::too_many_arguments)]
async fn rollout_rolling(
    ctx: &Ctx,
    d: &Deployment,
    api: &Api<ReplicaSet>,
    new: &ReplicaSet,
    olds: &[Arc<ReplicaSet>],
    pods: &[Arc<Pod>],
    replicas: i32,
    max_surge: i32,
    max_unavailable: i32,
    min_ready: i32,
) -> anyhow::Result<()> {
    let old_specs: i32 = olds.iter().map(|r| spec_replicas(r)).sum();
    let new_spec = spec_replicas(new);
    if old_specs == 0 {
        // Nothing to roll: follow the desired count (kubectl scale).
        return scale(ctx, d, api, new, replicas).await;
    }
    // Scale up the new ReplicaSet within the surge budget.
    let total = old_specs + new_spec;
    let max_total = replicas + max_surge;
    let mut new_target = new_spec;
    if new_spec < replicas && total < max_total {
        new_target = (new_spec + (max_total - total)).min(replicas);
    } else if new_spec > replicas {
        new_target = replicas;
    }
    scale(ctx, d, api, new, new_target).await?;

    // Scale down old ReplicaSets only as far as availability allows:
    // what stays available must be at least replicas - maxUnavailable.
    // Availability counts pods (capped by each ReplicaSet's spec), so a
    // scale-down the ReplicaSet has not acted on yet is not counted twice.
    let min_available = replicas - max_unavailable;
    let new_counts = counts(pods, new, min_ready);
    let new_available = new_counts.available.min(new_target);
    let mut old_available: Vec<(Arc<ReplicaSet>, i32)> = olds
        .iter()
        .map(|r| {
            (
                r.clone(),
                counts(pods, r, min_ready).available.min(spec_replicas(r)),
            )
        })
        .collect();
    // Unavailable old replicas can go first at no cost.
    for (rs, avail) in &mut old_available {
        let spec = spec_replicas(rs);
        if spec > *avail {
            scale(ctx, d, api, rs, *avail).await?;
        }
    }
    let total_available: i32 = new_available + old_available.iter().map(|(_, a)| *a).sum::<i32>();
    let mut budget = total_available - min_available;
    for (rs, avail) in &old_available {
        if budget <= 0 {
            break;
        }
        let current = (*avail).min(spec_replicas(rs));
        if current == 0 {
            continue;
        }
        let down = current.min(budget);
        scale(ctx, d, api, rs, current - down).await?;
        budget -= down;
    }
    Ok(())
}

async fn cleanup_history(
    api: &Api<ReplicaSet>,
    olds: &[Arc<ReplicaSet>],
    pods: &[Arc<Pod>],
    limit: i32,
) -> anyhow::Result<()> {
    let idle: Vec<&Arc<ReplicaSet>> = olds
        .iter()
        .filter(|r| {
            spec_replicas(r) == 0
                && counts(pods, r, 0).active == 0
                && r.metadata.deletion_timestamp.is_none()
        })
        .collect();
    let excess = idle.len().saturating_sub(limit.max(0) as usize);
    // `olds` is sorted by revision: the oldest go first.
    for rs in idle.into_iter().take(excess) {
        tapestry_runtime::ignore_not_found(
            api.delete(&rs.name_any(), &DeleteParams::background())
                .await,
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn sync_status(
    ctx: &Ctx,
    d: &Deployment,
    new: Option<&ReplicaSet>,
    rss: &[Arc<ReplicaSet>],
    pods: &[Arc<Pod>],
    replicas: i32,
    max_unavailable: i32,
    min_ready: i32,
    paused: bool,
) -> anyhow::Result<Requeue> {
    let mut total = Counts {
        active: 0,
        ready: 0,
        available: 0,
    };
    for rs in rss {
        let c = counts(pods, rs, min_ready);
        total.active += c.active;
        total.ready += c.ready;
        total.available += c.available;
    }
    let updated = new.map(|n| counts(pods, n, min_ready).active).unwrap_or(0);
    let new_available = new
        .map(|n| counts(pods, n, min_ready).available)
        .unwrap_or(0);
    let complete = updated == replicas && total.active == replicas && new_available == replicas;
    let existing = d.status.clone().unwrap_or_default();
    let old_conditions = existing.conditions.clone().unwrap_or_default();
    let t = now();
    let condition = |type_: &str, status: bool, reason: &str, message: String| -> Value {
        let status = if status { "True" } else { "False" };
        let prev = old_conditions.iter().find(|c| c.type_ == type_);
        let transition = match prev {
            Some(p) if p.status == status => {
                p.last_transition_time.as_ref().map(|x| x.0).unwrap_or(t)
            }
            _ => t,
        };
        let update = match prev {
            Some(p) if p.status == status && p.reason.as_deref() == Some(reason) => {
                p.last_update_time.as_ref().map(|x| x.0).unwrap_or(t)
            }
            _ => t,
        };
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastTransitionTime": transition.to_string(), "lastUpdateTime": update.to_string()})
    };
    let available_ok = total.available >= replicas - max_unavailable;
    let new_name = new.map(|n| n.name_any()).unwrap_or_default();
    let progressing = if paused {
        condition(
            "Progressing",
            false,
            "DeploymentPaused",
            "Deployment is paused".into(),
        )
    } else if complete {
        condition(
            "Progressing",
            true,
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
        )
    } else {
        condition(
            "Progressing",
            true,
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{new_name}\" is progressing."),
        )
    };
    let available = if available_ok {
        condition(
            "Available",
            true,
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
        )
    } else {
        condition(
            "Available",
            false,
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
        )
    };
    let status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": total.active,
        "updatedReplicas": updated,
        "readyReplicas": total.ready,
        "availableReplicas": total.available,
        "unavailableReplicas": (replicas - total.available).max(0),
        "conditions": [available, progressing],
    });
    let current = serde_json::to_value(&existing)?;
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastUpdateTime");
                    c.remove("lastTransitionTime");
                }
            }
        }
        for f in [
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
        ] {
            if v.get(f).is_none_or(|x| x == &json!(0)) {
                if let Some(m) = v.as_object_mut() {
                    m.remove(f);
                }
            }
        }
        v
    };
    let api: Api<Deployment> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    if strip(&current) != strip(&status) {
        api.patch_status(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    let revision = new.map(revision).unwrap_or(0);
    if revision > 0 && d.annotations().get(REVISION) != Some(&revision.to_string()) {
        let patch = json!({"metadata": {"annotations": {REVISION: revision.to_string()}}});
        api.patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    if total.ready > total.available {
        return Ok(Requeue::After(Duration::from_secs(1)));
    }
    Ok(Requeue::Done)
}
