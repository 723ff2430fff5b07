//! StatefulSet controller: pods with stable names (`web-0`, `web-1`, …),
//! stable hostnames under the governing Service (`spec.serviceName`), and
//! a PersistentVolumeClaim per claim template and ordinal that outlives
//! the pod (`data-web-0`). With `OrderedReady` pods are created one at a
//! time in ordinal order, each once the one before is Running and Ready,
//! and removed from the highest ordinal down; `Parallel` does both at once.
//! A changed template is recorded as a ControllerRevision and rolled out
//! from the highest ordinal down to the partition, one pod at a time
//! (`RollingUpdate`), or only as pods are deleted (`OnDelete`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::history::{self, REVISION_LABEL};
use crate::util::{
    controlled_by, controller_ref, is_active, is_available, is_finished, is_ready, now, owner_ref,
};
use crate::Ctx;
use tapestry_runtime::{ignore_not_found, is_status, key_of, split_key, Queue, Requeue};

const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.statefulsets.on_change(move |s, _| q.add(key_of(s)));
    let q = queue.clone();
    ctx.pods.on_change(move |p, _| {
        if let Some(r) = controller_ref(p).filter(|r| r.kind == "StatefulSet") {
            q.add(format!("{}/{}", p.namespace().unwrap_or_default(), r.name));
        }
    });
}

/// A pod's ordinal, if its name is `<set>-<ordinal>`.
fn ordinal(set: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

fn claim_name(template: &PersistentVolumeClaim, set: &str, ordinal: i32) -> String {
    format!("{}-{set}-{ordinal}", template.name_any())
}

fn running_and_ready(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") && is_ready(p)
}

fn revision_of(p: &Pod) -> Option<&str> {
    p.labels().get(REVISION_LABEL).map(String::as_str)
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let Some(set) = ctx.statefulsets.get(Some(ns), name) else {
        return Ok(Requeue::Done);
    };
    if set.metadata.deletion_timestamp.is_some() {
        return Ok(Requeue::Done);
    }
    let spec = set.spec.clone().unwrap_or_default();
    let uid = set.uid().unwrap_or_default();
    let pods: HashMap<i32, Arc<Pod>> = ctx
        .pods
        .list_in(ns, |p| controlled_by(p, &uid))
        .into_iter()
        .filter_map(|p| Some((ordinal(name, &p.name_any())?, p)))
        .collect();

    // Revisions: the one the template makes now, and the one the set ran
    // before the rollout began.
    let selector_labels = spec.selector.match_labels.clone().unwrap_or_default();
    let live: Vec<&str> = pods.values().filter_map(|p| revision_of(p)).collect();
    let (update_revision, history) = history::record(
        &ctx,
        set.as_ref(),
        &spec.template,
        &selector_labels,
        spec.revision_history_limit.unwrap_or(10),
        &live,
    )
    .await?;
    let status = set.status.clone().unwrap_or_default();
    let current_revision = status
        .current_revision
        .clone()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| update_revision.clone());
    let current_template = history
        .iter()
        .find(|r| r.name_any() == current_revision)
        .and_then(|r| history::template_of(r))
        .unwrap_or_else(|| spec.template.clone());

    let replicas = spec.replicas.unwrap_or(1).max(0);
    let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0);
    let wanted = start..start.saturating_add(replicas);
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        != Some("OnDelete");
    let partition = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let claim_templates = spec.volume_claim_templates.clone().unwrap_or_default();

    // Pods to make or replace, lowest ordinal first; with OrderedReady the
    // first one not Running and Ready holds back everything after it.
    let mut blocked = false;
    for ord in wanted.clone() {
        match pods.get(&ord) {
            None => {
                // Pods below the partition keep the revision they had.
                let (revision, template) = if rolling && ord < partition {
                    (&current_revision, &current_template)
                } else {
                    (&update_revision, &spec.template)
                };
                for claim in &claim_templates {
                    ensure_claim(&ctx, &claims_api, &set, &spec, claim, ord).await?;
                }
                let pod = set_pod(&set, &spec, template, revision, ord);
                match api.create(&PostParams::default(), &pod).await {
                    Ok(p) => ctx.recorder.record(
                        set.as_ref(),
                        false,
                        "SuccessfulCreate",
                        format!(
                            "create Pod {} in StatefulSet {name} successful",
                            p.name_any()
                        ),
                    ),
                    // The informer has not shown it yet.
                    Err(e) if is_status(&e, 409) => {}
                    Err(e) => {
                        ctx.recorder.record(
                            set.as_ref(),
                            true,
                            "FailedCreate",
                            format!(
                                "create Pod {name}-{ord} in StatefulSet {name} failed error: {e}"
                            ),
                        );
                        return Err(e.into());
                    }
                }
                if !parallel {
                    blocked = true;
                    break;
                }
            }
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                if !parallel {
                    blocked = true;
                    break;
                }
            }
            Some(p) if is_finished(p) => {
                // A failed or completed pod is recreated under its name.
                delete_pod(&ctx, &api, &set, &p.name_any()).await?;
                if !parallel {
                    blocked = true;
                    break;
                }
            }
            Some(p) => {
                if !parallel && !running_and_ready(p) {
                    blocked = true;
                    break;
                }
            }
        }
    }

    // Pods beyond the replicas: highest ordinal first, one at a time with
    // OrderedReady and only once the rest are Running and Ready.
    let mut condemned: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|(ord, _)| !wanted.contains(ord))
        .map(|(_, p)| p)
        .collect();
    condemned.sort_by_key(|p| std::cmp::Reverse(ordinal(name, &p.name_any())));
    if !blocked {
        for p in &condemned {
            if p.metadata.deletion_timestamp.is_none() {
                delete_pod(&ctx, &api, &set, &p.name_any()).await?;
            }
            if !parallel {
                blocked = true;
                break;
            }
        }
    }
    let scaled_delete = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|p| p.when_scaled.as_deref())
        == Some("Delete");
    if scaled_delete {
        delete_scaled_claims(&ctx, &claims_api, &set, &claim_templates, &pods, &wanted).await?;
    }

    // Rolling update: the highest ordinal at or above the partition that
    // runs an old revision goes, once every pod is Running and Ready.
    let all_ready = wanted
        .clone()
        .all(|ord| pods.get(&ord).is_some_and(|p| running_and_ready(p)));
    if rolling && !blocked && all_ready {
        let stale = wanted
            .clone()
            .rev()
            .filter(|ord| *ord >= partition)
            .filter_map(|ord| pods.get(&ord))
            .find(|p| revision_of(p) != Some(update_revision.as_str()));
        if let Some(p) = stale {
            delete_pod(&ctx, &api, &set, &p.name_any()).await?;
        }
    }

    // Status.
    let t = now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let present: Vec<&Arc<Pod>> = pods.values().filter(|p| is_active(p)).collect();
    let count = |f: &dyn Fn(&Pod) -> bool| present.iter().filter(|p| f(p)).count() as i32;
    let ready = count(&|p| is_ready(p));
    let available = count(&|p| is_available(p, min_ready, t));
    let updated = count(&|p| revision_of(p) == Some(update_revision.as_str()));
    let mut current = count(&|p| revision_of(p) == Some(current_revision.as_str()));
    let mut current_revision = current_revision;
    // The rollout is complete once every wanted pod runs the new revision.
    if updated == replicas && ready == replicas && present.len() as i32 == replicas {
        current_revision = update_revision.clone();
        current = updated;
    }
    let next = json!({
        "observedGeneration": set.metadata.generation,
        "replicas": present.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "currentReplicas": current,
        "updatedReplicas": updated,
        "currentRevision": current_revision,
        "updateRevision": update_revision,
        "collisionCount": status.collision_count.unwrap_or(0),
    });
    let now_status = serde_json::to_value(&status)?;
    let changed = next
        .as_object()
        .into_iter()
        .flatten()
        .any(|(k, v)| now_status.get(k).unwrap_or(&json!(0)) != v);
    if changed {
        let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
        sets.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": next})),
        )
        .await?;
    }
    // minReadySeconds: look again when pods become available.
    if ready > available {
        return Ok(Requeue::After(Duration::from_secs(1)));
    }
    Ok(Requeue::Done)
}

async fn delete_pod(ctx: &Ctx, api: &Api<Pod>, set: &StatefulSet, pod: &str) -> anyhow::Result<()> {
    ignore_not_found(api.delete(pod, &DeleteParams::default()).await)?;
    ctx.recorder.record(
        set,
        false,
        "SuccessfulDelete",
        format!(
            "delete Pod {pod} in StatefulSet {} successful",
            set.name_any()
        ),
    );
    Ok(())
}

/// The claim for one template and ordinal, made if it is not there. With
/// `whenDeleted: Delete` the set owns it, so it goes with the set.
async fn ensure_claim(
    ctx: &Ctx,
    api: &Api<PersistentVolumeClaim>,
    set: &StatefulSet,
    spec: &StatefulSetSpec,
    template: &PersistentVolumeClaim,
    ord: i32,
) -> anyhow::Result<()> {
    let ns = set.namespace().unwrap_or_default();
    let name = claim_name(template, &set.name_any(), ord);
    if ctx.volumes.claims.get(Some(&ns), &name).is_some() {
        return Ok(());
    }
    let owned = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|p| p.when_deleted.as_deref())
        == Some("Delete");
    let owner: Option<Vec<OwnerReference>> = owned.then(|| {
        vec![OwnerReference {
            controller: None,
            ..owner_ref(set)
        }]
    });
    let mut labels = template.metadata.labels.clone().unwrap_or_default();
    labels.extend(spec.selector.match_labels.clone().unwrap_or_default());
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            labels: Some(labels),
            annotations: template.metadata.annotations.clone(),
            owner_references: owner,
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    };
    match api.create(&PostParams::default(), &claim).await {
        Ok(_) => {
            ctx.recorder.record(
                set,
                false,
                "SuccessfulCreate",
                format!(
                    "create Claim {name} Pod {}-{ord} in StatefulSet {} success",
                    set.name_any(),
                    set.name_any()
                ),
            );
            Ok(())
        }
        Err(e) if is_status(&e, 409) => Ok(()),
        Err(e) => {
            ctx.recorder.record(
                set,
                true,
                "FailedCreate",
                format!(
                    "create Claim {name} for Pod {}-{ord} failed error: {e}",
                    set.name_any()
                ),
            );
            Err(e.into())
        }
    }
}

/// With `whenScaled: Delete`, the claims of ordinals scaled away go once
/// their pods are gone.
async fn delete_scaled_claims(
    ctx: &Ctx,
    api: &Api<PersistentVolumeClaim>,
    set: &StatefulSet,
    templates: &[PersistentVolumeClaim],
    pods: &HashMap<i32, Arc<Pod>>,
    wanted: &std::ops::Range<i32>,
) -> anyhow::Result<()> {
    let ns = set.namespace().unwrap_or_default();
    let set_name = set.name_any();
    for template in templates {
        let prefix = format!("{}-{set_name}-", template.name_any());
        let claims = ctx.volumes.claims.list_in(&ns, |c| {
            c.name_any()
                .strip_prefix(&prefix)
                .and_then(|o| o.parse::<i32>().ok())
                .is_some_and(|o| !wanted.contains(&o) && !pods.contains_key(&o))
                && c.metadata.deletion_timestamp.is_none()
        });
        for claim in claims {
            ignore_not_found(
                api.delete(&claim.name_any(), &DeleteParams::default())
                    .await,
            )?;
        }
    }
    Ok(())
}

/// The pod for `ordinal`, from `template` at `revision`.
fn set_pod(
    set: &StatefulSet,
    spec: &StatefulSetSpec,
    template: &PodTemplateSpec,
    revision: &str,
    ordinal: i32,
) -> Pod {
    let set_name = set.name_any();
    let name = format!("{set_name}-{ordinal}");
    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = meta.labels.unwrap_or_default();
    labels.insert(REVISION_LABEL.into(), revision.into());
    labels.insert(POD_NAME_LABEL.into(), name.clone());
    labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
    let mut pod_spec = template.spec.clone().unwrap_or_default();
    pod_spec.hostname = Some(name.clone());
    if let Some(service) = spec.service_name.clone().filter(|s| !s.is_empty()) {
        pod_spec.subdomain = Some(service);
    }
    let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
    for claim in spec.volume_claim_templates.iter().flatten() {
        let volume = Volume {
            name: claim.name_any(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(claim, &set_name, ordinal),
                read_only: None,
            }),
            ..Default::default()
        };
        match volumes.iter_mut().find(|v| v.name == volume.name) {
            Some(v) => *v = volume,
            None => volumes.push(volume),
        }
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: set.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![owner_ref(set)]),
            ..Default::default()
        },
        spec: Some(pod_spec),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
            "spec": {"serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                        "spec": {"accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": "1Gi"}}}}]}}))
        .unwrap()
    }

    #[test]
    fn pods_have_stable_names_hostnames_and_claims() {
        let set = set();
        let spec = set.spec.clone().unwrap();
        let pod = set_pod(&set, &spec, &spec.template, "web-abc", 2);
        assert_eq!(pod.name_any(), "web-2");
        let labels = pod.labels();
        assert_eq!(labels[REVISION_LABEL], "web-abc");
        assert_eq!(labels[POD_NAME_LABEL], "web-2");
        assert_eq!(labels[POD_INDEX_LABEL], "2");
        assert_eq!(labels["app"], "web");
        let ps = pod.spec.unwrap();
        assert_eq!(ps.hostname.as_deref(), Some("web-2"));
        assert_eq!(ps.subdomain.as_deref(), Some("web"));
        let volumes = ps.volumes.unwrap();
        assert_eq!(volumes[0].name, "data");
        assert_eq!(
            volumes[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "data-web-2"
        );
        assert_eq!(
            pod.metadata.owner_references.unwrap()[0].kind,
            "StatefulSet"
        );
    }

    #[test]
    fn ordinals_come_from_names() {
        assert_eq!(ordinal("web", "web-0"), Some(0));
        assert_eq!(ordinal("web", "web-12"), Some(12));
        assert_eq!(ordinal("web", "webby-1"), None);
        assert_eq!(ordinal("web", "web-x"), None);
    }
}
