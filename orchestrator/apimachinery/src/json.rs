//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

use json_patch::PatchOperation;
use serde_json::Value;

use crate::error::PatchError;

/// Applies a JSON merge patch (`application/merge-patch+json`): objects
/// merge recursively, `null` deletes a key, anything else (lists included)
/// replaces. A non-object patch replaces the whole document, as the RFC says.
pub fn json_merge_patch(original: &Value, patch: &Value) -> Value {
    let mut doc = original.clone();
    json_patch::merge(&mut doc, patch);
    doc
}

/// Applies a JSON patch (`application/json-patch+json`): a list of
/// `add`/`remove`/`replace`/`move`/`copy`/`test` operations, all or nothing.
pub fn json_patch(original: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = parse_json_patch(patch)?;
    // Work on a copy and drop it on failure: all-or-nothing without relying
    // on the library's undo path.
    let mut doc = original.clone();
    for (index, op) in ops.iter().enumerate() {
        if let Err(e) = json_patch::patch_unsafe(&mut doc, std::slice::from_ref(op)) {
            return Err(match (&e.kind, op) {
                (json_patch::PatchErrorKind::TestFailed, PatchOperation::Test(t)) => {
                    PatchError::TestFailed {
                        index,
                        path: pointer_display(t.path.as_str()),
                        expected: t.value.to_string(),
                    }
                }
                _ => PatchError::OperationFailed {
                    index,
                    op: op_name(op).to_string(),
                    path: pointer_display(op.path().as_str()),
                    reason: failure_reason(&e.kind, op, &doc),
                },
            });
        }
    }
    Ok(doc)
}

/// Parses a JSON patch document, naming the first malformed operation.
pub fn parse_json_patch(patch: &Value) -> Result<Vec<PatchOperation>, PatchError> {
    let invalid = |message: String| PatchError::InvalidPatch {
        kind: "JSON patch",
        message,
    };
    let Value::Array(items) = patch else {
        return Err(invalid(format!(
            "expected a JSON array of operations, got {}",
            type_name(patch)
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let op = item.get("op").and_then(Value::as_str);
            match op {
                None => Err(invalid(format!("operation {i}: missing \"op\""))),
                Some("add" | "remove" | "replace" | "move" | "copy" | "test") => {
                    serde_json::from_value::<PatchOperation>(item.clone())
                        .map_err(|e| invalid(format!("operation {i} ({}): {e}", op.unwrap_or(""))))
                }
                Some(other) => Err(invalid(format!(
                    "operation {i}: unknown op {other:?} (expected add, remove, replace, move, copy or test)"
                ))),
            }
        })
        .collect()
}

fn op_name(op: &PatchOperation) -> &'static str {
    match op {
        PatchOperation::Add(_) => "add",
        PatchOperation::Remove(_) => "remove",
        PatchOperation::Replace(_) => "replace",
        PatchOperation::Move(_) => "move",
        PatchOperation::Copy(_) => "copy",
        PatchOperation::Test(_) => "test",
    }
}

fn failure_reason(kind: &json_patch::PatchErrorKind, op: &PatchOperation, doc: &Value) -> String {
    use json_patch::PatchErrorKind as K;
    match kind {
        K::InvalidFromPointer => "the \"from\" path does not exist".to_string(),
        K::CannotMoveInsideItself => "cannot move a value into itself".to_string(),
        K::InvalidPointer => {
            // Say which part is missing: the target itself or its parent.
            let path = op.path().as_str();
            let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            match doc.pointer(parent) {
                None => format!("the parent {} does not exist", pointer_display(parent)),
                Some(Value::Array(_)) => "array index out of range or not a number".to_string(),
                Some(Value::Object(_)) => "the path does not exist".to_string(),
                Some(_) => format!(
                    "the parent {} is not an object or array",
                    pointer_display(parent)
                ),
            }
        }
        other => other.to_string(),
    }
}

fn pointer_display(p: &str) -> String {
    if p.is_empty() {
        "\"\" (the whole document)".to_string()
    } else {
        format!("{p:?}")
    }
}

/// "object", "array", ... for messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386_examples() {
        let doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        let out = json_merge_patch(&doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(out, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
        // Non-object patches replace the target; objects replace scalars.
        assert_eq!(json_merge_patch(&doc, &json!(["x"])), json!(["x"]));
        assert_eq!(
            json_merge_patch(&json!("s"), &json!({"a": {"b": null, "c": 1}})),
            json!({"a": {"c": 1}})
        );
        assert_eq!(
            json_merge_patch(
                &json!({"metadata": {"labels": {"a": "1", "b": "2"}}}),
                &json!({"metadata": {"labels": {"a": null}}})
            ),
            json!({"metadata": {"labels": {"b": "2"}}})
        );
    }

    #[test]
    fn json_patch_ops() {
        let doc = json!({"spec": {"replicas": 1, "list": ["a", "b"]}});
        let out = json_patch(
            &doc,
            &json!([
                {"op": "test", "path": "/spec/replicas", "value": 1},
                {"op": "replace", "path": "/spec/replicas", "value": 3},
                {"op": "add", "path": "/spec/list/-", "value": "c"},
                {"op": "remove", "path": "/spec/list/0"},
                {"op": "copy", "from": "/spec/replicas", "path": "/spec/copy"},
                {"op": "move", "from": "/spec/copy", "path": "/spec/moved"},
                {"op": "add", "path": "/metadata", "value": {"labels": {"a/b": "x"}}},
                {"op": "replace", "path": "/metadata/labels/a~1b", "value": "y"}
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"spec": {"replicas": 3, "list": ["b", "c"], "moved": 3},
                   "metadata": {"labels": {"a/b": "y"}}})
        );
    }

    #[test]
    fn json_patch_failures_are_atomic_and_described() {
        let doc = json!({"spec": {"replicas": 1}});
        let err = json_patch(
            &doc,
            &json!([
                {"op": "replace", "path": "/spec/replicas", "value": 2},
                {"op": "test", "path": "/spec/replicas", "value": 5}
            ]),
        )
        .unwrap_err();
        assert_eq!(
            err,
            PatchError::TestFailed {
                index: 1,
                path: "\"/spec/replicas\"".into(),
                expected: "5".into()
            }
        );
        let err =
            json_patch(&doc, &json!([{"op": "remove", "path": "/spec/missing"}])).unwrap_err();
        assert!(
            err.to_string()
                .contains("operation 0 (remove \"/spec/missing\")"),
            "{err}"
        );
        let err =
            json_patch(&doc, &json!([{"op": "add", "path": "/a/b", "value": 1}])).unwrap_err();
        assert!(
            err.to_string().contains("parent \"/a\" does not exist"),
            "{err}"
        );
        let err = json_patch(
            &doc,
            &json!([{"op": "add", "path": "/spec/replicas/x", "value": 1}]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not an object or array"), "{err}");
    }

    #[test]
    fn json_patch_malformed() {
        let doc = json!({});
        for bad in [
            json!({"op": "add"}),
            json!([{"path": "/a"}]),
            json!([{"op": "frobnicate", "path": "/a"}]),
            json!([{"op": "add", "path": "/a"}]),
            json!([{"op": "add", "path": "no-slash", "value": 1}]),
            json!([{"op": "move", "path": "/a"}]),
            json!(["add"]),
            json!([{"op": 1}]),
        ] {
            let err = json_patch(&doc, &bad).unwrap_err();
            assert!(
                matches!(err, PatchError::InvalidPatch { .. }),
                "{bad}: {err:?}"
            );
        }
        // Odd but valid shapes never panic.
        for (d, p) in [
            (json!([]), json!([{"op": "remove", "path": "/-"}])),
            (json!([]), json!([{"op": "add", "path": "/5", "value": 1}])),
            (json!("s"), json!([{"op": "add", "path": "/x", "value": 1}])),
            (
                json!({"a": [1]}),
                json!([{"op": "move", "from": "/a", "path": "/a/0"}]),
            ),
            (json!({"a": 1}), json!([{"op": "remove", "path": ""}])),
        ] {
            assert!(json_patch(&d, &p).is_err(), "{d} {p}");
        }
        assert_eq!(
            json_patch(
                &json!(1),
                &json!([{"op": "replace", "path": "", "value": 2}])
            )
            .unwrap(),
            json!(2)
        );
    }
}
