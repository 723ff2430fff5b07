//! Label selectors as workloads, services and aggregated roles use them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `selector` selects `labels` (an empty selector selects nothing,
/// as for workloads).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml = selector.match_labels.as_ref();
    let me = selector.match_expressions.as_ref();
    if ml.is_none_or(|m| m.is_empty()) && me.is_none_or(|m| m.is_empty()) {
        return false;
    }
    if let Some(ml) = ml {
        if ml.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            return false;
        }
    }
    for e in me.into_iter().flatten() {
        let values = e.values.as_deref().unwrap_or(&[]);
        let got = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => got.is_some_and(|g| values.contains(g)),
            "NotIn" => got.is_none_or(|g| !values.contains(g)),
            "Exists" => got.is_some(),
            "DoesNotExist" => got.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Whether a node selector term (of a node affinity, a pod's or a
/// PersistentVolume's) selects `node`: every expression on its labels and
/// every field (`metadata.name`) requirement holds; an empty term selects
/// nothing.
pub fn node_selector_term_matches(
    term: &k8s_openapi::api::core::v1::NodeSelectorTerm,
    node: &k8s_openapi::api::core::v1::Node,
) -> bool {
    let labels = node.metadata.labels.as_ref();
    let name = node.metadata.name.clone().unwrap_or_default();
    let exprs = term.match_expressions.as_deref().unwrap_or(&[]);
    let fields = term.match_fields.as_deref().unwrap_or(&[]);
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.and_then(|l| l.get(&r.key))))
        && fields.iter().all(|r| {
            let v = (r.key == "metadata.name").then_some(&name);
            requirement_matches(r, v)
        })
}

/// Whether a required node selector (any of its terms) selects `node`.
pub fn node_selector_matches(
    selector: &k8s_openapi::api::core::v1::NodeSelector,
    node: &k8s_openapi::api::core::v1::Node,
) -> bool {
    selector
        .node_selector_terms
        .iter()
        .any(|t| node_selector_term_matches(t, node))
}

fn requirement_matches(
    r: &k8s_openapi::api::core::v1::NodeSelectorRequirement,
    value: Option<&String>,
) -> bool {
    let values = r.values.as_deref().unwrap_or(&[]);
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}
