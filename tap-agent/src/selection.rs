//! Which pods of this node each policy taps, and what the kernel keeps of
//! their traffic. Policies come from `TapPolicy` resources
//! ([`Policy::from_resource`]) or from a `--policy-file`
//! ([`Policy::from_file`]); both become one [`Policy`] and go through one
//! [`select`], a pure function of the watched objects. Which pods a policy
//! selects, and how its pod-relative directions turn into the host-side
//! veth's, are the shared contract's (`tapestry_proto::crd`); this module
//! adds what only a tap knows (which pods can be tapped at all).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use tapestry_proto::{
    crd::{self, TapPolicySpec},
    policy,
};

use crate::filter::PolicySpec;

pub type Labels = BTreeMap<String, String>;

/// A policy as the agent applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Which pods (namespaces, namespace, pod and node selectors); only
    /// these fields of the spec are read.
    pub scope: TapPolicySpec,
    /// What the kernel keeps, with directions as the host-side veth sees them.
    pub kernel: PolicySpec,
}

impl Policy {
    /// The policy a `TapPolicy` resource asks for: `Ok(None)` when it is
    /// disabled or its capture has stopped; an error names the field.
    pub fn from_resource(p: &crd::TapPolicy) -> Result<Option<Policy>, String> {
        if !p.is_active() {
            return Ok(None);
        }
        if let Some(e) = p.spec.check().into_iter().next() {
            return Err(format!("spec.{e}"));
        }
        Ok(Some(Policy {
            scope: p.spec.clone(),
            kernel: PolicySpec {
                name: p.metadata.name.clone().unwrap_or_default(),
                rules: p.spec.rules.iter().map(|r| r.to_filter_rule()).collect(),
                snaplen: p.spec.snaplen,
            },
        }))
    }

    /// A `--policy-file` entry (validated when the file was read): its
    /// namespace and selector, and rules that are already
    /// interface-relative.
    pub fn from_file(p: &policy::TapPolicy) -> Policy {
        Policy {
            scope: TapPolicySpec {
                namespaces: p.namespace.iter().cloned().collect(),
                pod_selector: p.selector.clone(),
                ..Default::default()
            },
            kernel: PolicySpec {
                name: p.name.clone(),
                rules: p.rules.clone(),
                snaplen: p.snaplen,
            },
        }
    }

    pub fn name(&self) -> &str {
        &self.kernel.name
    }
}

/// What the tap needs of a pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub labels: Labels,
    pub annotations: Labels,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// Shares the node's network: no interface of its own to tap.
    pub host_network: bool,
    /// Being deleted (deletionTimestamp set) or finished: not tapped.
    pub terminating: bool,
}

/// A pod of this node that at least one policy taps.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectedPod {
    pub pod: PodView,
    pub policies: BTreeSet<String>,
}

/// The pods of `node` each policy taps: running pods with a network of
/// their own, in a selected namespace, matching the pod selector, while the
/// node matches the node selector. `namespaces` maps namespace names to
/// their labels; `node_labels` are this node's.
pub fn select(
    policies: &[Policy],
    pods: &[PodView],
    namespaces: &BTreeMap<String, Labels>,
    node: &str,
    node_labels: &Labels,
) -> Vec<SelectedPod> {
    let mut out = Vec::new();
    for pod in pods {
        if pod.node != node || pod.terminating || pod.host_network {
            continue;
        }
        let ns_labels = namespaces.get(&pod.namespace);
        let chosen: BTreeSet<String> = policies
            .iter()
            .filter(|p| {
                p.scope
                    .selects_pod(&pod.namespace, ns_labels, &pod.labels, node_labels)
            })
            .map(|p| p.name().to_string())
            .collect();
        if !chosen.is_empty() {
            out.push(SelectedPod {
                pod: pod.clone(),
                policies: chosen,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tapestry_proto::policy::FilterRule;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resource(name: &str, spec: serde_json::Value) -> crd::TapPolicy {
        crd::TapPolicy::new(name, serde_json::from_value(spec).unwrap())
    }

    fn policy(name: &str, spec: serde_json::Value) -> Policy {
        Policy::from_resource(&resource(name, spec))
            .unwrap()
            .expect("active")
    }

    fn pod(ns: &str, name: &str, app: &str) -> PodView {
        PodView {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            node: "n1".into(),
            labels: labels(&[("app", app)]),
            ips: vec!["10.1.0.5".parse().unwrap()],
            ..Default::default()
        }
    }

    /// Which pods (by name) each policy selects.
    fn chosen(
        policies: &[Policy],
        pods: &[PodView],
        namespaces: &BTreeMap<String, Labels>,
        node_labels: &Labels,
    ) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in select(policies, pods, namespaces, "n1", node_labels) {
            for p in s.policies {
                out.entry(p).or_default().push(s.pod.name.clone());
            }
        }
        out
    }

    #[test]
    fn the_pod_sees_directions_the_other_way_round() {
        // What the pod sends arrives on its host-side veth (ingress), what
        // it receives leaves through it (egress).
        let p = policy(
            "web",
            json!({"rules": [
                {"protocol": "tcp", "ports": ["80"], "direction": "toPod"},
                {"protocol": "udp", "direction": "fromPod"},
                {"protocol": "icmp"}
            ], "snaplen": 96}),
        );
        let rules: Vec<FilterRule> = [
            "proto=tcp,port=80,dir=egress",
            "proto=udp,dir=ingress",
            "proto=icmp,dir=both",
        ]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
        assert_eq!(p.kernel.rules, rules);
        assert_eq!(p.kernel.snaplen, Some(96));
    }

    #[test]
    fn namespaces_by_name_by_label_or_all() {
        let namespaces: BTreeMap<String, Labels> = [
            ("shop".to_string(), labels(&[("team", "a")])),
            ("bank".to_string(), labels(&[("team", "b")])),
            ("misc".to_string(), labels(&[])),
        ]
        .into();
        let pods = [
            pod("shop", "s", "web"),
            pod("bank", "b", "web"),
            pod("misc", "m", "web"),
        ];
        let policies = [
            policy("all", json!({})),
            policy("listed", json!({"namespaces": ["shop", "misc"]})),
            policy(
                "labelled",
                json!({"namespaceSelector": {"matchLabels": {"team": "b"}}}),
            ),
            // A list and a selector add up.
            policy(
                "both",
                json!({"namespaces": ["misc"], "namespaceSelector": {"matchLabels": {"team": "a"}}}),
            ),
        ];
        let got = chosen(&policies, &pods, &namespaces, &Labels::new());
        assert_eq!(got["all"], ["s", "b", "m"]);
        assert_eq!(got["listed"], ["s", "m"]);
        assert_eq!(got["labelled"], ["b"]);
        assert_eq!(got["both"], ["s", "m"]);
        // A namespace not (yet) known matches no label selector.
        let got = chosen(&policies, &pods, &BTreeMap::new(), &Labels::new());
        assert!(!got.contains_key("labelled"));
        assert_eq!(got["both"], ["m"]);
    }

    #[test]
    fn pod_and_node_selectors() {
        let pods = [pod("shop", "w", "web"), pod("shop", "d", "db")];
        let policies = [
            policy(
                "web",
                json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}}),
            ),
            policy(
                "on-edge",
                json!({"nodeSelector": {"matchLabels": {"role": "edge"}}}),
            ),
        ];
        let ns = BTreeMap::new();
        let got = chosen(&policies, &pods, &ns, &labels(&[("role", "core")]));
        assert_eq!(got.len(), 1);
        assert_eq!(got["web"], ["w"]);
        let got = chosen(&policies, &pods, &ns, &labels(&[("role", "edge")]));
        assert_eq!(got["on-edge"], ["w", "d"]);
    }

    #[test]
    fn disabled_and_stopped_policies_select_nothing() {
        assert_eq!(
            Policy::from_resource(&resource("off", json!({"enabled": false}))),
            Ok(None)
        );
        let mut stopped = resource("done", json!({}));
        stopped.status = Some(crd::TapPolicyStatus {
            stopped: Some(crd::Stopped {
                reason: "MaxPackets".into(),
                message: "1000 packets delivered".into(),
                at: "2026-01-01T00:00:00Z".into(),
            }),
            ..Default::default()
        });
        assert_eq!(Policy::from_resource(&stopped), Ok(None));
        assert!(Policy::from_resource(&resource("on", json!({}))).is_ok_and(|p| p.is_some()));
    }

    #[test]
    fn bad_resources_name_the_field() {
        let e = Policy::from_resource(&resource(
            "p",
            json!({"rules": [{}, {"protocol": "icmp", "ports": ["80"]}]}),
        ))
        .unwrap_err();
        assert!(e.starts_with("spec.rules[1].ports"), "{e}");
    }

    #[test]
    fn only_running_pods_with_their_own_network_on_this_node() {
        let mut elsewhere = pod("shop", "elsewhere", "web");
        elsewhere.node = "n2".into();
        let mut leaving = pod("shop", "leaving", "web");
        leaving.terminating = true;
        let mut host = pod("shop", "host", "web");
        host.host_network = true;
        let pods = [pod("shop", "here", "web"), elsewhere, leaving, host];
        let got = chosen(
            &[policy("all", json!({}))],
            &pods,
            &BTreeMap::new(),
            &Labels::new(),
        );
        assert_eq!(got["all"], ["here"]);
    }

    #[test]
    fn file_policies_select_the_same_way() {
        let file: policy::TapPolicy = serde_json::from_value(json!({
            "name": "web", "namespace": "shop", "selector": {"matchLabels": {"app": "web"}},
            "rules": [{"protocol": "tcp", "direction": "ingress"}], "snaplen": 64
        }))
        .unwrap();
        let p = Policy::from_file(&file);
        let pods = [
            pod("shop", "w", "web"),
            pod("shop", "d", "db"),
            pod("other", "o", "web"),
        ];
        let got = chosen(
            std::slice::from_ref(&p),
            &pods,
            &BTreeMap::new(),
            &Labels::new(),
        );
        assert_eq!(got["web"], ["w"]);
        for pod in &pods {
            assert_eq!(
                file.selects(&pod.namespace, &pod.labels),
                got["web"].contains(&pod.name)
            );
        }
        assert_eq!(p.kernel.rules, file.rules);
        assert_eq!(p.kernel.snaplen, Some(64));
    }
}
