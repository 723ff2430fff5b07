//! rbac.authorization.k8s.io/v1: Roles, ClusterRoles and their bindings.
//! What they grant is decided by [`crate::authz`]; here they are stored
//! objects with Kubernetes' validation and columns.

use std::sync::Arc;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::{json, Value};

use crate::error::Cause;
use crate::registry::{Behaviour, ResourceDef};
use crate::tables::{age, col, name, s, wide, TableDef, AGE, NAME};
use crate::validation::NameRule;

pub const GROUP: &str = "rbac.authorization.k8s.io";

pub fn resources() -> Vec<ResourceDef> {
    let roles_table = || {
        Arc::new(TableDef {
            columns: vec![NAME, col("Created At", "When the role was created.")],
            cells: |o, _| vec![name(o), json!(s(o, "/metadata/creationTimestamp"))],
        })
    };
    let bindings_table = || {
        Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Role", "The role bound."),
                AGE,
                wide("Users", "Users bound."),
                wide("Groups", "Groups bound."),
                wide("ServiceAccounts", "Service accounts bound."),
            ],
            cells: |o, now| {
                vec![
                    name(o),
                    json!(format!(
                        "{}/{}",
                        s(o, "/roleRef/kind"),
                        s(o, "/roleRef/name")
                    )),
                    age(o, now),
                    json!(subjects_of(o, "User")),
                    json!(subjects_of(o, "Group")),
                    json!(subjects_of(o, "ServiceAccount")),
                ]
            },
        })
    };
    vec![
        ResourceDef {
            name_rule: NameRule::PathSegment,
            behaviour: Arc::new(RoleRules),
            table: roles_table(),
            ..ResourceDef::of::<Role>()
        },
        ResourceDef {
            name_rule: NameRule::PathSegment,
            behaviour: Arc::new(RoleRules),
            table: roles_table(),
            ..ResourceDef::of::<ClusterRole>()
        },
        ResourceDef {
            name_rule: NameRule::PathSegment,
            behaviour: Arc::new(BindingRules { namespaced: true }),
            table: bindings_table(),
            ..ResourceDef::of::<RoleBinding>()
        },
        ResourceDef {
            name_rule: NameRule::PathSegment,
            behaviour: Arc::new(BindingRules { namespaced: false }),
            table: bindings_table(),
            ..ResourceDef::of::<ClusterRoleBinding>()
        },
    ]
}

/// `kubectl get rolebindings -o wide`: the subjects of one kind, as
/// `ns/name` for service accounts.
fn subjects_of(o: &Value, kind: &str) -> String {
    let names: Vec<String> = o
        .get("subjects")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|sub| s(sub, "/kind") == kind)
        .map(|sub| match kind {
            "ServiceAccount" => format!("{}/{}", s(sub, "/namespace"), s(sub, "/name")),
            _ => s(sub, "/name").to_string(),
        })
        .collect();
    names.join(", ")
}

struct RoleRules;

impl Behaviour for RoleRules {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let rules = obj.get("rules").and_then(Value::as_array);
        for (i, rule) in rules.into_iter().flatten().enumerate() {
            let path = format!("rules[{i}]");
            let list = |field: &str| {
                rule.get(field)
                    .and_then(Value::as_array)
                    .is_some_and(|l| !l.is_empty())
            };
            if !list("verbs") {
                causes.push(Cause::required(format!("{path}.verbs")));
            }
            let resource_rule = list("apiGroups") || list("resources") || list("resourceNames");
            if list("nonResourceURLs") {
                if resource_rule {
                    causes.push(Cause::invalid(
                        format!("{path}.nonResourceURLs"),
                        &rule["nonResourceURLs"],
                        "rules cannot apply to both regular resources and non-resource URLs",
                    ));
                }
                if obj
                    .pointer("/metadata/namespace")
                    .is_some_and(|n| !n.is_null())
                {
                    causes.push(Cause::invalid(
                        format!("{path}.nonResourceURLs"),
                        &rule["nonResourceURLs"],
                        "namespaced rules cannot apply to non-resource URLs",
                    ));
                }
            } else {
                if !list("apiGroups") {
                    causes.push(Cause::required(format!("{path}.apiGroups")));
                }
                if !list("resources") {
                    causes.push(Cause::required(format!("{path}.resources")));
                }
            }
        }
        causes
    }
}

struct BindingRules {
    namespaced: bool,
}

const SUBJECT_KINDS: &[&str] = &["ServiceAccount", "User", "Group"];

impl Behaviour for BindingRules {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let kinds: &[&str] = if self.namespaced {
            &["Role", "ClusterRole"]
        } else {
            &["ClusterRole"]
        };
        let kind = s(obj, "/roleRef/kind");
        if !kinds.contains(&kind) {
            causes.push(Cause::unsupported("roleRef.kind", &json!(kind), kinds));
        }
        if s(obj, "/roleRef/apiGroup") != GROUP {
            causes.push(Cause::unsupported(
                "roleRef.apiGroup",
                &json!(s(obj, "/roleRef/apiGroup")),
                &[GROUP],
            ));
        }
        if s(obj, "/roleRef/name").is_empty() {
            causes.push(Cause::required("roleRef.name"));
        }
        let subjects = obj.get("subjects").and_then(Value::as_array);
        for (i, sub) in subjects.into_iter().flatten().enumerate() {
            let path = format!("subjects[{i}]");
            let kind = s(sub, "/kind");
            if !SUBJECT_KINDS.contains(&kind) {
                causes.push(Cause::unsupported(
                    format!("{path}.kind"),
                    &json!(kind),
                    SUBJECT_KINDS,
                ));
            }
            if s(sub, "/name").is_empty() {
                causes.push(Cause::required(format!("{path}.name")));
            }
            if kind == "ServiceAccount" && !self.namespaced && s(sub, "/namespace").is_empty() {
                causes.push(Cause::required(format!("{path}.namespace")));
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        if new.get("roleRef") != old.get("roleRef") {
            causes.push(Cause::invalid(
                "roleRef",
                &new["roleRef"],
                "cannot change roleRef",
            ));
        }
        causes
    }
}
