//! Schema `default`s, as kube-apiserver applies them to custom objects:
//! after decoding, on every write and on every read from storage (so a
//! default added to a CRD shows in objects stored before it).
//!
//! Kubernetes' rules:
//!
//! * a property with a `default` that an existing object lacks gets a deep
//!   copy of it; no object is created to hold a default (a default of
//!   `spec.a.b` does nothing while `spec.a` is absent, unless `spec.a` has a
//!   default of its own);
//! * defaulting goes on into properties, map values and list items,
//!   including values just defaulted, so defaults nest;
//! * a `null` where the schema is not `nullable` takes the schema's default,
//!   for a property, a map value or a list item alike;
//! * a `null` member where the schema is neither nullable nor defaulted is
//!   dropped (list items stay, for validation to report). Kubernetes does
//!   this while decoding, after pruning and before defaulting, and only for
//!   schemas that prune; so [`crate::prune::prune`] does it, at that point,
//!   and [`default`] assumes it done.
//!
//! Defaults live only in properties, `additionalProperties` and `items`
//! (structural schemas allow none under logical junctors).

use serde_json::Value;

use crate::prune::{member_schema, TYPE_AND_OBJECT_META};
use crate::schema::Schema;

/// Apply schema `default`s, as kube-apiserver does on read and on write.
pub fn default(schema: &Schema, obj: &mut Value) {
    match obj {
        Value::Object(m) => {
            for (k, prop) in &schema.properties {
                let Some(d) = &prop.default else { continue };
                match m.get_mut(k) {
                    None => {
                        m.insert(k.clone(), d.clone());
                    }
                    Some(v) => null_to_default(v, prop),
                }
            }
            for (k, v) in m.iter_mut() {
                if let Some(prop) = schema.properties.get(k) {
                    default(prop, v);
                } else if let Some(values) = schema.additional_properties.as_deref() {
                    null_to_default(v, values);
                    default(values, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.items.as_deref() {
                for v in items {
                    null_to_default(v, item);
                    default(item, v);
                }
            }
        }
        _ => {}
    }
}

/// A `null` where `s` is not nullable takes `s`'s default, if it has one.
fn null_to_default(v: &mut Value, s: &Schema) {
    if v.is_null() && !s.nullable {
        if let Some(d) = &s.default {
            *v = d.clone();
        }
    }
}

/// Drops `null` members whose schema is neither nullable nor defaulted
/// (Kubernetes' `PruneNonNullableNullsWithoutDefaults`). The root's
/// `apiVersion`, `kind` and `metadata` are the API server's to decode.
pub(crate) fn prune_nulls(schema: &Schema, obj: &mut Value) {
    if let Value::Object(m) = obj {
        m.retain(|k, v| TYPE_AND_OBJECT_META.contains(&k.as_str()) || keep_member(schema, k, v));
    } else {
        prune_nulls_below(Some(schema), obj);
    }
}

/// Whether member `k` (value `v`) of an object of schema `s` stays, after
/// pruning the nulls below it.
fn keep_member(s: &Schema, k: &str, v: &mut Value) -> bool {
    let member = member_schema(s, k);
    if v.is_null() && member.is_some_and(|m| !m.nullable && m.default.is_none()) {
        return false;
    }
    prune_nulls_below(member, v);
    true
}

fn prune_nulls_below(s: Option<&Schema>, v: &mut Value) {
    let Some(s) = s else { return };
    match v {
        Value::Object(m) => m.retain(|k, v| keep_member(s, k, v)),
        Value::Array(items) => {
            for v in items {
                prune_nulls_below(s.items.as_deref(), v);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::prune::schemas::*;

    fn defaulted_obj(schema: &Schema, mut obj: Value) -> Value {
        default(schema, &mut obj);
        obj
    }

    /// A Widget with defaults at several depths.
    fn widget() -> Schema {
        let port = object(vec![
            ("port", integer()),
            ("protocol", defaulted(json!("TCP"), string())),
        ]);
        let strategy = defaulted(
            json!({}),
            object(vec![
                ("type", defaulted(json!("RollingUpdate"), string())),
                (
                    "rolling",
                    object(vec![("maxSurge", defaulted(json!(1), int_or_string()))]),
                ),
            ]),
        );
        root(
            object(vec![
                ("replicas", defaulted(json!(1), integer())),
                ("paused", boolean()),
                ("ports", map_list(&["port"], port)),
                ("strategy", strategy),
                (
                    "env",
                    map(defaulted(
                        json!({"value": ""}),
                        object(vec![
                            ("value", string()),
                            ("secret", defaulted(json!(false), boolean())),
                        ]),
                    )),
                ),
                ("tags", array(defaulted(json!("none"), string()))),
                ("note", nullable(defaulted(json!("n"), string()))),
            ]),
            object(vec![("phase", defaulted(json!("Pending"), string()))]),
        )
    }

    #[test]
    fn absent_properties_of_existing_objects_are_defaulted() {
        assert_eq!(
            defaulted_obj(&widget(), json!({"spec": {"paused": true}})),
            json!({"spec": {"paused": true, "replicas": 1, "note": "n",
                            "strategy": {"type": "RollingUpdate"}}})
        );
    }

    #[test]
    fn objects_are_not_created_to_hold_defaults() {
        // Neither `status` nor `spec.strategy.rolling` exist, and they have
        // no defaults of their own.
        assert_eq!(
            defaulted_obj(&widget(), json!({"metadata": {"name": "w"}})),
            json!({"metadata": {"name": "w"}})
        );
        let obj = defaulted_obj(
            &widget(),
            json!({"spec": {"strategy": {"type": "Recreate"}}}),
        );
        assert_eq!(obj["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn defaults_nest_into_defaulted_values_and_existing_objects() {
        let obj = defaulted_obj(
            &widget(),
            json!({"spec": {"strategy": {"rolling": {}}}, "status": {}}),
        );
        assert_eq!(
            obj["spec"]["strategy"],
            json!({"rolling": {"maxSurge": 1}, "type": "RollingUpdate"})
        );
        assert_eq!(obj["status"], json!({"phase": "Pending"}));
    }

    #[test]
    fn list_items_and_map_values_are_defaulted() {
        let obj = defaulted_obj(
            &widget(),
            json!({"spec": {"ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}],
                            "env": {"A": {"value": "1"}, "B": null},
                            "tags": ["x", null]}}),
        );
        assert_eq!(
            obj["spec"]["ports"],
            json!([{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}])
        );
        // The null map value takes the values' default, which is defaulted
        // in turn.
        assert_eq!(
            obj["spec"]["env"],
            json!({"A": {"value": "1", "secret": false}, "B": {"value": "", "secret": false}})
        );
        assert_eq!(obj["spec"]["tags"], json!(["x", "none"]));
    }

    #[test]
    fn nulls_take_defaults_unless_nullable() {
        let obj = defaulted_obj(
            &widget(),
            json!({"spec": {"replicas": null, "note": null, "paused": null}}),
        );
        assert_eq!(obj["spec"]["replicas"], 1);
        // Nullable: the null is a value.
        assert_eq!(obj["spec"]["note"], Value::Null);
        // No default: left for pruning (done before defaulting) to drop.
        assert_eq!(obj["spec"]["paused"], Value::Null);
    }

    #[test]
    fn defaults_are_deep_copies() {
        let schema = widget();
        let mut a = json!({"spec": {}});
        default(&schema, &mut a);
        a["spec"]["strategy"]["type"] = json!("Recreate");
        let b = defaulted_obj(&schema, json!({"spec": {}}));
        assert_eq!(b["spec"]["strategy"]["type"], "RollingUpdate");
        assert_eq!(
            schema.properties["spec"].properties["strategy"].default,
            Some(json!({}))
        );
    }

    #[test]
    fn unknown_members_and_wrong_types_are_left_alone() {
        for v in [
            json!(null),
            json!(3),
            json!([1, {"spec": {}}]),
            json!({"spec": 5}),
        ] {
            assert_eq!(defaulted_obj(&widget(), v.clone()), v);
        }
        let obj = defaulted_obj(
            &widget(),
            json!({"spec": {"ports": {"port": 1}, "env": [1], "strategy": "x", "tags": [null, 7],
                            "extra": {}},
                   "status": {"x": null}}),
        );
        assert_eq!(
            obj,
            json!({"spec": {"ports": {"port": 1}, "env": [1], "strategy": "x", "tags": ["none", 7],
                            "extra": {}, "replicas": 1, "note": "n"},
                   "status": {"x": null, "phase": "Pending"}})
        );
    }

    #[test]
    fn prune_nulls_drops_non_nullable_nulls_without_defaults_only() {
        let mut obj = json!({
            "kind": null, "metadata": null,
            "spec": {"paused": null, "replicas": null, "note": null, "unknown": null,
                     "env": {"A": null, "B": {"value": null}},
                     "ports": [null, {"port": null}]},
            "status": null,
        });
        prune_nulls(&widget(), &mut obj);
        assert_eq!(
            obj,
            json!({
                "kind": null, "metadata": null,
                "spec": {"replicas": null, "note": null, "unknown": null,
                         "env": {"A": null, "B": {}},
                         "ports": [null, {}]},
            })
        );
    }

    #[test]
    fn prune_then_default_fills_what_nulls_left() {
        let schema = widget();
        let mut obj = json!({"spec": {"paused": null, "replicas": null, "ports": [{"port": 1, "protocol": null}]}});
        crate::prune::prune(&schema, &mut obj);
        default(&schema, &mut obj);
        assert_eq!(
            obj["spec"],
            json!({"replicas": 1, "ports": [{"port": 1, "protocol": "TCP"}], "note": "n",
                   "strategy": {"type": "RollingUpdate"}})
        );
    }
}
