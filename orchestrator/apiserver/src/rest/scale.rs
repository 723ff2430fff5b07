//! The scale subresource (autoscaling/v1 Scale) of workloads and of custom
//! resources that declare one: a view of the replica count and selector
//! at paths each resource names.

use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use http::StatusCode;
use serde_json::{json, Value};

use super::render::json_response;
use super::{Api, Request};
use crate::error::{ApiError, ApiResult, Cause};
use crate::objects::{meta, meta_mut, meta_str};
use crate::patch::{self, PatchKind};
use crate::registry::{
    ResourceDef, Subresource, SubresourceDef, SubresourceDiscovery, SubresourceRest,
};

/// Where the selector a Scale reports comes from.
#[derive(Clone, Debug)]
pub enum SelectorSource {
    /// A LabelSelector object (built-in workloads' `spec.selector`),
    /// printed as a selector string.
    LabelSelector(String),
    /// A string already in selector syntax (a CRD's `labelSelectorPath`).
    Text(String),
    None,
}

/// Scale of one resource: JSON pointers to its desired and observed
/// replica counts and its selector.
pub struct ScaleRest {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub selector: SelectorSource,
}

impl ScaleRest {
    /// Built-in workloads: `spec.replicas`, `status.replicas`, `spec.selector`.
    pub fn workload() -> SubresourceDef {
        Self::def(ScaleRest {
            spec_replicas: "/spec/replicas".into(),
            status_replicas: "/status/replicas".into(),
            selector: SelectorSource::LabelSelector("/spec/selector".into()),
        })
    }

    pub fn def(rest: ScaleRest) -> SubresourceDef {
        SubresourceDef {
            kind: Subresource::Scale,
            rest: Arc::new(rest),
        }
    }

    /// The autoscaling/v1 Scale view of an object.
    fn scale_of(&self, obj: &Value) -> Value {
        let selector = match &self.selector {
            SelectorSource::LabelSelector(pointer) => {
                let s = crate::tables::selector_string(obj.pointer(pointer));
                if s == "<none>" {
                    String::new()
                } else {
                    s
                }
            }
            SelectorSource::Text(pointer) => obj
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            SelectorSource::None => String::new(),
        };
        let m = meta(obj);
        let replicas = |pointer: &str| obj.pointer(pointer).cloned().unwrap_or(json!(0));
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": m.get("name"),
                "namespace": m.get("namespace"),
                "uid": m.get("uid"),
                "resourceVersion": m.get("resourceVersion"),
                "creationTimestamp": m.get("creationTimestamp"),
            },
            "spec": {"replicas": replicas(&self.spec_replicas)},
            "status": {"replicas": replicas(&self.status_replicas), "selector": selector},
        })
    }

    async fn change(&self, api: &Api, req: &Request, change: Change) -> ApiResult<Response> {
        let written = api
            .update_object(req, |old| {
                let current = self.scale_of(old);
                let desired = match &change {
                    Change::Replace(body) => body.clone(),
                    Change::Patch(kind, doc) => patch::apply_untyped(*kind, &current, doc)?,
                };
                // A Scale is an autoscaling/v1 object: its count is an int32.
                let replicas = match desired.pointer("/spec/replicas") {
                    None | Some(Value::Null) => 0,
                    Some(n) => n
                        .as_i64()
                        .and_then(|n| i32::try_from(n).ok())
                        .ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "Scale in version \"v1\" cannot be handled as a Scale: spec.replicas: invalid value {n}: must be an int32"
                            ))
                        })?,
                };
                if replicas < 0 {
                    return Err(ApiError::Invalid {
                        target: req.target(),
                        causes: vec![Cause::invalid(
                            "spec.replicas",
                            &json!(replicas),
                            "must be greater than or equal to 0",
                        )],
                    });
                }
                let mut new = old.clone();
                set_pointer(&mut new, &self.spec_replicas, json!(replicas));
                // A Scale naming a resourceVersion pins the write to it; the
                // one read with the object is the object's own.
                let pinned = meta_str(&desired, "resourceVersion").to_string();
                if pinned.is_empty() {
                    meta_mut(&mut new).remove("resourceVersion");
                } else {
                    meta_mut(&mut new).insert("resourceVersion".into(), json!(pinned));
                }
                Ok(Some(new))
            })
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &self.scale_of(&written.obj),
            &[],
        ))
    }
}

enum Change {
    Replace(Value),
    Patch(PatchKind, Value),
}

/// Set the value at a JSON pointer, making the objects on the way.
fn set_pointer(obj: &mut Value, pointer: &str, value: Value) {
    let mut at = obj;
    let mut parts = pointer.split('/').skip(1).peekable();
    while let Some(part) = parts.next() {
        if !at.is_object() {
            *at = json!({});
        }
        let map = at.as_object_mut().expect("made an object above");
        if parts.peek().is_none() {
            map.insert(part.to_string(), value);
            return;
        }
        at = map.entry(part.to_string()).or_insert_with(|| json!({}));
    }
}

#[async_trait]
impl SubresourceRest for ScaleRest {
    fn discovery(&self, _def: &ResourceDef) -> SubresourceDiscovery {
        SubresourceDiscovery {
            kind: "Scale".into(),
            group_version: Some(("autoscaling", "v1")),
            verbs: &["get", "patch", "update"],
        }
    }

    async fn get(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        let name = req.name.clone().unwrap_or_default();
        let kv = api.get_kv(req, &name).await?;
        let obj = crate::objects::decode(&req.def, &kv)?;
        Ok(json_response(StatusCode::OK, &self.scale_of(&obj), &[]))
    }

    async fn update(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        let body = api.parse_body(req)?;
        self.change(api, req, Change::Replace(body)).await
    }

    async fn patch(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        let (kind, doc) = req.patch_document()?;
        if kind == PatchKind::Apply {
            return Err(ApiError::BadRequest(
                "apply patches are not supported on the scale subresource".into(),
            ));
        }
        self.change(api, req, Change::Patch(kind, doc)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_set_at_any_depth() {
        let mut obj = json!({"spec": {"other": 1}});
        set_pointer(&mut obj, "/spec/replicas", json!(3));
        set_pointer(&mut obj, "/spec/nested/count", json!(2));
        assert_eq!(
            obj,
            json!({"spec": {"other": 1, "replicas": 3, "nested": {"count": 2}}})
        );
    }
}
