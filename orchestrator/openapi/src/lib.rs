//! OpenAPI documents for the served resources.
//!
//! [`OpenApi`] is built once at start-up from the list of served resources
//! ([`ResourceInfo`]) and holds the serialized documents the API server hands
//! out unchanged:
//!
//! * `/openapi/v2` — [`OpenApi::v2_json`], Swagger 2.0 with every definition
//!   and path;
//! * `/openapi/v3` — [`OpenApi::v3_index_json`], the list of group-version
//!   documents, each with a content hash in its URL so clients can cache it;
//! * `/openapi/v3/api/v1`, `/openapi/v3/apis/apps/v1`, ... —
//!   [`OpenApi::v3_group_version_json`], OpenAPI 3.0 per group version.
//!
//! Schemas come from k8s-openapi's `schemars` implementations (names,
//! structure and descriptions); the Kubernetes extensions they lack
//! (group-version-kind, list/map types, patch strategies and merge keys) and
//! the `default`s server-side apply relies on are added from this crate's own
//! tables. The same definitions back the
//! [`PatchSchema`] implementation used by strategic merge patch and
//! server-side apply.

mod extensions;
mod fields;
mod names;
mod paths;
mod registry;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use k8s_openapi::schemars::generate::SchemaSettings;
use k8s_openapi::schemars::{JsonSchema, SchemaGenerator};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tapestry_apimachinery::{FieldSchema, PatchSchema};

use crate::paths::{Flavor, Gvk, PathItem, META};

/// One served resource, as the API server's discovery describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceInfo {
    /// API group, empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verbs: Vec<String>,
    /// `status`, `approval`, `scale`, `binding`, `eviction`, `log`, `exec`, `attach`,
    /// `portforward`, `proxy`, `ephemeralcontainers`, `resize`, `finalize`, `token`.
    pub subresources: Vec<String>,
    /// Definition name of the object type, e.g. `io.k8s.api.apps.v1.Deployment`.
    /// Its list type is `<definition>List`, generated here.
    pub definition: String,
    /// Whether PATCH takes strategic merge patches (built-in kinds do,
    /// custom resources do not; kubectl apply picks its patch type by it).
    pub strategic_merge: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A resource's definition is neither a known k8s-openapi type nor one
    /// added to the builder.
    UnknownDefinition(String),
    /// A subresource this crate does not know how to describe.
    UnknownSubresource(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownDefinition(d) => write!(f, "no schema for definition {d}"),
            Error::UnknownSubresource(s) => write!(f, "unknown subresource {s}"),
        }
    }
}

impl std::error::Error for Error {}

/// Collects additional schemas (e.g. for Tapestry's own resources) before
/// building. `OpenApi::new` is the shortcut when only built-in types are served.
pub struct OpenApiBuilder {
    generator: SchemaGenerator,
    /// Schemas of types added with [`OpenApiBuilder::schema`].
    custom: SchemaGenerator,
    extra: BTreeMap<String, Value>,
    version: String,
    v3_only: bool,
}

impl Default for OpenApiBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn generator() -> SchemaGenerator {
    // No transforms: `$ref` keeps its siblings (description, extensions),
    // which Swagger 2.0 documents use as is and OpenAPI 3.0 wraps in `allOf`.
    SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/definitions".into())
        .into_generator()
}

impl OpenApiBuilder {
    pub fn new() -> Self {
        OpenApiBuilder {
            generator: generator(),
            custom: generator(),
            extra: BTreeMap::new(),
            version: "v1.33.0".into(),
            v3_only: false,
        }
    }

    /// Build only the OpenAPI v3 documents, without the Swagger 2.0 one and
    /// the field types patches use (for documents served beside another
    /// set that has them, like a custom group version's).
    pub fn v3_only(mut self) -> Self {
        self.v3_only = true;
        self
    }

    /// `info.version` of the documents (the emulated Kubernetes version).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds the schema of `T` (and the types it references) under
    /// `T::schema_name()`. Kubernetes extensions can be set with schemars
    /// attributes, e.g. `#[schemars(extend("x-kubernetes-list-type" = "set"))]`.
    /// `Option` fields may use schemars' `null` type forms; they are
    /// rewritten to the plain type, which is what both OpenAPI versions expect.
    pub fn schema<T: JsonSchema>(mut self) -> Self {
        self.custom.subschema_for::<T>();
        self
    }

    /// Adds a hand-written Swagger 2.0 schema (`$ref`s as `#/definitions/NAME`).
    pub fn definition(mut self, name: impl Into<String>, schema: Value) -> Self {
        self.extra.insert(name.into(), schema);
        self
    }

    pub fn build(mut self, resources: &[ResourceInfo]) -> Result<OpenApi, Error> {
        for (name, mut schema) in self.custom.take_definitions(false) {
            strip_null(&mut schema);
            self.extra.entry(name).or_insert(schema);
        }
        // Generate what the resources and their operations need.
        let mut wanted: Vec<String> = resources.iter().map(|r| r.definition.clone()).collect();
        wanted.extend(
            paths::subresource_definitions(resources)
                .into_iter()
                .map(String::from),
        );
        for meta in [
            "Status",
            "ListMeta",
            "DeleteOptions",
            "Patch",
            "WatchEvent",
            "APIResourceList",
        ] {
            wanted.push(format!("{META}{meta}"));
        }
        for name in &wanted {
            let known = self.extra.contains_key(name)
                || self.generator.definitions().contains_key(name)
                || registry::generate_builtin(&mut self.generator, name);
            if !known {
                return Err(Error::UnknownDefinition(name.clone()));
            }
        }
        let mut defs: BTreeMap<String, Value> =
            self.generator.take_definitions(false).into_iter().collect();
        defs.extend(self.extra);

        add_list_definitions(&mut defs, resources);
        extensions::apply_table(&mut defs);
        add_gvks(&mut defs, resources);

        let mut items: Vec<PathItem> = Vec::new();
        let mut group_versions = BTreeSet::new();
        for r in resources {
            if group_versions.insert((r.group.clone(), r.version.clone())) {
                items.push(paths::discovery_path(&r.group, &r.version));
            }
            items.extend(paths::resource_paths(r)?);
        }
        items.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(OpenApi::assemble(&self.version, defs, &items, self.v3_only))
    }
}

/// Swagger 2.0 and OpenAPI 3.0 have no `null` type, which schemars uses for
/// `Option<T>` (`type: [T, "null"]`, `anyOf: [T, {type: null}]`); a field
/// that may be absent needs no more than not being required.
fn strip_null(value: &mut Value) {
    match value {
        Value::Object(m) => {
            if let Some(Value::Array(types)) = m.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.pop().expect("one type");
                    m.insert("type".into(), only);
                }
            }
            for key in ["anyOf", "oneOf"] {
                let Some(Value::Array(alternatives)) = m.get_mut(key) else {
                    continue;
                };
                alternatives.retain(|a| a != &json!({"type": "null"}));
                if alternatives.len() == 1 {
                    let only = alternatives.pop().expect("one alternative");
                    m.remove(key);
                    if let Value::Object(only) = only {
                        for (k, v) in only {
                            m.entry(k).or_insert(v);
                        }
                    }
                }
            }
            m.values_mut().for_each(strip_null);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_null),
        _ => {}
    }
}

/// `<definition>List` for every listable resource.
fn add_list_definitions(defs: &mut BTreeMap<String, Value>, resources: &[ResourceInfo]) {
    for r in resources
        .iter()
        .filter(|r| r.verbs.iter().any(|v| v == "list"))
    {
        let list = format!("{}List", r.definition);
        if defs.contains_key(&list) {
            continue;
        }
        // apiVersion and kind mean the same on a list as on its items.
        let item_prop = |field: &str| {
            defs.get(&r.definition)
                .and_then(|d| d.pointer(&format!("/properties/{field}")))
                .cloned()
                .unwrap_or_else(|| json!({"type": "string"}))
        };
        let schema = json!({
            "description": format!("{}List is a list of {} objects.", r.kind, r.kind),
            "type": "object",
            "properties": {
                "apiVersion": item_prop("apiVersion"),
                "items": {
                    "description": format!("The {} objects.", r.kind),
                    "type": "array",
                    "items": {"$ref": format!("#/definitions/{}", r.definition)},
                },
                "kind": item_prop("kind"),
                "metadata": {
                    "description": "Standard list metadata: resource version and continue token.",
                    "$ref": format!("#/definitions/{META}ListMeta"),
                },
            },
            "required": ["items"],
        });
        defs.insert(list, schema);
    }
}

/// `x-kubernetes-group-version-kind` on every top-level kind: the resources,
/// their lists, subresource payloads and the shared meta types.
fn add_gvks(defs: &mut BTreeMap<String, Value>, resources: &[ResourceInfo]) {
    let mut gvks: BTreeMap<String, BTreeSet<Gvk>> = BTreeMap::new();
    let mut add = |def: String, gvk: Gvk| {
        gvks.entry(def).or_default().insert(gvk);
    };
    for r in resources {
        add(
            r.definition.clone(),
            Gvk::new(&r.group, &r.version, &r.kind),
        );
        if r.verbs.iter().any(|v| v == "list") {
            add(
                format!("{}List", r.definition),
                Gvk::new(&r.group, &r.version, &format!("{}List", r.kind)),
            );
        }
        for (def, gvk) in paths::subresource_gvks(r) {
            add(def.to_string(), gvk);
        }
        // Delete options and watch events are accepted and sent by every
        // group version.
        add(
            format!("{META}DeleteOptions"),
            Gvk::new(&r.group, &r.version, "DeleteOptions"),
        );
        add(
            format!("{META}WatchEvent"),
            Gvk::new(&r.group, &r.version, "WatchEvent"),
        );
    }
    add(format!("{META}Status"), Gvk::new("", "v1", "Status"));
    for (def, list) in gvks {
        if let Some(Value::Object(schema)) = defs.get_mut(&def) {
            let list: Vec<Value> = list.iter().map(Gvk::to_json).collect();
            schema.insert("x-kubernetes-group-version-kind".into(), Value::Array(list));
        }
    }
}

/// All `$ref` targets in a schema or path item.
fn collect_refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => {
                        if let Some(name) = r
                            .strip_prefix("#/definitions/")
                            .or_else(|| r.strip_prefix("#/components/schemas/"))
                        {
                            out.push(name);
                        }
                    }
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// The direct references of every definition, computed once and shared by
/// all documents.
struct RefGraph<'d> {
    edges: HashMap<&'d str, Vec<&'d str>>,
}

impl<'d> RefGraph<'d> {
    fn new(defs: &'d BTreeMap<String, Value>) -> Self {
        let edges = defs
            .iter()
            .map(|(name, def)| {
                let mut refs = Vec::new();
                collect_refs(def, &mut refs);
                (name.as_str(), refs)
            })
            .collect();
        RefGraph { edges }
    }

    /// The definitions `roots` name and every definition they reach.
    fn reachable(&self, roots: Vec<&str>) -> BTreeSet<&'d str> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&str> = roots;
        while let Some(name) = stack.pop() {
            if let Some((name, refs)) = self.edges.get_key_value(name) {
                if seen.insert(*name) {
                    stack.extend(refs.iter().copied());
                }
            }
        }
        seen
    }
}

/// Rewrites a Swagger 2.0 schema into OpenAPI 3.0: refs point into
/// `components/schemas`, and a `$ref` with siblings (description,
/// extensions) becomes `allOf: [$ref]` because 3.0 ignores `$ref` siblings.
fn to_v3(value: &Value) -> Value {
    match value {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                let target = r.replace("#/definitions/", "#/components/schemas/");
                if m.len() == 1 {
                    return json!({"$ref": target});
                }
                let mut out = Map::new();
                out.insert("allOf".into(), json!([{"$ref": target}]));
                for (k, v) in m.iter().filter(|(k, _)| *k != "$ref") {
                    out.insert(k.clone(), to_v3(v));
                }
                return Value::Object(out);
            }
            Value::Object(m.iter().map(|(k, v)| (k.clone(), to_v3(v))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(to_v3).collect()),
        other => other.clone(),
    }
}

/// A document's hash as kube-apiserver writes it (upper-case hex SHA-256).
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

const BEARER: &str = "BearerToken";

fn security_scheme() -> Value {
    json!({
        "type": "apiKey",
        "name": "authorization",
        "in": "header",
        "description": "Bearer token: 'Authorization: Bearer <token>'.",
    })
}

// Definitions are pre-serialized (`RawValue`) once per flavor, so a schema
// shared by several documents is not serialized again for each.
type RawDefs<'a> = BTreeMap<&'a str, &'a RawValue>;

#[derive(Serialize)]
struct V2Doc<'a> {
    swagger: &'static str,
    info: &'a Value,
    paths: Map<String, Value>,
    definitions: RawDefs<'a>,
    #[serde(rename = "securityDefinitions")]
    security_definitions: &'a Value,
    security: &'a Value,
}

#[derive(Serialize)]
struct V3Doc<'a> {
    openapi: &'static str,
    info: &'a Value,
    paths: Map<String, Value>,
    components: V3Components<'a>,
    security: &'a Value,
}

#[derive(Serialize)]
struct V3Components<'a> {
    schemas: RawDefs<'a>,
    #[serde(rename = "securitySchemes")]
    security_schemes: &'a Value,
}

fn raw(value: &impl Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("serializing JSON values cannot fail")
}

fn to_bytes(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("serializing JSON values cannot fail")
}

/// One v3 document with the hash its URL carries.
struct V3Entry {
    json: Vec<u8>,
    hash: String,
}

/// The OpenAPI documents of the served resources, serialized once.
pub struct OpenApi {
    v2: Vec<u8>,
    v2_hash: String,
    v3_index: Vec<u8>,
    v3: BTreeMap<String, V3Entry>,
    fields: fields::FieldIndex,
}

impl OpenApi {
    /// Builds the documents for `resources` from the built-in k8s-openapi
    /// types. Use [`OpenApiBuilder`] to add schemas of other types.
    pub fn new(resources: &[ResourceInfo]) -> Result<OpenApi, Error> {
        OpenApiBuilder::new().build(resources)
    }

    pub fn builder() -> OpenApiBuilder {
        OpenApiBuilder::new()
    }

    fn assemble(
        version: &str,
        defs: BTreeMap<String, Value>,
        items: &[PathItem],
        v3_only: bool,
    ) -> OpenApi {
        let info = json!({"title": "Kubernetes", "version": version});
        let security = json!([{BEARER: []}]);
        let schemes = json!({BEARER: security_scheme()});
        let graph = RefGraph::new(&defs);

        // v2: every path and the definitions they reach (which include
        // everything any v3 document needs).
        let v2_paths: Map<String, Value> = items
            .iter()
            .map(|i| (i.path.clone(), paths::render_path(i, Flavor::V2)))
            .collect();
        let mut roots = Vec::new();
        collect_refs_map(&v2_paths, &mut roots);
        let used = graph.reachable(roots);
        let v3_raw: BTreeMap<&str, Box<RawValue>> =
            used.iter().map(|n| (*n, raw(&to_v3(&defs[*n])))).collect();
        let v2 = if v3_only {
            Vec::new()
        } else {
            let v2_raw: BTreeMap<&str, Box<RawValue>> =
                used.iter().map(|n| (*n, raw(&defs[*n]))).collect();
            to_bytes(&V2Doc {
                swagger: "2.0",
                info: &info,
                paths: v2_paths,
                definitions: v2_raw.iter().map(|(n, d)| (*n, &**d)).collect(),
                security_definitions: &schemes,
                security: &security,
            })
        };
        let v2_hash = hex_sha256(&v2);

        // v3: one document per group version with the definitions it reaches.
        let mut by_gv: BTreeMap<&str, Vec<&PathItem>> = BTreeMap::new();
        for item in items {
            by_gv
                .entry(item.group_version.as_str())
                .or_default()
                .push(item);
        }
        let mut v3 = BTreeMap::new();
        for (gv, items) in by_gv {
            let paths: Map<String, Value> = items
                .iter()
                .map(|i| (i.path.clone(), paths::render_path(i, Flavor::V3)))
                .collect();
            let mut roots = Vec::new();
            collect_refs_map(&paths, &mut roots);
            let names = graph.reachable(roots);
            let json = to_bytes(&V3Doc {
                openapi: "3.0.0",
                info: &info,
                paths,
                components: V3Components {
                    schemas: names.iter().map(|n| (*n, &*v3_raw[*n])).collect(),
                    security_schemes: &schemes,
                },
                security: &security,
            });
            let hash = hex_sha256(&json);
            v3.insert(gv.to_string(), V3Entry { json, hash });
        }
        let index: Map<String, Value> = v3
            .iter()
            .map(|(gv, e)| {
                let url = format!("/openapi/v3/{gv}?hash={}", e.hash);
                (gv.clone(), json!({"serverRelativeURL": url}))
            })
            .collect();
        let v3_index = to_bytes(&json!({"paths": index}));

        OpenApi {
            v2,
            v2_hash,
            v3_index,
            v3,
            fields: if v3_only {
                Default::default()
            } else {
                fields::index(&defs)
            },
        }
    }

    /// `/openapi/v2` as JSON.
    pub fn v2_json(&self) -> &[u8] {
        &self.v2
    }

    /// Content hash of the v2 document (hex), usable as its ETag.
    pub fn v2_hash(&self) -> &str {
        &self.v2_hash
    }

    /// `/openapi/v3`: `{"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=..."}, ...}}`.
    pub fn v3_index_json(&self) -> &[u8] {
        &self.v3_index
    }

    /// `/openapi/v3/<path>` for `path` like `api/v1` or `apis/apps/v1`.
    pub fn v3_group_version_json(&self, path: &str) -> Option<&[u8]> {
        self.v3.get(path).map(|e| e.json.as_slice())
    }

    /// The hash in the URL of `/openapi/v3/<path>`. A request that carries
    /// it may be answered with long-lived caching headers, since the
    /// document at that URL never changes.
    pub fn v3_hash(&self, path: &str) -> Option<&str> {
        self.v3.get(path).map(|e| e.hash.as_str())
    }

    /// The v3 document paths (`api/v1`, `apis/apps/v1`, ...).
    pub fn v3_paths(&self) -> impl Iterator<Item = &str> {
        self.v3.keys().map(String::as_str)
    }
}

fn collect_refs_map<'a>(paths: &'a Map<String, Value>, out: &mut Vec<&'a str>) {
    paths.values().for_each(|v| collect_refs(v, out));
}

impl PatchSchema for OpenApi {
    fn field(&self, type_name: &str, field: &str) -> Option<Cow<'_, FieldSchema>> {
        self.fields
            .field(type_name, field)
            .map(|f| Cow::Borrowed(&f.schema))
    }

    fn field_default(&self, type_name: &str, field: &str) -> Option<Value> {
        self.fields.field(type_name, field)?.default.clone()
    }

    fn atomic_type(&self, type_name: &str) -> bool {
        self.fields.is_atomic(type_name)
    }
}

impl fmt::Debug for OpenApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenApi")
            .field("v2_bytes", &self.v2.len())
            .field("v3", &self.v3.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests;
