//! The ServiceAccount admission of pods, as Kubernetes': a pod runs as
//! `spec.serviceAccountName` (default `default`), and unless it or its
//! account says `automountServiceAccountToken: false`, every container
//! gets a projected volume at [`MOUNT_PATH`] with a token bound to the
//! pod (which the kubelet requests and refreshes), the cluster CA
//! (`kube-root-ca.crt`) and the namespace: what in-cluster clients read.
//!
//! Unlike Kubernetes, a pod whose account does not exist yet is not
//! refused (a pod created right after its namespace would race the
//! controller that makes `default`); its kubelet retries the token until
//! the account exists.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};
use tapestry_store::Store;

use crate::error::ApiResult;
use crate::objects::{meta_str, random_suffix};
use crate::registry::WriteHook;

pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Kubernetes' choice: a little over an hour, so a token's refresh at 80%
/// of its life is noticeable apart from hourly events.
const TOKEN_SECONDS: i64 = 3607;

pub struct ServiceAccountAdmission {
    pub store: Arc<dyn Store>,
}

#[async_trait]
impl WriteHook for ServiceAccountAdmission {
    async fn on_create(&self, pod: &mut Value, _dry_run: bool) -> ApiResult<()> {
        let ns = meta_str(pod, "namespace").to_string();
        let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        let account = spec
            .get("serviceAccountName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .or_else(|| spec.get("serviceAccount").and_then(Value::as_str))
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_string();
        spec.insert("serviceAccountName".into(), json!(account));
        spec.insert("serviceAccount".into(), json!(account));
        let automount = match spec
            .get("automountServiceAccountToken")
            .and_then(Value::as_bool)
        {
            Some(a) => a,
            None => self.account_automounts(&ns, &account).await,
        };
        if automount {
            mount_token(spec);
        }
        Ok(())
    }

    async fn on_update(&self, _new: &mut Value, _old: &Value, _dry_run: bool) -> ApiResult<()> {
        Ok(())
    }

    async fn release(&self, _obj: &Value, _keep: Option<&Value>) {}
}

impl ServiceAccountAdmission {
    /// The account's `automountServiceAccountToken` (true when it, or the
    /// field, is absent).
    async fn account_automounts(&self, ns: &str, account: &str) -> bool {
        let key = format!("/registry/serviceaccounts/{ns}/{account}");
        let stored = self.store.get(&key).await.ok().flatten();
        stored
            .and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
            .and_then(|sa| {
                sa.get("automountServiceAccountToken")
                    .and_then(Value::as_bool)
            })
            .unwrap_or(true)
    }
}

/// Adds the projected volume, mounted read-only in every container that
/// does not mount something there already.
fn mount_token(spec: &mut serde_json::Map<String, Value>) {
    let name = format!("kube-api-access-{}", random_suffix());
    let volume = json!({
        "name": name,
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": TOKEN_SECONDS, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ],
        },
    });
    let mut mounted = false;
    for list in ["initContainers", "containers"] {
        for c in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let mounts = c
                .as_object_mut()
                .map(|c| c.entry("volumeMounts").or_insert_with(|| json!([])));
            let Some(Value::Array(mounts)) = mounts else {
                continue;
            };
            if mounts
                .iter()
                .any(|m| m.get("mountPath").and_then(Value::as_str) == Some(MOUNT_PATH))
            {
                continue;
            }
            mounts.push(json!({"name": name, "mountPath": MOUNT_PATH, "readOnly": true}));
            mounted = true;
        }
    }
    if mounted {
        let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
        if let Value::Array(v) = volumes {
            v.push(volume);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_container_mounts_one_token_volume() {
        let mut spec = json!({"containers": [{"name": "a"}, {"name": "b",
            "volumeMounts": [{"name": "own", "mountPath": MOUNT_PATH}]}],
            "initContainers": [{"name": "i"}]});
        mount_token(spec.as_object_mut().unwrap());
        let volumes = spec["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 1);
        let name = volumes[0]["name"].as_str().unwrap();
        assert!(name.starts_with("kube-api-access-"), "{name}");
        assert_eq!(spec["containers"][0]["volumeMounts"][0]["name"], name);
        assert_eq!(spec["containers"][0]["volumeMounts"][0]["readOnly"], true);
        assert_eq!(spec["initContainers"][0]["volumeMounts"][0]["name"], name);
        let b = spec["containers"][1]["volumeMounts"].as_array().unwrap();
        assert_eq!(b.len(), 1, "its own mount stays: {b:?}");
        // Validated by the same codec as any pod.
        let pod = json!({"metadata": {"name": "p"}, "spec": spec});
        serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(pod).unwrap();
    }
}
