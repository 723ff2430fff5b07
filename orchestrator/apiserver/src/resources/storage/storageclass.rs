//! storage.k8s.io/v1 StorageClasses: defaults (reclaim policy Delete,
//! binding mode Immediate), validation, a provisioner and parameters that
//! never change, and kubectl's columns with `(default)` after the name of
//! the default class.

use std::sync::Arc;

use k8s_openapi::api::storage::v1::StorageClass;
use serde_json::{json, Value};
use tapestry_apimachinery::validation::qualified_name_errors;

use crate::error::Cause;
use crate::registry::{names, Behaviour, ResourceDef};
use crate::tables::{age, col, s, TableDef, AGE, NAME};

/// The annotation that makes a class the default one.
pub const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";
/// The same, as Kubernetes' beta releases spelled it (still honoured).
pub const BETA_DEFAULT_CLASS_ANNOTATION: &str = "storageclass.beta.kubernetes.io/is-default-class";

const MAX_PARAMETERS: usize = 512;
const MAX_PARAMETERS_BYTES: usize = 256 * 1024;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["sc"]),
        behaviour: Arc::new(StorageClassBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Provisioner", "Indicates the type of the provisioner."),
                col(
                    "ReclaimPolicy",
                    "Dynamically provisioned PersistentVolumes of this storage class are created with this reclaimPolicy. Defaults to Delete.",
                ),
                col(
                    "VolumeBindingMode",
                    "VolumeBindingMode indicates how PersistentVolumeClaims should be provisioned and bound. When unset, VolumeBindingImmediate is used.",
                ),
                col(
                    "AllowVolumeExpansion",
                    "AllowVolumeExpansion shows whether the storage class allow volume expand.",
                ),
                AGE,
            ],
            cells: |o, now| {
                let mut name = s(o, "/metadata/name").to_string();
                if is_default_class(o) {
                    name.push_str(" (default)");
                }
                vec![
                    json!(name),
                    json!(s(o, "/provisioner")),
                    json!(or(s(o, "/reclaimPolicy"), "Delete")),
                    json!(or(s(o, "/volumeBindingMode"), "Immediate")),
                    json!(o
                        .get("allowVolumeExpansion")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)),
                    age(o, now),
                ]
            },
        }),
        ..ResourceDef::of::<StorageClass>()
    }
}

fn or<'a>(v: &'a str, default: &'a str) -> &'a str {
    if v.is_empty() {
        default
    } else {
        v
    }
}

/// Whether `class` is annotated as the default class.
pub fn is_default_class(class: &Value) -> bool {
    [DEFAULT_CLASS_ANNOTATION, BETA_DEFAULT_CLASS_ANNOTATION]
        .iter()
        .any(|a| {
            class
                .pointer("/metadata/annotations")
                .and_then(|m| m.get(*a))
                .and_then(Value::as_str)
                == Some("true")
        })
}

struct StorageClassBehaviour;

impl Behaviour for StorageClassBehaviour {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    fn default(&self, obj: &mut Value) {
        let Some(m) = obj.as_object_mut() else { return };
        m.entry("reclaimPolicy").or_insert_with(|| json!("Delete"));
        m.entry("volumeBindingMode")
            .or_insert_with(|| json!("Immediate"));
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let provisioner = obj.get("provisioner").and_then(Value::as_str);
        match provisioner {
            None | Some("") => causes.push(Cause::required("provisioner")),
            Some(p) => {
                for e in qualified_name_errors(p) {
                    causes.push(Cause::invalid("provisioner", &json!(p), e));
                }
            }
        }
        if let Some(params) = obj.get("parameters").and_then(Value::as_object) {
            if params.len() > MAX_PARAMETERS {
                causes.push(Cause::too_many(
                    "parameters",
                    params.len(),
                    MAX_PARAMETERS,
                    "parameters",
                ));
            }
            let mut size = 0;
            for (k, v) in params {
                if k.is_empty() {
                    causes.push(Cause::invalid(
                        "parameters",
                        &json!(k),
                        "empty parameter names are not allowed",
                    ));
                }
                size += k.len() + v.as_str().map_or(0, str::len);
            }
            if size > MAX_PARAMETERS_BYTES {
                causes.push(Cause::too_long("parameters", MAX_PARAMETERS_BYTES));
            }
        }
        if let Some(p) = obj.get("reclaimPolicy").filter(|v| !v.is_null()) {
            if !matches!(p.as_str(), Some("Delete" | "Retain")) {
                causes.push(Cause::unsupported(
                    "reclaimPolicy",
                    p,
                    &["Delete", "Retain"],
                ));
            }
        }
        if let Some(m) = obj.get("volumeBindingMode").filter(|v| !v.is_null()) {
            if !matches!(m.as_str(), Some("Immediate" | "WaitForFirstConsumer")) {
                causes.push(Cause::unsupported(
                    "volumeBindingMode",
                    m,
                    &["Immediate", "WaitForFirstConsumer"],
                ));
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        let same = |field: &str| new.get(field) == old.get(field);
        let empty_params = |o: &Value| {
            o.get("parameters")
                .and_then(Value::as_object)
                .is_none_or(|m| m.is_empty())
        };
        if !(same("parameters") || empty_params(new) && empty_params(old)) {
            causes.push(Cause::forbidden(
                "parameters",
                "updates to parameters are forbidden.",
            ));
        }
        if !same("provisioner") {
            causes.push(Cause::forbidden(
                "provisioner",
                "updates to provisioner are forbidden.",
            ));
        }
        if !same("reclaimPolicy") {
            causes.push(Cause::forbidden(
                "reclaimPolicy",
                "updates to reclaimPolicy are forbidden.",
            ));
        }
        if !same("volumeBindingMode") {
            causes.push(Cause::invalid(
                "volumeBindingMode",
                new.get("volumeBindingMode").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        causes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(c: Vec<Cause>) -> Vec<String> {
        c.into_iter().map(|c| c.field).collect()
    }

    #[test]
    fn defaults_and_required_provisioner() {
        let b = StorageClassBehaviour;
        let mut sc = json!({"metadata": {"name": "fast"}});
        b.default(&mut sc);
        assert_eq!(sc["reclaimPolicy"], "Delete");
        assert_eq!(sc["volumeBindingMode"], "Immediate");
        assert_eq!(fields(b.validate(&sc)), ["provisioner"]);
        sc["provisioner"] = json!("example.com/disk");
        sc["reclaimPolicy"] = json!("Recycle");
        assert_eq!(fields(b.validate(&sc)), ["reclaimPolicy"]);
    }

    #[test]
    fn provisioner_and_parameters_never_change() {
        let b = StorageClassBehaviour;
        let old = json!({"provisioner": "a.io/x", "parameters": {"k": "v"},
            "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"});
        let mut new = old.clone();
        new["allowVolumeExpansion"] = json!(true);
        assert!(b.validate_update(&new, &old).is_empty());
        new["provisioner"] = json!("b.io/y");
        new["parameters"] = json!({"k": "w"});
        assert_eq!(
            fields(b.validate_update(&new, &old)),
            ["parameters", "provisioner"]
        );
    }

    #[test]
    fn the_default_class_is_marked_in_its_name() {
        let sc = json!({"metadata": {"name": "local-path", "creationTimestamp": "2024-01-01T00:00:00Z",
            "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
            "provisioner": "tapestry.io/local-path", "reclaimPolicy": "Delete",
            "volumeBindingMode": "WaitForFirstConsumer"});
        let cells = (definition().table).cells(&sc, chrono::Utc::now());
        assert_eq!(cells[0], "local-path (default)");
        assert_eq!(cells[3], "WaitForFirstConsumer");
        assert_eq!(cells[4], false);
    }
}
