//! core/v1 Namespaces: the `kubernetes` finalizer and phase, and the
//! finalize subresource through which the namespace controller releases
//! them once their content is gone.

use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use http::StatusCode;
use k8s_openapi::api::core::v1::Namespace;
use serde_json::{json, Value};

use crate::error::ApiResult;
use crate::registry::{
    names, selectable, Behaviour, ResourceDef, Subresource, SubresourceDef, SubresourceDiscovery,
    SubresourceRest,
};
use crate::rest::status::StatusRest;
use crate::rest::{json_response, Api, Request};
use crate::tables::{age, col, name, s, TableDef, AGE, NAME};
use crate::validation::NameRule;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["ns"]),
        name_rule: NameRule::Dns1123Label,
        subresources: vec![
            StatusRest::def(),
            SubresourceDef {
                kind: Subresource::Finalize,
                rest: Arc::new(FinalizeRest),
            },
        ],
        behaviour: Arc::new(NamespaceBehaviour),
        table: Arc::new(TableDef {
            columns: vec![NAME, col("Status", "The status of the namespace"), AGE],
            cells: |o, now| vec![name(o), json!(s(o, "/status/phase")), age(o, now)],
        }),
        field_selectors: selectable(&[("status.phase", "/status/phase")]),
        ..ResourceDef::of::<Namespace>()
    }
}

struct NamespaceBehaviour;

impl Behaviour for NamespaceBehaviour {
    fn default(&self, obj: &mut Value) {
        // Every namespace carries its name as a label so selectors can match
        // namespaces by name.
        let name = s(obj, "/metadata/name").to_string();
        if !name.is_empty() {
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if let Some(labels) = labels.as_object_mut() {
                    labels.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({"phase": "Active"});
        let finalizers = obj.pointer("/spec/finalizers").cloned();
        if finalizers.is_none() {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
        }
    }

    fn prepare_for_update(&self, new: &mut Value, old: &Value) {
        // spec.finalizers belongs to the finalize subresource.
        new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
    }

    fn deletion_held(&self, obj: &Value) -> bool {
        obj.pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty())
    }

    fn begin_deletion(&self, obj: &mut Value) {
        obj["status"]["phase"] = json!("Terminating");
    }
}

/// namespaces/finalize: only spec.finalizers changes.
struct FinalizeRest;

#[async_trait]
impl SubresourceRest for FinalizeRest {
    fn discovery(&self, def: &ResourceDef) -> SubresourceDiscovery {
        SubresourceDiscovery {
            kind: def.kind.clone(),
            group_version: None,
            verbs: &["update"],
        }
    }

    async fn update(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        let body = api.parse_body(req)?;
        let finalizers = body
            .pointer("/spec/finalizers")
            .cloned()
            .unwrap_or(json!([]));
        let pinned = body.pointer("/metadata/resourceVersion").cloned();
        let written = api
            .update_object(req, |old| {
                let mut new = old.clone();
                new["spec"]["finalizers"] = finalizers.clone();
                match &pinned {
                    Some(rv) => new["metadata"]["resourceVersion"] = rv.clone(),
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove("resourceVersion");
                        }
                    }
                }
                Ok(Some(new))
            })
            .await?;
        Ok(json_response(StatusCode::OK, &written.obj, &[]))
    }
}
