//! NodeRestriction, as kube-apiserver's admission plugin of that name: a
//! node changes only what is its own. The Node authorizer
//! ([`crate::authz::node`]) already confines nodes by name; what needs the
//! object itself is checked here: the pods a node writes or deletes are
//! bound to it, the Node and Lease it creates carry its name, and the
//! tokens it asks for are bound to its pods.

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
