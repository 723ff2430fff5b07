//! core/v1 ReplicationControllers: ReplicaSets' predecessor, whose selector
//! is a plain label map. Served like ReplicaSets (status and scale
//! subresources, the same columns); validation is the ReplicaSet's on the
//! equivalent `matchLabels` selector, so errors name the same fields.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ReplicationController;
use serde_json::{json, Value};

use crate::error::Cause;
use crate::registry::{names, selectable, Behaviour, Generation, ResourceDef};
use crate::resources::apps::replicaset::table;
use crate::resources::apps::workload::{Workload, WorkloadBehaviour};
use crate::rest::scale::ScaleRest;
use crate::rest::status::StatusRest;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["rc"]),
        categories: names(&["all"]),
        // A plain map prints as a selector string like a LabelSelector does.
        subresources: vec![StatusRest::def(), ScaleRest::workload()],
        generation: Generation::Spec,
        behaviour: Arc::new(ReplicationControllerBehaviour),
        table: Arc::new(table(
            "The number of ready replicas for this replication controller.",
        )),
        field_selectors: selectable(&[("status.replicas", "/status/replicas")]),
        ..ResourceDef::of::<ReplicationController>()
    }
}

struct ReplicationControllerBehaviour;

/// The ReplicaSet rules and defaults, which hold for both kinds.
const AS_REPLICASET: WorkloadBehaviour = WorkloadBehaviour(Workload::ReplicaSet);

/// The object with its selector map as a LabelSelector's `matchLabels`.
fn as_replicaset(obj: &Value) -> Value {
    let mut view = obj.clone();
    if let Some(spec) = view.get_mut("spec").and_then(Value::as_object_mut) {
        if let Some(selector) = spec.remove("selector") {
            spec.insert("selector".into(), json!({ "matchLabels": selector }));
        }
    }
    view
}

impl Behaviour for ReplicationControllerBehaviour {
    /// Kubernetes' defaults: the selector and, when it has none, the
    /// object's labels come from the template's labels; one replica.
    fn default(&self, obj: &mut Value) {
        let template_labels = obj
            .pointer("/spec/template/metadata/labels")
            .filter(|l| l.as_object().is_some_and(|m| !m.is_empty()))
            .cloned();
        if let Some(labels) = template_labels {
            let empty =
                |v: Option<&Value>| v.and_then(Value::as_object).is_none_or(|m| m.is_empty());
            if empty(obj.pointer("/spec/selector")) {
                obj["spec"]["selector"] = labels.clone();
            }
            if obj.get("metadata").is_some_and(Value::is_object)
                && empty(obj.pointer("/metadata/labels"))
            {
                obj["metadata"]["labels"] = labels;
            }
        }
        AS_REPLICASET.default(obj);
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        AS_REPLICASET.prepare_for_create(obj);
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        AS_REPLICASET.validate(&as_replicaset(obj))
    }

    /// Unlike a ReplicaSet's, the selector may change.
    fn validate_update(&self, new: &Value, _old: &Value) -> Vec<Cause> {
        self.validate(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(spec: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec})
    }

    fn template(labels: Value) -> Value {
        json!({"metadata": {"labels": labels},
               "spec": {"containers": [{"name": "c", "image": "nginx"}]}})
    }

    #[test]
    fn selector_labels_and_replicas_default_from_the_template() {
        let mut o = rc(json!({"template": template(json!({"app": "web"}))}));
        ReplicationControllerBehaviour.default(&mut o);
        assert_eq!(o["spec"]["selector"], json!({"app": "web"}));
        assert_eq!(o["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(o["spec"]["replicas"], 1);
        assert_eq!(
            o.pointer("/spec/template/spec/restartPolicy"),
            Some(&json!("Always"))
        );
        assert!(ReplicationControllerBehaviour.validate(&o).is_empty());

        // What the user set stays.
        let mut o = rc(json!({"replicas": 0, "selector": {"app": "web"},
                              "template": template(json!({"app": "web", "tier": "fe"}))}));
        o["metadata"]["labels"] = json!({"team": "a"});
        ReplicationControllerBehaviour.default(&mut o);
        assert_eq!(o["spec"]["selector"], json!({"app": "web"}));
        assert_eq!(o["metadata"]["labels"], json!({"team": "a"}));
        assert_eq!(o["spec"]["replicas"], 0);
    }

    #[test]
    fn errors_name_the_field() {
        let fields = |o: Value| -> Vec<String> {
            let mut o = o;
            ReplicationControllerBehaviour.default(&mut o);
            ReplicationControllerBehaviour
                .validate(&o)
                .into_iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect()
        };
        assert_eq!(
            fields(rc(json!({"template": template(json!({}))}))),
            vec!["spec.selector: Required value"]
        );
        let mismatch = fields(rc(json!({"selector": {"app": "x"},
                                        "template": template(json!({"app": "web"}))})));
        assert_eq!(mismatch.len(), 1, "{mismatch:?}");
        assert!(
            mismatch[0].starts_with("spec.template.metadata.labels: Invalid value")
                && mismatch[0].ends_with("`selector` does not match template `labels`"),
            "{mismatch:?}"
        );
        assert_eq!(
            fields(rc(
                json!({"replicas": -1, "template": template(json!({"a": "b"}))})
            )),
            vec!["spec.replicas: Invalid value: -1: must be greater than or equal to 0"]
        );
    }
}
