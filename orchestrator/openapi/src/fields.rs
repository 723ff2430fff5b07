//! The field index behind [`tapestry_apimachinery::PatchSchema`], computed
//! once from the final definitions (so it sees exactly the extensions the
//! documents carry).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Map, Value};
use tapestry_apimachinery::{FieldKind, FieldSchema, ListType, PatchStrategy};

/// One indexed field.
#[derive(Debug)]
pub(crate) struct Field {
    pub schema: FieldSchema,
    /// The field's OpenAPI `default`.
    pub default: Option<Value>,
}

#[derive(Debug, Default)]
pub(crate) struct FieldIndex {
    /// type name -> field name -> field
    types: HashMap<String, HashMap<String, Field>>,
    /// Types marked `x-kubernetes-map-type: atomic`.
    atomic: HashSet<String>,
}

impl FieldIndex {
    pub(crate) fn field(&self, type_name: &str, field: &str) -> Option<&Field> {
        self.types.get(type_name)?.get(field)
    }

    /// The property names of a definition (or inline object type).
    pub(crate) fn properties(&self, type_name: &str) -> Option<Vec<String>> {
        Some(self.types.get(type_name)?.keys().cloned().collect())
    }

    pub(crate) fn is_atomic(&self, type_name: &str) -> bool {
        self.atomic.contains(type_name)
    }
}

fn map_type_atomic(schema: &Value) -> bool {
    schema.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic")
}

pub(crate) fn index(defs: &BTreeMap<String, Value>) -> FieldIndex {
    let mut out = FieldIndex::default();
    for (name, def) in defs {
        index_object(defs, name, def, &mut out);
    }
    out
}

fn index_object(defs: &BTreeMap<String, Value>, name: &str, def: &Value, out: &mut FieldIndex) {
    if map_type_atomic(def) {
        out.atomic.insert(name.to_string());
    }
    let Some(props) = def.get("properties").and_then(Value::as_object) else {
        return;
    };
    let mut fields = HashMap::with_capacity(props.len());
    for (field, schema) in props {
        // An object schema written inline (not a named definition) is indexed
        // under a derived name so it can still be merged field by field.
        let inline_name = format!("{name}.{field}");
        let indexed = Field {
            schema: field_schema(defs, schema, &inline_name, out),
            default: schema.get("default").cloned(),
        };
        fields.insert(field.clone(), indexed);
    }
    out.types.insert(name.to_string(), fields);
}

fn field_schema(
    defs: &BTreeMap<String, Value>,
    schema: &Value,
    inline_name: &str,
    out: &mut FieldIndex,
) -> FieldSchema {
    let obj = schema.as_object();
    let ext = |key: &str| obj.and_then(|o| o.get(key)).and_then(Value::as_str);
    let patch_strategies = ext("x-kubernetes-patch-strategy")
        .map(|s| {
            s.split(',')
                .filter_map(|s| match s.trim() {
                    "merge" => Some(PatchStrategy::Merge),
                    "replace" => Some(PatchStrategy::Replace),
                    "retainKeys" => Some(PatchStrategy::RetainKeys),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    FieldSchema {
        kind: kind_of(defs, schema, inline_name, out),
        patch_strategies,
        patch_merge_key: ext("x-kubernetes-patch-merge-key").map(str::to_string),
        // On the field itself, e.g. a map of labels that selects as a whole.
        atomic: map_type_atomic(schema),
    }
}

/// The definition a schema refers to (`$ref`, or `allOf` with one `$ref`).
pub(crate) fn ref_target(schema: &Map<String, Value>) -> Option<&str> {
    let r = match schema.get("$ref") {
        Some(r) => r,
        None => match schema
            .get("allOf")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            Some([one]) => one.get("$ref")?,
            _ => return None,
        },
    };
    let r = r.as_str()?;
    r.strip_prefix("#/definitions/")
        .or_else(|| r.strip_prefix("#/components/schemas/"))
}

fn kind_of(
    defs: &BTreeMap<String, Value>,
    schema: &Value,
    inline_name: &str,
    out: &mut FieldIndex,
) -> FieldKind {
    let Some(obj) = schema.as_object() else {
        return FieldKind::Scalar;
    };
    if let Some(target) = ref_target(obj) {
        return match defs.get(target) {
            // A named type is an object unless its schema is a scalar one
            // (Quantity, Time, IntOrString, ...).
            Some(def) if is_object(def) => FieldKind::Object {
                type_name: target.to_string(),
            },
            Some(def)
                if def
                    .get("additionalProperties")
                    .is_some_and(Value::is_object) =>
            {
                kind_of(defs, def, inline_name, out)
            }
            Some(_) => FieldKind::Scalar,
            // Unknown: let the patch code treat it as untyped.
            None => FieldKind::Object {
                type_name: target.to_string(),
            },
        };
    }
    match obj.get("type").and_then(Value::as_str) {
        Some("array") => {
            let item = match obj.get("items") {
                Some(items) => kind_of(defs, items, inline_name, out),
                None => FieldKind::Scalar,
            };
            let merge_key = obj
                .get("x-kubernetes-patch-merge-key")
                .and_then(Value::as_str);
            let merges = obj
                .get("x-kubernetes-patch-strategy")
                .and_then(Value::as_str)
                .is_some_and(|s| s.split(',').any(|s| s.trim() == "merge"));
            let list_type = match obj.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("set") => ListType::Set,
                Some("map") => {
                    let keys: Vec<String> = obj
                        .get("x-kubernetes-list-map-keys")
                        .and_then(Value::as_array)
                        .map(|k| {
                            k.iter()
                                .filter_map(|k| k.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    match (keys.is_empty(), merge_key) {
                        (true, Some(k)) => ListType::Map {
                            keys: vec![k.to_string()],
                        },
                        _ => ListType::Map { keys },
                    }
                }
                Some(_) => ListType::Atomic,
                // Unmarked lists follow the patch markers, as they did before
                // list types existed.
                None => match merge_key {
                    Some(k) => ListType::Map {
                        keys: vec![k.to_string()],
                    },
                    None if merges && item == FieldKind::Scalar => ListType::Set,
                    None => ListType::Atomic,
                },
            };
            FieldKind::List {
                item: Box::new(item),
                list_type,
            }
        }
        _ if obj.get("properties").is_some() => {
            index_object(defs, inline_name, schema, out);
            FieldKind::Object {
                type_name: inline_name.to_string(),
            }
        }
        Some("object") => match obj.get("additionalProperties") {
            Some(v @ Value::Object(_)) => FieldKind::Map {
                value: Box::new(kind_of(defs, v, inline_name, out)),
            },
            _ => FieldKind::Scalar,
        },
        _ => FieldKind::Scalar,
    }
}

fn is_object(def: &Value) -> bool {
    def.get("properties").is_some()
        || (def.get("type").and_then(Value::as_str) == Some("object")
            && !def
                .get("additionalProperties")
                .is_some_and(Value::is_object))
}
