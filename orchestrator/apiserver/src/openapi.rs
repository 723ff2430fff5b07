//! OpenAPI documents served at /openapi/v2 and /openapi/v3, generated once
//! at start-up from the registry; the same definitions type the patches.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, StatusCode};
use tapestry_apimachinery::PatchSchema;
use tapestry_openapi::{OpenApi, ResourceInfo};

use crate::discovery::KUBE_GIT_VERSION;
use crate::error::ApiError;
use crate::registry::Registry;

pub struct OpenApiDocs {
    docs: Arc<OpenApi>,
}

fn json_bytes(bytes: &[u8], cache: &str, etag: Option<&str>) -> Response {
    let mut resp = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, cache),
        ],
        bytes.to_vec(),
    )
        .into_response();
    if let Some(tag) = etag.and_then(|t| http::HeaderValue::from_str(&format!("\"{t}\"")).ok()) {
        resp.headers_mut().insert(header::ETAG, tag);
    }
    resp
}

impl OpenApiDocs {
    pub fn build(registry: &Registry) -> Result<Self> {
        let infos: Vec<ResourceInfo> = registry
            .all()
            .iter()
            .map(|d| ResourceInfo {
                group: d.group.to_string(),
                version: d.version.to_string(),
                kind: d.kind.to_string(),
                plural: d.plural.to_string(),
                namespaced: d.namespaced,
                verbs: crate::discovery::VERBS
                    .iter()
                    .map(|v| v.to_string())
                    .collect(),
                subresources: d
                    .subresources
                    .iter()
                    .map(|s| s.name().to_string())
                    .collect(),
                definition: d.definition.to_string(),
            })
            .collect();
        let version = KUBE_GIT_VERSION
            .split('+')
            .next()
            .unwrap_or(KUBE_GIT_VERSION);
        let docs = OpenApi::builder()
            .version(version)
            .build(&infos)
            .map_err(|e| anyhow::anyhow!("building OpenAPI documents: {e}"))?;
        Ok(OpenApiDocs {
            docs: Arc::new(docs),
        })
    }

    pub fn schema(&self) -> Arc<dyn PatchSchema> {
        self.docs.clone()
    }

    pub fn names(&self) -> Arc<dyn tapestry_kubeproto::JsonNames + Send + Sync> {
        self.docs.clone()
    }

    /// Swagger 2.0 as JSON; clients that only take the protobuf form get 406.
    pub fn v2(&self, headers: &HeaderMap) -> Response {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let wants_json = accept.is_empty()
            || accept.split(',').any(|a| {
                let a = a.trim();
                a.starts_with("application/json") || a.starts_with("*/*")
            });
        if !wants_json {
            return ApiError::NotAcceptable(
                "only application/json is served for /openapi/v2; use /openapi/v3".into(),
            )
            .into_response();
        }
        json_bytes(
            self.docs.v2_json(),
            "no-cache, private",
            Some(self.docs.v2_hash()),
        )
    }

    pub fn v3_index(&self) -> Response {
        json_bytes(self.docs.v3_index_json(), "no-cache, private", None)
    }

    pub fn v3(&self, path: &str, query: &HashMap<String, String>) -> Response {
        let Some(doc) = self.docs.v3_group_version_json(path) else {
            return ApiError::NotFound(crate::error::Target {
                resource: format!("openapi/v3/{path}"),
                ..Default::default()
            })
            .into_response();
        };
        let hash = self.docs.v3_hash(path);
        // A request naming the current hash may be cached forever.
        let immutable = query.get("hash").map(String::as_str) == hash;
        let cache = if immutable {
            "public, immutable, max-age=31536000"
        } else {
            "no-cache, private"
        };
        json_bytes(doc, cache, hash)
    }
}
