//! Field types of one custom resource version for server-side apply and
//! managed fields ([`tapestry_apimachinery::PatchSchema`]), derived from its
//! structural schema as Kubernetes derives its structured-merge-diff types:
//!
//! * lists are atomic unless `x-kubernetes-list-type` is `set` (merged by
//!   value) or `map` (merged by `x-kubernetes-list-map-keys`);
//! * objects with `properties` are owned field by field, and maps
//!   (`additionalProperties`) key by key, unless `x-kubernetes-map-type:
//!   atomic`;
//! * nodes that say nothing of their members (`x-kubernetes-preserve-unknown-fields`
//!   without properties, an object with neither properties nor
//!   `additionalProperties`), and members an object does not specify, are
//!   deduced from the value: objects merge member by member, lists are atomic;
//! * scalars, `x-kubernetes-int-or-string` included, are owned whole;
//! * `metadata` of the root and of every `x-kubernetes-embedded-resource` is
//!   the built-in ObjectMeta ([`OBJECT_META`]), whatever the schema says of it,
//!   with `apiVersion` and `kind` scalars;
//! * [`PatchSchema::field_default`] answers the `default` of a property, so
//!   a map-list item that omits a defaulted key field is keyed as the
//!   defaulted live item is.
//!
//! The root object type is named by the caller (e.g.
//! `com.example.v1.Widget`); nested objects are named after their path from
//! it: `.field` for a property, `[]` for list items and `{}` for map values,
//! with `.`, `[`, `{` and `\` in property names escaped by `\`
//! (`com.example.v1.Widget.spec.ports[]`). Names this schema does not know —
//! ObjectMeta and what it holds — are answered by a fallback schema, the
//! API server's built-in one, so a single [`PatchSchema`] serves the whole
//! object.
//!
//! All answers are computed when the schema is built: a lookup is two hash
//! map probes and lends what it finds.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use tapestry_apimachinery::{FieldKind, FieldSchema, ListType, PatchSchema};

use crate::prune::TYPE_AND_OBJECT_META;
use crate::schema::{self, MapType, Schema, SchemaType};

/// The built-in type of every `metadata` of a Kubernetes object.
pub const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// Field types of one custom resource for server-side apply: `root` is the type name used for the
/// whole object (e.g. "com.example.v1.Widget"); nested object nodes get derived names.
///
/// Type names it does not derive itself go to the fallback, which must know
/// [`OBJECT_META`]; it answers for `metadata` and everything in it.
pub struct CustomPatchSchema {
    types: HashMap<String, ObjectType>,
    fallback: Arc<dyn PatchSchema>,
}

/// One object node of the schema.
#[derive(Debug, Default)]
struct ObjectType {
    fields: HashMap<String, Field>,
    /// Members that are not properties, when `additionalProperties` gives
    /// them a schema; otherwise they are deduced from their values.
    others: Option<FieldSchema>,
    /// `x-kubernetes-map-type: atomic`.
    atomic: bool,
}

#[derive(Debug)]
struct Field {
    schema: FieldSchema,
    default: Option<Value>,
}

impl CustomPatchSchema {
    /// Derives the field types of the custom resource whose (whole-object)
    /// schema is `schema` and whose type is named `root`; `fallback` is the
    /// API server's built-in schema, consulted for ObjectMeta and for any
    /// type name not derived here.
    pub fn new(root: &str, schema: &Schema, fallback: Arc<dyn PatchSchema>) -> Self {
        let mut deriver = Deriver::default();
        deriver.object(schema, root.to_string(), true);
        CustomPatchSchema {
            types: deriver.types,
            fallback,
        }
    }
}

impl fmt::Debug for CustomPatchSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.types.keys().collect();
        names.sort();
        f.debug_struct("CustomPatchSchema")
            .field("types", &names)
            .finish_non_exhaustive()
    }
}

impl PatchSchema for CustomPatchSchema {
    fn field(&self, type_name: &str, field: &str) -> Option<Cow<'_, FieldSchema>> {
        match self.types.get(type_name) {
            Some(t) => t
                .fields
                .get(field)
                .map(|f| &f.schema)
                .or(t.others.as_ref())
                .map(Cow::Borrowed),
            None => self.fallback.field(type_name, field),
        }
    }

    fn field_default(&self, type_name: &str, field: &str) -> Option<Value> {
        match self.types.get(type_name) {
            Some(t) => t.fields.get(field)?.default.clone(),
            None => self.fallback.field_default(type_name, field),
        }
    }

    fn atomic_type(&self, type_name: &str) -> bool {
        match self.types.get(type_name) {
            Some(t) => t.atomic,
            None => self.fallback.atomic_type(type_name),
        }
    }
}

/// The walk over the schema that registers object types.
#[derive(Default)]
struct Deriver {
    types: HashMap<String, ObjectType>,
}

impl Deriver {
    /// A field (property or `additionalProperties`) of schema `s`.
    fn field(&mut self, s: &Schema, name: String) -> FieldSchema {
        let kind = self.kind(s, name);
        FieldSchema {
            atomic: atomic_map(s, &kind),
            ..plain(kind)
        }
    }

    /// A list item or map value of schema `s`. An atomic map has no type
    /// name to be atomic by, and a scalar is owned and replaced whole
    /// exactly as an atomic map is.
    fn element(&mut self, s: &Schema, name: String) -> FieldKind {
        match self.kind(s, name) {
            kind @ FieldKind::Map { .. } if atomic_map(s, &kind) => FieldKind::Scalar,
            kind => kind,
        }
    }

    fn kind(&mut self, s: &Schema, name: String) -> FieldKind {
        if s.int_or_string {
            return FieldKind::Scalar;
        }
        match s.type_ {
            Some(SchemaType::Object) => self.object(s, name, false),
            Some(SchemaType::Array) => self.list(s, name),
            Some(_) => FieldKind::Scalar,
            // Untyped (preserve-unknown-fields): shaped by what it specifies.
            None if s.properties.is_empty()
                && s.additional_properties.is_none()
                && (s.items.is_some() || s.list_type.is_some()) =>
            {
                self.list(s, name)
            }
            None => self.object(s, name, false),
        }
    }

    fn list(&mut self, s: &Schema, name: String) -> FieldKind {
        let item = match s.items.as_deref() {
            Some(items) => self.element(items, name + "[]"),
            None => FieldKind::Scalar,
        };
        let list_type = match &s.list_type {
            None | Some(schema::ListType::Atomic) => ListType::Atomic,
            Some(schema::ListType::Set) => ListType::Set,
            Some(schema::ListType::Map { keys }) => ListType::Map { keys: keys.clone() },
        };
        FieldKind::List {
            item: Box::new(item),
            list_type,
        }
    }

    /// An object node: a map when only `additionalProperties` describe it,
    /// otherwise an object type registered under `name`.
    fn object(&mut self, s: &Schema, name: String, root: bool) -> FieldKind {
        let has_meta = root || s.embedded_resource;
        if s.properties.is_empty() && !has_meta {
            if let Some(values) = s.additional_properties.as_deref() {
                let value = self.element(values, name + "{}");
                return FieldKind::Map {
                    value: Box::new(value),
                };
            }
        }
        let mut fields: HashMap<String, Field> = s
            .properties
            .iter()
            .filter(|(k, _)| !(has_meta && TYPE_AND_OBJECT_META.contains(&k.as_str())))
            .map(|(k, p)| {
                let field = Field {
                    schema: self.field(p, child_name(&name, k)),
                    default: p.default.clone(),
                };
                (k.clone(), field)
            })
            .collect();
        if has_meta {
            // Kubernetes replaces whatever the schema says of these.
            for (k, kind) in [
                ("apiVersion", FieldKind::Scalar),
                ("kind", FieldKind::Scalar),
                (
                    "metadata",
                    FieldKind::Object {
                        type_name: OBJECT_META.to_string(),
                    },
                ),
            ] {
                let field = Field {
                    schema: plain(kind),
                    default: None,
                };
                fields.insert(k.to_string(), field);
            }
        }
        let others = s
            .additional_properties
            .as_deref()
            .map(|values| self.field(values, format!("{name}{{}}")));
        let atomic = s.map_type == Some(MapType::Atomic);
        self.types.insert(
            name.clone(),
            ObjectType {
                fields,
                others,
                atomic,
            },
        );
        FieldKind::Object { type_name: name }
    }
}

/// A field of `kind` with no patch markers (CRD schemas have none).
fn plain(kind: FieldKind) -> FieldSchema {
    FieldSchema {
        kind,
        patch_strategies: Vec::new(),
        patch_merge_key: None,
        atomic: false,
    }
}

/// `x-kubernetes-map-type: atomic` on a node that holds members (it means
/// nothing on lists and scalars).
fn atomic_map(s: &Schema, kind: &FieldKind) -> bool {
    s.map_type == Some(MapType::Atomic)
        && matches!(kind, FieldKind::Object { .. } | FieldKind::Map { .. })
}

/// The name of the type of property `field` of type `parent`.
fn child_name(parent: &str, field: &str) -> String {
    let mut name = String::with_capacity(parent.len() + field.len() + 1);
    name.push_str(parent);
    name.push('.');
    for c in field.chars() {
        if matches!(c, '.' | '[' | '{' | '\\') {
            name.push('\\');
        }
        name.push(c);
    }
    name
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tapestry_apimachinery::{apply, ApplyError};

    use super::*;
    use crate::prune::schemas::*;

    const WIDGET: &str = "com.example.v1.Widget";

    /// The built-in part: ObjectMeta with labels (a granular map) and
    /// finalizers (a set), as the API server's OpenAPI schema has them.
    struct BuiltIn;

    impl PatchSchema for BuiltIn {
        fn field(&self, type_name: &str, field: &str) -> Option<Cow<'_, FieldSchema>> {
            let kind = match (type_name, field) {
                (OBJECT_META, "labels" | "annotations") => FieldKind::Map {
                    value: Box::new(FieldKind::Scalar),
                },
                (OBJECT_META, "finalizers") => FieldKind::List {
                    item: Box::new(FieldKind::Scalar),
                    list_type: ListType::Set,
                },
                (OBJECT_META, "name" | "namespace") => FieldKind::Scalar,
                _ => return None,
            };
            Some(Cow::Owned(plain(kind)))
        }

        fn atomic_type(&self, type_name: &str) -> bool {
            type_name == "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
        }
    }

    /// A Widget CRD schema exercising every kind of node.
    fn widget_schema() -> Schema {
        let port = object(vec![
            ("port", integer()),
            ("protocol", defaulted(json!("TCP"), string())),
            ("name", string()),
        ]);
        let endpoint = atomic(object(vec![("host", string()), ("port", integer())]));
        let template = embedded(object(vec![("spec", object(vec![("image", string())]))]));
        let mut metadata = object(vec![("name", string())]);
        metadata.max_properties = Some(3);
        let spec = object(vec![
            ("replicas", integer()),
            ("ports", map_list(&["port", "protocol"], port)),
            ("args", array(string())),
            ("zones", set(string())),
            ("selector", atomic(map(string()))),
            ("labels", map(string())),
            ("endpoint", endpoint.clone()),
            ("backups", array(endpoint)),
            ("groups", map(atomic(map(string())))),
            ("config", preserve(object(vec![("level", integer())]))),
            ("raw", preserve(Schema::default())),
            ("empty", object(vec![])),
            ("size", int_or_string()),
            ("template", template),
            ("matrix", array(array(object(vec![("v", integer())])))),
            ("a.b", object(vec![("c", string())])),
        ]);
        object(vec![
            ("metadata", metadata),
            ("spec", spec),
            ("status", object(vec![("ready", boolean())])),
        ])
    }

    fn widget() -> CustomPatchSchema {
        CustomPatchSchema::new(WIDGET, &widget_schema(), Arc::new(BuiltIn))
    }

    fn spec_type() -> String {
        format!("{WIDGET}.spec")
    }

    fn kind(s: &CustomPatchSchema, type_name: &str, field: &str) -> Option<FieldKind> {
        s.field(type_name, field).map(|f| f.into_owned().kind)
    }

    fn obj(t: &str) -> FieldKind {
        FieldKind::Object {
            type_name: t.to_string(),
        }
    }

    fn list(item: FieldKind, list_type: ListType) -> FieldKind {
        FieldKind::List {
            item: Box::new(item),
            list_type,
        }
    }

    #[test]
    fn root_has_type_meta_and_object_meta_from_the_built_in_schema() {
        let s = widget();
        assert_eq!(kind(&s, WIDGET, "apiVersion"), Some(FieldKind::Scalar));
        assert_eq!(kind(&s, WIDGET, "kind"), Some(FieldKind::Scalar));
        // The schema's own `metadata` (name, maxProperties) gives way.
        assert_eq!(kind(&s, WIDGET, "metadata"), Some(obj(OBJECT_META)));
        assert_eq!(kind(&s, &format!("{WIDGET}.metadata"), "name"), None);
        assert_eq!(kind(&s, WIDGET, "spec"), Some(obj(&spec_type())));
        assert_eq!(
            kind(&s, WIDGET, "status"),
            Some(obj(&format!("{WIDGET}.status")))
        );
        // ObjectMeta's fields come from the fallback.
        assert_eq!(
            kind(&s, OBJECT_META, "labels"),
            Some(FieldKind::Map {
                value: Box::new(FieldKind::Scalar)
            })
        );
        assert!(s.atomic_type("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"));
        assert_eq!(kind(&s, "io.k8s.api.core.v1.Pod", "spec"), None);
    }

    #[test]
    fn lists_are_atomic_unless_set_or_map() {
        let s = widget();
        let spec = spec_type();
        assert_eq!(
            kind(&s, &spec, "ports"),
            Some(list(
                obj(&format!("{spec}.ports[]")),
                ListType::Map {
                    keys: vec!["port".into(), "protocol".into()]
                }
            ))
        );
        assert_eq!(
            kind(&s, &spec, "args"),
            Some(list(FieldKind::Scalar, ListType::Atomic))
        );
        assert_eq!(
            kind(&s, &spec, "zones"),
            Some(list(FieldKind::Scalar, ListType::Set))
        );
        assert_eq!(
            kind(&s, &spec, "matrix"),
            Some(list(
                list(obj(&format!("{spec}.matrix[][]")), ListType::Atomic),
                ListType::Atomic
            ))
        );
        assert_eq!(
            kind(&s, &format!("{spec}.matrix[][]"), "v"),
            Some(FieldKind::Scalar)
        );
    }

    #[test]
    fn list_map_key_defaults_are_answered() {
        let s = widget();
        let port = format!("{}.ports[]", spec_type());
        assert_eq!(s.field_default(&port, "protocol"), Some(json!("TCP")));
        assert_eq!(s.field_default(&port, "port"), None);
        assert_eq!(s.field_default(&port, "nope"), None);
        assert_eq!(s.field_default(WIDGET, "apiVersion"), None);
    }

    #[test]
    fn atomic_maps_and_objects() {
        let s = widget();
        let spec = spec_type();
        let selector = s.field(&spec, "selector").unwrap();
        assert!(selector.atomic);
        assert_eq!(
            selector.kind,
            FieldKind::Map {
                value: Box::new(FieldKind::Scalar)
            }
        );
        assert!(!s.field(&spec, "labels").unwrap().atomic);
        let endpoint = s.field(&spec, "endpoint").unwrap();
        assert!(endpoint.atomic);
        assert!(s.atomic_type(&format!("{spec}.endpoint")));
        // Items: atomic by their type.
        assert_eq!(
            kind(&s, &spec, "backups"),
            Some(list(obj(&format!("{spec}.backups[]")), ListType::Atomic))
        );
        assert!(s.atomic_type(&format!("{spec}.backups[]")));
        // Map values that are atomic maps are owned whole.
        assert_eq!(
            kind(&s, &spec, "groups"),
            Some(FieldKind::Map {
                value: Box::new(FieldKind::Scalar)
            })
        );
        assert!(!s.atomic_type(&spec));
    }

    #[test]
    fn preserved_empty_and_int_or_string_nodes() {
        let s = widget();
        let spec = spec_type();
        let config = format!("{spec}.config");
        assert_eq!(kind(&s, &spec, "config"), Some(obj(&config)));
        assert_eq!(kind(&s, &config, "level"), Some(FieldKind::Scalar));
        // Unspecified members are deduced: unknown to the schema.
        assert_eq!(kind(&s, &config, "anything"), None);
        assert_eq!(kind(&s, &spec, "raw"), Some(obj(&format!("{spec}.raw"))));
        assert_eq!(kind(&s, &format!("{spec}.raw"), "x"), None);
        assert_eq!(
            kind(&s, &spec, "empty"),
            Some(obj(&format!("{spec}.empty")))
        );
        assert_eq!(kind(&s, &spec, "size"), Some(FieldKind::Scalar));
        assert_eq!(kind(&s, &spec, "nope"), None);
    }

    #[test]
    fn embedded_resources_have_object_meta() {
        let s = widget();
        let template = format!("{}.template", spec_type());
        assert_eq!(kind(&s, &template, "metadata"), Some(obj(OBJECT_META)));
        assert_eq!(kind(&s, &template, "kind"), Some(FieldKind::Scalar));
        assert_eq!(
            kind(&s, &template, "spec"),
            Some(obj(&format!("{template}.spec")))
        );
    }

    #[test]
    fn derived_names_escape_property_names() {
        let s = widget();
        let spec = spec_type();
        assert_eq!(kind(&s, &spec, "a.b"), Some(obj(&format!("{spec}.a\\.b"))));
        assert_eq!(
            kind(&s, &format!("{spec}.a\\.b"), "c"),
            Some(FieldKind::Scalar)
        );
        assert_eq!(child_name("R", "x[{\\"), "R.x\\[\\{\\\\");
    }

    #[test]
    fn objects_with_properties_and_additional_properties() {
        let mut spec = object(vec![("fixed", integer())]);
        spec.additional_properties = Some(Box::new(object(vec![("v", string())])));
        let s = CustomPatchSchema::new(WIDGET, &object(vec![("spec", spec)]), Arc::new(BuiltIn));
        let spec = spec_type();
        assert_eq!(kind(&s, &spec, "fixed"), Some(FieldKind::Scalar));
        assert_eq!(kind(&s, &spec, "other"), Some(obj(&format!("{spec}{{}}"))));
        assert_eq!(
            kind(&s, &format!("{spec}{{}}"), "v"),
            Some(FieldKind::Scalar)
        );
    }

    // Server-side apply end to end.

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:01:00Z";

    fn config(spec: Value, labels: Value) -> Value {
        json!({"apiVersion": "example.com/v1", "kind": "Widget",
               "metadata": {"name": "w", "labels": labels}, "spec": spec})
    }

    #[test]
    fn apply_merges_map_list_items_by_key_and_reports_conflicts() {
        let s = widget();
        let a = config(
            json!({"ports": [{"port": 80, "name": "http"}], "selector": {"app": "w"}}),
            json!({"team": "a"}),
        );
        let obj = apply(None, &a, "alice", false, &s, WIDGET, T0).unwrap();
        let b = config(
            json!({"ports": [{"port": 443, "name": "https"},
                             {"port": 53, "protocol": "UDP", "name": "dns"}]}),
            json!({"tier": "b"}),
        );
        let obj = apply(Some(&obj), &b, "bob", false, &s, WIDGET, T0).unwrap();
        // Items merged by key, labels key by key through ObjectMeta.
        assert_eq!(
            obj["spec"]["ports"],
            json!([{"port": 80, "name": "http"}, {"port": 443, "name": "https"},
                   {"port": 53, "protocol": "UDP", "name": "dns"}])
        );
        assert_eq!(obj["metadata"]["labels"], json!({"team": "a", "tier": "b"}));
        assert_eq!(
            tapestry_apimachinery::owned_paths(&obj, "bob"),
            [
                ".metadata.labels.tier",
                ".spec.ports[port=443,protocol=\"TCP\"]",
                ".spec.ports[port=443,protocol=\"TCP\"].name",
                ".spec.ports[port=443,protocol=\"TCP\"].port",
                ".spec.ports[port=53,protocol=\"UDP\"]",
                ".spec.ports[port=53,protocol=\"UDP\"].name",
                ".spec.ports[port=53,protocol=\"UDP\"].port",
                ".spec.ports[port=53,protocol=\"UDP\"].protocol",
            ]
        );

        // Bob renames alice's port (its key defaults protocol to TCP) and
        // changes one key of her atomic selector: two conflicts.
        let b2 = config(
            json!({"ports": [{"port": 80, "protocol": "TCP", "name": "web"}],
                   "selector": {"app": "w", "extra": "x"}}),
            json!({"tier": "b"}),
        );
        let err = apply(Some(&obj), &b2, "bob", false, &s, WIDGET, T1).unwrap_err();
        let ApplyError::Conflicts(conflicts) = &err else {
            panic!("{err}")
        };
        let paths: Vec<(&str, &str)> = conflicts
            .iter()
            .map(|c| (c.manager.as_str(), c.path.as_str()))
            .collect();
        assert_eq!(
            paths,
            [
                ("alice", ".spec.ports[port=80,protocol=\"TCP\"].name"),
                ("alice", ".spec.selector"),
            ]
        );

        // Forced: bob takes the fields; his own earlier items go, since he
        // no longer applies them.
        let obj = apply(Some(&obj), &b2, "bob", true, &s, WIDGET, T1).unwrap();
        assert_eq!(
            obj["spec"]["ports"],
            json!([{"port": 80, "name": "web", "protocol": "TCP"}])
        );
        assert_eq!(obj["spec"]["selector"], json!({"app": "w", "extra": "x"}));
        assert!(!tapestry_apimachinery::owned_paths(&obj, "alice")
            .iter()
            .any(|p| p.ends_with(".name") || p == ".spec.selector"));
    }

    #[test]
    fn apply_merges_deduced_nodes_and_replaces_atomic_lists() {
        let s = widget();
        let a = config(
            json!({"config": {"x": {"y": 1}, "list": [1]}, "args": ["a"]}),
            json!({}),
        );
        let obj = apply(None, &a, "alice", false, &s, WIDGET, T0).unwrap();
        let b = config(json!({"config": {"x": {"z": 2}}}), json!({}));
        let obj = apply(Some(&obj), &b, "bob", false, &s, WIDGET, T0).unwrap();
        assert_eq!(
            obj["spec"]["config"],
            json!({"x": {"y": 1, "z": 2}, "list": [1]})
        );
        let c = config(json!({"config": {"list": [2]}, "args": ["b"]}), json!({}));
        let err = apply(Some(&obj), &c, "carol", false, &s, WIDGET, T1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 2 conflicts: conflicts with \"alice\":\n- .spec.args\n- .spec.config.list"
        );
    }
}
