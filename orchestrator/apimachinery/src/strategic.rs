//! Strategic merge patch (`application/strategic-merge-patch+json`).
//!
//! Like JSON merge patch, but lists whose field declares patch strategy
//! `merge` are merged: by the patch merge key for lists of objects, as sets
//! for lists of scalars. Directives in the patch steer the merge:
//!
//! * `$patch: replace | delete | merge` in a map (or as a list item);
//! * `$retainKeys: [..]` drops keys of the original map not listed;
//! * `$deleteFromPrimitiveList/<f>: [..]` removes values from list `f`;
//! * `$setElementOrder/<f>: [..]` gives the order of the resulting list `f`.
//!
//! Directives are consumed: none is ever left in the result.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::error::PatchError;
use crate::fieldpath::canonical;
use crate::json::type_name;
use crate::schema::{FieldKind, FieldSchema, PatchSchema, PatchStrategy};

const PATCH: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER: &str = "$setElementOrder/";
const DELETE_PRIMITIVE: &str = "$deleteFromPrimitiveList/";

/// Applies a strategic merge patch to `original`, an object of `type_name`
/// (e.g. `io.k8s.api.apps.v1.Deployment`). Fields the schema does not know
/// are merged like a JSON merge patch.
pub fn strategic_merge_patch(
    original: &Value,
    patch: &Value,
    schema: &dyn PatchSchema,
    type_name: &str,
) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::InvalidPatch {
            kind: "strategic merge patch",
            message: format!("expected a JSON object, got {}", self::type_name(patch)),
        });
    };
    let original = match original {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let ctx = Ctx { schema };
    let kind = FieldKind::Object {
        type_name: type_name.to_string(),
    };
    let mut path = Path::default();
    ctx.merge_map(original, patch, Some(&kind), &mut path)
}

/// Field path for error messages, e.g. `.spec.containers[1].ports`.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn field(&mut self, f: &str) {
        self.0.push(format!(".{f}"));
    }
    fn index(&mut self, i: usize) {
        self.0.push(format!("[{i}]"));
    }
    fn pop(&mut self) {
        self.0.pop();
    }
    fn err(&self, message: impl Into<String>) -> PatchError {
        let p = self.0.concat();
        PatchError::Strategic {
            path: if p.is_empty() { ".".to_string() } else { p },
            message: message.into(),
        }
    }
}

struct Ctx<'a> {
    schema: &'a dyn PatchSchema,
}

impl Ctx<'_> {
    /// Schema of `key` in a map of kind `kind` (None: untyped).
    fn child(&self, kind: Option<&FieldKind>, key: &str) -> Option<Cow<'_, FieldSchema>> {
        match kind? {
            FieldKind::Object { type_name } => self.schema.field(type_name, key),
            FieldKind::Map { value } => Some(Cow::Owned(FieldSchema {
                kind: (**value).clone(),
                patch_strategies: Vec::new(),
                patch_merge_key: None,
                atomic: false,
            })),
            _ => None,
        }
    }

    fn merge_map(
        &self,
        mut original: Map<String, Value>,
        patch: &Map<String, Value>,
        kind: Option<&FieldKind>,
        path: &mut Path,
    ) -> Result<Value, PatchError> {
        match patch.get(PATCH) {
            None => {}
            Some(Value::String(d)) if d == "merge" => {}
            Some(Value::String(d)) if d == "replace" => {
                // The patch (minus directives) is the new value.
                let mut rest = patch.clone();
                rest.shift_remove(PATCH);
                return self.merge_map(Map::new(), &rest, kind, path);
            }
            Some(Value::String(d)) if d == "delete" => return Ok(Value::Object(Map::new())),
            Some(other) => {
                return Err(path.err(format!(
                    "unknown patch directive {PATCH}: {other} (expected replace, merge or delete)"
                )))
            }
        }

        if let Some(retain) = patch.get(RETAIN_KEYS) {
            let keys = string_list(retain)
                .ok_or_else(|| path.err(format!("{RETAIN_KEYS} must be a list of strings")))?;
            // Every field the patch sets must be retained.
            if let Some(k) = patch
                .iter()
                .find(|(k, v)| !v.is_null() && !is_directive(k) && !keys.contains(&k.as_str()))
                .map(|(k, _)| k)
            {
                return Err(path.err(format!(
                    "field {k:?} is set but not listed in {RETAIN_KEYS}"
                )));
            }
            original.retain(|k, _| keys.iter().any(|r| r == k));
        }

        // Primitive-list deletions and the server's list order are taken
        // from the original before the patch's own fields are merged.
        let mut orders: Vec<(&str, &Vec<Value>, Vec<Value>)> = Vec::new();
        for (k, v) in patch {
            if let Some(field) = k.strip_prefix(DELETE_PRIMITIVE) {
                let Value::Array(values) = v else {
                    return Err(path.err(format!("{k} must be a list, got {}", type_name(v))));
                };
                if let Some(Value::Array(list)) = original.get_mut(field) {
                    list.retain(|item| !values.contains(item));
                }
            } else if let Some(field) = k.strip_prefix(SET_ORDER) {
                let Value::Array(order) = v else {
                    return Err(path.err(format!("{k} must be a list, got {}", type_name(v))));
                };
                let server = match original.get(field) {
                    Some(Value::Array(l)) => l.clone(),
                    _ => Vec::new(),
                };
                orders.push((field, order, server));
            }
        }

        for (k, pv) in patch {
            if is_directive(k) {
                continue;
            }
            if pv.is_null() {
                original.shift_remove(k);
                continue;
            }
            let fs = self.child(kind, k);
            path.field(k);
            let merged = self.merge_value(original.get(k), pv, fs.as_deref(), path)?;
            path.pop();
            // Inserting an existing key keeps its position (preserve_order).
            original.insert(k.clone(), merged);
        }

        for (field, order, server) in orders {
            let merge_key = self
                .child(kind, field)
                .and_then(|fs| fs.patch_merge_key.clone());
            if let Some(Value::Array(list)) = original.get_mut(field) {
                reorder(list, order, &server, merge_key.as_deref());
            }
        }
        Ok(Value::Object(original))
    }

    fn merge_value(
        &self,
        original: Option<&Value>,
        patch: &Value,
        fs: Option<&FieldSchema>,
        path: &mut Path,
    ) -> Result<Value, PatchError> {
        let kind = fs.map(|f| &f.kind);
        match patch {
            Value::Object(pm) => {
                // A scalar/unknown-shaped field given an object merges like
                // JSON merge patch; the object always wins over a non-object.
                let map_kind = match kind {
                    Some(k @ (FieldKind::Object { .. } | FieldKind::Map { .. })) => Some(k),
                    _ => None,
                };
                let base = match original {
                    Some(Value::Object(m)) => m.clone(),
                    _ => Map::new(),
                };
                self.merge_map(base, pm, map_kind, path)
            }
            Value::Array(items) => {
                let merge = fs.is_some_and(|f| f.patch_strategies.contains(&PatchStrategy::Merge));
                if merge {
                    let base = match original {
                        Some(Value::Array(l)) => l.clone(),
                        _ => Vec::new(),
                    };
                    self.merge_list(base, items, fs, path).map(Value::Array)
                } else {
                    Ok(strip_directives(patch))
                }
            }
            scalar => Ok(scalar.clone()),
        }
    }

    fn merge_list(
        &self,
        mut original: Vec<Value>,
        patch: &[Value],
        fs: Option<&FieldSchema>,
        path: &mut Path,
    ) -> Result<Vec<Value>, PatchError> {
        let merge_key = fs.and_then(|f| f.patch_merge_key.as_deref());
        let item_kind = match fs.map(|f| &f.kind) {
            Some(FieldKind::List { item, .. }) => match item.as_ref() {
                k @ (FieldKind::Object { .. } | FieldKind::Map { .. }) => Some(k),
                _ => None,
            },
            _ => None,
        };

        // Directive items: `{"$patch": "delete", key: v}` removes items,
        // `{"$patch": "replace"}` makes the rest of the patch the list.
        let mut replace = false;
        let mut rest: Vec<(usize, &Value)> = Vec::new();
        for (i, item) in patch.iter().enumerate() {
            let directive = item.as_object().and_then(|m| m.get(PATCH));
            match directive {
                None => rest.push((i, item)),
                Some(Value::String(d)) if d == "replace" => replace = true,
                Some(Value::String(d)) if d == "merge" => {}
                Some(Value::String(d)) if d == "delete" => {
                    path.index(i);
                    let Some(mk) = merge_key else {
                        return Err(path.err(format!(
                            "{PATCH}: delete needs a merge key, and this list has none"
                        )));
                    };
                    let Some(kv) = item.get(mk) else {
                        return Err(path.err(format!(
                            "{PATCH}: delete item does not contain the merge key {mk:?}"
                        )));
                    };
                    path.pop();
                    original.retain(|o| o.get(mk) != Some(kv));
                }
                Some(other) => {
                    path.index(i);
                    return Err(path.err(format!(
                        "unknown patch directive {PATCH}: {other} (expected replace, merge or delete)"
                    )));
                }
            }
        }

        if replace {
            return rest
                .into_iter()
                .map(|(i, item)| {
                    path.index(i);
                    let v = self.merge_value(None, item, None, path);
                    path.pop();
                    v
                })
                .collect();
        }

        // Items the patch names end up in the patch's order; the others
        // keep their place relative to the original (see `reorder`).
        let server = original.clone();
        let patch_order: Vec<Value> = rest.iter().map(|(_, v)| (*v).clone()).collect();
        match merge_key {
            Some(mk) => {
                for (i, item) in rest {
                    path.index(i);
                    let Value::Object(pm) = item else {
                        return Err(path.err(format!(
                            "expected an object with merge key {mk:?}, got {}",
                            type_name(item)
                        )));
                    };
                    let Some(kv) = pm.get(mk).filter(|v| !v.is_null()) else {
                        return Err(path.err(format!("item does not contain the merge key {mk:?}")));
                    };
                    let found = original
                        .iter()
                        .position(|o| o.as_object().and_then(|m| m.get(mk)) == Some(kv));
                    match found {
                        Some(idx) => {
                            let base = match &original[idx] {
                                Value::Object(m) => m.clone(),
                                _ => Map::new(),
                            };
                            original[idx] = self.merge_map(base, pm, item_kind, path)?;
                        }
                        None => {
                            let new = self.merge_map(Map::new(), pm, item_kind, path)?;
                            original.push(new);
                        }
                    }
                    path.pop();
                }
            }
            None => {
                // Merge strategy without a key: a set of scalars. Objects here
                // cannot be matched, so such a patch replaces the list.
                if rest.iter().any(|(_, v)| v.is_object() || v.is_array()) {
                    return Ok(rest.into_iter().map(|(_, v)| strip_directives(v)).collect());
                }
                // Union without duplicates, first occurrence wins.
                let mut merged: Vec<Value> = Vec::with_capacity(original.len() + rest.len());
                for item in original.iter().chain(rest.into_iter().map(|(_, v)| v)) {
                    if !merged.contains(item) {
                        merged.push(item.clone());
                    }
                }
                original = merged;
            }
        }
        reorder(&mut original, &patch_order, &server, merge_key);
        Ok(original)
    }
}

fn is_directive(k: &str) -> bool {
    k == PATCH || k == RETAIN_KEYS || k.starts_with(SET_ORDER) || k.starts_with(DELETE_PRIMITIVE)
}

fn string_list(v: &Value) -> Option<Vec<&str>> {
    v.as_array()?.iter().map(Value::as_str).collect()
}

/// Removes directive keys at any depth, for values copied verbatim.
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !is_directive(k))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// Orders a merged list: items named in `order` (the `$setElementOrder`
/// list, or the patch list itself) follow that order; the other items keep
/// their relative order from the server's list and are interleaved with the
/// ordered ones by their server positions. Where that comparison is not
/// possible (an item new to the server), the ordered item goes first.
fn reorder(list: &mut Vec<Value>, order: &[Value], server: &[Value], merge_key: Option<&str>) {
    let key_of = |v: &Value| -> Option<String> {
        match merge_key {
            Some(mk) => v.get(mk).map(|k| canonical(k).to_string()),
            None => Some(canonical(v).to_string()),
        }
    };
    let order_keys: Vec<Option<String>> = order.iter().map(key_of).collect();
    let server_keys: Vec<Option<String>> = server.iter().map(key_of).collect();
    let pos = |keys: &[Option<String>], k: &Option<String>| -> Option<usize> {
        k.as_ref()?;
        keys.iter().position(|x| x == k)
    };

    let items: Vec<(Option<String>, Value)> = list.drain(..).map(|v| (key_of(&v), v)).collect();
    let mut ordered: Vec<(usize, Option<usize>, Value)> = Vec::new();
    let mut server_only: Vec<(Option<usize>, Value)> = Vec::new();
    for (k, v) in items {
        let sp = pos(&server_keys, &k);
        match pos(&order_keys, &k) {
            Some(op) => ordered.push((op, sp, v)),
            None => server_only.push((sp, v)),
        }
    }
    ordered.sort_by_key(|(op, _, _)| *op);
    // Stable: items not in the server list stay at the end, in list order.
    server_only.sort_by_key(|(sp, _)| sp.unwrap_or(usize::MAX));

    let mut a = server_only.into_iter().peekable();
    let mut b = ordered.into_iter().peekable();
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some((sa, _)), Some((_, sb, _))) => match (sa, sb) {
                (Some(x), Some(y)) => x < y,
                _ => false,
            },
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_a {
            if let Some((_, v)) = a.next() {
                list.push(v);
            }
        } else if let Some((_, _, v)) = b.next() {
            list.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testschema::TestSchema;
    use serde_json::json;

    const DEPLOY: &str = "io.k8s.api.apps.v1.Deployment";
    const POD: &str = "io.k8s.api.core.v1.Pod";

    fn smp(orig: Value, patch: Value) -> Value {
        strategic_merge_patch(&orig, &patch, &TestSchema, DEPLOY).unwrap()
    }

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "labels": {"app": "web", "tier": "fe"},
                         "finalizers": ["a", "b"]},
            "spec": {"replicas": 1, "template": {"spec": {
                "containers": [
                    {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80, "protocol": "TCP"}],
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                    {"name": "sidecar", "image": "envoy:1"}
                ],
                "tolerations": [{"key": "k", "operator": "Exists"}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            }}}
        })
    }

    #[test]
    fn kubectl_image_change() {
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{"$setElementOrder/containers":[{"name":"web"},{"name":"sidecar"}],
                   "containers":[{"image":"nginx:2","name":"web"}]}}}}),
        );
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["image"], "nginx:2");
        assert_eq!(cs[0]["ports"][0]["containerPort"], 80);
        assert_eq!(cs[1]["name"], "sidecar");
        assert!(!out.to_string().contains('$'));
    }

    #[test]
    fn kubectl_single_container_order() {
        // Exactly what kubectl apply sends after editing one image.
        let orig =
            json!({"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:1"}]}}}});
        let out = smp(
            orig,
            json!({"spec":{"template":{"spec":{"$setElementOrder/containers":[{"name":"web"}],"containers":[{"image":"nginx:2","name":"web"}]}}}}),
        );
        assert_eq!(
            out,
            json!({"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:2"}]}}}})
        );
    }

    #[test]
    fn delete_container_and_reorder() {
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{
                "$setElementOrder/containers":[{"name":"web"}],
                "containers":[{"$patch":"delete","name":"sidecar"}]}}}}),
        );
        let cs = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0]["name"], "web");

        // Add a container at the front, reorder the rest.
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{
                "$setElementOrder/containers":[{"name":"init"},{"name":"sidecar"},{"name":"web"}],
                "containers":[{"name":"init","image":"busybox"}]}}}}),
        );
        let names: Vec<&str> = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["init", "sidecar", "web"]);
    }

    #[test]
    fn server_only_items_keep_their_place() {
        let orig = json!({"spec":{"template":{"spec":{"containers":[
            {"name":"x"},{"name":"a"},{"name":"b"}]}}}});
        let out = smp(
            orig,
            json!({"spec":{"template":{"spec":{
            "$setElementOrder/containers":[{"name":"b"},{"name":"a"},{"name":"c"}],
            "containers":[{"name":"c"}]}}}}),
        );
        let names: Vec<&str> = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["x", "b", "a", "c"]);
    }

    #[test]
    fn list_order_follows_kubernetes() {
        let names = |v: &Value| -> Vec<String> {
            v["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        let live = |ns: &[&str]| {
            json!({"spec":{"template":{"spec":{"containers":
            ns.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()}}}})
        };
        // Without $setElementOrder the patch list's order is used.
        let out = smp(
            live(&["b", "c", "a"]),
            json!({"spec":{"template":{"spec":{"containers":[
            {"name":"a","x":1},{"name":"b"},{"name":"d"}]}}}}),
        );
        assert_eq!(names(&out), ["c", "a", "b", "d"]);
        // Server-only items interleave by their server positions.
        let out = smp(
            live(&["c", "b", "d", "a", "e"]),
            json!({"spec":{"template":{"spec":{
            "$setElementOrder/containers":[{"name":"a"},{"name":"b"}],
            "containers":[{"name":"a"},{"name":"b"}]}}}}),
        );
        assert_eq!(names(&out), ["c", "d", "a", "b", "e"]);
        // Order alone, without list changes.
        let out = smp(
            live(&["b", "a"]),
            json!({"spec":{"template":{"spec":{
            "$setElementOrder/containers":[{"name":"a"},{"name":"b"}]}}}}),
        );
        assert_eq!(names(&out), ["a", "b"]);
        // Primitive lists too.
        let out = smp(
            json!({"metadata":{"finalizers":["b","e","a","c","d"]}}),
            json!({"metadata":{
            "$setElementOrder/finalizers":["a","b","f"],"$deleteFromPrimitiveList/finalizers":["c"],
            "finalizers":["f"]}}),
        );
        assert_eq!(
            out["metadata"]["finalizers"],
            json!(["e", "a", "b", "f", "d"])
        );
    }

    #[test]
    fn nested_merge_keys_and_nulls() {
        let out = smp(
            deployment(),
            json!({"metadata":{"labels":{"tier":null,"new":"x"}},
                   "spec":{"template":{"spec":{"containers":[{"name":"web",
                       "ports":[{"containerPort":443}],
                       "env":[{"name":"A","value":null,"valueFrom":{"fieldRef":{"fieldPath":"x"}}},{"name":"C","value":"3"}]}]}}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"app": "web", "new": "x"}));
        let web = &out["spec"]["template"]["spec"]["containers"][0];
        // Items the patch names follow the patch's order; an item new to the
        // server is placed before server-only items, as Kubernetes does.
        assert_eq!(
            web["ports"],
            json!([{"containerPort": 443}, {"containerPort": 80, "protocol": "TCP"}])
        );
        assert_eq!(
            web["env"],
            json!([{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "x"}}},
                   {"name": "C", "value": "3"}, {"name": "B", "value": "2"}])
        );
    }

    #[test]
    fn primitive_sets_finalizers() {
        let out = smp(deployment(), json!({"metadata":{"finalizers":["b","c"]}}));
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b", "c"]));
        let out = smp(
            deployment(),
            json!({"metadata":{"$deleteFromPrimitiveList/finalizers":["a"],
                               "$setElementOrder/finalizers":["c","b"],"finalizers":["c"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["c", "b"]));
    }

    #[test]
    fn atomic_lists_replace() {
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{"tolerations":[{"key":"z","operator":"Exists"}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["tolerations"],
            json!([{"key":"z","operator":"Exists"}])
        );
        // Unknown fields behave like JSON merge patch.
        let out = smp(
            json!({"x": {"a": [1, 2], "b": 1}}),
            json!({"x": {"a": [3], "b": null, "c": {"d": 1}}}),
        );
        assert_eq!(out, json!({"x": {"a": [3], "c": {"d": 1}}}));
    }

    #[test]
    fn map_directives() {
        // $patch: replace on a map.
        let out = smp(
            deployment(),
            json!({"metadata":{"labels":{"$patch":"replace","only":"1"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"only": "1"}));
        // $patch: delete on a map.
        let out = smp(
            deployment(),
            json!({"metadata":{"labels":{"$patch":"delete"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({}));
        // $patch: replace on a list.
        let out = smp(
            deployment(),
            json!({"spec":{"template":{"spec":{"containers":[
            {"$patch":"replace"},{"name":"solo","image":"x"}]}}}}),
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name":"solo","image":"x"}])
        );
    }

    #[test]
    fn retain_keys_volumes_and_strategy() {
        let orig = json!({"spec":{"strategy":{"type":"RollingUpdate","rollingUpdate":{"maxSurge":1}},
            "template":{"spec":{"volumes":[{"name":"v","emptyDir":{}}]}}}});
        let out = smp(
            orig,
            json!({"spec":{
            "strategy":{"$retainKeys":["type"],"type":"Recreate"},
            "template":{"spec":{"volumes":[{"$retainKeys":["configMap","name"],"configMap":{"name":"cm"},"name":"v"}]}}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type":"Recreate"}));
        assert_eq!(
            out["spec"]["template"]["spec"]["volumes"],
            json!([{"name":"v","configMap":{"name":"cm"}}])
        );
    }

    #[test]
    fn new_values_are_stripped_of_directives_and_nulls() {
        let out = strategic_merge_patch(
            &json!({"spec": {}}),
            &json!({"spec":{"containers":[{"name":"a","$retainKeys":["name","env"],"env":[{"name":"x","$patch":"delete"}],"args":null}],
                    "$setElementOrder/containers":[{"name":"a"}]}}),
            &TestSchema,
            POD,
        )
        .unwrap();
        assert_eq!(out, json!({"spec":{"containers":[{"name":"a","env":[]}]}}));
    }

    #[test]
    fn errors_name_the_path() {
        let err = strategic_merge_patch(
            &deployment(),
            &json!({"spec":{"template":{"spec":{"containers":[{"image":"x"}]}}}}),
            &TestSchema,
            DEPLOY,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "invalid strategic merge patch at .spec.template.spec.containers[0]: item does not contain the merge key \"name\"");
        let err = strategic_merge_patch(
            &deployment(),
            &json!({"spec":{"template":{"spec":{"containers":["web"]}}}}),
            &TestSchema,
            DEPLOY,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("containers[0]: expected an object"),
            "{err}"
        );
        let err = strategic_merge_patch(
            &deployment(),
            &json!({"metadata":{"$patch":"explode"}}),
            &TestSchema,
            DEPLOY,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("at .metadata: unknown patch directive"),
            "{err}"
        );
        let err =
            strategic_merge_patch(&deployment(), &json!(["x"]), &TestSchema, DEPLOY).unwrap_err();
        assert!(matches!(err, PatchError::InvalidPatch { .. }));
        for bad in [
            json!({"spec":{"$retainKeys":"x"}}),
            json!({"spec":{"$setElementOrder/x": 1}}),
            json!({"metadata":{"$deleteFromPrimitiveList/finalizers": "a"}}),
            json!({"metadata":{"finalizers":[{"$patch":"delete"}]}}),
            json!({"spec":{"template":{"spec":{"containers":[{"$patch":"delete"}]}}}}),
            json!({"spec":{"template":{"spec":{"containers":[{"$patch":7}]}}}}),
        ] {
            assert!(
                strategic_merge_patch(&deployment(), &bad, &TestSchema, DEPLOY).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn untyped_content_matches_json_merge_patch() {
        let docs = [
            json!({"a": {"b": [1, {"c": null}], "d": "x"}, "e": 1}),
            json!({"spec": {"group": "g", "versions": [{"name": "v1"}]}}),
            json!({}),
        ];
        let patches = [
            json!({"a": {"b": {"z": 1}, "d": null}, "n": {"m": null, "k": [null]}}),
            json!({"spec": {"versions": [{"name": "v2", "x": null}], "group": null}}),
            json!({"e": {"f": {"g": 1}}}),
        ];
        for d in &docs {
            for p in &patches {
                for t in ["example.com.v1.Widget", DEPLOY] {
                    let ours = strategic_merge_patch(d, p, &TestSchema, t).unwrap();
                    assert_eq!(ours, crate::json::json_merge_patch(d, p), "{t} {d} {p}");
                }
            }
        }
    }

    #[test]
    fn odd_shapes_never_panic() {
        let patches = [
            json!({"spec": "string"}),
            json!({"spec": {"template": "x"}}),
            json!({"spec": {"template": {"spec": {"containers": {"name": "web"}}}}}),
            json!({"spec": {"template": {"spec": {"containers": [[1]]}}}}),
            json!({"spec": {"template": {"spec": {"containers": [{"name": {"a": 1}}]}}}}),
            json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "ports": "x"}]}}}}),
            json!({"spec": {"template": {"spec": {"$setElementOrder/containers": [1, null, {"x": 1}]}}}}),
            json!({"spec": {"template": {"spec": {"$setElementOrder/tolerations": [{"key": "k"}]}}}}),
            json!({"metadata": {"finalizers": [{"a": 1}, "x"]}}),
            json!({"metadata": {"labels": ["x"]}}),
            json!({"metadata": 5}),
            json!({"$patch": "delete"}),
            json!({"$patch": "replace", "a": {"$patch": "delete"}}),
            json!({}),
        ];
        let originals = [
            deployment(),
            json!("string"),
            json!({"spec": {"template": {"spec": {"containers": "x"}}}}),
            json!({"spec": {"template": {"spec": {"containers": [1, "a", null, [], {"name": 1}]}}}}),
            json!({"metadata": {"finalizers": "x", "labels": 3}}),
        ];
        for o in &originals {
            for p in &patches {
                for t in [DEPLOY, POD, "unknown.Type", ""] {
                    if let Ok(v) = strategic_merge_patch(o, p, &TestSchema, t) {
                        assert!(!v.to_string().contains("$patch"), "{o} {p} -> {v}");
                    }
                }
            }
        }
    }
}
