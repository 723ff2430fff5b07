//! core/v1 ServiceAccounts, and their token subresource: an
//! authentication.k8s.io/v1 TokenRequest answered with a token signed by
//! the server ([`crate::satokens`]), optionally bound to a pod.

use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use http::StatusCode;
use k8s_openapi::api::core::v1::ServiceAccount;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult, Cause};
use crate::objects::{decode, meta_str};
use crate::registry::{
    names, ResourceDef, Subresource, SubresourceDef, SubresourceDiscovery, SubresourceRest,
};
use crate::rest::noderestriction::{check_pod, node_of};
use crate::rest::render::json_response;
use crate::rest::{Api, Request};
use crate::satokens::{
    Claims, KubernetesClaims, ObjectRef, DEFAULT_EXPIRATION_SECONDS, ISSUER,
    MAX_EXPIRATION_SECONDS, MIN_EXPIRATION_SECONDS,
};
use crate::tables::{age, col, len, name, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["sa"]),
        subresources: vec![SubresourceDef {
            kind: Subresource::Token,
            rest: Arc::new(TokenRest),
        }],
        table: Arc::new(TableDef {
            columns: vec![NAME, col("Secrets", "Number of secrets."), AGE],
            cells: |o, now| vec![name(o), json!(len(o, "/secrets")), age(o, now)],
        }),
        ..ResourceDef::of::<ServiceAccount>()
    }
}

struct TokenRest;

fn invalid(req: &Request, field: &str, value: &Value, detail: &str) -> ApiError {
    ApiError::Invalid {
        target: req.target(),
        causes: vec![Cause::invalid(field, value, detail)],
    }
}

#[async_trait]
impl SubresourceRest for TokenRest {
    fn discovery(&self, _def: &ResourceDef) -> SubresourceDiscovery {
        SubresourceDiscovery {
            kind: "TokenRequest".into(),
            group_version: Some(("authentication.k8s.io", "v1")),
            verbs: &["create"],
        }
    }

    async fn create(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        let issuer = api
            .service_account_tokens
            .get()
            .ok_or_else(|| ApiError::Internal("service account tokens are not set up".into()))?;
        let mut body = api.parse_body(req)?;
        if !body.is_object() {
            return Err(ApiError::BadRequest(
                "the body must be a TokenRequest".into(),
            ));
        }
        let ns = req.namespace.clone().unwrap_or_default();
        let sa_name = req.name.clone().unwrap_or_default();
        let sa_req = req.derived(req.namespace.clone(), req.name.clone(), None);
        let sa = decode(&req.def, &api.get_kv(&sa_req, &sa_name).await?)?;
        let spec = body.get("spec").cloned().unwrap_or(json!({}));
        let expiration = match spec.get("expirationSeconds") {
            None | Some(Value::Null) => DEFAULT_EXPIRATION_SECONDS,
            Some(v) => match v.as_i64() {
                Some(s) if s >= MIN_EXPIRATION_SECONDS => s.min(MAX_EXPIRATION_SECONDS),
                _ => {
                    return Err(invalid(
                        req,
                        "spec.expirationSeconds",
                        v,
                        &format!(
                            "may not specify a duration less than {MIN_EXPIRATION_SECONDS} seconds"
                        ),
                    ))
                }
            },
        };
        let audiences: Vec<String> = match spec.get("audiences").and_then(Value::as_array) {
            Some(a) if !a.is_empty() => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    invalid(req, "spec.audiences", &spec["audiences"], "must be strings")
                })?,
            _ => vec![ISSUER.to_string()],
        };
        let pod = match spec.get("boundObjectRef").filter(|b| !b.is_null()) {
            None if node_of(req.user.as_deref()).is_some() => {
                return Err(ApiError::Forbidden(
                    "a node may only request tokens bound to its pods (spec.boundObjectRef)".into(),
                ))
            }
            None => None,
            Some(b) => Some(bound_pod(api, req, &ns, b).await?),
        };
        let now = chrono::Utc::now();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: format!("system:serviceaccount:{ns}:{sa_name}"),
            aud: audiences.clone(),
            exp: now.timestamp() + expiration,
            iat: now.timestamp(),
            nbf: now.timestamp(),
            jti: uuid::Uuid::new_v4().to_string(),
            kubernetes: KubernetesClaims {
                namespace: ns.clone(),
                serviceaccount: ObjectRef {
                    name: sa_name.clone(),
                    uid: meta_str(&sa, "uid").to_string(),
                },
                pod,
            },
        };
        let token = issuer.sign(&claims).map_err(ApiError::internal)?;
        let expires = chrono::DateTime::from_timestamp(claims.exp, 0)
            .unwrap_or(now)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        body["apiVersion"] = json!("authentication.k8s.io/v1");
        body["kind"] = json!("TokenRequest");
        body["spec"]["audiences"] = json!(audiences);
        body["spec"]["expirationSeconds"] = json!(expiration);
        body["status"] = json!({"token": token, "expirationTimestamp": expires});
        Ok(json_response(StatusCode::CREATED, &body, &[]))
    }
}

/// The pod a token is bound to: it must exist, in the account's
/// namespace, and be the one named by uid when a uid is given.
async fn bound_pod(api: &Api, req: &Request, ns: &str, bound: &Value) -> ApiResult<ObjectRef> {
    let kind = bound
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind != "Pod" {
        return Err(invalid(
            req,
            "spec.boundObjectRef.kind",
            &json!(kind),
            "supported values: \"Pod\"",
        ));
    }
    let name = bound
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let pods = api
        .registry
        .get("", "v1", "pods")
        .ok_or_else(|| ApiError::Internal("pods are not served".into()))?;
    let pod_req = Request::internal(pods.clone(), Some(ns), Some(name));
    let pod = decode(&pods, &api.get_kv(&pod_req, name).await?)?;
    if let Some(node) = node_of(req.user.as_deref()) {
        check_pod(node, &pod)?;
    }
    let uid = meta_str(&pod, "uid").to_string();
    if let Some(want) = bound
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        if want != uid {
            return Err(ApiError::Conflict {
                target: pod_req.target(),
                message: format!("the UID in the bound object reference ({want}) does not match the UID in record ({uid}). The object might have been deleted and then recreated"),
            });
        }
    }
    Ok(ObjectRef {
        name: name.to_string(),
        uid,
    })
}
