//! pods/eviction: a policy/v1 Eviction asks for a pod's graceful deletion
//! with the Eviction's deleteOptions (what `kubectl drain` posts). A pod a
//! PodDisruptionBudget covers goes only if the budget has a disruption to
//! spare, which the eviction takes from the budget's status in the same
//! write (so two evictions cannot spend one disruption); otherwise the
//! answer is 429, which `kubectl drain` retries.

use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use serde_json::{json, Value};

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use tapestry_runtime::disruption::{covers, verdict, Verdict};

use crate::error::{ApiError, ApiResult, Cause};
use crate::objects::{decode, meta_str, now_rfc3339};
use crate::registry::{
    ResourceDef, Subresource, SubresourceDef, SubresourceDiscovery, SubresourceRest,
};
use crate::rest::delete_is_dry_run;
use crate::rest::render::created_status;
use crate::rest::{Api, Request};
use crate::selectors::labels_of;

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
        let pod_req = req.derived(req.namespace.clone(), req.name.clone(), None);
        let pod = decode(&pod_req.def, &api.get_kv(&pod_req, &url_name).await?)?;
        if !budget_exempt(&pod) {
            // A dry run is refused as the real one would be, and spends nothing.
            spend_budget(api, &pod, delete_is_dry_run(req, &options)?).await?;
        }
        api.delete_one(&pod_req, url_name, &options).await?;
        Ok(created_status())
    }
}

/// Pods no budget protects, as in Kubernetes: already going, finished, or
/// not started.
fn budget_exempt(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp").is_some()
        || matches!(
            pod.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed" | "Pending")
        )
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Take one disruption from the budget covering `pod` (only check, for a
/// dry run), or refuse.
async fn spend_budget(api: &Api, pod: &Value, dry_run: bool) -> ApiResult<()> {
    let namespace = meta_str(pod, "namespace").to_string();
    let pod_name = meta_str(pod, "name").to_string();
    let budgets = api.internal_request(
        "policy",
        "v1",
        "poddisruptionbudgets",
        Some(&namespace),
        None,
    )?;
    let stored = api
        .store
        .list(
            &budgets.def.key_prefix(Some(&namespace)),
            Default::default(),
        )
        .await
        .map_err(ApiError::internal)?;
    let labels = labels_of(pod);
    let mut covering = Vec::new();
    for kv in &stored.items {
        let budget: PodDisruptionBudget =
            serde_json::from_value(decode(&budgets.def, kv)?).map_err(ApiError::internal)?;
        if covers(&budget, &labels) {
            covering.push(budget);
        }
    }
    let budget = match covering.as_slice() {
        [] => return Ok(()),
        [one] => one,
        _ => {
            return Err(ApiError::Internal(
                "This pod has more than one PodDisruptionBudget, which the eviction \
                 subresource does not support."
                    .into(),
            ))
        }
    };
    let name = budget.metadata.name.clone().unwrap_or_default();
    let status_req = budgets.derived(
        Some(namespace.clone()),
        Some(name),
        Some(Subresource::Status),
    );
    let healthy = is_ready(pod);
    if dry_run {
        return match verdict(budget, healthy) {
            Verdict::Refuse(why) => Err(ApiError::TooManyRequests(why)),
            Verdict::Allow | Verdict::Spend => Ok(()),
        };
    }
    // Decided on the budget as stored at the write, not as listed above.
    api.update_object(&status_req, |current| {
        let budget: PodDisruptionBudget =
            serde_json::from_value(current.clone()).map_err(ApiError::internal)?;
        match verdict(&budget, healthy) {
            Verdict::Allow => Ok(None),
            Verdict::Refuse(why) => Err(ApiError::TooManyRequests(why)),
            Verdict::Spend => {
                let mut next = current.clone();
                let allowed = budget.status.map_or(0, |s| s.disruptions_allowed);
                next["status"]["disruptionsAllowed"] = json!(allowed - 1);
                if !next["status"]["disruptedPods"].is_object() {
                    next["status"]["disruptedPods"] = json!({});
                }
                next["status"]["disruptedPods"][&pod_name] = json!(now_rfc3339());
                Ok(Some(next))
            }
        }
    })
    .await?;
    Ok(())
}
