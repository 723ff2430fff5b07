//! NodeRestriction, as kube-apiserver's admission plugin of that name: a
//! node changes only what is its own. The Node authorizer
//! ([`crate::authz::node`]) already confines nodes by name; what needs the
//! object itself is checked here: the pods a node writes or deletes are
//! bound to it, the Node and Lease it creates carry its name, the tokens
//! it asks for are bound to its pods, and the only volumes it changes are
//! its own local-path volumes being deleted.

use serde_json::Value;
use tapestry_apimachinery::tokens::User;

use super::Request;
use crate::authz::node::node_name;
use crate::error::{ApiError, ApiResult};
use crate::objects::meta_str;

/// Check a write by `req`'s user to `obj` (the new object of a create, the
/// stored one of an update or delete).
pub fn check(req: &Request, obj: &Value) -> ApiResult<()> {
    let Some(node) = req.user.as_deref().and_then(node_name) else {
        return Ok(());
    };
    let def = &req.def;
    let name = meta_str(obj, "name");
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "pods") => check_pod(node, obj),
        ("", "nodes") if name != node => Err(ApiError::Forbidden(format!(
            "node \"{node}\" is not allowed to modify node \"{name}\""
        ))),
        ("", "persistentvolumes") if !own_local_path_volume(node, obj) => {
            Err(ApiError::Forbidden(format!(
                "node \"{node}\" may only change deleted local-path volumes on itself, not persistentvolume \"{name}\""
            )))
        }
        ("coordination.k8s.io", "leases")
            if meta_str(obj, "namespace") == "kube-node-lease" && name != node =>
        {
            Err(ApiError::Forbidden(format!(
                "node \"{node}\" is not allowed to modify lease \"{name}\" in kube-node-lease"
            )))
        }
        _ => Ok(()),
    }
}

/// A node's update of a volume (already its own, see [`check`]) may only
/// drop the local-path cleanup finalizer: nothing else of the volume is
/// the node's to change.
pub fn check_update(req: &Request, new: &Value, old: &Value) -> ApiResult<()> {
    let Some(node) = req.user.as_deref().and_then(node_name) else {
        return Ok(());
    };
    if (req.def.group.as_str(), req.def.plural.as_str()) != ("", "persistentvolumes")
        || only_cleanup_dropped(new, old)
    {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "node \"{node}\" may only remove the {} finalizer of persistentvolume \"{}\"",
        tapestry_runtime::storage::LOCAL_PATH_CLEANUP,
        meta_str(old, "name")
    )))
}

/// Whether `new` is `old` with at most the local-path cleanup finalizer
/// removed.
fn only_cleanup_dropped(new: &Value, old: &Value) -> bool {
    use tapestry_runtime::storage::LOCAL_PATH_CLEANUP;
    let finalizers = |o: &Value| -> Vec<String> {
        o.pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect()
    };
    // What remains once the fields a write may carry along are set aside.
    let rest = |o: &Value| {
        let mut o = o.clone();
        if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            for key in ["finalizers", "resourceVersion", "managedFields"] {
                m.remove(key);
            }
        }
        o
    };
    let (kept, had) = (finalizers(new), finalizers(old));
    kept.iter().all(|f| had.contains(f))
        && had
            .iter()
            .all(|f| kept.contains(f) || f == LOCAL_PATH_CLEANUP)
        && rest(new) == rest(old)
}

/// Whether `pv` is a local-path volume on `node` being deleted: the one
/// kind of volume a node changes (removing its cleanup finalizer once the
/// directory is gone).
fn own_local_path_volume(node: &str, pv: &Value) -> bool {
    use tapestry_runtime::storage::{
        LOCAL_PATH_NODE_LABEL, LOCAL_PATH_PROVISIONER, PROVISIONED_BY,
    };
    let annotation = pv
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(PROVISIONED_BY))
        .and_then(Value::as_str);
    let label = pv
        .pointer("/metadata/labels")
        .and_then(|l| l.get(LOCAL_PATH_NODE_LABEL))
        .and_then(Value::as_str);
    pv.pointer("/metadata/deletionTimestamp").is_some()
        && annotation == Some(LOCAL_PATH_PROVISIONER)
        && label == Some(node)
}

/// A node's write to pod `pod` (or a token bound to it): only if the pod
/// is bound to that node.
pub fn check_pod(node: &str, pod: &Value) -> ApiResult<()> {
    let bound_to = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if bound_to == node {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "node \"{node}\" can only modify pods bound to it; pod \"{}/{}\" is {}",
        meta_str(pod, "namespace"),
        meta_str(pod, "name"),
        if bound_to.is_empty() {
            "not bound to a node".to_string()
        } else {
            format!("bound to node \"{bound_to}\"")
        }
    )))
}

/// The node `user` is, for handlers that check bound objects themselves.
pub fn node_of(user: Option<&User>) -> Option<&str> {
    user.and_then(node_name)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tapestry_runtime::storage::{
        LOCAL_PATH_NODE_LABEL, LOCAL_PATH_PROVISIONER, PROVISIONED_BY,
    };

    use super::{only_cleanup_dropped, own_local_path_volume};

    #[test]
    fn a_node_may_only_drop_the_cleanup_finalizer() {
        let pv = |finalizers: serde_json::Value, path: &str| {
            json!({"metadata": {"name": "pvc-1", "resourceVersion": "7", "finalizers": finalizers},
                   "spec": {"local": {"path": path}}})
        };
        let old = pv(
            json!([
                tapestry_runtime::storage::LOCAL_PATH_CLEANUP,
                "kubernetes.io/pv-protection"
            ]),
            "/v",
        );
        let dropped = pv(json!(["kubernetes.io/pv-protection"]), "/v");
        assert!(only_cleanup_dropped(&dropped, &old));
        assert!(only_cleanup_dropped(&old, &old));
        // Another finalizer, or anything else of the volume: refused.
        assert!(!only_cleanup_dropped(&pv(json!([]), "/v"), &old));
        assert!(!only_cleanup_dropped(
            &pv(json!(["kubernetes.io/pv-protection"]), "/elsewhere"),
            &old
        ));
        assert!(!only_cleanup_dropped(
            &pv(json!(["x", "kubernetes.io/pv-protection"]), "/v"),
            &old
        ));
    }

    #[test]
    fn a_node_changes_only_its_own_deleted_local_path_volumes() {
        let pv = |node: &str, deleted: bool, provisioner: &str| {
            let mut v = json!({"metadata": {"name": "pvc-1",
                "annotations": {PROVISIONED_BY: provisioner},
                "labels": {LOCAL_PATH_NODE_LABEL: node}}});
            if deleted {
                v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            v
        };
        assert!(own_local_path_volume(
            "a",
            &pv("a", true, LOCAL_PATH_PROVISIONER)
        ));
        assert!(!own_local_path_volume(
            "a",
            &pv("b", true, LOCAL_PATH_PROVISIONER)
        ));
        assert!(!own_local_path_volume(
            "a",
            &pv("a", false, LOCAL_PATH_PROVISIONER)
        ));
        assert!(!own_local_path_volume("a", &pv("a", true, "example.com/x")));
    }
}
