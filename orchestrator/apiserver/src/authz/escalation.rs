//! Escalation prevention, as kube-apiserver's RBAC registry does it: a
//! Role or ClusterRole may only be written by someone who holds every
//! rule it grants (or may `escalate` roles), and a binding only by
//! someone who holds every rule of the role it binds (or may `bind`
//! that role). Otherwise a user allowed to write RBAC objects could grant
//! themselves anything.

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::Value;
use tapestry_apimachinery::tokens::User;

use super::{full_resource, qualified_resource, rule_allows, Attributes, Authorizer, Target};
use crate::error::{ApiError, ApiResult};
use crate::registry::ResourceDef;
use crate::resources::rbac::GROUP;

pub fn check(authz: &Authorizer, user: &User, def: &ResourceDef, obj: &Value) -> ApiResult<()> {
    if def.group != GROUP {
        return Ok(());
    }
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ns = (!namespace.is_empty()).then_some(namespace);
    let (rules, waiver, what) = match def.plural.as_str() {
        "roles" | "clusterroles" => {
            let rules: Vec<PolicyRule> =
                serde_json::from_value(obj.get("rules").cloned().unwrap_or(Value::Null))
                    .unwrap_or_default();
            let escalate = Attributes::resource("escalate", GROUP, &def.plural, "", ns, Some(name));
            (rules, escalate, format!("{} {name:?}", def.kind))
        }
        "rolebindings" | "clusterrolebindings" => {
            let kind = obj
                .pointer("/roleRef/kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let role = obj
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let plural = if kind == "Role" {
                "roles"
            } else {
                "clusterroles"
            };
            let bind = Attributes::resource("bind", GROUP, plural, "", ns, Some(role));
            // A binding to a role that does not exist yet grants nothing
            // until it does; then its rules are what the writer must hold.
            let rules = authz.role_rules(kind, role, namespace).unwrap_or_default();
            (rules, bind, format!("{kind} {role:?}"))
        }
        _ => return Ok(()),
    };
    if authz.allows(user, &waiver) {
        return Ok(());
    }
    let held = authz.rules_for(user, namespace);
    let missing: Vec<String> = rules
        .iter()
        .flat_map(atoms)
        .filter(|a| !held.iter().any(|h| rule_allows(h, a)))
        .map(|a| describe(&a))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
    let more = missing.len().saturating_sub(shown.len());
    Err(ApiError::Forbidden(format!(
        "{} {name:?} is forbidden: user \"{}\" is attempting to grant RBAC permissions not currently held (through {what}): {}{}",
        def.plural,
        user.name,
        shown.join("; "),
        if more > 0 { format!("; and {more} more") } else { String::new() },
    )))
}

/// One rule broken into single (verb, group, resource, name) grants, each
/// of which the writer must hold; a `*` must be held as `*`.
fn atoms(rule: &PolicyRule) -> Vec<Attributes> {
    let mut out = Vec::new();
    for verb in &rule.verbs {
        for url in rule.non_resource_urls.iter().flatten() {
            out.push(Attributes {
                verb: verb.clone(),
                target: Target::NonResource { path: url.clone() },
            });
        }
        let names: Vec<Option<&str>> = match rule.resource_names.as_deref() {
            Some(n) if !n.is_empty() => n.iter().map(|n| Some(n.as_str())).collect(),
            _ => vec![None],
        };
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                let (res, sub) = resource.split_once('/').unwrap_or((resource, ""));
                for name in &names {
                    out.push(Attributes::resource(verb, group, res, sub, None, *name));
                }
            }
        }
    }
    out
}

fn describe(a: &Attributes) -> String {
    match &a.target {
        Target::NonResource { path } => format!("{} {path}", a.verb),
        Target::Resource {
            group,
            resource,
            subresource,
            name,
            ..
        } => {
            let mut r = qualified_resource(&full_resource(resource, subresource), group);
            if !name.is_empty() {
                r = format!("{r} {name:?}");
            }
            format!("{} {r}", a.verb)
        }
    }
}
