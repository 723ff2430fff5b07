//! apps/v1 StatefulSets: the workload rules of ReplicaSets (selector,
//! template, replicas) plus ordered pod management, update strategies with
//! a partition, volume claim templates and Kubernetes' narrow set of
//! mutable spec fields.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::workload::{entry, Workload, WorkloadBehaviour};
use crate::error::Cause;
use crate::registry::{names, Behaviour, Generation, ResourceDef};
use crate::resources::podspec::default_pod_spec;
use crate::rest::scale::ScaleRest;
use crate::rest::status::StatusRest;
use crate::tables::{age, col, container_names_and_images, i, name, wide, TableDef, AGE, NAME};
use crate::validation::dns1123_label_errors;
use k8s_openapi::api::apps::v1::StatefulSet;

/// Spec fields an update may change; the rest are fixed at create.
const MUTABLE: &[&str] = &[
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
];

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["sts"]),
        categories: names(&["all"]),
        subresources: vec![StatusRest::def(), ScaleRest::workload()],
        generation: Generation::Spec,
        behaviour: Arc::new(StatefulSetBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Ready", "Number of the pod with ready state"),
                AGE,
                wide("Containers", "Names of each container in the template."),
                wide(
                    "Images",
                    "Images referenced by each container in the template.",
                ),
            ],
            cells: |o, now| {
                let (names, images) = container_names_and_images(o.pointer("/spec/template/spec"));
                vec![
                    name(o),
                    json!(format!(
                        "{}/{}",
                        i(o, "/status/readyReplicas"),
                        i(o, "/spec/replicas")
                    )),
                    age(o, now),
                    json!(names),
                    json!(images),
                ]
            },
        }),
        ..ResourceDef::of::<StatefulSet>()
    }
}

struct StatefulSetBehaviour;

/// The rules StatefulSets share with ReplicaSets.
const SHARED: WorkloadBehaviour = WorkloadBehaviour(Workload::ReplicaSet);

impl Behaviour for StatefulSetBehaviour {
    fn default(&self, obj: &mut Value) {
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        spec.entry("replicas").or_insert(json!(1));
        spec.entry("podManagementPolicy")
            .or_insert(json!("OrderedReady"));
        spec.entry("revisionHistoryLimit").or_insert(json!(10));
        let strategy = entry(spec, "updateStrategy");
        strategy.entry("type").or_insert(json!("RollingUpdate"));
        if strategy["type"] == "RollingUpdate" {
            entry(strategy, "rollingUpdate")
                .entry("partition")
                .or_insert(json!(0));
        }
        let retention = entry(spec, "persistentVolumeClaimRetentionPolicy");
        retention.entry("whenDeleted").or_insert(json!("Retain"));
        retention.entry("whenScaled").or_insert(json!("Retain"));
        if let Some(claims) = spec
            .get_mut("volumeClaimTemplates")
            .and_then(Value::as_array_mut)
        {
            for claim in claims.iter_mut().filter_map(Value::as_object_mut) {
                entry(claim, "spec")
                    .entry("volumeMode")
                    .or_insert(json!("Filesystem"));
                entry(claim, "status")
                    .entry("phase")
                    .or_insert(json!("Pending"));
            }
        }
        if let Some(template_spec) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
            default_pod_spec(template_spec);
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        SHARED.prepare_for_create(obj);
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = SHARED.validate(&with_claim_volumes(obj));
        let Some(spec) = obj.get("spec") else {
            return causes;
        };
        let policy = spec.get("podManagementPolicy").and_then(Value::as_str);
        if let Some(p) = policy.filter(|p| !["OrderedReady", "Parallel"].contains(p)) {
            causes.push(Cause::unsupported(
                "spec.podManagementPolicy",
                &json!(p),
                &["OrderedReady", "Parallel"],
            ));
        }
        match spec.pointer("/updateStrategy/type").and_then(Value::as_str) {
            Some("RollingUpdate") | None => {
                let partition = spec.pointer("/updateStrategy/rollingUpdate/partition");
                if let Some(p) = partition.and_then(Value::as_i64).filter(|p| *p < 0) {
                    causes.push(Cause::invalid(
                        "spec.updateStrategy.rollingUpdate.partition",
                        &json!(p),
                        "must be greater than or equal to 0",
                    ));
                }
            }
            Some("OnDelete") => {
                if spec.pointer("/updateStrategy/rollingUpdate").is_some() {
                    causes.push(Cause::invalid(
                        "spec.updateStrategy.rollingUpdate",
                        spec.pointer("/updateStrategy/rollingUpdate")
                            .unwrap_or(&Value::Null),
                        "only allowed for updateStrategy 'RollingUpdate'",
                    ));
                }
            }
            Some(other) => causes.push(Cause::unsupported(
                "spec.updateStrategy.type",
                &json!(other),
                &["OnDelete", "RollingUpdate"],
            )),
        }
        for (field, value) in [
            (
                "whenDeleted",
                spec.pointer("/persistentVolumeClaimRetentionPolicy/whenDeleted"),
            ),
            (
                "whenScaled",
                spec.pointer("/persistentVolumeClaimRetentionPolicy/whenScaled"),
            ),
        ] {
            if let Some(v) = value
                .and_then(Value::as_str)
                .filter(|v| !["Retain", "Delete"].contains(v))
            {
                causes.push(Cause::unsupported(
                    format!("spec.persistentVolumeClaimRetentionPolicy.{field}"),
                    &json!(v),
                    &["Retain", "Delete"],
                ));
            }
        }
        if let Some(start) = spec.pointer("/ordinals/start").and_then(Value::as_i64) {
            if start < 0 {
                causes.push(Cause::invalid(
                    "spec.ordinals.start",
                    &json!(start),
                    "must be greater than or equal to 0",
                ));
            }
        }
        let claims = spec.get("volumeClaimTemplates").and_then(Value::as_array);
        let mut claim_names = Vec::new();
        for (k, claim) in claims.into_iter().flatten().enumerate() {
            let field = format!("spec.volumeClaimTemplates[{k}]");
            match claim.pointer("/metadata/name").and_then(Value::as_str) {
                None | Some("") => causes.push(Cause::required(format!("{field}.metadata.name"))),
                Some(n) if claim_names.contains(&n) => causes.push(Cause::duplicate(
                    format!("{field}.metadata.name"),
                    &json!(n),
                )),
                Some(n) => claim_names.push(n),
            }
            let modes = claim.pointer("/spec/accessModes").and_then(Value::as_array);
            if modes.is_none_or(Vec::is_empty) {
                causes.push(Cause::required(format!("{field}.spec.accessModes")));
            }
            if claim.pointer("/spec/resources/requests/storage").is_none() {
                causes.push(Cause::required(format!("{field}.spec.resources[storage]")));
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        let fixed = |o: &Value| -> Map<String, Value> {
            o.get("spec")
                .and_then(Value::as_object)
                .map(|s| {
                    s.iter()
                        .filter(|(k, _)| !MUTABLE.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        if fixed(new) != fixed(old) {
            causes.push(Cause::forbidden(
                "spec",
                "updates to statefulset spec for fields other than 'replicas', 'ordinals', \
                 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and \
                 'minReadySeconds' are forbidden",
            ));
        }
        causes
    }
}

/// `obj` with the volume each claim template gives the pods (the
/// controller adds one of the template's name, in place of a template
/// volume so named): the template's containers may mount them.
fn with_claim_volumes(obj: &Value) -> Value {
    let mut obj = obj.clone();
    let names: Vec<String> = obj
        .pointer("/spec/volumeClaimTemplates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.pointer("/metadata/name").and_then(Value::as_str))
        .filter(|n| !n.is_empty() && dns1123_label_errors(n).is_empty())
        .map(str::to_string)
        .collect();
    let Some(pod_spec) = obj
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    else {
        return obj;
    };
    let Some(volumes) = pod_spec
        .entry("volumes")
        .or_insert_with(|| json!([]))
        .as_array_mut()
    else {
        return obj;
    };
    for name in names {
        if !volumes.iter().any(|v| v["name"] == name.as_str()) {
            volumes.push(json!({"name": name, "persistentVolumeClaim": {"claimName": name}}));
        }
    }
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts() -> Value {
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
               "metadata": {"name": "web", "namespace": "default"},
               "spec": {"serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
                        "volumeClaimTemplates": [{"metadata": {"name": "data"},
                            "spec": {"accessModes": ["ReadWriteOnce"],
                                     "resources": {"requests": {"storage": "1Gi"}}}}]}})
    }

    #[test]
    fn defaults_follow_kubernetes() {
        let mut o = sts();
        StatefulSetBehaviour.default(&mut o);
        assert_eq!(o["spec"]["replicas"], 1);
        assert_eq!(o["spec"]["podManagementPolicy"], "OrderedReady");
        assert_eq!(o["spec"]["revisionHistoryLimit"], 10);
        assert_eq!(
            o["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        );
        assert_eq!(
            o["spec"]["persistentVolumeClaimRetentionPolicy"],
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
        );
        assert_eq!(
            o["spec"]["volumeClaimTemplates"][0]["spec"]["volumeMode"],
            "Filesystem"
        );
        assert!(StatefulSetBehaviour.validate(&o).is_empty());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut o = sts();
        o["spec"]["podManagementPolicy"] = json!("Random");
        o["spec"]["updateStrategy"] =
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": -1}});
        o["spec"]["volumeClaimTemplates"][0]["spec"]
            .as_object_mut()
            .unwrap()
            .remove("accessModes");
        let fields: Vec<String> = StatefulSetBehaviour
            .validate(&o)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.podManagementPolicy",
                "spec.updateStrategy.rollingUpdate.partition",
                "spec.volumeClaimTemplates[0].spec.accessModes"
            ]
        );
    }

    #[test]
    fn containers_mount_the_claim_templates() {
        let mut o = sts();
        o["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "data", "mountPath": "/data"}]);
        StatefulSetBehaviour.default(&mut o);
        assert!(StatefulSetBehaviour.validate(&o).is_empty());
        assert!(o["spec"]["template"]["spec"].get("volumes").is_none());
        // A template volume of the claim's name is replaced, not doubled.
        o["spec"]["template"]["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        assert!(StatefulSetBehaviour.validate(&o).is_empty());
        o["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": "other", "mountPath": "/data"}]);
        let fields: Vec<String> = StatefulSetBehaviour
            .validate(&o)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            ["spec.template.spec.containers[0].volumeMounts[0].name"]
        );
    }

    #[test]
    fn only_kubernetes_mutable_fields_change() {
        let old = sts();
        let mut scaled = old.clone();
        scaled["spec"]["replicas"] = json!(5);
        assert!(StatefulSetBehaviour
            .validate_update(&scaled, &old)
            .is_empty());
        let mut renamed = old.clone();
        renamed["spec"]["serviceName"] = json!("other");
        let causes = StatefulSetBehaviour.validate_update(&renamed, &old);
        assert_eq!(causes.len(), 1);
        assert!(causes[0].message.contains("are forbidden"), "{causes:?}");
    }
}
