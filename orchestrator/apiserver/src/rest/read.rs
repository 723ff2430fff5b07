//! Reads: get and list, with selectors, pagination and resourceVersion
//! semantics. Plain object responses are assembled from the stored bytes.

use axum::response::Response;
use base64::Engine;
use http::StatusCode;
use serde_json::{json, Value};
use tapestry_store::{ListOptions, StoreError};

use super::render::{json_bytes_response, json_response, render_one, table, Rendering};
use super::{Api, Request};
use crate::error::{ApiError, ApiResult};
use crate::objects::{
    append_served_or_decode, decode, parse_resource_version, partial_metadata, SelectorView,
};
use crate::registry::ResourceDef;
use crate::selectors::{FieldSelector, LabelSelector};

impl Api {
    /// GET of one object (also the status subresource, which reads the
    /// whole object).
    pub async fn get(&self, req: &Request) -> ApiResult<Response> {
        let name = req.name.clone().unwrap_or_default();
        let kv = self.get_kv(req, &name).await?;
        let rendering = Rendering::negotiate(req);
        if rendering == Rendering::Object {
            let mut body = Vec::with_capacity(kv.value.len() + 32);
            append_served_or_decode(&req.def, &kv, &mut body, req.omit_managed_fields)?;
            return Ok(json_bytes_response(StatusCode::OK, body, &[]));
        }
        let obj = decode(&req.def, &kv)?;
        let body = render_one(&req.def, &obj, rendering).into_owned();
        Ok(json_response(StatusCode::OK, &body, &[]))
    }

    pub(crate) fn selectors(&self, req: &Request) -> ApiResult<(LabelSelector, FieldSelector)> {
        let labels = LabelSelector::parse(req.param("labelSelector").unwrap_or(""))
            .map_err(ApiError::BadRequest)?;
        let fields = FieldSelector::parse(req.param("fieldSelector").unwrap_or(""))
            .map_err(ApiError::BadRequest)?;
        for f in fields.fields() {
            if !req.def.supports_field(f) {
                return Err(ApiError::BadRequest(format!(
                    "field label not supported: {f}"
                )));
            }
        }
        Ok((labels, fields))
    }

    /// The key prefix a list or watch scans, narrowed by a namespace field
    /// selector on all-namespace requests.
    pub fn scan_prefix(&self, req: &Request, fields: &FieldSelector) -> String {
        let ns = req.namespace.as_deref().or_else(|| {
            fields
                .exact("metadata.namespace")
                .filter(|_| req.def.namespaced)
        });
        req.def.key_prefix(ns)
    }

    pub fn matches(
        def: &ResourceDef,
        labels: &LabelSelector,
        fields: &FieldSelector,
        obj: &Value,
    ) -> bool {
        labels.matches_object(obj) && fields.matches(|f| def.field_value(obj, f))
    }

    pub async fn list(&self, req: &Request) -> ApiResult<Response> {
        let (labels, fields) = self.selectors(req)?;
        let prefix = self.scan_prefix(req, &fields);
        let limit = match req.param("limit") {
            None => 0,
            Some(l) => l
                .parse::<usize>()
                .map_err(|_| ApiError::BadRequest(format!("invalid limit {l:?}")))?,
        };
        let (revision, start_after) = match req.param("continue") {
            Some(token) => {
                if req.param("resourceVersion").is_some() {
                    return Err(ApiError::BadRequest(
                        "specifying resource version is not allowed when using continue".into(),
                    ));
                }
                let (rv, start) = decode_continue(token)?;
                (Some(rv), Some(start))
            }
            None => {
                let rv = match (req.param("resourceVersion"), req.param("resourceVersionMatch")) {
                    (Some(rv), Some("Exact")) => Some(parse_resource_version(rv)?),
                    (None, Some(m)) => {
                        return Err(ApiError::BadRequest(format!(
                            "resourceVersionMatch {m:?} is forbidden unless resourceVersion is provided"
                        )))
                    }
                    (Some(rv), Some("NotOlderThan") | None) => {
                        let wanted = parse_resource_version(rv)?;
                        let current = self.store.current_revision().await.map_err(ApiError::internal)?;
                        if wanted > current {
                            return Err(ApiError::Timeout(format!(
                                "Too large resource version: {wanted}, current: {current}"
                            )));
                        }
                        None
                    }
                    (Some(_), Some(other)) => {
                        return Err(ApiError::BadRequest(format!(
                            "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
                        )))
                    }
                    (None, None) => None,
                };
                (rv, None)
            }
        };
        let filtered = !labels.is_empty() || !fields.is_empty();
        let rendering = Rendering::negotiate(req);
        // Plain object lists are assembled from the stored bytes; tables
        // and metadata-only lists need the decoded objects.
        let raw = rendering == Rendering::Object;
        let selector_view = (raw && filtered).then(|| SelectorView::new(&req.def));
        let mut items = Vec::new();
        let mut raw_items: Vec<u8> = Vec::new();
        let mut count = 0usize;
        let mut cursor = start_after;
        let mut read_at = revision;
        let mut remaining;
        let mut last_key;
        loop {
            let page = self
                .store
                .list(
                    &prefix,
                    ListOptions {
                        revision: read_at,
                        limit: if limit == 0 { None } else { Some(limit - count) },
                        start_after: cursor.clone(),
                    },
                )
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if req.param("continue").is_some() => ApiError::Gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.".into(),
                    ),
                    other => ApiError::from_store(other, &req.target()),
                })?;
            read_at = Some(page.revision);
            remaining = page.remaining;
            last_key = page.items.last().map(|kv| kv.key.clone());
            if raw {
                // resourceVersion and a comma add under 48 bytes per item.
                raw_items.reserve(page.items.iter().map(|kv| kv.value.len() + 48).sum());
            }
            for kv in &page.items {
                if !raw {
                    let obj = decode(&req.def, kv)?;
                    if filtered && !Self::matches(&req.def, &labels, &fields, &obj) {
                        continue;
                    }
                    items.push(obj);
                    count += 1;
                    continue;
                }
                if let Some(view) = &selector_view {
                    let obj = view.read(&req.def, kv)?;
                    if !Self::matches(&req.def, &labels, &fields, &obj) {
                        continue;
                    }
                }
                if count > 0 {
                    raw_items.push(b',');
                }
                append_served_or_decode(&req.def, kv, &mut raw_items, req.omit_managed_fields)?;
                count += 1;
            }
            if limit == 0 || count >= limit || remaining == 0 {
                break;
            }
            cursor = last_key.clone();
        }
        let revision = read_at.unwrap_or(0);
        let mut list_meta = json!({ "resourceVersion": revision.to_string() });
        if limit > 0 && remaining > 0 {
            if let Some(k) = &last_key {
                list_meta["continue"] = json!(encode_continue(revision, k));
                if !filtered {
                    list_meta["remainingItemCount"] = json!(remaining);
                }
            }
        }
        let body = match rendering {
            Rendering::Object => {
                let head = json!({
                    "kind": req.def.list_kind,
                    "apiVersion": req.def.api_version(),
                    "metadata": list_meta,
                });
                let mut body = serde_json::to_vec(&head).map_err(ApiError::internal)?;
                body.pop(); // the closing brace; items follow
                body.reserve(raw_items.len() + 12);
                body.extend_from_slice(b",\"items\":[");
                body.extend_from_slice(&raw_items);
                body.extend_from_slice(b"]}");
                return Ok(json_bytes_response(StatusCode::OK, body, &[]));
            }
            Rendering::Table { include } => table(&req.def, &items, include, list_meta, true),
            Rendering::PartialMetadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": list_meta,
                "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
            }),
        };
        Ok(json_response(StatusCode::OK, &body, &[]))
    }
}

fn encode_continue(revision: i64, last_key: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": revision, "start": last_key});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> ApiResult<(i64, String)> {
    let bad = || ApiError::BadRequest(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_i64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rv, start.to_string()))
}
