//! pods/eviction: a policy/v1 Eviction asks for a pod's graceful deletion
//! with the Eviction's deleteOptions (what `kubectl drain` posts). No
//! PodDisruptionBudgets are served, so every eviction is allowed.

use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult, Cause};
use crate::registry::{
    ResourceDef, Subresource, SubresourceDef, SubresourceDiscovery, SubresourceRest,
};
use crate::rest::render::created_status;
use crate::rest::{Api, Request};

pub fn def() -> SubresourceDef {
    SubresourceDef {
        kind: Subresource::Eviction,
        rest: Arc::new(EvictionRest),
    }
}

struct EvictionRest;

#[async_trait]
impl SubresourceRest for EvictionRest {
    fn discovery(&self, _def: &ResourceDef) -> SubresourceDiscovery {
        SubresourceDiscovery {
            kind: "Eviction".into(),
            group_version: Some(("policy", "v1")),
            verbs: &["create"],
        }
    }

    async fn create(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        let body = api.parse_body(req)?;
        let kind = body
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("Eviction");
        if kind != "Eviction" {
            return Err(ApiError::BadRequest(format!(
                "kind: expected Eviction, got {kind:?}"
            )));
        }
        let url_name = req.name.clone().unwrap_or_default();
        let body_name = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if body_name != url_name {
            return Err(ApiError::Invalid {
                target: req.target(),
                causes: vec![Cause::invalid(
                    "metadata.name",
                    &json!(body_name),
                    "name in URL does not match name in Eviction object",
                )],
            });
        }
        let options = body.get("deleteOptions").cloned().unwrap_or(json!({}));
        if !options.is_object() && !options.is_null() {
            return Err(ApiError::Invalid {
                target: req.target(),
                causes: vec![Cause::invalid(
                    "deleteOptions",
                    &options,
                    "must be a DeleteOptions object",
                )],
            });
        }
        let options = if options.is_null() {
            json!({})
        } else {
            options
        };
        // The pod itself is deleted, not a subresource of it.
        let pod = req.derived(req.namespace.clone(), req.name.clone(), None);
        api.delete_one(&pod, url_name, &options).await?;
        Ok(created_status())
    }
}
