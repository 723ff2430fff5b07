//! PersistentVolume binding, protection and reclaim, and the built-in
//! local-path provisioner, as kube-controller-manager's persistentvolume
//! binder, pvc-protection and pv-protection controllers do it.
//!
//! One queue holds claims (`claim:NS/NAME`) and volumes (`volume:NAME`):
//!
//! - A pending claim binds to the volume pre-bound to it (its
//!   `spec.claimRef`, or the claim's `spec.volumeName`), else to the
//!   smallest available volume of its class that fits: access modes, size,
//!   volume mode, label selector and, for a claim whose first consumer is
//!   placed, the node's match of the volume's node affinity. The volume is
//!   written first (claimRef), then the claim (volumeName and the
//!   `pv.kubernetes.io/bind-completed` annotation), then both statuses.
//! - Claims of a WaitForFirstConsumer class wait until the scheduler names
//!   a node (`volume.kubernetes.io/selected-node`). Of the `local-path`
//!   class they are then provisioned: a `local` volume named
//!   `pvc-<claim uid>` at `ROOT/<name>` on that node (ROOT is what the
//!   node's kubelet publishes, see [`tapestry_runtime::storage`]),
//!   pre-bound to the claim. Other provisioners' claims are annotated for
//!   them and wait.
//! - A volume whose claim is gone is Released. Retain keeps it so; Delete
//!   deletes the object of a local-path volume: its cleanup finalizer
//!   keeps it until the kubelet of its node removed the directory (so the
//!   kubelet deletes the data, this controller the object). A Delete or
//!   Recycle volume of another kind turns Failed (there is no deleter for
//!   it here).
//! - `kubernetes.io/pvc-protection` leaves a deleted claim once no pod
//!   that has not terminated uses it; `kubernetes.io/pv-protection` a
//!   deleted volume once it is not bound.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tapestry_apimachinery::quantity::parse_milli;
use tapestry_runtime::selector::{node_selector_matches, selects};
use tapestry_runtime::storage::{
    BIND_COMPLETED, BOUND_BY_CONTROLLER, HOSTNAME_LABEL, LOCAL_PATH_CLEANUP, LOCAL_PATH_NODE_LABEL,
    LOCAL_PATH_PROVISIONER, LOCAL_PATH_ROOT, PROVISIONED_BY, PVC_PROTECTION, PV_PROTECTION,
    SELECTED_NODE, STORAGE_PROVISIONER,
};
use tapestry_runtime::{ignore_not_found, key_of, Informer, Queue, Requeue};
use tokio_util::sync::CancellationToken;

use crate::util::is_terminating;
use crate::Ctx;

const CLAIM: &str = "claim:";
const VOLUME: &str = "volume:";
/// A claim waiting on something no watch here reports (a node's root).
const RETRY: Duration = Duration::from_secs(10);

/// The watches of volumes, claims and classes.
pub struct Informers {
    pub volumes: Arc<Informer<PersistentVolume>>,
    pub claims: Arc<Informer<PersistentVolumeClaim>>,
    pub classes: Arc<Informer<StorageClass>>,
}

impl Informers {
    pub fn new(client: &Client) -> Self {
        let all = watcher::Config::default();
        Informers {
            volumes: Informer::new(Api::all(client.clone()), all.clone()),
            claims: Informer::new(Api::all(client.clone()), all.clone()),
            classes: Informer::new(Api::all(client.clone()), all),
        }
    }

    pub fn start(&self, shutdown: CancellationToken) {
        self.volumes.start(shutdown.clone());
        self.claims.start(shutdown.clone());
        self.classes.start(shutdown);
    }

    pub async fn ready(&self) {
        tokio::join!(
            self.volumes.ready(),
            self.claims.ready(),
            self.classes.ready()
        );
    }
}

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let v = &ctx.volumes;
    let q = queue.clone();
    v.claims.on_change(move |c, _| {
        q.add(format!("{CLAIM}{}", key_of(c)));
        if let Some(pv) = c.spec.as_ref().and_then(|s| s.volume_name.as_ref()) {
            q.add(format!("{VOLUME}{pv}"));
        }
    });
    let q = queue.clone();
    v.volumes.on_change(move |pv, _| {
        q.add(format!("{VOLUME}{}", pv.name_any()));
        if let Some((ns, name, _)) = claim_ref(pv) {
            q.add(format!("{CLAIM}{ns}/{name}"));
        }
    });
    let q = queue.clone();
    let claims = v.claims.clone();
    v.classes.on_change(move |class, _| {
        let name = class.name_any();
        for c in claims.store.state() {
            if c.spec
                .as_ref()
                .and_then(|s| s.volume_name.as_ref())
                .is_none()
                && class_of(&c) == name
            {
                q.add(format!("{CLAIM}{}", key_of(c.as_ref())));
            }
        }
    });
    // A claim being deleted waits for its pods.
    let q = queue.clone();
    let claims = v.claims.clone();
    ctx.pods.on_change(move |p, _| {
        let ns = p.namespace().unwrap_or_default();
        for name in claims_used(p) {
            if claims
                .get(Some(&ns), name)
                .is_some_and(|c| is_terminating(c.as_ref()))
            {
                q.add(format!("{CLAIM}{ns}/{name}"));
            }
        }
    });
}

pub fn keys(ctx: &Ctx) -> Vec<String> {
    let v = &ctx.volumes;
    let claims = v.claims.store.state();
    let volumes = v.volumes.store.state();
    claims
        .iter()
        .map(|c| format!("{CLAIM}{}", key_of(c.as_ref())))
        .chain(
            volumes
                .iter()
                .map(|pv| format!("{VOLUME}{}", pv.name_any())),
        )
        .collect()
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    if let Some(k) = key.strip_prefix(CLAIM) {
        let (ns, name) = k.split_once('/').unwrap_or(("", k));
        return reconcile_claim(&ctx, ns, name).await;
    }
    if let Some(name) = key.strip_prefix(VOLUME) {
        return reconcile_volume(&ctx, name).await;
    }
    Ok(Requeue::Done)
}

/// The claims a pod's volumes name.
fn claims_used(p: &Pod) -> impl Iterator<Item = &str> {
    p.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
}

/// `(namespace, name, uid)` of the claim a volume is bound or pre-bound to.
fn claim_ref(pv: &PersistentVolume) -> Option<(&str, &str, &str)> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    let name = r.name.as_deref().filter(|n| !n.is_empty())?;
    Some((
        r.namespace.as_deref().unwrap_or(""),
        name,
        r.uid.as_deref().unwrap_or(""),
    ))
}

/// Whether `pv`'s claimRef names `claim` (by uid once it has one).
fn refers_to(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    claim_ref(pv).is_some_and(|(ns, name, uid)| {
        Some(ns) == claim.metadata.namespace.as_deref()
            && name == claim.name_any()
            && (uid.is_empty() || Some(uid) == claim.metadata.uid.as_deref())
    })
}

fn class_of(c: &PersistentVolumeClaim) -> String {
    c.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default()
}

fn volume_class(pv: &PersistentVolume) -> &str {
    pv.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

fn annotation<'a, K: kube::Resource>(o: &'a K, key: &str) -> Option<&'a str> {
    o.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn has_finalizer<K: kube::Resource>(o: &K, f: &str) -> bool {
    o.meta().finalizers.iter().flatten().any(|x| x == f)
}

fn requested(c: &PersistentVolumeClaim) -> i128 {
    c.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| parse_milli(&q.0))
        .unwrap_or(0)
}

fn capacity(pv: &PersistentVolume) -> Option<i128> {
    pv.spec
        .as_ref()?
        .capacity
        .as_ref()?
        .get("storage")
        .and_then(|q| parse_milli(&q.0))
}

fn pv_phase(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Whether `pv` could serve `claim`: class, volume mode, access modes,
/// size, selector, and (when the claim's consumer is placed) the node.
pub fn fits(pv: &PersistentVolume, claim: &PersistentVolumeClaim, node: Option<&Node>) -> bool {
    let (Some(ps), Some(cs)) = (pv.spec.as_ref(), claim.spec.as_ref()) else {
        return false;
    };
    if volume_class(pv) != class_of(claim) {
        return false;
    }
    let mode = |m: Option<&String>| m.map_or("Filesystem", |m| m.as_str()).to_string();
    if mode(ps.volume_mode.as_ref()) != mode(cs.volume_mode.as_ref()) {
        return false;
    }
    let pv_modes = ps.access_modes.as_deref().unwrap_or(&[]);
    if !cs
        .access_modes
        .iter()
        .flatten()
        .all(|m| pv_modes.contains(m))
    {
        return false;
    }
    if capacity(pv).is_none_or(|c| c < requested(claim)) {
        return false;
    }
    if let Some(sel) = cs.selector.as_ref() {
        let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
            && sel.match_expressions.as_ref().is_none_or(|m| m.is_empty());
        if !empty && !selects(sel, &pv.labels().clone()) {
            return false;
        }
    }
    if let (Some(node), Some(required)) = (
        node,
        ps.node_affinity.as_ref().and_then(|a| a.required.as_ref()),
    ) {
        if !node_selector_matches(required, node) {
            return false;
        }
    }
    true
}

/// The smallest unbound volume that fits `claim`.
pub fn best_fit<'a>(
    volumes: &'a [Arc<PersistentVolume>],
    claim: &PersistentVolumeClaim,
    node: Option<&Node>,
) -> Option<&'a Arc<PersistentVolume>> {
    volumes
        .iter()
        .filter(|pv| {
            claim_ref(pv).is_none()
                && !is_terminating(pv.as_ref())
                && matches!(pv_phase(pv), "" | "Pending" | "Available")
                && fits(pv, claim, node)
        })
        .min_by_key(|pv| (capacity(pv).unwrap_or(0), pv.name_any()))
}

async fn reconcile_claim(ctx: &Ctx, ns: &str, name: &str) -> anyhow::Result<Requeue> {
    let v = &ctx.volumes;
    let Some(claim) = v.claims.get(Some(ns), name) else {
        return Ok(Requeue::Done);
    };
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    if is_terminating(claim.as_ref()) {
        if has_finalizer(claim.as_ref(), PVC_PROTECTION) && !in_use(ctx, ns, name) {
            remove_finalizer(&api, claim.as_ref(), PVC_PROTECTION).await?;
        }
        return Ok(Requeue::Done);
    }
    let bound_to = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty());
    if let Some(pv_name) = bound_to {
        return sync_bound_claim(ctx, &api, &claim, &pv_name).await;
    }
    // Pre-bound by a volume's claimRef.
    let volumes = v.volumes.store.state();
    if let Some(pv) = volumes
        .iter()
        .find(|pv| refers_to(pv, &claim) && !is_terminating(pv.as_ref()))
    {
        bind(ctx, &api, &claim, pv).await?;
        return Ok(Requeue::Done);
    }
    let class_name = class_of(&claim);
    let class = (!class_name.is_empty())
        .then(|| v.classes.get(None, &class_name))
        .flatten();
    let delayed = class
        .as_ref()
        .is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
    let selected = annotation(claim.as_ref(), SELECTED_NODE).map(str::to_string);
    if delayed && selected.is_none() {
        ctx.recorder.record(
            claim.as_ref(),
            false,
            "WaitForFirstConsumer",
            "waiting for first consumer to be created before binding".into(),
        );
        return Ok(Requeue::Done);
    }
    let node = selected.as_deref().and_then(|n| ctx.nodes.get(None, n));
    if let Some(pv) = best_fit(&volumes, &claim, node.as_deref()) {
        bind(ctx, &api, &claim, pv).await?;
        return Ok(Requeue::Done);
    }
    let Some(class) = class else {
        let message = if class_name.is_empty() {
            "no persistent volumes available for this claim and no storage class is set".to_string()
        } else {
            format!("storageclass.storage.k8s.io \"{class_name}\" not found")
        };
        let reason = if class_name.is_empty() {
            "FailedBinding"
        } else {
            "ProvisioningFailed"
        };
        ctx.recorder.record(claim.as_ref(), true, reason, message);
        return Ok(Requeue::Done);
    };
    if annotation(claim.as_ref(), STORAGE_PROVISIONER) != Some(class.provisioner.as_str()) {
        let patch = json!({"metadata": {"annotations": {STORAGE_PROVISIONER: class.provisioner}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    if class.provisioner != LOCAL_PATH_PROVISIONER {
        ctx.recorder.record(
            claim.as_ref(),
            false,
            "ExternalProvisioning",
            format!(
                "Waiting for a volume to be created by the external provisioner '{}'",
                class.provisioner
            ),
        );
        return Ok(Requeue::Done);
    }
    let Some(node_name) = selected else {
        ctx.recorder.record(
            claim.as_ref(),
            true,
            "ProvisioningFailed",
            format!(
                "storageclass \"{class_name}\": the {LOCAL_PATH_PROVISIONER} provisioner needs volumeBindingMode WaitForFirstConsumer"
            ),
        );
        return Ok(Requeue::Done);
    };
    provision(ctx, &claim, &class, &node_name, node.as_deref()).await
}

/// Create the local-path volume of `claim` on `node_name`, pre-bound to
/// the claim (the volume's event then binds them).
async fn provision(
    ctx: &Ctx,
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node_name: &str,
    node: Option<&Node>,
) -> anyhow::Result<Requeue> {
    let root = node.and_then(|n| annotation(n, LOCAL_PATH_ROOT));
    let Some(root) = root.filter(|r| r.starts_with('/')) else {
        ctx.recorder.record(
            claim,
            true,
            "ProvisioningFailed",
            format!("node \"{node_name}\" does not publish where its local-path volumes live ({LOCAL_PATH_ROOT})"),
        );
        return Ok(Requeue::After(RETRY));
    };
    let pv = local_path_volume(claim, class, node_name, root);
    let pv_name = pv.name_any();
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match api.create(&PostParams::default(), &pv).await {
        Ok(_) => ctx.recorder.record(
            claim,
            false,
            "ProvisioningSucceeded",
            format!("Successfully provisioned volume {pv_name} on node {node_name}"),
        ),
        Err(e) if tapestry_runtime::is_status(&e, 409) => {}
        Err(e) => {
            ctx.recorder.record(
                claim,
                true,
                "ProvisioningFailed",
                format!("creating volume {pv_name}: {e}"),
            );
            return Err(e.into());
        }
    }
    Ok(Requeue::Done)
}

/// The volume the local-path provisioner makes for `claim` on a node
/// whose local-path volumes live under `root`.
pub fn local_path_volume(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node: &str,
    root: &str,
) -> PersistentVolume {
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    let name = format!("pvc-{uid}");
    let spec = claim.spec.clone().unwrap_or_default();
    let request = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_else(|| "0".into());
    let value = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "annotations": {PROVISIONED_BY: LOCAL_PATH_PROVISIONER},
            "labels": {LOCAL_PATH_NODE_LABEL: node},
            "finalizers": [LOCAL_PATH_CLEANUP],
        },
        "spec": {
            "capacity": {"storage": request},
            "accessModes": spec.access_modes.clone().unwrap_or_default(),
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "storageClassName": class.name_any(),
            "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
            "local": {"path": format!("{}/{name}", root.trim_end_matches('/'))},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]}]}},
            "claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(), "name": claim.name_any(), "uid": uid,
            },
        },
    });
    serde_json::from_value(value).unwrap_or_default()
}

/// Bind `claim` and `pv`: the volume's claimRef first, then the claim.
async fn bind(
    ctx: &Ctx,
    claims: &Api<PersistentVolumeClaim>,
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
) -> anyhow::Result<()> {
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv_name = pv.name_any();
    let ref_uid = claim_ref(pv).map(|(_, _, uid)| uid).unwrap_or("");
    let claim_uid = claim.metadata.uid.clone().unwrap_or_default();
    let mut pv_now = pv.clone();
    if ref_uid != claim_uid {
        let mut patch = json!({
            "metadata": {"resourceVersion": pv.resource_version()},
            "spec": {"claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": claim.namespace(), "name": claim.name_any(),
                "uid": claim_uid, "resourceVersion": claim.resource_version(),
            }},
        });
        if claim_ref(pv).is_none() {
            patch["metadata"]["annotations"] = json!({BOUND_BY_CONTROLLER: "yes"});
        }
        pv_now = volumes
            .patch(&pv_name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    if pv_phase(&pv_now) != "Bound" {
        let status = json!({"status": {"phase": "Bound"}});
        volumes
            .patch_status(&pv_name, &PatchParams::default(), &Patch::Merge(status))
            .await?;
    }
    let mut annotations = json!({BIND_COMPLETED: "yes"});
    if claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_none_or(str::is_empty)
    {
        annotations[BOUND_BY_CONTROLLER] = json!("yes");
    }
    let patch = json!({
        "metadata": {"resourceVersion": claim.resource_version(), "annotations": annotations},
        "spec": {"volumeName": pv_name},
    });
    let name = claim.name_any();
    let claim_now = claims
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    set_claim_bound(claims, &claim_now, &pv_now).await?;
    ctx.recorder
        .record(claim, false, "Bound", format!("Bound to volume {pv_name}"));
    Ok(())
}

async fn set_claim_bound(
    claims: &Api<PersistentVolumeClaim>,
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
) -> anyhow::Result<()> {
    let spec = pv.spec.clone().unwrap_or_default();
    let want = json!({
        "phase": "Bound",
        "capacity": spec.capacity.unwrap_or_default(),
        "accessModes": spec.access_modes.unwrap_or_default(),
    });
    let status = claim.status.clone().unwrap_or_default();
    let now = json!({
        "phase": status.phase,
        "capacity": status.capacity.unwrap_or_default(),
        "accessModes": status.access_modes.unwrap_or_default(),
    });
    if now != want {
        claims
            .patch_status(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": want})),
            )
            .await?;
    }
    Ok(())
}

/// A claim naming its volume: finish the binding, or report it Lost.
async fn sync_bound_claim(
    ctx: &Ctx,
    api: &Api<PersistentVolumeClaim>,
    claim: &PersistentVolumeClaim,
    pv_name: &str,
) -> anyhow::Result<Requeue> {
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
    let Some(pv) = ctx.volumes.volumes.get(None, pv_name) else {
        if phase == Some("Bound") {
            let status = json!({"status": {"phase": "Lost"}});
            api.patch_status(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(status),
            )
            .await?;
            ctx.recorder.record(
                claim,
                true,
                "ClaimLost",
                "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!"
                    .into(),
            );
        }
        return Ok(Requeue::Done);
    };
    if refers_to(&pv, claim) {
        if claim_ref(&pv).is_some_and(|(_, _, uid)| uid.is_empty())
            || annotation(claim, BIND_COMPLETED).is_none()
            || pv_phase(&pv) != "Bound"
        {
            bind(ctx, api, claim, &pv).await?;
        } else {
            set_claim_bound(api, claim, &pv).await?;
        }
        return Ok(Requeue::Done);
    }
    if claim_ref(&pv).is_none() && !is_terminating(pv.as_ref()) {
        // Pre-bound by the claim's volumeName.
        let node = annotation(claim, SELECTED_NODE).and_then(|n| ctx.nodes.get(None, n));
        if fits(&pv, claim, node.as_deref()) {
            bind(ctx, api, claim, &pv).await?;
        } else {
            ctx.recorder.record(
                claim,
                true,
                "FailedBinding",
                format!("volume \"{pv_name}\" does not fit the claim"),
            );
        }
        return Ok(Requeue::Done);
    }
    ctx.recorder.record(
        claim,
        true,
        "FailedBinding",
        format!("volume \"{pv_name}\" already bound to a different claim."),
    );
    Ok(Requeue::Done)
}

/// Whether a pod that has not terminated uses the claim.
fn in_use(ctx: &Ctx, ns: &str, name: &str) -> bool {
    !ctx.pods
        .list_in(ns, |p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed")) && claims_used(p).any(|c| c == name)
        })
        .is_empty()
}

async fn remove_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let keep: Vec<&String> = obj
        .meta()
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != finalizer)
        .collect();
    let patch =
        json!({"metadata": {"resourceVersion": obj.meta().resource_version, "finalizers": keep}});
    let name = obj.meta().name.clone().unwrap_or_default();
    ignore_not_found(
        api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await,
    )?;
    Ok(())
}

/// What a volume's claimRef finds.
#[derive(Debug, PartialEq, Eq)]
pub enum ClaimState {
    /// No claimRef.
    Unclaimed,
    /// Pre-bound to a claim that does not exist yet, or that has not
    /// bound yet.
    Waiting,
    /// Its claim names it.
    Bound,
    /// Its claim names another volume.
    Elsewhere,
    /// Its claim is gone (or was replaced by a new one of the same name).
    Released,
}

pub fn claim_state(pv: &PersistentVolume, claim: Option<&PersistentVolumeClaim>) -> ClaimState {
    let Some((_, _, uid)) = claim_ref(pv) else {
        return ClaimState::Unclaimed;
    };
    match claim {
        Some(c) if uid.is_empty() || Some(uid) == c.metadata.uid.as_deref() => {
            match c.spec.as_ref().and_then(|s| s.volume_name.as_deref()) {
                Some(v) if v == pv.name_any() => ClaimState::Bound,
                None | Some("") => ClaimState::Waiting,
                Some(_) => ClaimState::Elsewhere,
            }
        }
        _ if uid.is_empty() => ClaimState::Waiting,
        _ => ClaimState::Released,
    }
}

async fn reconcile_volume(ctx: &Ctx, name: &str) -> anyhow::Result<Requeue> {
    let Some(pv) = ctx.volumes.volumes.get(None, name) else {
        return Ok(Requeue::Done);
    };
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let claim = claim_ref(&pv).and_then(|(ns, n, _)| ctx.volumes.claims.get(Some(ns), n));
    let state = claim_state(&pv, claim.as_deref());
    if is_terminating(pv.as_ref()) {
        if state != ClaimState::Bound && has_finalizer(pv.as_ref(), PV_PROTECTION) {
            remove_finalizer(&api, pv.as_ref(), PV_PROTECTION).await?;
        }
        return Ok(Requeue::Done);
    }
    let set_phase = |phase: &'static str, message: Option<String>| {
        let api = api.clone();
        let current = pv_phase(&pv).to_string();
        let current_message = pv
            .status
            .as_ref()
            .and_then(|s| s.message.clone())
            .unwrap_or_default();
        async move {
            if current == phase && current_message == message.clone().unwrap_or_default() {
                return Ok::<(), anyhow::Error>(());
            }
            let status = json!({"status": {"phase": phase, "message": message}});
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
                .await?;
            Ok(())
        }
    };
    match state {
        ClaimState::Unclaimed => {
            if pv_phase(&pv) != "Failed" {
                set_phase("Available", None).await?;
            }
        }
        // Being bound: the claim's half follows (its sync enqueued it).
        ClaimState::Waiting => {
            if !matches!(pv_phase(&pv), "Bound" | "Failed") {
                set_phase("Available", None).await?;
            }
        }
        ClaimState::Bound => set_phase("Bound", None).await?,
        ClaimState::Elsewhere => {
            if annotation(pv.as_ref(), BOUND_BY_CONTROLLER).is_some() {
                // The controller's own half-done binding: undo it.
                let patch = json!({"metadata": {"resourceVersion": pv.resource_version(),
                    "annotations": {BOUND_BY_CONTROLLER: null}}, "spec": {"claimRef": null}});
                api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
            }
            set_phase("Available", None).await?;
        }
        ClaimState::Released => {
            let policy = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
                .unwrap_or("Retain");
            let local_path =
                annotation(pv.as_ref(), PROVISIONED_BY) == Some(LOCAL_PATH_PROVISIONER);
            match policy {
                "Delete" if local_path => {
                    set_phase("Released", None).await?;
                    ignore_not_found(api.delete(name, &DeleteParams::default()).await)?;
                    ctx.recorder.record(
                        pv.as_ref(),
                        false,
                        "VolumeDelete",
                        format!("Deleting released volume {name}: its node removes the data"),
                    );
                }
                "Delete" => {
                    set_phase(
                        "Failed",
                        Some(format!("error getting deleter volume plugin for volume \"{name}\": no deletable volume plugin matched")),
                    )
                    .await?
                }
                "Recycle" => {
                    set_phase(
                        "Failed",
                        Some("recycling is not supported: no volume plugin matched".into()),
                    )
                    .await?
                }
                _ => set_phase("Released", None).await?,
            }
        }
    }
    Ok(Requeue::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pv(name: &str, size: &str, modes: &[&str], class: &str) -> Arc<PersistentVolume> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"capacity": {"storage": size}, "accessModes": modes,
                         "storageClassName": class, "hostPath": {"path": "/x"}},
                "status": {"phase": "Available"},
            }))
            .unwrap(),
        )
    }

    fn claim(size: &str, modes: &[&str], class: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "data", "namespace": "default", "uid": "u1"},
            "spec": {"accessModes": modes, "storageClassName": class,
                     "resources": {"requests": {"storage": size}}},
        }))
        .unwrap()
    }

    #[test]
    fn the_smallest_fitting_volume_wins() {
        let volumes = vec![
            pv("big", "10Gi", &["ReadWriteOnce"], ""),
            pv("small", "500Mi", &["ReadWriteOnce"], ""),
            pv("fits", "2Gi", &["ReadWriteOnce", "ReadOnlyMany"], ""),
            pv("other-class", "1Gi", &["ReadWriteOnce"], "fast"),
            pv("rox", "1Gi", &["ReadOnlyMany"], ""),
        ];
        let c = claim("1Gi", &["ReadWriteOnce"], "");
        assert_eq!(best_fit(&volumes, &c, None).unwrap().name_any(), "fits");
        let c = claim("1Gi", &["ReadWriteOnce"], "fast");
        assert_eq!(
            best_fit(&volumes, &c, None).unwrap().name_any(),
            "other-class"
        );
        let c = claim("20Gi", &["ReadWriteOnce"], "");
        assert!(best_fit(&volumes, &c, None).is_none());
    }

    #[test]
    fn claimed_and_selected_out_volumes_are_skipped() {
        let mut labelled = (*pv("labelled", "1Gi", &["ReadWriteOnce"], "")).clone();
        labelled.metadata.labels = Some(labels(&[("tier", "gold")]));
        let mut taken = (*pv("taken", "1Gi", &["ReadWriteOnce"], "")).clone();
        taken.spec.as_mut().unwrap().claim_ref = Some(Default::default());
        taken
            .spec
            .as_mut()
            .unwrap()
            .claim_ref
            .as_mut()
            .unwrap()
            .name = Some("x".into());
        let volumes = vec![Arc::new(labelled), Arc::new(taken)];
        let mut c = claim("1Gi", &["ReadWriteOnce"], "");
        assert_eq!(best_fit(&volumes, &c, None).unwrap().name_any(), "labelled");
        c.spec.as_mut().unwrap().selector =
            serde_json::from_value(json!({"matchLabels": {"tier": "silver"}})).unwrap();
        assert!(best_fit(&volumes, &c, None).is_none());
    }

    #[test]
    fn node_affinity_must_match_the_chosen_node() {
        let mut local = (*pv("local", "1Gi", &["ReadWriteOnce"], "")).clone();
        local.spec.as_mut().unwrap().node_affinity = serde_json::from_value(json!({"required":
            {"nodeSelectorTerms": [{"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": ["a"]}]}]}}))
        .unwrap();
        let node = |n: &str| -> Node {
            serde_json::from_value(json!({"metadata": {"name": n, "labels": {HOSTNAME_LABEL: n}}}))
                .unwrap()
        };
        let c = claim("1Gi", &["ReadWriteOnce"], "");
        assert!(fits(&local, &c, Some(&node("a"))));
        assert!(!fits(&local, &c, Some(&node("b"))));
        assert!(fits(&local, &c, None));
    }

    #[test]
    fn a_volume_whose_claim_is_gone_is_released() {
        let mut v = (*pv("v", "1Gi", &["ReadWriteOnce"], "")).clone();
        assert_eq!(claim_state(&v, None), ClaimState::Unclaimed);
        v.spec.as_mut().unwrap().claim_ref =
            serde_json::from_value(json!({"namespace": "default", "name": "data"})).unwrap();
        assert_eq!(claim_state(&v, None), ClaimState::Waiting, "pre-bound");
        let mut c = claim("1Gi", &["ReadWriteOnce"], "");
        assert_eq!(claim_state(&v, Some(&c)), ClaimState::Waiting);
        c.spec.as_mut().unwrap().volume_name = Some("v".into());
        assert_eq!(claim_state(&v, Some(&c)), ClaimState::Bound);
        c.spec.as_mut().unwrap().volume_name = Some("w".into());
        assert_eq!(claim_state(&v, Some(&c)), ClaimState::Elsewhere);
        v.spec.as_mut().unwrap().claim_ref.as_mut().unwrap().uid = Some("old".into());
        assert_eq!(claim_state(&v, Some(&c)), ClaimState::Released, "replaced");
        assert_eq!(claim_state(&v, None), ClaimState::Released, "deleted");
    }

    #[test]
    fn a_local_path_volume_lives_on_its_node() {
        let c = claim("1Gi", &["ReadWriteOnce"], "local-path");
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": "local-path"}, "provisioner": LOCAL_PATH_PROVISIONER,
            "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer"}))
        .unwrap();
        let v = local_path_volume(&c, &class, "n1", "/var/lib/tapestry/volumes/");
        assert_eq!(v.name_any(), "pvc-u1");
        let spec = v.spec.as_ref().unwrap();
        assert_eq!(
            spec.local.as_ref().unwrap().path,
            "/var/lib/tapestry/volumes/pvc-u1"
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(spec.claim_ref.as_ref().unwrap().uid.as_deref(), Some("u1"));
        assert_eq!(
            v.metadata.finalizers.as_deref(),
            Some(&[LOCAL_PATH_CLEANUP.to_string()][..])
        );
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": "n1", "labels": {HOSTNAME_LABEL: "n1"}}}),
        )
        .unwrap();
        assert!(fits(&v, &c, Some(&node)));
    }
}
