//! networking.k8s.io/v1 IngressClasses: which controller serves an
//! Ingress. Cluster-scoped; `spec.controller` is required and immutable.

use std::sync::Arc;

use k8s_openapi::api::networking::v1::IngressClass;
use serde_json::{json, Value};

use crate::error::Cause;
use crate::registry::{Behaviour, ResourceDef};
use crate::tables::{age, col, name, s, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        behaviour: Arc::new(IngressClassBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col(
                    "Controller",
                    "Controller that is responsible for handling this class",
                ),
                col(
                    "Parameters",
                    "A reference to a resource with additional parameters",
                ),
                AGE,
            ],
            cells: |o, now| {
                vec![
                    name(o),
                    json!(s(o, "/spec/controller")),
                    json!(parameters(o)),
                    age(o, now),
                ]
            },
        }),
        ..ResourceDef::of::<IngressClass>()
    }
}

/// kubectl's PARAMETERS: `Kind[.apiGroup]/name`, or `<none>`.
fn parameters(o: &Value) -> String {
    let Some(p) = o.pointer("/spec/parameters").filter(|p| !p.is_null()) else {
        return "<none>".into();
    };
    let mut shown = s(p, "/kind").to_string();
    if let Some(g) = p.get("apiGroup").and_then(Value::as_str) {
        shown = format!("{shown}.{g}");
    }
    format!("{shown}/{}", s(p, "/name"))
}

struct IngressClassBehaviour;

impl Behaviour for IngressClassBehaviour {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let controller = s(obj, "/spec/controller");
        if controller.is_empty() {
            causes.push(Cause::required("spec.controller"));
        } else if controller.len() > 250 {
            causes.push(Cause::too_long("spec.controller", 250));
        }
        if let Some(p) = obj.pointer("/spec/parameters").filter(|p| !p.is_null()) {
            if s(p, "/kind").is_empty() {
                causes.push(Cause::required("spec.parameters.kind"));
            }
            if s(p, "/name").is_empty() {
                causes.push(Cause::required("spec.parameters.name"));
            }
            match p.get("scope").and_then(Value::as_str) {
                None | Some("Cluster") => {
                    if p.get("namespace").and_then(Value::as_str).is_some() {
                        causes.push(Cause::forbidden(
                            "spec.parameters.namespace",
                            "`parameters.scope` is set to 'Cluster'",
                        ));
                    }
                }
                Some("Namespace") => {
                    if s(p, "/namespace").is_empty() {
                        causes.push(Cause::required_because(
                            "spec.parameters.namespace",
                            "`parameters.scope` is set to 'Namespace'",
                        ));
                    }
                }
                Some(other) => causes.push(Cause::unsupported(
                    "spec.parameters.scope",
                    &json!(other),
                    &["Cluster", "Namespace"],
                )),
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        if s(new, "/spec/controller") != s(old, "/spec/controller") {
            causes.push(Cause::invalid(
                "spec.controller",
                &json!(s(new, "/spec/controller")),
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
    fn classes_need_a_controller_they_keep() {
        let b = IngressClassBehaviour;
        assert!(b
            .validate(&json!({"spec": {"controller": "example.com/ingress"}}))
            .is_empty());
        assert_eq!(b.validate(&json!({"spec": {}}))[0].field, "spec.controller");
        let old = json!({"spec": {"controller": "a/b"}});
        let new = json!({"spec": {"controller": "a/c"}});
        assert_eq!(b.validate_update(&new, &old)[0].field, "spec.controller");
        assert_eq!(
            parameters(
                &json!({"spec": {"parameters": {"kind": "Params", "apiGroup": "k8s.example.com", "name": "p"}}})
            ),
            "Params.k8s.example.com/p"
        );
    }
}
