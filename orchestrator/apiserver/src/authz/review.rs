//! The review APIs clients ask the authorizer through:
//! `SelfSubjectAccessReview` (`kubectl auth can-i`),
//! `SelfSubjectRulesReview` (`kubectl auth can-i --list`),
//! `SubjectAccessReview` / `LocalSubjectAccessReview` (asking for someone
//! else), `SelfSubjectReview` (`kubectl auth whoami`) and `TokenReview`
//! (who a bearer token belongs to, for servers that take the cluster's
//! tokens). Nothing is stored: each answers the object sent with its
//! status filled in.

use axum::response::{IntoResponse, Response};
use http::{Method, StatusCode};
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::{json, Value};
use tapestry_apimachinery::tokens::User;

use super::{authenticated, Attributes, Authorizer};
use crate::error::{ApiError, ApiResult};
use crate::pki::LiveTokens;
use crate::rest::render::json_response;
use crate::rest::Api;

const AUTHZ: &str = "authorization.k8s.io";
const AUTHN: &str = "authentication.k8s.io";

/// Which review a path asks for, and the namespace of a local one.
fn route(path: &str) -> Option<(&'static str, &'static str, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["apis", AUTHZ, "v1", "selfsubjectaccessreviews"] => {
            Some((AUTHZ, "selfsubjectaccessreviews", None))
        }
        ["apis", AUTHZ, "v1", "selfsubjectrulesreviews"] => {
            Some((AUTHZ, "selfsubjectrulesreviews", None))
        }
        ["apis", AUTHZ, "v1", "subjectaccessreviews"] => {
            Some((AUTHZ, "subjectaccessreviews", None))
        }
        ["apis", AUTHZ, "v1", "namespaces", ns, "localsubjectaccessreviews"] => {
            Some((AUTHZ, "localsubjectaccessreviews", Some(ns.to_string())))
        }
        ["apis", AUTHN, "v1", "selfsubjectreviews"] => Some((AUTHN, "selfsubjectreviews", None)),
        ["apis", AUTHN, "v1", "tokenreviews"] => Some((AUTHN, "tokenreviews", None)),
        _ => None,
    }
}

/// Serves `path` if it is a review; None otherwise.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    authz: &Authorizer,
    tokens: &LiveTokens,
    api: &Api,
    user: &User,
    method: &Method,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Option<Response> {
    let (group, resource, namespace) = route(path)?;
    let answer = async {
        if method != Method::POST {
            return Err(ApiError::MethodNotAllowed {
                target: crate::error::Target {
                    group: group.into(),
                    resource: resource.into(),
                    kind: String::new(),
                    name: String::new(),
                },
                message: format!("{method} is not supported on {resource}: only create"),
            });
        }
        authz.check(
            user,
            &Attributes::resource("create", group, resource, "", namespace.as_deref(), None),
        )?;
        let review = api.parse_bytes(content_type, body)?;
        if !review.is_object() {
            return Err(ApiError::BadRequest(format!(
                "{resource}: the body must be an object"
            )));
        }
        let status = match resource {
            "selfsubjectaccessreviews" => access(authz, user, &review["spec"], None)?,
            "subjectaccessreviews" => {
                access(authz, &subject(&review["spec"])?, &review["spec"], None)?
            }
            "localsubjectaccessreviews" => access(
                authz,
                &subject(&review["spec"])?,
                &review["spec"],
                namespace.as_deref(),
            )?,
            "selfsubjectrulesreviews" => rules(authz, user, &review["spec"])?,
            "tokenreviews" => token_review(tokens, api, &review["spec"]).await,
            _ => json!({"userInfo": user_info(user)}),
        };
        let mut out = review;
        out["apiVersion"] = json!(format!("{group}/v1"));
        out["status"] = status;
        Ok(out)
    }
    .await;
    Some(match answer {
        Ok(out) => json_response(StatusCode::CREATED, &out, &[]),
        Err(e) => e.into_response(),
    })
}

/// Who a token belongs to (see [`crate::bootstraptokens::bearer_user`]),
/// service account tokens checked against `spec.audiences`.
async fn token_review(tokens: &LiveTokens, api: &Api, spec: &Value) -> Value {
    let token = spec["token"].as_str().unwrap_or_default();
    let audiences: Vec<String> = spec["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let user = crate::bootstraptokens::bearer_user(api, tokens, token, &audiences).await;
    match user {
        Ok(u) => {
            let mut status = json!({"authenticated": true, "user": user_info(&authenticated(&u))});
            if !audiences.is_empty() {
                status["audiences"] = json!(audiences);
            }
            status
        }
        Err(e) => json!({"authenticated": false, "error": e}),
    }
}

fn user_info(user: &User) -> Value {
    let mut info = json!({"username": user.name, "uid": user.uid, "groups": user.groups});
    if !user.extra.is_empty() {
        info["extra"] = json!(user.extra);
    }
    info
}

/// The user a (Local)SubjectAccessReview asks about.
fn subject(spec: &Value) -> ApiResult<User> {
    let name = spec["user"].as_str().unwrap_or_default();
    let groups: Vec<String> = spec["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g.as_str().map(str::to_string))
        .collect();
    if name.is_empty() && groups.is_empty() {
        return Err(ApiError::Invalid {
            target: crate::error::Target {
                group: AUTHZ.into(),
                resource: "subjectaccessreviews".into(),
                kind: "SubjectAccessReview".into(),
                name: String::new(),
            },
            causes: vec![crate::error::Cause::required_because(
                "spec.user",
                "at least one of user or group must be specified",
            )],
        });
    }
    Ok(User {
        name: name.to_string(),
        uid: spec["uid"].as_str().unwrap_or_default().to_string(),
        groups,
        extra: serde_json::from_value(spec["extra"].clone()).unwrap_or_default(),
    })
}

fn access(
    authz: &Authorizer,
    user: &User,
    spec: &Value,
    local_ns: Option<&str>,
) -> ApiResult<Value> {
    let attrs = if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
        let s = |k: &str| r[k].as_str().unwrap_or_default();
        let namespace = local_ns.unwrap_or(s("namespace"));
        Attributes::resource(
            s("verb"),
            s("group"),
            s("resource"),
            s("subresource"),
            Some(namespace),
            Some(s("name")),
        )
    } else if let Some(n) = spec.get("nonResourceAttributes").filter(|r| r.is_object()) {
        Attributes {
            verb: n["verb"].as_str().unwrap_or_default().to_string(),
            target: super::Target::NonResource {
                path: n["path"].as_str().unwrap_or_default().to_string(),
            },
        }
    } else {
        return Err(ApiError::BadRequest(
            "spec: exactly one of resourceAttributes or nonResourceAttributes must be given".into(),
        ));
    };
    let allowed = authz.allows(&authenticated(user), &attrs);
    let mut status = json!({"allowed": allowed});
    if allowed {
        status["reason"] = json!("allowed by RBAC");
    }
    Ok(status)
}

fn rules(authz: &Authorizer, user: &User, spec: &Value) -> ApiResult<Value> {
    let namespace = spec["namespace"].as_str().unwrap_or_default();
    let (mut resource_rules, mut non_resource_rules) = (Vec::new(), Vec::new());
    for r in authz.rules_for(user, namespace) {
        let PolicyRule {
            api_groups,
            non_resource_urls,
            resource_names,
            resources,
            verbs,
        } = r;
        match non_resource_urls {
            Some(urls) if !urls.is_empty() => {
                non_resource_rules.push(json!({"verbs": verbs, "nonResourceURLs": urls}))
            }
            _ => {
                let mut rule = json!({"verbs": verbs, "apiGroups": api_groups.unwrap_or_default(),
                                      "resources": resources.unwrap_or_default()});
                if let Some(names) = resource_names.filter(|n| !n.is_empty()) {
                    rule["resourceNames"] = json!(names);
                }
                resource_rules.push(rule);
            }
        }
    }
    Ok(
        json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules,
              "incomplete": false}),
    )
}
