//! Volume binding in scheduling, as kube-scheduler's VolumeBinding plugin
//! decides it for Tapestry's storage: a pod whose claim is missing, being
//! deleted, or unbound in an Immediate class waits; a bound claim's volume
//! restricts the pod to the nodes its node affinity selects; an unbound
//! claim of a WaitForFirstConsumer class goes with the pod, to a node that
//! can provision it (for `local-path`, a node publishing its volume root),
//! and the chosen node is written on the claim
//! (`volume.kubernetes.io/selected-node`) before the pod is bound, which
//! lets the binding controller provision or bind its volume there.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Node, NodeSelector, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tapestry_runtime::selector::node_selector_matches;
use tapestry_runtime::storage::{LOCAL_PATH_PROVISIONER, LOCAL_PATH_ROOT, SELECTED_NODE};
use tapestry_runtime::Informer;
use tokio_util::sync::CancellationToken;

/// The watches of claims, volumes and classes.
pub struct Volumes {
    pub claims: Arc<Informer<PersistentVolumeClaim>>,
    pub volumes: Arc<Informer<PersistentVolume>>,
    pub classes: Arc<Informer<StorageClass>>,
}

impl Volumes {
    /// Watches started; `changed` is called on every change.
    pub fn start(
        client: &Client,
        changed: impl Fn() + Clone + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> Self {
        let all = watcher::Config::default();
        let v = Volumes {
            claims: Informer::new(Api::all(client.clone()), all.clone()),
            volumes: Informer::new(Api::all(client.clone()), all.clone()),
            classes: Informer::new(Api::all(client.clone()), all),
        };
        let c = changed.clone();
        v.claims.on_change(move |_, _| c());
        let c = changed.clone();
        v.volumes.on_change(move |_, _| c());
        v.classes.on_change(move |_, _| changed());
        v.claims.start(shutdown.clone());
        v.volumes.start(shutdown.clone());
        v.classes.start(shutdown);
        v
    }

    pub async fn ready(&self) {
        tokio::join!(
            self.claims.ready(),
            self.volumes.ready(),
            self.classes.ready()
        );
    }

    /// What `pod`'s claims ask of a node.
    pub fn needs(&self, pod: &Pod) -> Result<Vec<Need>, String> {
        let ns = pod.namespace().unwrap_or_default();
        needs(
            pod,
            |name| self.claims.get(Some(&ns), name),
            |name| self.volumes.get(None, name),
            |name| self.classes.get(None, name),
        )
    }
}

/// What one claim of a pod asks of the node it goes to.
#[derive(Clone, Debug, PartialEq)]
pub enum Need {
    /// Bound: the volume's node affinity, if it has one.
    Bound(Option<NodeSelector>),
    /// Waiting for its first consumer: the claim's name, the node already
    /// chosen for it, and whether the node must offer local-path storage.
    Delayed {
        claim: String,
        selected: Option<String>,
        local_path: bool,
    },
}

/// What each of `pod`'s claims asks, or why the pod cannot be placed
/// anywhere now.
pub fn needs(
    pod: &Pod,
    claim: impl Fn(&str) -> Option<Arc<PersistentVolumeClaim>>,
    volume: impl Fn(&str) -> Option<Arc<PersistentVolume>>,
    class: impl Fn(&str) -> Option<Arc<StorageClass>>,
) -> Result<Vec<Need>, String> {
    let mut out = Vec::new();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    for v in volumes.into_iter().flatten() {
        let Some(source) = v.persistent_volume_claim.as_ref() else {
            continue;
        };
        let name = &source.claim_name;
        let Some(c) = claim(name) else {
            return Err(format!("persistentvolumeclaim \"{name}\" not found"));
        };
        if c.metadata.deletion_timestamp.is_some() {
            return Err(format!("persistentvolumeclaim \"{name}\" is being deleted"));
        }
        let spec = c.spec.clone().unwrap_or_default();
        if let Some(pv_name) = spec.volume_name.as_deref().filter(|n| !n.is_empty()) {
            let Some(pv) = volume(pv_name) else {
                return Err("pvc(s) bound to non-existent pv(s)".into());
            };
            let affinity = pv
                .spec
                .as_ref()
                .and_then(|s| s.node_affinity.as_ref())
                .and_then(|a| a.required.clone());
            out.push(Need::Bound(affinity));
            continue;
        }
        let class = spec
            .storage_class_name
            .as_deref()
            .filter(|n| !n.is_empty())
            .and_then(&class);
        let delayed = class
            .as_ref()
            .is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
        if !delayed {
            return Err("pod has unbound immediate PersistentVolumeClaims".into());
        }
        out.push(Need::Delayed {
            claim: name.clone(),
            selected: c
                .annotations()
                .get(SELECTED_NODE)
                .filter(|n| !n.is_empty())
                .cloned(),
            local_path: class.is_some_and(|c| c.provisioner == LOCAL_PATH_PROVISIONER),
        });
    }
    Ok(out)
}

/// Why `node` cannot take a pod with these claims, or None.
pub fn filter(needs: &[Need], node: &Node) -> Option<&'static str> {
    for need in needs {
        match need {
            Need::Bound(Some(affinity)) if !node_selector_matches(affinity, node) => {
                return Some("node(s) had volume node affinity conflict");
            }
            Need::Bound(_) => {}
            Need::Delayed { selected, .. }
                if selected
                    .as_deref()
                    .is_some_and(|s| Some(s) != node.metadata.name.as_deref()) =>
            {
                return Some("node(s) were not the node selected for the pod's volume");
            }
            Need::Delayed {
                local_path: true, ..
            } if !node.annotations().contains_key(LOCAL_PATH_ROOT) => {
                return Some("node(s) did not offer local-path storage");
            }
            Need::Delayed { .. } => {}
        }
    }
    None
}

/// The claims to mark with the chosen node before the pod is bound.
pub fn to_select(needs: &[Need]) -> Vec<String> {
    needs
        .iter()
        .filter_map(|n| match n {
            Need::Delayed {
                claim,
                selected: None,
                ..
            } => Some(claim.clone()),
            _ => None,
        })
        .collect()
}

/// Write `node` on each claim as its first consumer's node.
pub async fn select_node(
    client: &Client,
    namespace: &str,
    claims: &[String],
    node: &str,
) -> Result<(), kube::Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    for claim in claims {
        let patch = json!({"metadata": {"annotations": {SELECTED_NODE: node}}});
        api.patch(claim, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn obj<T: k8s_openapi::serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c"}],
                     "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}}))
        .unwrap()
    }

    fn node(name: &str, root: bool) -> Node {
        let mut n = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}});
        if root {
            n["metadata"]["annotations"] = json!({LOCAL_PATH_ROOT: "/data/volumes"});
        }
        serde_json::from_value(n).unwrap()
    }

    fn class(mode: &str) -> Option<Arc<StorageClass>> {
        Some(obj(json!({"metadata": {"name": "local-path"},
            "provisioner": LOCAL_PATH_PROVISIONER, "volumeBindingMode": mode})))
    }

    #[test]
    fn unbound_immediate_and_missing_claims_wait() {
        let no_volume = |_: &str| None::<Arc<PersistentVolume>>;
        assert_eq!(
            needs(
                &pod(),
                |_| None,
                no_volume,
                |_: &str| None::<Arc<StorageClass>>
            ),
            Err("persistentvolumeclaim \"data\" not found".into())
        );
        let claim = obj::<PersistentVolumeClaim>(json!({"metadata": {"name": "data"},
            "spec": {"storageClassName": "local-path"}}));
        let got = needs(
            &pod(),
            |_| Some(claim.clone()),
            no_volume,
            |_| class("Immediate"),
        );
        assert_eq!(
            got,
            Err("pod has unbound immediate PersistentVolumeClaims".into())
        );
    }

    #[test]
    fn a_delayed_claim_goes_where_local_path_is_offered_and_is_marked() {
        let claim = obj::<PersistentVolumeClaim>(json!({"metadata": {"name": "data"},
            "spec": {"storageClassName": "local-path"}}));
        let got = needs(
            &pod(),
            |_| Some(claim.clone()),
            |_| None,
            |_| class("WaitForFirstConsumer"),
        )
        .unwrap();
        assert_eq!(filter(&got, &node("a", true)), None);
        assert!(filter(&got, &node("b", false)).is_some());
        assert_eq!(to_select(&got), ["data"]);
    }

    #[test]
    fn a_bound_volume_keeps_the_pod_on_its_node() {
        let claim = obj::<PersistentVolumeClaim>(json!({"metadata": {"name": "data"},
            "spec": {"volumeName": "pv1"}}));
        let pv = obj::<PersistentVolume>(json!({"metadata": {"name": "pv1"},
            "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["a"]}]}]}}}}));
        let got = needs(
            &pod(),
            |_| Some(claim.clone()),
            |_| Some(pv.clone()),
            |_| None,
        )
        .unwrap();
        assert_eq!(filter(&got, &node("a", false)), None);
        assert_eq!(
            filter(&got, &node("b", true)),
            Some("node(s) had volume node affinity conflict")
        );
        assert!(to_select(&got).is_empty());
    }
}
