//! One parsed request against a resource, and what its query, headers and
//! body say.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::Api;
use crate::error::{ApiError, ApiResult, Target};
use crate::patch::PatchKind;
use crate::registry::{ResourceDef, Subresource};

pub struct Request {
    pub def: Arc<ResourceDef>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<Subresource>,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Serve objects without `metadata.managedFields` (see
    /// [`crate::server::LocalHandler`]).
    pub omit_managed_fields: bool,
    /// Who asked; None for the server's own requests. Writes of RBAC
    /// objects check it against escalation.
    pub user: Option<std::sync::Arc<crate::pki::User>>,
}

/// How unknown and duplicate fields in a body are treated.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

impl Request {
    /// A request for `name` (or the collection) with nothing else set, for
    /// the server's own work.
    pub fn internal(def: Arc<ResourceDef>, namespace: Option<&str>, name: Option<&str>) -> Self {
        Request {
            def,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            sub: None,
            query: HashMap::new(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            omit_managed_fields: false,
            user: None,
        }
    }

    /// The same request for another object or subresource, without a body.
    pub fn derived(
        &self,
        namespace: Option<String>,
        name: Option<String>,
        sub: Option<Subresource>,
    ) -> Self {
        Request {
            def: self.def.clone(),
            namespace,
            name,
            sub,
            query: self.query.clone(),
            headers: self.headers.clone(),
            body: Bytes::new(),
            omit_managed_fields: self.omit_managed_fields,
            user: self.user.clone(),
        }
    }

    pub fn target(&self) -> Target {
        Target {
            group: self.def.group.clone(),
            resource: self.def.plural.clone(),
            kind: self.def.kind.clone(),
            name: self.name.clone().unwrap_or_default(),
        }
    }

    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn dry_run(&self) -> ApiResult<bool> {
        match self.param("dryRun") {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::BadRequest(format!(
                "Invalid dryRun value {other:?}: only \"All\" is supported"
            ))),
        }
    }

    pub fn field_validation(&self) -> ApiResult<FieldValidation> {
        match self.param("fieldValidation") {
            None | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::BadRequest(format!(
                "fieldValidation parameter unsupported: {other:?}; supported values are Strict, Warn and Ignore"
            ))),
        }
    }

    pub fn field_manager(&self, default: &str) -> ApiResult<String> {
        let manager = self
            .param("fieldManager")
            .map(str::to_string)
            .unwrap_or_else(|| {
                // Kubernetes derives the default manager from the user agent.
                self.headers
                    .get(http::header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|ua| ua.split('/').next())
                    .filter(|s| !s.is_empty())
                    .unwrap_or(default)
                    .to_string()
            });
        if manager.len() > 128 || manager.chars().any(|c| c.is_control()) {
            return Err(ApiError::BadRequest(
                "fieldManager must be at most 128 printable characters".into(),
            ));
        }
        Ok(manager)
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| ct.split(';').next().unwrap_or("").trim())
            .unwrap_or("application/json")
    }

    pub fn accept(&self) -> &str {
        self.headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The patch type and document of a PATCH request. Strategic merge
    /// patches are refused for resources without Go-struct merge keys
    /// (custom resources), with the 415 kube-apiserver answers.
    pub fn patch_document(&self) -> ApiResult<(PatchKind, Value)> {
        let content_type = self.content_type();
        let kind = PatchKind::from_content_type(content_type)
            .filter(|k| *k != PatchKind::Strategic || self.def.strategic_merge)
            .ok_or_else(|| {
                let accepted = if self.def.strategic_merge {
                    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
                } else {
                    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
                };
                ApiError::UnsupportedMediaType(format!(
                    "the body of the request was in an unknown format - accepted media types include: {accepted}"
                ))
            })?;
        let doc = match kind {
            PatchKind::Apply => serde_yaml::from_slice(&self.body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))?,
            _ => serde_json::from_slice(&self.body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))?,
        };
        Ok((kind, doc))
    }

    /// DeleteOptions from the body (empty: none).
    pub fn delete_options(&self, api: &Api) -> ApiResult<Value> {
        if self.body.is_empty() {
            Ok(Value::Object(Default::default()))
        } else {
            api.parse_body(self)
        }
    }
}

impl Api {
    /// Parse a request body: JSON, YAML, or Kubernetes' protobuf encoding
    /// (which client-go's typed clients send).
    pub fn parse_body(&self, req: &Request) -> ApiResult<Value> {
        self.parse_bytes(req.content_type(), &req.body)
    }

    /// [`Api::parse_body`] of a body in `content_type`.
    pub fn parse_bytes(&self, content_type: &str, body: &[u8]) -> ApiResult<Value> {
        if body.is_empty() {
            return Err(ApiError::BadRequest("request body is empty".into()));
        }
        match content_type {
            "application/yaml" => serde_yaml::from_slice::<Value>(body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}"))),
            "application/json" | "" => serde_json::from_slice::<Value>(body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding JSON: {e}"))),
            "application/vnd.kubernetes.protobuf" => {
                tapestry_kubeproto::decode(body, self.proto_names.as_ref())
                    .map_err(|e| ApiError::BadRequest(format!("error decoding protobuf: {e}")))
            }
            other => Err(ApiError::UnsupportedMediaType(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf; got {other:?}"
            ))),
        }
    }
}
