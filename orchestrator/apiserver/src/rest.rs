//! The generic REST implementation: one code path for every resource's get,
//! list, create, update, patch, delete and deletecollection, with the
//! per-resource differences coming from its [`ResourceDef`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use chrono::Utc;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};
use tapestry_store::{KeyValue, ListOptions, Store, StoreError};

use crate::error::{ApiError, ApiResult, Cause, Target, OBJECT_MODIFIED};
use crate::objects::{
    append_served, append_served_or_decode, decode, encode, finalizers, is_terminating, meta,
    meta_mut, meta_str, now_rfc3339, parse_resource_version, partial_metadata, random_suffix,
    remove_managed_fields, spec_differs, SelectorView,
};
use crate::patch::{self, FieldManagement};
use crate::registry::{Registry, ResourceDef, Subresource};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::validation::{validate_object_meta, validate_object_meta_update};

/// Attempts at a read-modify-write before giving up on conflicts.
const MAX_CAS_ATTEMPTS: usize = 16;

/// Everything a handler needs, shared by all requests.
pub struct Api {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub fields: FieldManagement,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// JSON property names for decoding protobuf bodies.
    pub proto_names: Arc<dyn tapestry_kubeproto::JsonNames + Send + Sync>,
}

/// One parsed request against a resource.
pub struct Request {
    pub def: Arc<ResourceDef>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Serve objects without `metadata.managedFields` (see
    /// [`crate::server::LocalHandler`]).
    pub omit_managed_fields: bool,
}

impl Request {
    pub fn target(&self) -> Target {
        Target {
            group: self.def.group.to_string(),
            resource: self.def.plural.to_string(),
            kind: self.def.kind.to_string(),
            name: self.name.clone().unwrap_or_default(),
        }
    }

    fn param(&self, key: &str) -> Option<&str> {
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

    fn field_validation(&self) -> ApiResult<FieldValidation> {
        match self.param("fieldValidation") {
            None | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::BadRequest(format!(
                "fieldValidation parameter unsupported: {other:?}; supported values are Strict, Warn and Ignore"
            ))),
        }
    }

    fn field_manager(&self, default: &str) -> ApiResult<String> {
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

    fn content_type(&self) -> &str {
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
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

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
            def.table.row(o, object, now)
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

/// Paths present in `input` but dropped by decoding: unknown fields. The
/// path grows and shrinks in one buffer and is copied out only for an
/// unknown field; formatting it at every field cost as much as the decode.
fn unknown_fields(input: &Value, decoded: &Value, path: &mut String, out: &mut Vec<String>) {
    let len = path.len();
    match (input, decoded) {
        (Value::Object(i), Value::Object(d)) => {
            for (k, v) in i {
                if len > 0 {
                    path.push('.');
                }
                path.push_str(k);
                match d.get(k) {
                    Some(dv) => unknown_fields(v, dv, path, out),
                    None if v.is_null() => {}
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(i), Value::Array(d)) => {
            for (idx, (iv, dv)) in i.iter().zip(d).enumerate() {
                let _ = write!(path, "[{idx}]");
                unknown_fields(iv, dv, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Whether a stored namespace is being deleted, as [`is_terminating`] reads
/// it. Every create checks; decoding only `deletionTimestamp` skips
/// building the whole namespace.
fn namespace_terminating(stored: &[u8]) -> ApiResult<bool> {
    match serde_json::from_slice::<NamespaceDeletion>(stored) {
        Ok(namespace) => Ok(namespace.metadata.deletion_timestamp.is_some()),
        // Metadata that is not an object: read it as any object is read.
        Err(_) => serde_json::from_slice::<Value>(stored)
            .map(|ns| is_terminating(&ns))
            .map_err(ApiError::internal),
    }
}

#[derive(serde::Deserialize)]
struct NamespaceDeletion {
    #[serde(default)]
    metadata: NamespaceDeletionMeta,
}

#[derive(serde::Deserialize, Default)]
struct NamespaceDeletionMeta {
    /// Null reads as absent, as in [`is_terminating`].
    #[serde(rename = "deletionTimestamp", default)]
    deletion_timestamp: Option<serde::de::IgnoredAny>,
}

/// Managed fields a patch left exactly as stored skip the typed round trip
/// (they are often half of an object, and the write that follows decodes
/// and rewrites them whole): an empty list stands in for them, keeping their
/// place in the decoded object, and they are returned to go back there.
fn set_aside_stored_managed_fields(obj: &mut Value, stored: &Value) -> Option<Value> {
    let stored = stored.pointer("/metadata/managedFields")?;
    let slot = obj.pointer_mut("/metadata/managedFields")?;
    if slot != stored {
        return None;
    }
    Some(std::mem::replace(slot, Value::Array(Vec::new())))
}

/// Put set-aside managed fields back in their placeholder's place; gives
/// them back if the decoded object has no placeholder.
fn put_back_managed_fields(decoded: &mut Value, managed: Value) -> Result<(), Value> {
    match decoded.pointer_mut("/metadata/managedFields") {
        Some(slot) => {
            *slot = managed;
            Ok(())
        }
        None => Err(managed),
    }
}

/// Outcome of a write.
struct Written {
    obj: Value,
    created: bool,
    /// What the store now holds for `obj`, when it holds it: a plain
    /// response is these bytes with `resourceVersion` spliced in, rather
    /// than `obj` encoded a second time.
    stored: Option<KeyValue>,
}

impl Written {
    fn new(obj: Value, created: bool) -> Self {
        Written {
            obj,
            created,
            stored: None,
        }
    }

    /// 201 for a creation, 200 otherwise, rendered as the client asked.
    fn respond(&self, req: &Request, warnings: &[String]) -> Response {
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

impl Api {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Registry,
        fields: FieldManagement,
        metrics: Arc<crate::metrics::Metrics>,
        proto_names: Arc<dyn tapestry_kubeproto::JsonNames + Send + Sync>,
    ) -> Self {
        Api {
            store,
            registry,
            fields,
            metrics,
            proto_names,
        }
    }

    /// Create an object on the server's own behalf (bootstrap objects).
    pub async fn create_internal(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        namespace: Option<&str>,
        obj: Value,
    ) -> ApiResult<()> {
        let def = self.registry.get(group, version, plural).ok_or_else(|| {
            ApiError::Internal(format!("no resource {plural} in {group}/{version}"))
        })?;
        let req = Request {
            def,
            namespace: namespace.map(str::to_string),
            name: None,
            sub: None,
            query: HashMap::new(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            omit_managed_fields: false,
        };
        let obj = self.admit_body(&req, obj, &mut Vec::new(), None)?;
        self.create_object(&req, obj, Some("tapestry-apiserver"))
            .await
            .map(|_| ())
    }

    /// Parse a request body: JSON, YAML, or Kubernetes' protobuf encoding
    /// (which client-go's typed clients send).
    pub(crate) fn parse_body(&self, req: &Request) -> ApiResult<Value> {
        if req.body.is_empty() {
            return Err(ApiError::BadRequest("request body is empty".into()));
        }
        match req.content_type() {
            "application/yaml" => serde_yaml::from_slice::<Value>(&req.body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}"))),
            "application/json" | "" => serde_json::from_slice::<Value>(&req.body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding JSON: {e}"))),
            "application/vnd.kubernetes.protobuf" => {
                tapestry_kubeproto::decode(&req.body, self.proto_names.as_ref())
                    .map_err(|e| ApiError::BadRequest(format!("error decoding protobuf: {e}")))
            }
            other => Err(ApiError::UnsupportedMediaType(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf; got {other:?}"
            ))),
        }
    }

    fn key(&self, req: &Request, name: &str) -> String {
        req.def.key(req.namespace.as_deref(), name)
    }

    async fn get_kv(&self, req: &Request, name: &str) -> ApiResult<KeyValue> {
        let mut target = req.target();
        target.name = name.to_string();
        self.store
            .get(&self.key(req, name))
            .await
            .map_err(|e| ApiError::from_store(e, &target))?
            .ok_or(ApiError::NotFound(target))
    }

    /// Decode, type-check and canonicalise a client-sent object. `stored`
    /// is the object a patch was applied to, when the write then records
    /// managed fields (which rewrites them whole).
    fn admit_body(
        &self,
        req: &Request,
        mut obj: Value,
        warnings: &mut Vec<String>,
        stored: Option<&Value>,
    ) -> ApiResult<Value> {
        let def = &req.def;
        if !obj.is_object() {
            return Err(ApiError::BadRequest(format!(
                "{} in version {:?} cannot be handled as a {}: the body must be a JSON object",
                def.kind, def.version, def.kind
            )));
        }
        let api_version = def.api_version();
        match obj.get("apiVersion").and_then(Value::as_str) {
            None | Some("") => obj["apiVersion"] = json!(api_version),
            Some(v) if v == api_version => {}
            Some(v) => {
                return Err(ApiError::BadRequest(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )))
            }
        }
        match obj.get("kind").and_then(Value::as_str) {
            None | Some("") => obj["kind"] = json!(def.kind),
            Some(k) if k == def.kind => {}
            Some(k) => {
                return Err(ApiError::BadRequest(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    def.kind
                )))
            }
        }
        let body_ns = meta_str(&obj, "namespace").to_string();
        if def.namespaced {
            let url_ns = req.namespace.clone().unwrap_or_default();
            if !body_ns.is_empty() && body_ns != url_ns {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            meta_mut(&mut obj).insert("namespace".into(), json!(url_ns));
        } else if !body_ns.is_empty() {
            meta_mut(&mut obj).remove("namespace");
        }
        let set_aside = stored.and_then(|stored| set_aside_stored_managed_fields(&mut obj, stored));
        let codec = |obj: &Value| {
            (def.codec)(obj).map_err(|e| {
                ApiError::BadRequest(format!(
                    "{} in version \"{}\" cannot be handled as a {}: {e}",
                    def.kind, def.version, def.kind
                ))
            })
        };
        let mut decoded = codec(&obj)?;
        let validation = req.field_validation()?;
        if validation != FieldValidation::Ignore {
            let mut unknown = Vec::new();
            unknown_fields(&obj, &decoded, &mut String::new(), &mut unknown);
            if !unknown.is_empty() {
                if validation == FieldValidation::Strict {
                    let list: Vec<String> = unknown
                        .iter()
                        .map(|f| format!("unknown field \"{f}\""))
                        .collect();
                    return Err(ApiError::BadRequest(format!(
                        "strict decoding error: {}",
                        list.join(", ")
                    )));
                }
                warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")));
            }
        }
        if let Some(managed) = set_aside {
            if let Err(managed) = put_back_managed_fields(&mut decoded, managed) {
                // The codec dropped the placeholder: decode it all.
                meta_mut(&mut obj).insert("managedFields".into(), managed);
                decoded = codec(&obj)?;
            }
        }
        Ok(decoded)
    }

    async fn check_namespace(&self, req: &Request) -> ApiResult<()> {
        let Some(ns) = req.namespace.as_deref().filter(|_| req.def.namespaced) else {
            return Ok(());
        };
        let key = format!("/registry/namespaces/{ns}");
        let target = Target {
            group: String::new(),
            resource: "namespaces".into(),
            kind: "Namespace".into(),
            name: ns.to_string(),
        };
        let kv = self
            .store
            .get(&key)
            .await
            .map_err(|e| ApiError::from_store(e, &target))?
            .ok_or(ApiError::NotFound(target))?;
        if namespace_terminating(&kv.value)? {
            return Err(ApiError::Forbidden(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                req.def.plural,
                req.name.clone().unwrap_or_default()
            )));
        }
        Ok(())
    }

    fn invalid(req: &Request, obj: &Value, causes: Vec<Cause>) -> ApiError {
        let mut target = req.target();
        target.name = meta_str(obj, "name").to_string();
        ApiError::Invalid { target, causes }
    }

    /// Create-path processing shared by POST and apply-creates.
    fn prepare_create(&self, req: &Request, obj: &mut Value) -> ApiResult<()> {
        let def = &req.def;
        let m = meta_mut(obj);
        let name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let generate = m
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() && !generate.is_empty() {
            m.insert(
                "name".into(),
                json!(format!("{generate}{}", random_suffix())),
            );
        }
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            m.remove(f);
        }
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        if def.tracks_generation {
            m.insert("generation".into(), json!(1));
        } else {
            m.remove("generation");
        }
        def.behaviour.default(obj);
        def.behaviour.prepare_for_create(obj);
        let mut causes = validate_object_meta(obj, def.namespaced, def.name_rule);
        causes.extend(def.behaviour.validate(obj));
        if !causes.is_empty() {
            return Err(Self::invalid(req, obj, causes));
        }
        drop_empty_finalizers(obj);
        Ok(())
    }

    /// Update-path processing: carry over what clients may not change,
    /// apply the subresource's rules, bump generation, validate.
    fn prepare_update(&self, req: &Request, new: &mut Value, old: &Value) -> ApiResult<()> {
        let def = &req.def;
        let sub = req.sub.as_deref();
        if sub == Some("status") {
            // Only status changes through the status subresource.
            // `new` is replaced by `merged` below, so its parts are taken.
            let status = new.as_object_mut().and_then(|m| m.remove("status"));
            let mut merged = old.clone();
            match status {
                Some(s) => merged["status"] = s,
                None => {
                    if let Some(m) = merged.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            // Keep metadata the client may legitimately send along.
            let mut carried = vec!["managedFields"];
            if def.behaviour.status_takes_labels_and_annotations() {
                carried.extend(["labels", "annotations"]);
            }
            for field in carried {
                match meta_mut(new).remove(field) {
                    Some(v) => {
                        meta_mut(&mut merged).insert(field.into(), v);
                    }
                    None if field != "managedFields" => {
                        meta_mut(&mut merged).remove(field);
                    }
                    None => {}
                }
            }
            *new = merged;
        } else if sub == Some("finalize") {
            // Only spec.finalizers changes through namespaces/finalize.
            let finalizers = new.pointer("/spec/finalizers").cloned();
            let mut merged = old.clone();
            merged["spec"]["finalizers"] = finalizers.unwrap_or(json!([]));
            *new = merged;
        } else if sub.is_none() && def.has(Subresource::Status) {
            // A write to the object itself keeps the stored status; a
            // subresource writes what it owns (a binding, for one, sets
            // the pod's PodScheduled condition).
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        let old_meta = meta(old);
        let m = meta_mut(new);
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old_meta.get(f) {
                Some(v) if f != "uid" || m.get("uid").is_none_or(|u| u.as_str() == Some("")) => {
                    m.insert(f.into(), v.clone());
                }
                None if f != "uid" => {
                    m.remove(f);
                }
                _ => {}
            }
        }
        m.remove("selfLink");
        def.behaviour.default(new);
        if sub.is_none() {
            def.behaviour.prepare_for_update(new, old);
        }
        if def.tracks_generation && spec_differs(new, old) {
            let gen = meta(old)
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(new).insert("generation".into(), json!(gen + 1));
        }
        let mut causes = validate_object_meta(new, def.namespaced, def.name_rule);
        causes.extend(validate_object_meta_update(new, old));
        if sub.is_none() {
            causes.extend(def.behaviour.validate_update(new, old));
        }
        if !causes.is_empty() {
            return Err(Self::invalid(req, new, causes));
        }
        drop_empty_finalizers(new);
        Ok(())
    }

    // ---- reads ----------------------------------------------------------

    pub async fn get(&self, req: &Request) -> ApiResult<Response> {
        let name = req.name.clone().unwrap_or_default();
        let kv = self.get_kv(req, &name).await?;
        let rendering = Rendering::negotiate(req);
        if matches!(req.sub.as_deref(), Some("status") | None) && rendering == Rendering::Object {
            let mut body = Vec::with_capacity(kv.value.len() + 32);
            append_served_or_decode(&req.def, &kv, &mut body, req.omit_managed_fields)?;
            return Ok(json_bytes_response(StatusCode::OK, body, &[]));
        }
        let obj = decode(&req.def, &kv)?;
        let body = match req.sub.as_deref() {
            Some("scale") => scale_of(&obj),
            Some("status") | None => render_one(&req.def, &obj, rendering).into_owned(),
            Some(other) => return Err(unsupported_sub(req, other, "get")),
        };
        Ok(json_response(StatusCode::OK, &body, &[]))
    }

    fn selectors(&self, req: &Request) -> ApiResult<(LabelSelector, FieldSelector)> {
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
                    "kind": format!("{}List", req.def.kind),
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

    // ---- writes ---------------------------------------------------------

    pub async fn create(&self, req: &Request) -> ApiResult<Response> {
        if req.sub.as_deref() == Some("eviction") {
            return self.evict(req).await;
        }
        if req.sub.as_deref() == Some("binding") {
            return self.bind(req).await;
        }
        let mut warnings = Vec::new();
        let body = self.parse_body(req)?;
        let obj = self.admit_body(req, body, &mut warnings, None)?;
        let manager = req.field_manager("unknown")?;
        let written = self.create_object(req, obj, Some(&manager)).await?;
        Ok(written.respond(req, &warnings))
    }

    /// Store a new object. `manager` records field ownership for ordinary
    /// creates; applies pass None (their managed fields are already set).
    async fn create_object(
        &self,
        req: &Request,
        mut obj: Value,
        manager: Option<&str>,
    ) -> ApiResult<Written> {
        self.check_namespace(req).await?;
        let dry_run = req.dry_run()?;
        let generated =
            meta_str(&obj, "name").is_empty() && !meta_str(&obj, "generateName").is_empty();
        let attempts = if generated { 3 } else { 1 };
        // Only a generated name is retried, from the object as it came.
        let template = generated.then(|| obj.clone());
        for attempt in 0..attempts {
            if let Some(template) = template.as_ref().filter(|_| attempt > 0) {
                obj = template.clone();
            }
            self.prepare_create(req, &mut obj)?;
            if let Some(m) = manager {
                self.fields.record_update(&req.def, None, &mut obj, m, None);
            }
            let name = meta_str(&obj, "name").to_string();
            let key = req.def.key(req.namespace.as_deref(), &name);
            let mut target = req.target();
            target.name = name.clone();
            // Report an existing object before allocating anything for it.
            let exists = self.store.get(&key).await.map_err(ApiError::internal)?;
            if exists.is_some() {
                if attempt + 1 < attempts {
                    continue;
                }
                return Err(ApiError::AlreadyExists(target));
            }
            if let Some(hook) = &req.def.hook {
                hook.on_create(&mut obj, dry_run).await?;
            }
            if dry_run {
                return Ok(Written::new(obj, true));
            }
            match self.store.create(&key, encode(&req.def, &obj)?).await {
                Ok(kv) => {
                    meta_mut(&mut obj)
                        .insert("resourceVersion".into(), json!(kv.mod_revision.to_string()));
                    return Ok(Written {
                        stored: Some(kv),
                        ..Written::new(obj, true)
                    });
                }
                Err(e) => {
                    if let Some(hook) = &req.def.hook {
                        hook.release(&obj, None).await;
                    }
                    if matches!(e, StoreError::AlreadyExists(_)) && attempt + 1 < attempts {
                        continue;
                    }
                    return Err(ApiError::from_store(e, &target));
                }
            }
        }
        // Every generated name collided (the last attempt returns above).
        Err(ApiError::AlreadyExists(req.target()))
    }

    /// Read-modify-write of one object: `mutate` receives the current object
    /// and returns the desired one; conflicts with concurrent writers are
    /// retried unless the client pinned a resourceVersion.
    async fn update_object<F>(&self, req: &Request, mut mutate: F) -> ApiResult<Written>
    where
        F: FnMut(&Value) -> ApiResult<Option<Value>>,
    {
        let dry_run = req.dry_run()?;
        let name = req.name.clone().unwrap_or_default();
        for _ in 0..MAX_CAS_ATTEMPTS {
            let kv = self.get_kv(req, &name).await?;
            let old = decode(&req.def, &kv)?;
            let Some(mut new) = mutate(&old)? else {
                return Ok(Written {
                    stored: Some(kv),
                    ..Written::new(old, false)
                });
            };
            let pinned = meta_str(&new, "resourceVersion").to_string();
            if !pinned.is_empty() && pinned != kv.mod_revision.to_string() {
                return Err(ApiError::Conflict {
                    target: req.target(),
                    message: OBJECT_MODIFIED.into(),
                });
            }
            self.prepare_update(req, &mut new, &old)?;
            if let Some(hook) = &req.def.hook {
                hook.on_update(&mut new, &old, dry_run).await?;
            }
            // An object being deleted goes once its last finalizer is gone;
            // a pod also waits for its kubelet to confirm (grace period 0),
            // as Kubernetes' pod strategy does.
            let finished = is_terminating(&new)
                && finalizers(&new).is_empty()
                && !namespace_blocks(&req.def, &new)
                && !pod_grace_pending(&req.def, &new);
            if dry_run {
                return Ok(Written::new(new, false));
            }
            let key = self.key(req, &name);
            let result = if finished {
                self.store.delete(&key, Some(kv.mod_revision)).await
            } else {
                self.store
                    .update(&key, encode(&req.def, &new)?, kv.mod_revision)
                    .await
            };
            match result {
                Ok(stored) => {
                    if let Some(hook) = &req.def.hook {
                        if finished {
                            hook.release(&new, None).await;
                        } else {
                            hook.release(&old, Some(&new)).await;
                        }
                    }
                    meta_mut(&mut new).insert(
                        "resourceVersion".into(),
                        json!(stored.mod_revision.to_string()),
                    );
                    // A finishing delete stored nothing new: `stored` is
                    // the object as it was.
                    return Ok(Written {
                        stored: (!finished).then_some(stored),
                        ..Written::new(new, false)
                    });
                }
                Err(StoreError::Conflict { .. }) => {
                    if let Some(hook) = &req.def.hook {
                        hook.release(&new, Some(&old)).await;
                    }
                    if !pinned.is_empty() {
                        return Err(ApiError::Conflict {
                            target: req.target(),
                            message: OBJECT_MODIFIED.into(),
                        });
                    }
                }
                Err(e) => return Err(ApiError::from_store(e, &req.target())),
            }
        }
        Err(ApiError::Conflict {
            target: req.target(),
            message: OBJECT_MODIFIED.into(),
        })
    }

    pub async fn update(&self, req: &Request) -> ApiResult<Response> {
        let mut warnings = Vec::new();
        let body = self.parse_body(req)?;
        if req.sub.as_deref() == Some("scale") {
            return self.update_scale(req, ScaleChange::Replace(body)).await;
        }
        let body_name = meta_str(&body, "name").to_string();
        let url_name = req.name.clone().unwrap_or_default();
        if !body_name.is_empty() && body_name != url_name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
            )));
        }
        let mut obj = self.admit_body(req, body, &mut warnings, None)?;
        meta_mut(&mut obj).insert("name".into(), json!(url_name));
        let manager = req.field_manager("unknown")?;
        let written = match self
            .update_object(req, |old| {
                let mut new = obj.clone();
                self.fields.record_update(
                    &req.def,
                    Some(old),
                    &mut new,
                    &manager,
                    req.sub.as_deref(),
                );
                Ok(Some(new))
            })
            .await
        {
            // PUT creates when the object is absent, as kube-apiserver allows
            // for most resources.
            Err(ApiError::NotFound(_)) if req.sub.is_none() => {
                let mut fresh = obj.clone();
                meta_mut(&mut fresh).remove("resourceVersion");
                self.create_object(req, fresh, Some(&manager)).await?
            }
            other => other?,
        };
        Ok(written.respond(req, &warnings))
    }

    pub async fn patch(&self, req: &Request) -> ApiResult<Response> {
        let content_type = req.content_type().to_string();
        let kind = patch::PatchKind::from_content_type(&content_type).ok_or_else(|| {
            ApiError::UnsupportedMediaType(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {content_type:?}"
            ))
        })?;
        let patch_doc: Value = match kind {
            patch::PatchKind::Apply => serde_yaml::from_slice(&req.body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))?,
            _ => serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))?,
        };
        if req.sub.as_deref() == Some("scale") {
            return self
                .update_scale(req, ScaleChange::Patch(kind, patch_doc))
                .await;
        }
        let mut warnings = Vec::new();
        let force = match req.param("force") {
            None | Some("false") => false,
            Some("true") => {
                if kind != patch::PatchKind::Apply {
                    return Err(ApiError::BadRequest(
                        "force may only be set for apply patches".into(),
                    ));
                }
                true
            }
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "invalid force value {other:?}"
                )))
            }
        };
        let manager = if kind == patch::PatchKind::Apply {
            req.param("fieldManager")
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::BadRequest(
                        "PATCH requests with apply content type must include fieldManager".into(),
                    )
                })?
        } else {
            req.field_manager("unknown")?
        };
        let result = self
            .update_object(req, |old| {
                let patched = match kind {
                    patch::PatchKind::Apply => {
                        let applied = self.admit_body(req, patch_doc.clone(), &mut Vec::new(), None)?;
                        self.fields.apply(&req.def, Some(old), &applied, &manager, force, req.sub.as_deref())?
                    }
                    other => {
                        let mut patched = patch::apply_patch(&self.fields, &req.def, other, old, &patch_doc)?;
                        // The patch may not change identity.
                        if meta_str(&patched, "name") != meta_str(old, "name") {
                            return Err(ApiError::BadRequest(
                                "metadata.name: the name of the object cannot be changed by a patch".into(),
                            ));
                        }
                        // A patch pins the version only if it names a different
                        // one; otherwise it is reapplied on conflicts.
                        if meta_str(&patched, "resourceVersion") == meta_str(old, "resourceVersion") {
                            meta_mut(&mut patched).remove("resourceVersion");
                        }
                        let mut new = self.admit_body(req, patched, &mut warnings, Some(old))?;
                        self.fields.record_update(&req.def, Some(old), &mut new, &manager, req.sub.as_deref());
                        new
                    }
                };
                Ok(Some(patched))
            })
            .await;
        let written = match result {
            Err(ApiError::NotFound(_)) if kind == patch::PatchKind::Apply && req.sub.is_none() => {
                let mut applied = self.admit_body(req, patch_doc.clone(), &mut warnings, None)?;
                meta_mut(&mut applied)
                    .insert("name".into(), json!(req.name.clone().unwrap_or_default()));
                let obj = self
                    .fields
                    .apply(&req.def, None, &applied, &manager, force, None)?;
                self.create_object(req, obj, None).await?
            }
            other => other?,
        };
        Ok(written.respond(req, &warnings))
    }

    async fn update_scale(&self, req: &Request, change: ScaleChange) -> ApiResult<Response> {
        let def = req.def.clone();
        if !def.has(Subresource::Scale) {
            return Err(unsupported_sub(req, "scale", "update"));
        }
        let written = self
            .update_object(req, |old| {
                let current = scale_of(old);
                let desired = match &change {
                    ScaleChange::Replace(body) => body.clone(),
                    ScaleChange::Patch(kind, doc) => patch::apply_untyped(*kind, &current, doc)?,
                };
                let replicas = desired
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if replicas < 0 {
                    return Err(ApiError::Invalid {
                        target: req.target(),
                        causes: vec![Cause::invalid(
                            "spec.replicas",
                            &json!(replicas),
                            "must be greater than or equal to 0",
                        )],
                    });
                }
                let mut new = old.clone();
                new["spec"]["replicas"] = json!(replicas);
                let pinned = meta_str(&desired, "resourceVersion");
                meta_mut(&mut new).insert("resourceVersion".into(), json!(pinned));
                if pinned.is_empty() {
                    meta_mut(&mut new).remove("resourceVersion");
                }
                Ok(Some(new))
            })
            .await?;
        Ok(json_response(StatusCode::OK, &scale_of(&written.obj), &[]))
    }

    /// pods/binding: assign a pod to a node, once.
    async fn bind(&self, req: &Request) -> ApiResult<Response> {
        if req.def.plural != "pods" || req.sub.as_deref() != Some("binding") {
            return Err(unsupported_sub(
                req,
                req.sub.as_deref().unwrap_or(""),
                "create",
            ));
        }
        let body = self.parse_body(req)?;
        let node = body
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if node.is_empty() {
            return Err(ApiError::Invalid {
                target: req.target(),
                causes: vec![Cause::required("target.name")],
            });
        }
        let binding_req = Request {
            def: req.def.clone(),
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            sub: Some("binding".into()),
            query: req.query.clone(),
            headers: req.headers.clone(),
            body: Bytes::new(),
            omit_managed_fields: req.omit_managed_fields,
        };
        self.update_object(&binding_req, |old| {
            let current = old.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
            if is_terminating(old) {
                return Err(ApiError::Conflict {
                    target: req.target(),
                    message: "pod is being deleted, cannot be assigned to a host".into(),
                });
            }
            if !current.is_empty() {
                return Err(ApiError::Conflict {
                    target: req.target(),
                    message: format!("pod {} is already assigned to node {current:?}", meta_str(old, "name")),
                });
            }
            let mut new = old.clone();
            new["spec"]["nodeName"] = json!(node);
            let now = now_rfc3339();
            let conditions = new["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let mut conditions: Vec<Value> = conditions.into_iter().filter(|c| c["type"] != "PodScheduled").collect();
            conditions.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now}));
            new["status"]["conditions"] = json!(conditions);
            meta_mut(&mut new).remove("resourceVersion");
            Ok(Some(new))
        })
        .await?;
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            &[],
        ))
    }

    pub async fn delete(&self, req: &Request) -> ApiResult<Response> {
        let options = if req.body.is_empty() {
            json!({})
        } else {
            self.parse_body(req)?
        };
        let obj = self
            .delete_one(req, req.name.clone().unwrap_or_default(), &options)
            .await?;
        Ok(json_response(StatusCode::OK, &obj, &[]))
    }

    /// Delete one object honouring preconditions, finalizers, propagation
    /// policy and graceful pod termination.
    pub(crate) async fn delete_one(
        &self,
        req: &Request,
        name: String,
        options: &Value,
    ) -> ApiResult<Value> {
        let dry_run = req.dry_run()?
            || options
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|d| d.iter().any(|v| v == "All"));
        let propagation = options
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .or_else(|| req.param("propagationPolicy"))
            .map(str::to_string);
        let orphan = options.get("orphanDependents").and_then(Value::as_bool);
        let grace: Option<i64> = options
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| req.param("gracePeriodSeconds").and_then(|g| g.parse().ok()));
        let mut target = req.target();
        target.name = name.clone();
        let key = self.key(req, &name);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let kv = self
                .store
                .get(&key)
                .await
                .map_err(|e| ApiError::from_store(e, &target))?
                .ok_or_else(|| ApiError::NotFound(target.clone()))?;
            let obj = decode(&req.def, &kv)?;
            if let Some(uid) = options
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
            {
                if uid != meta_str(&obj, "uid") {
                    return Err(ApiError::Conflict {
                        target: target.clone(),
                        message: format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", meta_str(&obj, "uid")),
                    });
                }
            }
            if let Some(rv) = options
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
            {
                if rv != kv.mod_revision.to_string() {
                    return Err(ApiError::Conflict {
                        target: target.clone(),
                        message: format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", kv.mod_revision),
                    });
                }
            }
            let mut updated = obj.clone();
            let mut fins = finalizers(&obj);
            let wanted_finalizer = match (propagation.as_deref(), orphan) {
                (Some("Foreground"), _) => Some("foregroundDeletion"),
                (Some("Orphan"), _) | (None, Some(true)) => Some("orphan"),
                _ => None,
            };
            if let Some(f) = wanted_finalizer {
                if !fins.iter().any(|x| x == f) {
                    fins.push(f.to_string());
                }
                fins.retain(|x| x == f || (x != "orphan" && x != "foregroundDeletion"));
            }
            let graceful = pod_grace_period(&req.def, &obj, grace);
            let blocks = namespace_blocks(&req.def, &obj);
            let now = now_rfc3339();
            let immediate = fins.is_empty() && graceful.is_none() && !blocks;
            if immediate {
                if dry_run {
                    return Ok(obj);
                }
                match self.store.delete(&key, Some(kv.mod_revision)).await {
                    Ok(_) => {
                        if let Some(hook) = &req.def.hook {
                            hook.release(&obj, None).await;
                        }
                        return Ok(obj);
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(StoreError::NotFound(_)) => return Err(ApiError::NotFound(target)),
                    Err(e) => return Err(ApiError::from_store(e, &target)),
                }
            }
            // Mark for deletion: finalizers, the namespace controller or the
            // kubelet finish the job.
            let m = meta_mut(&mut updated);
            if fins.is_empty() {
                m.remove("finalizers");
            } else {
                m.insert("finalizers".into(), json!(fins));
            }
            if m.get("deletionTimestamp").is_none() {
                let grace_secs = graceful.unwrap_or(0);
                let when = (Utc::now() + chrono::Duration::seconds(grace_secs))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                m.insert(
                    "deletionTimestamp".into(),
                    json!(if grace_secs > 0 { when } else { now }),
                );
                m.insert("deletionGracePeriodSeconds".into(), json!(grace_secs));
            } else if let Some(g) = graceful {
                // A shorter grace period may replace a longer one.
                let current = m
                    .get("deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if g < current {
                    m.insert("deletionGracePeriodSeconds".into(), json!(g));
                }
            }
            if req.def.plural == "namespaces" {
                updated["status"]["phase"] = json!("Terminating");
            }
            if updated == obj {
                return Ok(obj);
            }
            if dry_run {
                return Ok(updated);
            }
            match self
                .store
                .update(&key, encode(&req.def, &updated)?, kv.mod_revision)
                .await
            {
                Ok(stored) => {
                    meta_mut(&mut updated).insert(
                        "resourceVersion".into(),
                        json!(stored.mod_revision.to_string()),
                    );
                    return Ok(updated);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ApiError::from_store(e, &target)),
            }
        }
        Err(ApiError::Conflict {
            target,
            message: OBJECT_MODIFIED.into(),
        })
    }

    pub async fn delete_collection(&self, req: &Request) -> ApiResult<Response> {
        let options = if req.body.is_empty() {
            json!({})
        } else {
            self.parse_body(req)?
        };
        let (labels, fields) = self.selectors(req)?;
        let prefix = self.scan_prefix(req, &fields);
        let page = self
            .store
            .list(&prefix, ListOptions::default())
            .await
            .map_err(|e| ApiError::from_store(e, &req.target()))?;
        let mut deleted = Vec::new();
        for kv in &page.items {
            let obj = decode(&req.def, kv)?;
            if !Self::matches(&req.def, &labels, &fields, &obj) {
                continue;
            }
            let name = meta_str(&obj, "name").to_string();
            let ns = meta_str(&obj, "namespace").to_string();
            let item_req = Request {
                def: req.def.clone(),
                namespace: if req.def.namespaced { Some(ns) } else { None },
                name: Some(name.clone()),
                sub: None,
                query: req.query.clone(),
                headers: req.headers.clone(),
                body: Bytes::new(),
                omit_managed_fields: req.omit_managed_fields,
            };
            match self.delete_one(&item_req, name, &options).await {
                Ok(o) => deleted.push(o),
                Err(ApiError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let body = json!({
            "kind": format!("{}List", req.def.kind),
            "apiVersion": req.def.api_version(),
            "metadata": {"resourceVersion": page.revision.to_string()},
            "items": deleted,
        });
        Ok(json_response(StatusCode::OK, &body, &[]))
    }
}

enum ScaleChange {
    Replace(Value),
    Patch(patch::PatchKind, Value),
}

/// The autoscaling/v1 Scale view of a workload.
fn scale_of(obj: &Value) -> Value {
    let selector = crate::tables::selector_string(obj.pointer("/spec/selector"));
    let m = meta(obj);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m.get("name"),
            "namespace": m.get("namespace"),
            "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"),
            "creationTimestamp": m.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": if selector == "<none>" { String::new() } else { selector },
        },
    })
}

/// Kubernetes omits an empty finalizer list, so clients see none at all.
fn drop_empty_finalizers(obj: &mut Value) {
    let m = meta_mut(obj);
    if m.get("finalizers")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
    {
        m.remove("finalizers");
    }
}

/// A pod being deleted gracefully whose kubelet has not confirmed yet.
fn pod_grace_pending(def: &ResourceDef, obj: &Value) -> bool {
    def.plural == "pods"
        && def.group.is_empty()
        && obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .is_some_and(|g| g > 0)
}

/// Pods bound to a node terminate gracefully: the kubelet stops them and
/// then deletes them for good. Returns the grace period when that applies.
fn pod_grace_period(def: &ResourceDef, obj: &Value, requested: Option<i64>) -> Option<i64> {
    if def.plural != "pods" || !def.group.is_empty() {
        return None;
    }
    let scheduled = obj
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let phase = obj
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !scheduled || matches!(phase, "Succeeded" | "Failed") {
        return None;
    }
    let grace = requested
        .or_else(|| {
            obj.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30);
    if grace <= 0 {
        // An explicit zero asks for immediate removal; only a terminating
        // pod's kubelet (or a forced delete) does that.
        return if is_terminating(obj) || requested == Some(0) {
            None
        } else {
            Some(0)
        };
    }
    Some(grace)
}

/// A namespace is only removed once its spec.finalizers are done.
fn namespace_blocks(def: &ResourceDef, obj: &Value) -> bool {
    def.plural == "namespaces"
        && def.group.is_empty()
        && obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty())
}

fn unsupported_sub(req: &Request, sub: &str, verb: &str) -> ApiError {
    ApiError::NotFound(Target {
        group: req.def.group.into(),
        resource: format!("{}/{sub}", req.def.plural),
        kind: req.def.kind.into(),
        name: format!("{} ({verb})", req.name.clone().unwrap_or_default()),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::typed_codec;
    use k8s_openapi::api::core::v1::Pod;

    /// A patch naming a resourceVersion applies to that version only, as a
    /// writer working from a cached copy needs: an older one is a 409
    /// Conflict and changes nothing; the current one applies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_patch_pinned_to_an_older_version_conflicts() {
        let server = crate::testing::start().await;
        let pods = "/api/v1/namespaces/default/pods";
        let pod = json!({"metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]}});
        let created = server.send("POST", pods, &pod).await;
        let status = format!("{pods}/p/status");
        server
            .send("PATCH", &status, &json!({"status": {"phase": "Succeeded"}}))
            .await;

        let stale = json!({"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
            "status": {"phase": "Running"}});
        let (code, answer) = server.request("PATCH", &status, &stale).await;
        assert_eq!(code, http::StatusCode::CONFLICT, "{answer}");
        assert_eq!(answer["reason"], "Conflict", "{answer}");
        let now = server.send("GET", &format!("{pods}/p"), &Value::Null).await;
        assert_eq!(now["status"]["phase"], "Succeeded");

        let current = json!({"metadata": {"resourceVersion": now["metadata"]["resourceVersion"]},
            "status": {"message": "done"}});
        let patched = server.send("PATCH", &status, &current).await;
        assert_eq!(patched["status"]["message"], "done");
        assert_eq!(patched["status"]["phase"], "Succeeded");
    }

    /// An emptied finalizer list is dropped, as Kubernetes omits it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_finalizer_list_is_dropped() {
        let server = crate::testing::start().await;
        let cms = "/api/v1/namespaces/default/configmaps";
        let cm = json!({"metadata": {"name": "c", "finalizers": ["example.com/hold"]}});
        server.send("POST", cms, &cm).await;
        let emptied = server
            .send(
                "PATCH",
                &format!("{cms}/c"),
                &json!({"metadata": {"finalizers": []}}),
            )
            .await;
        assert!(emptied["metadata"].get("finalizers").is_none(), "{emptied}");
        let created = server
            .send(
                "POST",
                cms,
                &json!({"metadata": {"name": "d", "finalizers": []}}),
            )
            .await;
        assert!(created["metadata"].get("finalizers").is_none(), "{created}");
    }

    #[test]
    fn unknown_fields_are_named_by_their_full_path() {
        let pod = json!({
            "metadata": {"name": "p", "bogus": 1, "alsoNull": null},
            "spec": {"containers": [
                {"name": "a", "image": "busybox"},
                {"name": "b", "image": "busybox", "extra": {"deep": true}},
            ]},
            "top": "x",
        });
        let decoded = typed_codec::<Pod>(&pod).unwrap();
        let mut found = Vec::new();
        unknown_fields(&pod, &decoded, &mut String::new(), &mut found);
        assert_eq!(found, ["metadata.bogus", "spec.containers[1].extra", "top"]);
    }

    #[test]
    fn a_namespace_is_read_as_being_deleted_as_is_terminating_reads_it() {
        for ns in [
            json!({"metadata": {"name": "a"}}),
            json!({"metadata": {"name": "a", "deletionTimestamp": null}}),
            json!({"metadata": {"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"finalizers": ["kubernetes"]}}),
            json!({"kind": "Namespace"}),
            json!({"metadata": null}),
            json!({"metadata": "x"}),
        ] {
            let stored = serde_json::to_vec(&ns).unwrap();
            assert_eq!(
                namespace_terminating(&stored).unwrap(),
                is_terminating(&ns),
                "{ns}"
            );
        }
        assert!(namespace_terminating(b"{").is_err());
    }

    /// Setting stored managed fields aside decodes a patched object as the
    /// whole round trip does: the same fields in the same order, and the
    /// managed fields with the same content (their key order is rewritten
    /// by the managed-fields bookkeeping that follows either way).
    #[test]
    fn stored_managed_fields_set_aside_decode_as_the_round_trip() {
        let entry = |manager: &str, sub: Option<&str>| {
            let mut e = json!({"manager": manager, "operation": "Update", "apiVersion": "v1",
                "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:image": {}}}}}});
            if let Some(sub) = sub {
                e["subresource"] = json!(sub);
            }
            e
        };
        let stored = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"a": "b"},
                         "managedFields": [entry("kubectl", None), entry("kubelet", Some("status"))]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Pending"}});
        let mut patched = stored.clone();
        patched["status"] =
            json!({"phase": "Running", "podIP": "10.0.0.1", "startTime": "2026-01-01T00:00:01Z"});
        patched["metadata"]["resourceVersion"] = json!("7");

        let whole = typed_codec::<Pod>(&patched).unwrap();
        let mut obj = patched.clone();
        let managed = set_aside_stored_managed_fields(&mut obj, &stored).expect("unchanged");
        assert_eq!(obj["metadata"]["managedFields"], json!([]));
        let mut decoded = typed_codec::<Pod>(&obj).unwrap();
        put_back_managed_fields(&mut decoded, managed).expect("placeholder kept");
        assert_eq!(decoded, whole);
        let without_managed = |v: &Value| {
            let mut v = v.clone();
            remove_managed_fields(&mut v);
            serde_json::to_string(&v).unwrap()
        };
        assert_eq!(without_managed(&decoded), without_managed(&whole));
        let order = |v: &Value| -> Vec<String> {
            v["metadata"].as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(order(&decoded), order(&whole));

        // Changed, added or absent managed fields take the whole round trip.
        let mut changed = patched.clone();
        changed["metadata"]["managedFields"][0]["manager"] = json!("other");
        assert!(set_aside_stored_managed_fields(&mut changed, &stored).is_none());
        let mut unstored = stored.clone();
        remove_managed_fields(&mut unstored);
        assert!(set_aside_stored_managed_fields(&mut patched.clone(), &unstored).is_none());
        let mut without = patched.clone();
        remove_managed_fields(&mut without);
        assert!(set_aside_stored_managed_fields(&mut without, &stored).is_none());
        // No placeholder to fill: the managed fields come back.
        assert_eq!(
            put_back_managed_fields(&mut json!({"metadata": {}}), json!([1])),
            Err(json!([1]))
        );
    }
}
