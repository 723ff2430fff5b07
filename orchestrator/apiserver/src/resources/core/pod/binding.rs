//! pods/binding: assign a pod to a node, once (what the scheduler posts).

use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult, Cause};
use crate::objects::{is_terminating, meta_mut, meta_str, now_rfc3339};
use crate::registry::{
    ResourceDef, Subresource, SubresourceDef, SubresourceDiscovery, SubresourceRest,
};
use crate::rest::render::created_status;
use crate::rest::{Api, Request};

pub fn def() -> SubresourceDef {
    SubresourceDef {
        kind: Subresource::Binding,
        rest: Arc::new(BindingRest),
    }
}

struct BindingRest;

#[async_trait]
impl SubresourceRest for BindingRest {
    fn discovery(&self, _def: &ResourceDef) -> SubresourceDiscovery {
        SubresourceDiscovery {
            kind: "Binding".into(),
            group_version: None,
            verbs: &["create"],
        }
    }

    async fn create(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        let body = api.parse_body(req)?;
        let node = body
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if node.is_empty() {
            return Err(ApiError::Invalid {
                target: req.target(),
                causes: vec![Cause::required("target.name")],
            });
        }
        api.update_object(req, |old| {
            let current = old
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .unwrap_or("");
            if is_terminating(old) {
                return Err(ApiError::Conflict {
                    target: req.target(),
                    message: "pod is being deleted, cannot be assigned to a host".into(),
                });
            }
            if !current.is_empty() {
                return Err(ApiError::Conflict {
                    target: req.target(),
                    message: format!(
                        "pod {} is already assigned to node {current:?}",
                        meta_str(old, "name")
                    ),
                });
            }
            let mut new = old.clone();
            new["spec"]["nodeName"] = json!(node);
            let now = now_rfc3339();
            let conditions = new["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut conditions: Vec<Value> = conditions
                .into_iter()
                .filter(|c| c["type"] != "PodScheduled")
                .collect();
            conditions.push(json!({"type": "PodScheduled", "status": "True",
                "lastProbeTime": null, "lastTransitionTime": now}));
            new["status"]["conditions"] = json!(conditions);
            meta_mut(&mut new).remove("resourceVersion");
            Ok(Some(new))
        })
        .await?;
        Ok(created_status())
    }
}
