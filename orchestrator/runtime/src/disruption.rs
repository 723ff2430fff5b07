//! PodDisruptionBudgets as the API server's eviction and the disruption
//! controller both read them: which pods a budget covers, and whether one
//! more of them may be evicted given the status the controller keeps.

use std::collections::BTreeMap;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use crate::selector::selects;

/// What kube-apiserver answers when a budget has no disruption to spare.
pub const REFUSED: &str = "Cannot evict pod as it would violate the pod's disruption budget.";

/// How long a pod the eviction let go counts as disrupted (not healthy)
/// while it has not gone yet.
pub const DISRUPTION_TIMEOUT_SECS: i64 = 120;

/// Whether `budget` covers a pod with `labels`: in policy/v1 an empty
/// selector covers every pod of the namespace, a missing one none.
pub fn covers(budget: &PodDisruptionBudget, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = budget.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    let empty = selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(|e| e.is_empty());
    empty || selects(selector, labels)
}

/// What an eviction of a pod a budget covers may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead without spending the budget (an unhealthy pod).
    Allow,
    /// Go ahead, and take one disruption from the budget.
    Spend,
    /// Refuse (429): the message says why.
    Refuse(String),
}

/// The verdict for evicting a pod (`healthy`: Ready) that `budget` covers.
pub fn verdict(budget: &PodDisruptionBudget, healthy: bool) -> Verdict {
    let status = budget.status.clone().unwrap_or_default();
    let generation = budget.metadata.generation.unwrap_or(0);
    if status.observed_generation.unwrap_or(0) < generation {
        return Verdict::Refuse(format!(
            "{REFUSED} The disruption budget {} is still being processed by the server.",
            budget.metadata.name.as_deref().unwrap_or_default()
        ));
    }
    if !healthy {
        let policy = budget
            .spec
            .as_ref()
            .and_then(|s| s.unhealthy_pod_eviction_policy.as_deref());
        // An unhealthy pod does not count towards the budget: it may go
        // when the budget is met anyway (IfHealthyBudget) or always.
        if policy == Some("AlwaysAllow")
            || (status.current_healthy >= status.desired_healthy && status.desired_healthy > 0)
        {
            return Verdict::Allow;
        }
    }
    if status.disruptions_allowed <= 0 {
        return Verdict::Refuse(format!(
            "{REFUSED} The disruption budget {} needs {} healthy pods and has {} currently",
            budget.metadata.name.as_deref().unwrap_or_default(),
            status.desired_healthy,
            status.current_healthy
        ));
    }
    Verdict::Spend
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn budget(spec: serde_json::Value, status: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(json!({"metadata": {"name": "web", "generation": 1},
                                      "spec": spec, "status": status}))
        .unwrap()
    }

    #[test]
    fn empty_selectors_cover_the_namespace_missing_ones_nothing() {
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert!(covers(&budget(json!({"selector": {}}), json!({})), &labels));
        assert!(!covers(&budget(json!({}), json!({})), &labels));
        let other = json!({"selector": {"matchLabels": {"app": "db"}}});
        assert!(!covers(&budget(other, json!({})), &labels));
    }

    #[test]
    fn healthy_pods_spend_the_budget_until_it_is_gone() {
        let status = |allowed: i32| {
            json!({"observedGeneration": 1, "disruptionsAllowed": allowed,
                   "currentHealthy": 2, "desiredHealthy": 2, "expectedPods": 2})
        };
        assert_eq!(verdict(&budget(json!({}), status(1)), true), Verdict::Spend);
        let Verdict::Refuse(why) = verdict(&budget(json!({}), status(0)), true) else {
            panic!("allowed");
        };
        assert!(
            why.contains("needs 2 healthy pods and has 2 currently"),
            "{why}"
        );
        // An unhealthy pod goes when the healthy ones meet the budget.
        assert_eq!(
            verdict(&budget(json!({}), status(0)), false),
            Verdict::Allow
        );
        // Not processed yet: refused.
        let stale = json!({"observedGeneration": 0, "disruptionsAllowed": 5});
        assert!(matches!(
            verdict(&budget(json!({}), stale), true),
            Verdict::Refuse(_)
        ));
    }
}
