//! Responses: objects, Tables and metadata-only views, as the client's
//! Accept header asks, and the outcome of a write.

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use chrono::Utc;
use http::{HeaderValue, StatusCode};
use serde_json::{json, Value};
use tapestry_store::KeyValue;

use super::Request;
use crate::objects::{append_served, partial_metadata, remove_managed_fields};
use crate::registry::ResourceDef;

/// What the client asked to get back: the objects, a Table, or metadata only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rendering {
    Object,
    Table { include: TableObject },
    PartialMetadata,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableObject {
    None,
    Metadata,
    Object,
}

impl Rendering {
    pub fn negotiate(req: &Request) -> Self {
        // The first supported media type in the Accept list wins.
        for part in req.accept().split(',') {
            let part = part.trim();
            if part.contains("as=Table") {
                let include = match req.param("includeObject") {
                    Some("None") => TableObject::None,
                    Some("Object") => TableObject::Object,
                    _ => TableObject::Metadata,
                };
                return Rendering::Table { include };
            }
            if part.contains("as=PartialObjectMetadata") {
                return Rendering::PartialMetadata;
            }
            if part.starts_with("application/json") || part.starts_with("*/*") || part.is_empty() {
                return Rendering::Object;
            }
        }
        Rendering::Object
    }
}

pub fn json_response(code: StatusCode, body: &Value, warnings: &[String]) -> Response {
    json_bytes_response(code, serde_json::to_vec(body).unwrap_or_default(), warnings)
}

/// A response whose JSON body is already encoded.
pub fn json_bytes_response(code: StatusCode, bytes: Vec<u8>, warnings: &[String]) -> Response {
    let mut resp = (
        code,
        [(http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response();
    for w in warnings {
        let text = format!("299 - {:?}", w);
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append("warning", v);
        }
    }
    resp
}

/// The `Status` a successful create-only subresource (binding, eviction)
/// answers.
pub fn created_status() -> Response {
    json_response(
        StatusCode::CREATED,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        &[],
    )
}

/// A single object rendered as the client asked.
pub fn render_one<'a>(def: &ResourceDef, obj: &'a Value, rendering: Rendering) -> Cow<'a, Value> {
    match rendering {
        Rendering::Object => Cow::Borrowed(obj),
        Rendering::PartialMetadata => Cow::Owned(partial_metadata(obj)),
        Rendering::Table { include } => Cow::Owned(table(
            def,
            std::slice::from_ref(obj),
            include,
            json!({}),
            true,
        )),
    }
}

pub fn table(
    def: &ResourceDef,
    objs: &[Value],
    include: TableObject,
    list_meta: Value,
    with_columns: bool,
) -> Value {
    let now = Utc::now();
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let object = match include {
                TableObject::None => Value::Null,
                TableObject::Metadata => partial_metadata(o),
                TableObject::Object => o.clone(),
            };
            json!({ "cells": def.table.cells(o, now), "object": object })
        })
        .collect();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "rows": rows,
    });
    if with_columns {
        t["columnDefinitions"] = def.table.column_definitions();
    }
    t
}

/// Outcome of a write.
pub struct Written {
    pub obj: Value,
    pub created: bool,
    /// What the store now holds for `obj`, when it holds it: a plain
    /// response is these bytes with `resourceVersion` spliced in, rather
    /// than `obj` encoded a second time.
    pub stored: Option<KeyValue>,
}

impl Written {
    pub fn new(obj: Value, created: bool) -> Self {
        Written {
            obj,
            created,
            stored: None,
        }
    }

    /// 201 for a creation, 200 otherwise, rendered as the client asked.
    pub fn respond(&self, req: &Request, warnings: &[String]) -> Response {
        let code = if self.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let rendering = Rendering::negotiate(req);
        if let (Rendering::Object, Some(kv)) = (rendering, &self.stored) {
            let mut body = Vec::with_capacity(kv.value.len() + 48);
            if append_served(&req.def, kv, &mut body, req.omit_managed_fields) {
                return json_bytes_response(code, body, warnings);
            }
        }
        let mut body = render_one(&req.def, &self.obj, rendering);
        if req.omit_managed_fields && body.pointer("/metadata/managedFields").is_some() {
            remove_managed_fields(body.to_mut());
        }
        json_response(code, &body, warnings)
    }
}
