//! ReplicaSet controller: keeps `spec.replicas` active pods from the
//! template, owned by the ReplicaSet, and reports status.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::util::{controlled_by, controller_ref, is_active, is_available, is_ready, now};
use crate::Ctx;
use tapestry_runtime::{key_of, lock, split_key, Queue, Requeue};

/// Pods created or deleted per reconcile at most (the rest next round).
const BURST: usize = 500;
/// How many pod writes are in flight at once.
const PARALLEL: usize = 16;
/// Writes not seen back in the watch after this long are forgotten.
const EXPECTATION_TTL: Duration = Duration::from_secs(30);

/// Pods created and pods deleted, not yet seen, and since when.
type Pending = (HashSet<String>, HashSet<String>, Instant);

/// What a ReplicaSet's last reconcile created and deleted but the pod
/// informer may not have shown yet. Acting again before they show would
/// create or delete twice.
#[derive(Default)]
pub struct Expectations {
    inner: Mutex<HashMap<String, Pending>>,
}

impl Expectations {
    pub(crate) fn set(&self, key: &str, adds: HashSet<String>, dels: HashSet<String>) {
        lock(&self.inner).insert(key.to_string(), (adds, dels, Instant::now()));
    }

    /// Whether everything expected has been observed in `pods`.
    pub(crate) fn satisfied(
        &self,
        key: &str,
        ns: &str,
        pods: &tapestry_runtime::Informer<Pod>,
    ) -> bool {
        let mut m = lock(&self.inner);
        let Some((adds, dels, at)) = m.get_mut(key) else {
            return true;
        };
        adds.retain(|n| pods.get(Some(ns), n).is_none());
        dels.retain(|n| {
            pods.get(Some(ns), n)
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
        });
        if (adds.is_empty() && dels.is_empty()) || at.elapsed() > EXPECTATION_TTL {
            m.remove(key);
            return true;
        }
        false
    }
}

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.replicasets.on_change(move |rs, _| q.add(key_of(rs)));
    let q = queue.clone();
    ctx.pods.on_change(move |p, _| {
        if let Some(r) = controller_ref(p).filter(|r| r.kind == "ReplicaSet") {
            q.add(format!("{}/{}", p.namespace().unwrap_or_default(), r.name));
        }
    });
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let Some(rs) = ctx.replicasets.get(Some(ns), name) else {
        return Ok(Requeue::Done);
    };
    let uid = rs.uid().unwrap_or_default();
    let pods = ctx.pods.list_in(ns, |p| controlled_by(p, &uid));
    let active: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_active(p)).collect();
    let spec = rs.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0) as usize;
    let satisfied = ctx.rs_expectations.satisfied(&key, ns, &ctx.pods);
    if satisfied && rs.metadata.deletion_timestamp.is_none() {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
        if active.len() < desired {
            let n = (desired - active.len()).min(BURST);
            let template = spec.template.clone().unwrap_or_default();
            let owner = crate::util::owner_ref(rs.as_ref());
            let prefix = rs.name_any();
            let created: Vec<Result<String, kube::Error>> = futures::stream::iter(0..n)
                .map(|_| create_pod(&api, &template, &owner, &prefix))
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
            let mut adds = HashSet::new();
            let mut err = None;
            for r in created {
                match r {
                    Ok(pod) => {
                        ctx.recorder.record(
                            rs.as_ref(),
                            false,
                            "SuccessfulCreate",
                            format!("Created pod: {pod}"),
                        );
                        adds.insert(pod);
                    }
                    Err(e) => err = Some(e),
                }
            }
            ctx.rs_expectations.set(&key, adds, HashSet::new());
            if let Some(e) = err {
                ctx.recorder.record(
                    rs.as_ref(),
                    true,
                    "FailedCreate",
                    format!("Error creating: {e}"),
                );
                return Err(e.into());
            }
        } else if active.len() > desired {
            let mut victims = active.clone();
            victims.sort_by_key(|p| deletion_rank(p));
            victims.truncate((active.len() - desired).min(BURST));
            let names: Vec<String> = victims.iter().map(|p| p.name_any()).collect();
            let results: Vec<Result<(), kube::Error>> = futures::stream::iter(names.clone())
                .map(|n| {
                    let api = api.clone();
                    async move {
                        tapestry_runtime::ignore_not_found(
                            api.delete(&n, &DeleteParams::default()).await,
                        )
                    }
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
            for n in &names {
                ctx.recorder.record(
                    rs.as_ref(),
                    false,
                    "SuccessfulDelete",
                    format!("Deleted pod: {n}"),
                );
            }
            ctx.rs_expectations
                .set(&key, HashSet::new(), names.into_iter().collect());
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                return Err(e.into());
            }
        }
    }
    update_status(&ctx, &rs, &pods).await
}

/// Pods to delete first: unscheduled, then pending, then not ready, then
/// the youngest.
fn deletion_rank(p: &Pod) -> (u8, u8, u8, std::cmp::Reverse<i64>) {
    let unscheduled = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none();
    let pending = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(0);
    (
        u8::from(!unscheduled),
        u8::from(!pending),
        u8::from(is_ready(p)),
        std::cmp::Reverse(created),
    )
}

async fn create_pod(
    api: &Api<Pod>,
    template: &PodTemplateSpec,
    owner: &OwnerReference,
    prefix: &str,
) -> Result<String, kube::Error> {
    let tm = template.metadata.clone().unwrap_or_default();
    let pod = Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{prefix}-")),
            labels: tm.labels,
            annotations: tm.annotations,
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    };
    Ok(api.create(&PostParams::default(), &pod).await?.name_any())
}

async fn update_status(ctx: &Ctx, rs: &ReplicaSet, pods: &[Arc<Pod>]) -> anyhow::Result<Requeue> {
    let min_ready = rs
        .spec
        .as_ref()
        .and_then(|s| s.min_ready_seconds)
        .unwrap_or(0);
    let t = now();
    let active: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_active(p)).collect();
    let ready = active.iter().filter(|p| is_ready(p)).count() as i32;
    let available = active
        .iter()
        .filter(|p| is_available(p, min_ready, t))
        .count() as i32;
    let template_labels = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully = active
        .iter()
        .filter(|p| {
            template_labels
                .iter()
                .all(|(k, v)| p.labels().get(k) == Some(v))
        })
        .count() as i32;
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": fully,
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs.metadata.generation,
    });
    let current = serde_json::to_value(rs.status.clone().unwrap_or_default())?;
    let changed = [
        "replicas",
        "fullyLabeledReplicas",
        "readyReplicas",
        "availableReplicas",
        "observedGeneration",
    ]
    .iter()
    .any(|f| current.get(*f).unwrap_or(&json!(0)) != status.get(*f).unwrap_or(&json!(0)));
    if changed {
        let api: Api<ReplicaSet> =
            Api::namespaced(ctx.client.clone(), &rs.namespace().unwrap_or_default());
        api.patch_status(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    // Pods ready but not yet available become available later.
    if ready > available {
        return Ok(Requeue::After(Duration::from_secs(1)));
    }
    Ok(Requeue::Done)
}
