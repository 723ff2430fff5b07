//! policy/v1 PodDisruptionBudgets: how many of a set of pods must stay
//! healthy while pods are evicted. The disruption controller keeps their
//! status (healthy pods, disruptions allowed); pods/eviction spends it.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::Cause;
use crate::registry::{names, Behaviour, Generation, ResourceDef};
use crate::rest::status::StatusRest;
use crate::selectors::validate_selector;
use crate::tables::{age, col, i, name, TableDef, AGE, NAME};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["pdb"]),
        subresources: vec![StatusRest::def()],
        generation: Generation::Spec,
        behaviour: Arc::new(BudgetBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col(
                    "Min Available",
                    "The minimum number of pods that must be available.",
                ),
                col(
                    "Max Unavailable",
                    "The maximum number of pods that may be unavailable.",
                ),
                col(
                    "Allowed Disruptions",
                    "Calculated number of pods that may be disrupted at this time.",
                ),
                AGE,
            ],
            cells: |o, now| {
                let shown = |pointer: &str| match o.pointer(pointer) {
                    Some(Value::String(s)) => json!(s),
                    Some(Value::Number(n)) => json!(n.to_string()),
                    _ => json!("N/A"),
                };
                vec![
                    name(o),
                    shown("/spec/minAvailable"),
                    shown("/spec/maxUnavailable"),
                    json!(i(o, "/status/disruptionsAllowed")),
                    age(o, now),
                ]
            },
        }),
        ..ResourceDef::of::<PodDisruptionBudget>()
    }
}

struct BudgetBehaviour;

/// A count or a percentage of at most 100%, as minAvailable and
/// maxUnavailable take them.
fn validate_int_or_percent(field: &str, v: &Value) -> Option<Cause> {
    match v {
        Value::Number(n) if n.as_i64().is_some_and(|n| n >= 0) => None,
        Value::Number(n) => Some(Cause::invalid(
            field,
            &json!(n),
            "must be greater than or equal to 0",
        )),
        Value::String(s) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(p) if (0..=100).contains(&p) => None,
            Some(p) if p < 0 => Some(Cause::invalid(
                field,
                v,
                "must be greater than or equal to 0",
            )),
            Some(_) => Some(Cause::invalid(field, v, "must not be greater than 100%")),
            None => Some(Cause::invalid(
                field,
                v,
                "a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')",
            )),
        },
        other => Some(Cause::invalid(field, other, "must be an integer or percentage (e.g '5%')")),
    }
}

impl Behaviour for BudgetBehaviour {
    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({"disruptionsAllowed": 0, "currentHealthy": 0,
                               "desiredHealthy": 0, "expectedPods": 0});
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        let min = spec.get("minAvailable").filter(|v| !v.is_null());
        let max = spec.get("maxUnavailable").filter(|v| !v.is_null());
        if min.is_some() && max.is_some() {
            causes.push(Cause::invalid(
                "spec",
                &spec,
                "minAvailable and maxUnavailable cannot be both set",
            ));
        }
        if let Some(c) = min.and_then(|v| validate_int_or_percent("spec.minAvailable", v)) {
            causes.push(c);
        }
        if let Some(c) = max.and_then(|v| validate_int_or_percent("spec.maxUnavailable", v)) {
            causes.push(c);
        }
        let policy = spec
            .get("unhealthyPodEvictionPolicy")
            .and_then(Value::as_str);
        if let Some(p) = policy.filter(|p| !["IfHealthyBudget", "AlwaysAllow"].contains(p)) {
            causes.push(Cause::unsupported(
                "spec.unhealthyPodEvictionPolicy",
                &json!(p),
                &["AlwaysAllow", "IfHealthyBudget"],
            ));
        }
        validate_selector(spec.get("selector"), "spec.selector", &mut causes);
        causes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(spec: Value) -> Vec<String> {
        BudgetBehaviour
            .validate(&json!({"spec": spec}))
            .into_iter()
            .map(|c| c.field)
            .collect()
    }

    #[test]
    fn budgets_are_validated_as_kubernetes_does() {
        assert!(
            fields(json!({"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}))
                .is_empty()
        );
        assert!(fields(json!({"maxUnavailable": "25%"})).is_empty());
        assert_eq!(
            fields(json!({"minAvailable": 1, "maxUnavailable": 1})),
            ["spec"]
        );
        assert_eq!(fields(json!({"minAvailable": -1})), ["spec.minAvailable"]);
        assert_eq!(
            fields(json!({"maxUnavailable": "120%"})),
            ["spec.maxUnavailable"]
        );
        assert_eq!(
            fields(json!({"maxUnavailable": "half"})),
            ["spec.maxUnavailable"]
        );
        assert_eq!(
            fields(json!({"unhealthyPodEvictionPolicy": "Never"})),
            ["spec.unhealthyPodEvictionPolicy"]
        );
        assert_eq!(
            fields(json!({"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}})),
            ["spec.selector.matchExpressions[0].values"]
        );
    }
}
