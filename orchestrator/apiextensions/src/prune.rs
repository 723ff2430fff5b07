//! Pruning: what a custom object holds beyond its schema is dropped, as
//! kube-apiserver does when it decodes a custom object (every write, and
//! every read from storage).
//!
//! [`prune`] follows kube-apiserver's decoder, in its order:
//!
//! 1. Unknown fields go. `properties` name the fields of an object,
//!    `additionalProperties` the values of a map, `items` the items of a
//!    list; any other member of an object is dropped, and below a list
//!    without `items` objects keep nothing.
//!    `x-kubernetes-preserve-unknown-fields` keeps the unknown members of its
//!    node (and, as Kubernetes has it, of its list items), while members the
//!    schema does specify are still pruned by their own schemas below it.
//!    `x-kubernetes-embedded-resource` objects, and the root, keep
//!    `apiVersion`, `kind` and `metadata` whatever the schema says. Logical
//!    junctors (`allOf`, ...) add no fields.
//! 2. `null`s of fields that are neither nullable nor defaulted go
//!    ([`crate::default`] explains why they come before defaulting).
//! 3. The `metadata` of embedded resources is decoded as an ObjectMeta and
//!    written back, as Kubernetes' round trip through its Go type does: unknown
//!    fields (also in `ownerReferences` and `managedFields` items) go, so do
//!    `null`s and empty optional values (`creationTimestamp: null` of
//!    generated manifests, `labels: {}`, `name: ""`), timestamps are written
//!    in UTC to the second, and owner references get their required strings.
//!
//! The root's `apiVersion`, `kind` and `metadata` are left alone: the API
//! server decodes those itself.
//!
//! Values of the wrong type are never rejected here (validation reports
//! them); like kube-apiserver, an object where the schema expects a scalar
//! loses all its members, and wrongly typed ObjectMeta fields are kept.

use serde_json::{Map, Value};

use crate::schema::Schema;

/// The members every Kubernetes object may have whatever its schema says.
pub(crate) const TYPE_AND_OBJECT_META: [&str; 3] = ["apiVersion", "kind", "metadata"];

fn is_type_or_object_meta(key: &str) -> bool {
    TYPE_AND_OBJECT_META.contains(&key)
}

/// The schema of member `key` of an object of schema `s`: its property, or
/// else the map value schema.
pub(crate) fn member_schema<'s>(s: &'s Schema, key: &str) -> Option<&'s Schema> {
    s.properties.get(key).or(s.additional_properties.as_deref())
}

/// Drop fields the schema does not specify, as kube-apiserver prunes custom objects.
/// Returns the paths dropped, e.g. "spec.foo", "spec.items[1].bar" (for fieldValidation Warn/Strict:
/// the API server reports `unknown field "spec.foo"`).
///
/// The paths come as kube-apiserver lists them: those the schema prunes,
/// sorted, then those of embedded resources' `metadata`, sorted, which name
/// map values by key in brackets (`spec.templates[web].metadata.foo`).
pub fn prune(schema: &Schema, obj: &mut Value) -> Vec<String> {
    let mut unknown = Walk::default();
    unknown.prune(obj, Some(schema), true);
    crate::default::prune_nulls(schema, obj);
    let mut paths = unknown.dropped;
    paths.sort_unstable();
    if schema_has_embedded(schema) {
        let mut meta = Walk::default();
        meta.embedded_meta(obj, schema);
        meta.dropped.sort_unstable();
        paths.append(&mut meta.dropped);
    }
    paths
}

/// One step of a field path.
enum Step<'a> {
    /// A property, or a map key where Kubernetes writes those as fields.
    Field(&'a str),
    Index(usize),
    /// A map key in brackets.
    Key(&'a str),
}

/// A walk over an object: the path of the node it is at, and the paths of
/// what it dropped.
#[derive(Default)]
struct Walk {
    path: String,
    dropped: Vec<String>,
}

impl Walk {
    fn push(path: &mut String, step: Step<'_>) {
        use std::fmt::Write as _;
        let _ = match step {
            Step::Field(f) if path.is_empty() => write!(path, "{f}"),
            Step::Field(f) => write!(path, ".{f}"),
            Step::Index(i) => write!(path, "[{i}]"),
            Step::Key(k) => write!(path, "[{k}]"),
        };
    }

    /// Runs `f` with the walk one step further down.
    fn at(&mut self, step: Step<'_>, f: impl FnOnce(&mut Self)) {
        let len = self.path.len();
        Self::push(&mut self.path, step);
        f(self);
        self.path.truncate(len);
    }

    /// The path of field `name` of the current node.
    fn child(&self, name: &str) -> String {
        let mut path = self.path.clone();
        Self::push(&mut path, Step::Field(name));
        path
    }

    /// Prunes `v` by `s`; `None` means no schema applies, so objects keep
    /// nothing.
    fn prune(&mut self, v: &mut Value, s: Option<&Schema>, root: bool) {
        if let Some(s) = s.filter(|s| s.preserve_unknown_fields) {
            return self.keep_unknown(v, s, root);
        }
        match v {
            Value::Object(m) => {
                let Some(s) = s else {
                    for k in m.keys() {
                        self.dropped.push(self.child(k));
                    }
                    m.clear();
                    return;
                };
                let keeps_meta = root || s.embedded_resource;
                m.retain(|k, v| {
                    if keeps_meta && is_type_or_object_meta(k) {
                        return true;
                    }
                    match member_schema(s, k) {
                        Some(child) => {
                            self.at(Step::Field(k), |w| w.prune(v, Some(child), false));
                            true
                        }
                        None => {
                            self.dropped.push(self.child(k));
                            false
                        }
                    }
                });
            }
            Value::Array(items) => {
                let item = s.and_then(|s| s.items.as_deref());
                for (i, v) in items.iter_mut().enumerate() {
                    self.at(Step::Index(i), |w| w.prune(v, item, false));
                }
            }
            _ => {}
        }
    }

    /// A node with `x-kubernetes-preserve-unknown-fields`: unknown members
    /// stay, specified ones are pruned by their schemas.
    fn keep_unknown(&mut self, v: &mut Value, s: &Schema, root: bool) {
        match v {
            Value::Object(m) => {
                let keeps_meta = root || s.embedded_resource;
                for (k, v) in m.iter_mut() {
                    if keeps_meta && is_type_or_object_meta(k) {
                        continue;
                    }
                    if let Some(child) = member_schema(s, k) {
                        self.at(Step::Field(k), |w| w.prune(v, Some(child), false));
                    }
                }
            }
            // Items inherit the list's preservation (Kubernetes' rule), so
            // only what their schema specifies is pruned.
            Value::Array(items) => {
                if let Some(item) = s.items.as_deref() {
                    for (i, v) in items.iter_mut().enumerate() {
                        self.at(Step::Index(i), |w| w.keep_unknown(v, item, false));
                    }
                }
            }
            _ => {}
        }
    }

    /// Finds the `metadata` of embedded resources (not the root's) and
    /// gives it the ObjectMeta round trip.
    fn embedded_meta(&mut self, v: &mut Value, s: &Schema) {
        match v {
            Value::Object(m) => {
                if s.embedded_resource {
                    if let Some(meta) = m.get_mut("metadata") {
                        object_meta(meta, &self.child("metadata"), &mut self.dropped);
                    }
                }
                for (k, v) in m.iter_mut() {
                    if let Some(p) = s.properties.get(k) {
                        self.at(Step::Field(k), |w| w.embedded_meta(v, p));
                    } else if let Some(values) = s.additional_properties.as_deref() {
                        self.at(Step::Key(k), |w| w.embedded_meta(v, values));
                    }
                }
            }
            Value::Array(items) => {
                if let Some(item) = s.items.as_deref() {
                    for (i, v) in items.iter_mut().enumerate() {
                        self.at(Step::Index(i), |w| w.embedded_meta(v, item));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether any node below the root is an embedded resource (the root's own
/// metadata is the API server's).
fn schema_has_embedded(s: &Schema) -> bool {
    let below = |c: &Schema| c.embedded_resource || schema_has_embedded(c);
    s.properties.values().any(below)
        || s.additional_properties.as_deref().is_some_and(below)
        || s.items.as_deref().is_some_and(below)
}

/// How a field of ObjectMeta (or of the types it holds) decodes and
/// encodes in Kubernetes' Go types.
#[derive(Clone, Copy)]
enum Meta {
    /// A string; `omitempty` ones vanish when empty, the others are
    /// written even when absent.
    Str { omitempty: bool },
    /// `int64` with `omitempty` (gone when 0), or `*int64` (`omitempty`:
    /// false, kept when 0).
    Int { omitempty: bool },
    /// `*bool`.
    Bool,
    /// `metav1.Time`: RFC 3339, written in UTC to the second; empty is zero
    /// and gone.
    Time,
    /// `map[string]string`.
    StringMap,
    /// `[]string`.
    Strings,
    /// A list of structs with these fields.
    Structs(&'static [(&'static str, Meta)]),
    /// Kept as it is (`fieldsV1`).
    Raw,
}

const OPTIONAL: Meta = Meta::Str { omitempty: true };
const REQUIRED: Meta = Meta::Str { omitempty: false };

/// `k8s.io/apimachinery/pkg/apis/meta/v1.ObjectMeta`.
const OBJECT_META: &[(&str, Meta)] = &[
    ("name", OPTIONAL),
    ("generateName", OPTIONAL),
    ("namespace", OPTIONAL),
    ("selfLink", OPTIONAL),
    ("uid", OPTIONAL),
    ("resourceVersion", OPTIONAL),
    ("generation", Meta::Int { omitempty: true }),
    ("creationTimestamp", Meta::Time),
    ("deletionTimestamp", Meta::Time),
    ("deletionGracePeriodSeconds", Meta::Int { omitempty: false }),
    ("labels", Meta::StringMap),
    ("annotations", Meta::StringMap),
    ("ownerReferences", Meta::Structs(OWNER_REFERENCE)),
    ("finalizers", Meta::Strings),
    ("managedFields", Meta::Structs(MANAGED_FIELDS_ENTRY)),
];

const OWNER_REFERENCE: &[(&str, Meta)] = &[
    ("apiVersion", REQUIRED),
    ("kind", REQUIRED),
    ("name", REQUIRED),
    ("uid", REQUIRED),
    ("controller", Meta::Bool),
    ("blockOwnerDeletion", Meta::Bool),
];

const MANAGED_FIELDS_ENTRY: &[(&str, Meta)] = &[
    ("manager", OPTIONAL),
    ("operation", OPTIONAL),
    ("apiVersion", OPTIONAL),
    ("time", Meta::Time),
    ("fieldsType", OPTIONAL),
    ("fieldsV1", Meta::Raw),
    ("subresource", OPTIONAL),
];

/// An embedded resource's `metadata` after Kubernetes' ObjectMeta round
/// trip; unknown fields are recorded under `path`.
fn object_meta(meta: &mut Value, path: &str, dropped: &mut Vec<String>) {
    if meta.is_null() {
        *meta = Value::Object(Map::new());
    }
    if let Value::Object(m) = meta {
        meta_struct(m, OBJECT_META, path, dropped);
    }
}

fn meta_struct(
    m: &mut Map<String, Value>,
    fields: &[(&str, Meta)],
    path: &str,
    dropped: &mut Vec<String>,
) {
    m.retain(|k, v| match fields.iter().find(|(name, _)| name == k) {
        Some((_, kind)) => meta_value(v, *kind, path, k, dropped),
        None => {
            dropped.push(format!("{path}.{k}"));
            false
        }
    });
    for (name, kind) in fields {
        if matches!(kind, Meta::Str { omitempty: false }) && !m.contains_key(*name) {
            m.insert(name.to_string(), Value::String(String::new()));
        }
    }
}

/// Normalizes one ObjectMeta value, field `field` of the struct at `path`;
/// false when the round trip omits it. Values of the wrong type stay for
/// validation to report.
fn meta_value(
    v: &mut Value,
    kind: Meta,
    path: &str,
    field: &str,
    dropped: &mut Vec<String>,
) -> bool {
    match (kind, &mut *v) {
        // A required string decodes null as "" and writes it.
        (Meta::Str { omitempty: false }, Value::Null) => {
            *v = Value::String(String::new());
            true
        }
        (_, Value::Null) => false,
        (Meta::Str { omitempty }, Value::String(s)) => !(omitempty && s.is_empty()),
        (Meta::Int { omitempty: true }, Value::Number(n)) => n.as_i64() != Some(0),
        (Meta::Time, Value::String(s)) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => {
                *s = t
                    .with_timezone(&chrono::Utc)
                    .format("%Y-%m-%dT%H:%M:%SZ")
                    .to_string();
                true
            }
            Err(_) => !s.is_empty(),
        },
        (Meta::StringMap, Value::Object(m)) => {
            for v in m.values_mut().filter(|v| v.is_null()) {
                *v = Value::String(String::new());
            }
            !m.is_empty()
        }
        (Meta::Strings, Value::Array(items)) => {
            for v in items.iter_mut().filter(|v| v.is_null()) {
                *v = Value::String(String::new());
            }
            !items.is_empty()
        }
        (Meta::Structs(fields), Value::Array(items)) => {
            for (i, item) in items.iter_mut().enumerate() {
                if item.is_null() {
                    *item = Value::Object(Map::new());
                }
                if let Value::Object(m) = item {
                    meta_struct(m, fields, &format!("{path}.{field}[{i}]"), dropped);
                }
            }
            !items.is_empty()
        }
        _ => true,
    }
}

#[cfg(test)]
pub(crate) mod schemas {
    //! Schema nodes for tests, written as CRD authors write them.

    use serde_json::Value;

    use crate::schema::{ListType, MapType, Schema, SchemaType};

    fn typed(t: SchemaType) -> Schema {
        Schema {
            type_: Some(t),
            ..Default::default()
        }
    }

    pub fn string() -> Schema {
        typed(SchemaType::String)
    }

    pub fn integer() -> Schema {
        typed(SchemaType::Integer)
    }

    pub fn boolean() -> Schema {
        typed(SchemaType::Boolean)
    }

    pub fn object(props: Vec<(&str, Schema)>) -> Schema {
        Schema {
            type_: Some(SchemaType::Object),
            properties: props.into_iter().map(|(k, s)| (k.to_string(), s)).collect(),
            ..Default::default()
        }
    }

    /// An object with arbitrary keys whose values follow `values`.
    pub fn map(values: Schema) -> Schema {
        Schema {
            type_: Some(SchemaType::Object),
            additional_properties: Some(Box::new(values)),
            ..Default::default()
        }
    }

    pub fn array(items: Schema) -> Schema {
        Schema {
            type_: Some(SchemaType::Array),
            items: Some(Box::new(items)),
            ..Default::default()
        }
    }

    pub fn map_list(keys: &[&str], items: Schema) -> Schema {
        Schema {
            list_type: Some(ListType::Map {
                keys: keys.iter().map(|k| k.to_string()).collect(),
            }),
            ..array(items)
        }
    }

    pub fn set(items: Schema) -> Schema {
        Schema {
            list_type: Some(ListType::Set),
            ..array(items)
        }
    }

    pub fn int_or_string() -> Schema {
        Schema {
            int_or_string: true,
            ..Default::default()
        }
    }

    pub fn preserve(s: Schema) -> Schema {
        Schema {
            preserve_unknown_fields: true,
            ..s
        }
    }

    pub fn embedded(s: Schema) -> Schema {
        Schema {
            embedded_resource: true,
            ..s
        }
    }

    pub fn atomic(s: Schema) -> Schema {
        Schema {
            map_type: Some(MapType::Atomic),
            ..s
        }
    }

    pub fn defaulted(default: Value, s: Schema) -> Schema {
        Schema {
            default: Some(default),
            ..s
        }
    }

    pub fn nullable(s: Schema) -> Schema {
        Schema {
            nullable: true,
            ..s
        }
    }

    /// A CRD root: `spec` and `status` as given.
    pub fn root(spec: Schema, status: Schema) -> Schema {
        object(vec![("spec", spec), ("status", status)])
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::schemas::*;
    use super::*;

    /// A Widget: ports keyed by port, a selector map, a free-form `config`,
    /// a pod template (embedded resource) and a map of templates.
    fn widget() -> Schema {
        let port = object(vec![
            ("port", integer()),
            ("name", string()),
            ("protocol", string()),
        ]);
        let template = embedded(object(vec![(
            "spec",
            object(vec![("image", string()), ("args", array(string()))]),
        )]));
        root(
            object(vec![
                ("replicas", integer()),
                ("ports", map_list(&["port"], port)),
                ("selector", map(string())),
                (
                    "config",
                    preserve(object(vec![("level", object(vec![("value", integer())]))])),
                ),
                ("template", template.clone()),
                ("templates", map(template)),
                ("size", int_or_string()),
            ]),
            object(vec![("ready", boolean())]),
        )
    }

    fn pruned(schema: &Schema, mut obj: Value) -> (Value, Vec<String>) {
        let paths = prune(schema, &mut obj);
        (obj, paths)
    }

    #[test]
    fn root_type_and_object_meta_are_kept_unknown_top_level_fields_go() {
        let (obj, paths) = pruned(
            &widget(),
            json!({"apiVersion": "example.com/v1", "kind": "Widget",
                   "metadata": {"name": "w", "bogus": 1}, "extra": true, "spec": {}}),
        );
        assert_eq!(
            obj,
            json!({"apiVersion": "example.com/v1", "kind": "Widget",
                   "metadata": {"name": "w", "bogus": 1}, "spec": {}})
        );
        assert_eq!(paths, ["extra"]);
    }

    #[test]
    fn properties_prune_nested_unknown_fields() {
        let (obj, paths) = pruned(
            &widget(),
            json!({"spec": {"replicas": 2, "foo": 1, "template": {"spec": {"image": "x", "tty": true}}},
                   "status": {"ready": true, "phase": "Up"}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"replicas": 2, "template": {"spec": {"image": "x"}}},
                   "status": {"ready": true}})
        );
        assert_eq!(
            paths,
            ["spec.foo", "spec.template.spec.tty", "status.phase"]
        );
    }

    #[test]
    fn list_items_are_pruned_by_index() {
        let (obj, paths) = pruned(
            &widget(),
            json!({"spec": {"ports": [{"port": 80}, {"port": 443, "bar": 1, "baz": {}}]}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"ports": [{"port": 80}, {"port": 443}]}})
        );
        assert_eq!(paths, ["spec.ports[1].bar", "spec.ports[1].baz"]);
    }

    #[test]
    fn map_values_are_pruned_by_their_schema() {
        let schema = root(
            object(vec![("limits", map(object(vec![("max", integer())])))]),
            object(vec![]),
        );
        let (obj, paths) = pruned(
            &schema,
            json!({"spec": {"limits": {"cpu": {"max": 2, "min": 1}, "a.b": {"x": 1}}}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"limits": {"cpu": {"max": 2}, "a.b": {}}}})
        );
        assert_eq!(paths, ["spec.limits.a.b.x", "spec.limits.cpu.min"]);
    }

    #[test]
    fn preserve_unknown_fields_keeps_unknowns_but_prunes_specified_fields() {
        let (obj, paths) = pruned(
            &widget(),
            json!({"spec": {"config": {"anything": {"goes": [1]}, "level": {"value": 3, "unit": "x"}}}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"config": {"anything": {"goes": [1]}, "level": {"value": 3}}}})
        );
        assert_eq!(paths, ["spec.config.level.unit"]);
    }

    #[test]
    fn preserve_unknown_fields_at_the_root_keeps_everything_unspecified() {
        let schema = preserve(object(vec![("spec", object(vec![("a", integer())]))]));
        let (obj, paths) = pruned(&schema, json!({"other": 1, "spec": {"a": 1, "b": 2}}));
        assert_eq!(obj, json!({"other": 1, "spec": {"a": 1}}));
        assert_eq!(paths, ["spec.b"]);
    }

    #[test]
    fn preserved_list_items_keep_their_unknown_fields() {
        let schema = root(
            object(vec![(
                "steps",
                preserve(array(object(vec![(
                    "run",
                    object(vec![("cmd", string())]),
                )]))),
            )]),
            object(vec![]),
        );
        let (obj, paths) = pruned(
            &schema,
            json!({"spec": {"steps": [{"free": 1, "run": {"cmd": "x", "shell": "sh"}}]}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"steps": [{"free": 1, "run": {"cmd": "x"}}]}})
        );
        assert_eq!(paths, ["spec.steps[0].run.shell"]);
    }

    #[test]
    fn junctors_add_no_fields() {
        let mut spec = object(vec![("a", string())]);
        spec.any_of = vec![object(vec![("b", string())])];
        spec.all_of = vec![object(vec![("c", string())])];
        let (obj, paths) = pruned(
            &root(spec, object(vec![])),
            json!({"spec": {"a": "1", "b": "2", "c": "3"}}),
        );
        assert_eq!(obj, json!({"spec": {"a": "1"}}));
        assert_eq!(paths, ["spec.b", "spec.c"]);
    }

    #[test]
    fn objects_where_a_scalar_is_expected_lose_their_members() {
        // As in Kubernetes; validation then reports the type.
        let (obj, paths) = pruned(
            &widget(),
            json!({"spec": {"replicas": {"a": 1}, "size": {"b": 2}, "ports": "none"}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"replicas": {}, "size": {}, "ports": "none"}})
        );
        assert_eq!(paths, ["spec.replicas.a", "spec.size.b"]);
    }

    #[test]
    fn a_list_without_items_schema_keeps_no_object_members() {
        let list = Schema {
            type_: Some(crate::schema::SchemaType::Array),
            ..Default::default()
        };
        let (obj, paths) = pruned(
            &root(object(vec![("l", list)]), object(vec![])),
            json!({"spec": {"l": [1, {"a": [{"b": 1}]}]}}),
        );
        assert_eq!(obj, json!({"spec": {"l": [1, {}]}}));
        assert_eq!(paths, ["spec.l[1].a"]);
    }

    #[test]
    fn any_json_shape_is_handled() {
        let schema = widget();
        for v in [
            json!(null),
            json!(1),
            json!("x"),
            json!([{"spec": 1}]),
            json!({"spec": null}),
            json!({"spec": [1, 2]}),
            json!({"spec": {"ports": [null, 1, [2], {"port": {}}]}}),
            json!({"spec": {"template": {"metadata": 5}}}),
            json!({"spec": {"template": {"metadata": {"ownerReferences": [1, null, "x"]}}}}),
        ] {
            let mut obj = v.clone();
            prune(&schema, &mut obj);
        }
        let (obj, paths) = pruned(&schema, json!([{"spec": 1}]));
        assert_eq!(obj, json!([{}]));
        assert_eq!(paths, ["[0].spec"]);
    }

    #[test]
    fn embedded_resources_keep_type_meta_and_prune_metadata_to_object_meta() {
        let (obj, paths) = pruned(
            &widget(),
            json!({"spec": {"template": {
                "apiVersion": "v1", "kind": "Pod", "foo": 1,
                "metadata": {"name": "p", "labels": {"app": "web"}, "color": "red",
                             "creationTimestamp": null,
                             "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o",
                                                  "uid": "u", "extra": 1}]},
                "spec": {"image": "nginx"}}}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"template": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "labels": {"app": "web"},
                             "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o",
                                                  "uid": "u"}]},
                "spec": {"image": "nginx"}}}})
        );
        assert_eq!(
            paths,
            [
                "spec.template.foo",
                "spec.template.metadata.color",
                "spec.template.metadata.ownerReferences[0].extra",
            ]
        );
    }

    #[test]
    fn embedded_metadata_round_trips_like_object_meta() {
        let (obj, paths) = pruned(
            &widget(),
            json!({"spec": {"template": {"metadata": {
                "name": "", "namespace": "ns", "generation": 0, "deletionGracePeriodSeconds": 0,
                "annotations": {}, "labels": {"a": null}, "finalizers": [],
                "creationTimestamp": "2024-05-01T12:00:00.250+02:00",
                "deletionTimestamp": null,
                "ownerReferences": [{"uid": "u1", "controller": null}],
                "managedFields": [{"manager": "m", "operation": "", "fieldsV1": {"f:a": {}}}]}}}}),
        );
        assert_eq!(
            obj["spec"]["template"]["metadata"],
            json!({"namespace": "ns", "deletionGracePeriodSeconds": 0, "labels": {"a": ""},
                   "creationTimestamp": "2024-05-01T10:00:00Z",
                   "ownerReferences": [{"uid": "u1", "apiVersion": "", "kind": "", "name": ""}],
                   "managedFields": [{"manager": "m", "fieldsV1": {"f:a": {}}}]})
        );
        assert!(paths.is_empty(), "{paths:?}");
    }

    #[test]
    fn embedded_metadata_null_becomes_empty_and_wrong_types_stay() {
        let (obj, _) = pruned(&widget(), json!({"spec": {"template": {"metadata": null}}}));
        assert_eq!(obj, json!({"spec": {"template": {"metadata": {}}}}));
        let (obj, paths) = pruned(
            &widget(),
            json!({"spec": {"template": {"metadata": {"name": 5, "labels": [], "x": 1}}}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"template": {"metadata": {"name": 5, "labels": []}}}})
        );
        assert_eq!(paths, ["spec.template.metadata.x"]);
    }

    #[test]
    fn embedded_metadata_paths_name_map_values_by_key_and_come_last() {
        let (_, paths) = pruned(
            &widget(),
            json!({"spec": {"zzz": 1, "templates": {
                "web": {"metadata": {"b": 1, "a": 2}, "q": 1}}}}),
        );
        assert_eq!(
            paths,
            [
                "spec.templates.web.q",
                "spec.zzz",
                "spec.templates[web].metadata.a",
                "spec.templates[web].metadata.b",
            ]
        );
    }

    #[test]
    fn embedded_resources_in_list_items_and_preserved_embedded_nodes() {
        let raw = embedded(preserve(object(vec![])));
        let schema = root(
            object(vec![("resources", array(raw.clone())), ("one", raw)]),
            object(vec![]),
        );
        let (obj, paths) = pruned(
            &schema,
            json!({"spec": {"one": {"kind": "A", "data": {"x": 1}, "metadata": {"name": "a", "z": 0}},
                            "resources": [{"kind": "B", "metadata": {"name": "b", "y": 1}}]}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"one": {"kind": "A", "data": {"x": 1}, "metadata": {"name": "a"}},
                            "resources": [{"kind": "B", "metadata": {"name": "b"}}]}})
        );
        assert_eq!(
            paths,
            ["spec.one.metadata.z", "spec.resources[0].metadata.y"]
        );
    }

    #[test]
    fn non_nullable_nulls_without_default_go_after_pruning() {
        let schema = root(
            object(vec![
                ("a", string()),
                ("b", nullable(string())),
                ("c", defaulted(json!("d"), string())),
                ("m", map(string())),
            ]),
            object(vec![]),
        );
        let (obj, paths) = pruned(
            &schema,
            json!({"apiVersion": null, "spec": {"a": null, "b": null, "c": null, "m": {"k": null},
                                                "u": null}}),
        );
        assert_eq!(
            obj,
            json!({"apiVersion": null, "spec": {"b": null, "c": null, "m": {}}})
        );
        assert_eq!(paths, ["spec.u"]);
    }
}
