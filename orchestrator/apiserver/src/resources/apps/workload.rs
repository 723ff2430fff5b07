//! What Deployments, ReplicaSets and DaemonSets share: defaults, the
//! selector/template rules and the immutable selector.

use serde_json::{json, Map, Value};

use crate::error::Cause;
use crate::registry::Behaviour;
use crate::resources::podspec::{default_pod_spec, validate_pod_spec};
use crate::selectors::{labels_of, LabelSelector};
use crate::tables::selector_string;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Deployment,
    ReplicaSet,
    DaemonSet,
}

pub struct WorkloadBehaviour(pub Workload);

/// The object under `key`, made (or made an object) if it is not one.
pub(super) fn entry<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = m.entry(key).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("made an object above")
}

impl Behaviour for WorkloadBehaviour {
    fn default(&self, obj: &mut Value) {
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        match self.0 {
            Workload::Deployment => {
                spec.entry("replicas").or_insert(json!(1));
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                let strategy = entry(spec, "strategy");
                strategy.entry("type").or_insert(json!("RollingUpdate"));
                if strategy["type"] == "RollingUpdate" {
                    let ru = entry(strategy, "rollingUpdate");
                    ru.entry("maxUnavailable").or_insert(json!("25%"));
                    ru.entry("maxSurge").or_insert(json!("25%"));
                }
            }
            Workload::ReplicaSet => {
                spec.entry("replicas").or_insert(json!(1));
            }
            Workload::DaemonSet => {
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                let strategy = entry(spec, "updateStrategy");
                strategy.entry("type").or_insert(json!("RollingUpdate"));
                if strategy["type"] == "RollingUpdate" {
                    let ru = entry(strategy, "rollingUpdate");
                    ru.entry("maxUnavailable").or_insert(json!(1));
                    ru.entry("maxSurge").or_insert(json!(0));
                }
            }
        }
        if let Some(template_spec) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
            default_pod_spec(template_spec);
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({});
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let Some(spec) = obj.get("spec") else {
            return vec![Cause::required("spec")];
        };
        if let Some(r) = spec.get("replicas").and_then(Value::as_i64) {
            if r < 0 {
                causes.push(Cause::invalid(
                    "spec.replicas",
                    &json!(r),
                    "must be greater than or equal to 0",
                ));
            }
        }
        let selector = spec.get("selector");
        let empty_selector = selector.is_none_or(|s| {
            s.get("matchLabels")
                .and_then(Value::as_object)
                .is_none_or(Map::is_empty)
                && s.get("matchExpressions")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty)
        });
        if empty_selector {
            causes.push(Cause::required("spec.selector"));
        }
        match spec.get("template") {
            None => causes.push(Cause::required("spec.template")),
            Some(template) => {
                if let (Some(sel), false) = (selector, empty_selector) {
                    if !selector_matches(sel, template) {
                        causes.push(Cause::invalid(
                            "spec.template.metadata.labels",
                            template.pointer("/metadata/labels").unwrap_or(&Value::Null),
                            "`selector` does not match template `labels`",
                        ));
                    }
                }
                match template.get("spec") {
                    Some(pod_spec) => {
                        causes.extend(validate_pod_spec(pod_spec, "spec.template.spec"));
                        let restart = pod_spec.get("restartPolicy").and_then(Value::as_str);
                        if restart.is_some_and(|r| r != "Always") {
                            causes.push(Cause::unsupported(
                                "spec.template.spec.restartPolicy",
                                &json!(restart),
                                &["Always"],
                            ));
                        }
                    }
                    None => causes.push(Cause::required("spec.template.spec")),
                }
            }
        }
        if self.0 == Workload::Deployment {
            let kind = obj.pointer("/spec/strategy/type").and_then(Value::as_str);
            if let Some(kind) = kind {
                if !["Recreate", "RollingUpdate"].contains(&kind) {
                    causes.push(Cause::unsupported(
                        "spec.strategy.type",
                        &json!(kind),
                        &["Recreate", "RollingUpdate"],
                    ));
                }
                if kind == "Recreate" && obj.pointer("/spec/strategy/rollingUpdate").is_some() {
                    causes.push(Cause::forbidden(
                        "spec.strategy.rollingUpdate",
                        "may not be specified when strategy `type` is 'Recreate'",
                    ));
                }
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        if new.pointer("/spec/selector") != old.pointer("/spec/selector") {
            causes.push(Cause::invalid(
                "spec.selector",
                new.pointer("/spec/selector").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        causes
    }
}

/// Whether a workload's selector selects its own template's labels.
fn selector_matches(selector: &Value, template: &Value) -> bool {
    let labels = labels_of(template);
    let mut terms: Vec<String> = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    let expressions = selector_string(Some(&json!({
        "matchExpressions": selector.get("matchExpressions").cloned().unwrap_or(json!([]))
    })));
    if expressions != "<none>" {
        terms.push(expressions);
    }
    LabelSelector::parse(&terms.join(",")).is_ok_and(|s| s.matches(&labels))
}
