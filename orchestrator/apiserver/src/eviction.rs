//! pods/eviction: a policy/v1 Eviction asks for a pod's graceful deletion
//! with the Eviction's deleteOptions (what `kubectl drain` posts). No
//! PodDisruptionBudgets are served, so every eviction is allowed.

use axum::response::Response;
use http::StatusCode;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult, Cause};
use crate::rest::{json_response, Api, Request};

impl Api {
    pub(crate) async fn evict(&self, req: &Request) -> ApiResult<Response> {
        let body = self.parse_body(req)?;
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
        self.delete_one(req, url_name, &options).await?;
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Success", "code": 201}),
            &[],
        ))
    }
}
