//! From pods to targets: which host-side veths the policies select.
//!
//! A pod-watching source (kube-rs reflector over the pods of this node)
//! keeps a list of [`PodView`]s and publishes [`targets_for`] of it as the
//! desired [`TargetSet`]; the [`crate::targets::Reconciler`] does the rest.
//! The kubelet records each pod's host-side veth in the annotation
//! [`HOST_VETH_ANNOTATION`].

use std::collections::BTreeMap;

use tapestry_proto::{policy::TapPolicy, tap::v1::PodIdentity};

use crate::{
    filter::PolicySpec,
    targets::{Target, TargetSet},
};

pub const HOST_VETH_ANNOTATION: &str = "tapestry.io/host-veth";

/// What the tap needs of a pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Being deleted (deletionTimestamp set) or finished: not tapped.
    pub terminating: bool,
}

/// The kernel-side view of a list of policies (bit i = policies[i]).
pub fn policy_specs(policies: &[TapPolicy]) -> Vec<PolicySpec> {
    policies
        .iter()
        .map(|p| PolicySpec {
            name: p.name.clone(),
            rules: p.rules.clone(),
            snaplen: p.snaplen,
        })
        .collect()
}

/// The interfaces to tap on `node`: every running pod of the node with a
/// host veth that at least one policy selects.
pub fn targets_for(pods: &[PodView], policies: &[TapPolicy], node: &str) -> TargetSet {
    let mut out = TargetSet::new();
    for pod in pods {
        if pod.node != node || pod.terminating {
            continue;
        }
        let Some(veth) = pod.annotations.get(HOST_VETH_ANNOTATION) else {
            continue;
        };
        let mask = policies
            .iter()
            .enumerate()
            .filter(|(_, p)| p.selects(&pod.namespace, &pod.labels))
            .fold(0u64, |m, (i, _)| m | (1 << i));
        if mask == 0 || veth.is_empty() {
            continue;
        }
        out.insert(
            veth.clone(),
            Target {
                interface: veth.clone(),
                pod: Some(PodIdentity {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                    labels: pod.labels.clone().into_iter().collect(),
                    node: pod.node.clone(),
                }),
                policy_mask: mask,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, app: &str, veth: Option<&str>) -> PodView {
        PodView {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            node: "n1".into(),
            labels: [("app".to_string(), app.to_string())].into(),
            annotations: veth
                .map(|v| [(HOST_VETH_ANNOTATION.to_string(), v.to_string())].into())
                .unwrap_or_default(),
            terminating: false,
        }
    }

    fn policy(json: serde_json::Value) -> TapPolicy {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn selects_pods_of_this_node_by_namespace_and_labels() {
        let policies = [
            policy(
                serde_json::json!({"name": "web", "namespace": "shop", "selector": {"matchLabels": {"app": "web"}}}),
            ),
            policy(serde_json::json!({"name": "all-shop", "namespace": "shop"})),
        ];
        let mut other_node = pod("shop", "w3", "web", Some("veth3"));
        other_node.node = "n2".into();
        let mut leaving = pod("shop", "w4", "web", Some("veth4"));
        leaving.terminating = true;
        let pods = [
            pod("shop", "w1", "web", Some("veth1")),
            pod("shop", "d1", "db", Some("veth2")),
            pod("other", "w2", "web", Some("veth5")),
            pod("shop", "w0", "web", None),
            other_node,
            leaving,
        ];
        let t = targets_for(&pods, &policies, "n1");
        assert_eq!(t.keys().collect::<Vec<_>>(), ["veth1", "veth2"]);
        assert_eq!(t["veth1"].policy_mask, 0b11);
        assert_eq!(t["veth2"].policy_mask, 0b10);
        let id = t["veth1"].pod.as_ref().unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.name.as_str(), id.uid.as_str()),
            ("shop", "w1", "uid-w1")
        );
        assert_eq!(id.labels["app"], "web");
        // A pod created later appears; a deleted one disappears.
        let mut more = pods.to_vec();
        more.push(pod("shop", "w9", "web", Some("veth9")));
        more.remove(0);
        let t = targets_for(&more, &policies, "n1");
        assert_eq!(t.keys().collect::<Vec<_>>(), ["veth2", "veth9"]);
    }
}
