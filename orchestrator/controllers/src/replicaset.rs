//! ReplicaSet controller, which also serves ReplicationControllers (a
//! ReplicaSet whose selector is a plain label map): keeps `spec.replicas`
//! active pods from the template, owned by the controller, adopts orphan
//! pods its selector selects and releases owned pods it no longer selects,
//! and reports status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::util::{
    controlled_by, controller_ref, is_active, is_available, is_ready, is_terminating, now, selects,
};
use crate::Ctx;
use tapestry_runtime::{key_of, lock, split_key, Informer, Queue, Requeue};

/// What the controller needs of the kinds it serves.
pub trait Replicated:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn informer(ctx: &Ctx) -> &Arc<Informer<Self>>;
    fn replicas(&self) -> i32;
    fn min_ready_seconds(&self) -> i32;
    fn template(&self) -> Option<&PodTemplateSpec>;
    /// Whether the selector selects `labels` (an empty one selects nothing).
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool;
}

impl Replicated for ReplicaSet {
    fn informer(ctx: &Ctx) -> &Arc<Informer<Self>> {
        &ctx.replicasets
    }
    fn replicas(&self) -> i32 {
        self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }
    fn min_ready_seconds(&self) -> i32 {
        self.spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0)
    }
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref()?.template.as_ref()
    }
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.spec
            .as_ref()
            .is_some_and(|s| selects(&s.selector, labels))
    }
}

impl Replicated for ReplicationController {
    fn informer(ctx: &Ctx) -> &Arc<Informer<Self>> {
        &ctx.replicationcontrollers
    }
    fn replicas(&self) -> i32 {
        self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }
    fn min_ready_seconds(&self) -> i32 {
        self.spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0)
    }
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref()?.template.as_ref()
    }
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        let selector = k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: self.spec.as_ref().and_then(|s| s.selector.clone()),
            match_expressions: None,
        };
        selects(&selector, labels)
    }
}

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

pub fn setup<K: Replicated>(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    K::informer(ctx).on_change(move |o, _| q.add(key_of(o)));
    let q = queue.clone();
    let c = Arc::downgrade(ctx);
    let kind = K::kind(&());
    ctx.pods.on_change(move |p, _| {
        let ns = p.namespace().unwrap_or_default();
        match controller_ref(p) {
            Some(r) if r.kind == kind => q.add(format!("{ns}/{}", r.name)),
            Some(_) => {}
            // An orphan wakes the controllers that may adopt it.
            None if !is_terminating(p) => {
                let Some(ctx) = c.upgrade() else { return };
                for owner in K::informer(&ctx).list_in(&ns, |o| o.selects(p.labels())) {
                    q.add(key_of(owner.as_ref()));
                }
            }
            None => {}
        }
    });
}

pub async fn reconcile<K: Replicated>(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let Some(rs) = K::informer(&ctx).get(Some(ns), name) else {
        return Ok(Requeue::Done);
    };
    let uid = rs.uid().unwrap_or_default();
    let pods = claim_pods(&ctx, rs.as_ref(), ns, &uid).await?;
    let active: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_active(p)).collect();
    let desired = rs.replicas().max(0) as usize;
    // Keys of both kinds share the expectations: tell them apart.
    let expectations_key = format!("{}/{key}", K::kind(&()));
    let satisfied = ctx
        .rs_expectations
        .satisfied(&expectations_key, ns, &ctx.pods);
    if satisfied && rs.meta().deletion_timestamp.is_none() {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
        if active.len() < desired {
            let n = (desired - active.len()).min(BURST);
            let template = rs.template().cloned().unwrap_or_default();
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
            ctx.rs_expectations
                .set(&expectations_key, adds, HashSet::new());
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
            ctx.rs_expectations.set(
                &expectations_key,
                HashSet::new(),
                names.into_iter().collect(),
            );
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                return Err(e.into());
            }
        }
    }
    update_status(&ctx, rs.as_ref(), &pods).await
}

/// The pods `owner` controls, as Kubernetes' pod claiming has it: owned
/// pods its selector still selects, plus orphans it selects, which it
/// adopts (unless it is being deleted); owned pods it no longer selects are
/// released.
async fn claim_pods<K: Replicated>(
    ctx: &Ctx,
    owner: &K,
    ns: &str,
    uid: &str,
) -> anyhow::Result<Vec<Arc<Pod>>> {
    let candidates = ctx.pods.list_in(ns, |p| {
        controlled_by(p, uid) || (controller_ref(p).is_none() && !is_terminating(p))
    });
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut claimed = Vec::new();
    for p in candidates {
        let selected = owner.selects(p.labels());
        let mine = controlled_by(p.as_ref(), uid);
        let refs = p.metadata.owner_references.clone().unwrap_or_default();
        let new_refs = match (mine, selected) {
            (true, true) => {
                claimed.push(p);
                continue;
            }
            (true, false) => refs.into_iter().filter(|r| r.uid != uid).collect(),
            (false, true) if !is_terminating(owner) => {
                let mut refs = refs;
                refs.push(crate::util::owner_ref(owner));
                refs
            }
            (false, _) => continue,
        };
        // The resourceVersion makes the write conditional on what was read.
        // No references left: the field goes, as Kubernetes leaves it.
        let new_refs = (!new_refs.is_empty()).then_some(new_refs);
        let patch = json!({"metadata": {
            "ownerReferences": new_refs,
            "resourceVersion": p.resource_version(),
        }});
        match api
            .patch(&p.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(written) if !mine => claimed.push(Arc::new(written)),
            Ok(_) => {}
            Err(e) if tapestry_runtime::not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(claimed)
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

async fn update_status<K: Replicated>(
    ctx: &Ctx,
    rs: &K,
    pods: &[Arc<Pod>],
) -> anyhow::Result<Requeue> {
    let min_ready = rs.min_ready_seconds();
    let t = now();
    let active: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_active(p)).collect();
    let ready = active.iter().filter(|p| is_ready(p)).count() as i32;
    let available = active
        .iter()
        .filter(|p| is_available(p, min_ready, t))
        .count() as i32;
    let template_labels = rs
        .template()
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
        "observedGeneration": rs.meta().generation,
    });
    let current = serde_json::to_value(rs)?
        .get("status")
        .cloned()
        .unwrap_or_default();
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
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &rs.namespace().unwrap_or_default());
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
