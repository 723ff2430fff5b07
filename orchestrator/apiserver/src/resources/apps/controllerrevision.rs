//! apps/v1 ControllerRevisions: the template history of StatefulSets and
//! DaemonSets, which `kubectl rollout history|undo` reads. A revision's
//! data and number are what it was written with.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::Cause;
use crate::registry::{Behaviour, ResourceDef};
use crate::tables::{age, col, i, name, TableDef, AGE, NAME};
use k8s_openapi::api::apps::v1::ControllerRevision;

pub fn definition() -> ResourceDef {
    ResourceDef {
        behaviour: Arc::new(RevisionBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Controller", "Controller of the object."),
                col("Revision", "Revision of the ControllerRevision."),
                AGE,
            ],
            cells: |o, now| {
                vec![
                    name(o),
                    json!(controller(o)),
                    json!(i(o, "/revision")),
                    age(o, now),
                ]
            },
        }),
        ..ResourceDef::of::<ControllerRevision>()
    }
}

/// `statefulset.apps/web` for a revision controlled by StatefulSet web.
fn controller(o: &Value) -> String {
    let owners = o
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array);
    let Some(owner) = owners
        .into_iter()
        .flatten()
        .find(|r| r["controller"] == json!(true))
    else {
        return "<none>".into();
    };
    let kind = owner["kind"].as_str().unwrap_or_default().to_lowercase();
    let group = owner["apiVersion"]
        .as_str()
        .and_then(|v| v.rsplit_once('/'))
        .map(|(g, _)| format!(".{g}"))
        .unwrap_or_default();
    format!(
        "{kind}{group}/{}",
        owner["name"].as_str().unwrap_or_default()
    )
}

struct RevisionBehaviour;

impl Behaviour for RevisionBehaviour {
    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        if obj.get("data").is_none_or(Value::is_null) {
            causes.push(Cause::required_because("data", "data is mandatory"));
        }
        match obj.get("revision").and_then(Value::as_i64) {
            None => causes.push(Cause::required("revision")),
            Some(r) if r < 0 => causes.push(Cause::invalid(
                "revision",
                &json!(r),
                "must be greater than or equal to 0",
            )),
            Some(_) => {}
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        if new.get("data") != old.get("data") {
            causes.push(Cause::invalid(
                "data",
                new.get("data").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        causes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_column_names_kind_group_and_name() {
        let o = json!({"metadata": {"ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "controller": true}]}});
        assert_eq!(controller(&o), "statefulset.apps/web");
        assert_eq!(controller(&json!({})), "<none>");
    }

    #[test]
    fn data_is_fixed() {
        let old = json!({"data": {"spec": {}}, "revision": 1});
        assert!(RevisionBehaviour.validate_update(&old, &old).is_empty());
        let new = json!({"data": {"spec": {"x": 1}}, "revision": 1});
        assert_eq!(
            RevisionBehaviour.validate_update(&new, &old)[0].field,
            "data"
        );
        assert_eq!(
            RevisionBehaviour.validate(&json!({"revision": 1}))[0].field,
            "data"
        );
    }
}
