//! apps/v1 workloads: Deployments, ReplicaSets, DaemonSets.

use std::sync::Arc;

use k8s_openapi::api::apps::v1 as appsv1;
use serde_json::{json, Map, Value};

use super::podspec::{default_pod_spec, validate_pod_spec};
use crate::error::Cause;
use crate::registry::{typed_codec, Behaviour, ResourceDef, Subresource};
use crate::selectors::{labels_of, LabelSelector};
use crate::tables::{
    age, col, container_names_and_images, i, name, selector_string, wide, TableDef, AGE, NAME,
};
use crate::validation::NameRule;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Deployment,
    ReplicaSet,
    DaemonSet,
}

pub fn resources() -> Vec<ResourceDef> {
    vec![
        ResourceDef {
            group: "apps",
            version: "v1",
            kind: "Deployment",
            plural: "deployments",
            singular: "deployment",
            short_names: &["deploy"],
            categories: &["all"],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[Subresource::Status, Subresource::Scale],
            definition: "io.k8s.api.apps.v1.Deployment",
            storage: "deployments",
            tracks_generation: true,
            codec: typed_codec::<appsv1::Deployment>,
            behaviour: Arc::new(WorkloadBehaviour(Workload::Deployment)),
            hook: None,
            table: TableDef {
                columns: vec![
                    NAME,
                    col("Ready", "Number of the pod with ready state"),
                    col("Up-to-date", "Total number of non-terminated pods targeted by this deployment that have the desired template spec."),
                    col("Available", "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."),
                    AGE,
                    wide("Containers", "Names of each container in the template."),
                    wide("Images", "Images referenced by each container in the template."),
                    wide("Selector", "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment."),
                ],
                cells: |o, now| {
                    let (names, images) = container_names_and_images(o.pointer("/spec/template/spec"));
                    vec![
                        name(o),
                        json!(format!("{}/{}", i(o, "/status/readyReplicas"), i(o, "/spec/replicas"))),
                        json!(i(o, "/status/updatedReplicas")),
                        json!(i(o, "/status/availableReplicas")),
                        age(o, now),
                        json!(names),
                        json!(images),
                        json!(selector_string(o.pointer("/spec/selector"))),
                    ]
                },
            },
            field_selectors: &[],
        },
        ResourceDef {
            group: "apps",
            version: "v1",
            kind: "ReplicaSet",
            plural: "replicasets",
            singular: "replicaset",
            short_names: &["rs"],
            categories: &["all"],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[Subresource::Status, Subresource::Scale],
            definition: "io.k8s.api.apps.v1.ReplicaSet",
            storage: "replicasets",
            tracks_generation: true,
            codec: typed_codec::<appsv1::ReplicaSet>,
            behaviour: Arc::new(WorkloadBehaviour(Workload::ReplicaSet)),
            hook: None,
            table: TableDef {
                columns: vec![
                    NAME,
                    col("Desired", "Number of desired pods."),
                    col("Current", "Number of actual replicas."),
                    col("Ready", "The number of ready replicas for this replica set."),
                    AGE,
                    wide("Containers", "Names of each container in the template."),
                    wide("Images", "Images referenced by each container in the template."),
                    wide("Selector", "Label query over pods that should match the replica count."),
                ],
                cells: |o, now| {
                    let (names, images) = container_names_and_images(o.pointer("/spec/template/spec"));
                    vec![
                        name(o),
                        json!(i(o, "/spec/replicas")),
                        json!(i(o, "/status/replicas")),
                        json!(i(o, "/status/readyReplicas")),
                        age(o, now),
                        json!(names),
                        json!(images),
                        json!(selector_string(o.pointer("/spec/selector"))),
                    ]
                },
            },
            field_selectors: &[("status.replicas", "/status/replicas")],
        },
        ResourceDef {
            group: "apps",
            version: "v1",
            kind: "DaemonSet",
            plural: "daemonsets",
            singular: "daemonset",
            short_names: &["ds"],
            categories: &["all"],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[Subresource::Status],
            definition: "io.k8s.api.apps.v1.DaemonSet",
            storage: "daemonsets",
            tracks_generation: true,
            codec: typed_codec::<appsv1::DaemonSet>,
            behaviour: Arc::new(WorkloadBehaviour(Workload::DaemonSet)),
            hook: None,
            table: TableDef {
                columns: vec![
                    NAME,
                    col("Desired", "The total number of nodes that should be running the daemon pod."),
                    col("Current", "The number of nodes running at least one daemon pod and are supposed to."),
                    col("Ready", "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready."),
                    col("Up-to-date", "The total number of nodes that are running updated daemon pod"),
                    col("Available", "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available."),
                    col("Node Selector", "NodeSelector is a selector which must be true for the pod to fit on a node."),
                    AGE,
                    wide("Containers", "Names of each container in the template."),
                    wide("Images", "Images referenced by each container in the template."),
                    wide("Selector", "A label query over pods that are managed by the daemon set."),
                ],
                cells: |o, now| {
                    let (names, images) = container_names_and_images(o.pointer("/spec/template/spec"));
                    let node_selector = o
                        .pointer("/spec/template/spec/nodeSelector")
                        .and_then(Value::as_object)
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "<none>".into());
                    vec![
                        name(o),
                        json!(i(o, "/status/desiredNumberScheduled")),
                        json!(i(o, "/status/currentNumberScheduled")),
                        json!(i(o, "/status/numberReady")),
                        json!(i(o, "/status/updatedNumberScheduled")),
                        json!(i(o, "/status/numberAvailable")),
                        json!(node_selector),
                        age(o, now),
                        json!(names),
                        json!(images),
                        json!(selector_string(o.pointer("/spec/selector"))),
                    ]
                },
            },
            field_selectors: &[],
        },
    ]
}

struct WorkloadBehaviour(Workload);

fn entry<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Value {
    let v = m.entry(key).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v
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
                if strategy.get("type").is_none() {
                    strategy["type"] = json!("RollingUpdate");
                }
                if strategy["type"] == "RollingUpdate" {
                    let ru = strategy.as_object_mut().map(|s| entry(s, "rollingUpdate"));
                    if let Some(ru) = ru.and_then(Value::as_object_mut) {
                        ru.entry("maxUnavailable").or_insert(json!("25%"));
                        ru.entry("maxSurge").or_insert(json!("25%"));
                    }
                }
            }
            Workload::ReplicaSet => {
                spec.entry("replicas").or_insert(json!(1));
            }
            Workload::DaemonSet => {
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                let strategy = entry(spec, "updateStrategy");
                if strategy.get("type").is_none() {
                    strategy["type"] = json!("RollingUpdate");
                }
                if strategy["type"] == "RollingUpdate" {
                    let ru = strategy.as_object_mut().map(|s| entry(s, "rollingUpdate"));
                    if let Some(ru) = ru.and_then(Value::as_object_mut) {
                        ru.entry("maxUnavailable").or_insert(json!(1));
                        ru.entry("maxSurge").or_insert(json!(0));
                    }
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
