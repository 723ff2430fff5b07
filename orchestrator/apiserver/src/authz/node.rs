//! The Node authorizer: what a node (`system:node:NAME` in
//! `system:nodes`) may do, as kube-apiserver's Node authorizer decides it.
//! A node reads the Secrets, ConfigMaps and PersistentVolumeClaims its
//! own pods use and asks for tokens of their ServiceAccounts, nothing
//! else of those kinds; it writes its own Node and Lease only. Which
//! objects its pods use comes from a graph kept from every pod's spec
//! ([`PodGraph`]), which the authorizer follows like the RBAC objects.
//! What the graph does not decide, the `system:node` role's rules do
//! (reading pods, Services, EndpointSlices; writing events). Which pods a
//! node may write (their status, their deletion) is checked against the
//! stored pod by admission ([`crate::rest`]), as NodeRestriction does.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Deserialize;
use tapestry_apimachinery::tokens::User;

use super::{rule_allows, Attributes, Target};

pub use super::bootstrap::NODES;
use tapestry_runtime::csr::NODE_USER_PREFIX;
/// The namespace of node heartbeats.
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// The node a user is, if it is one.
pub fn node_name(user: &User) -> Option<&str> {
    let name = user.name.strip_prefix(NODE_USER_PREFIX)?;
    (!name.is_empty() && user.groups.iter().any(|g| g == NODES)).then_some(name)
}

/// What the Node authorizer says about a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// Not the Node authorizer's call: RBAC decides.
    NoOpinion,
}

/// The kinds of objects a node reaches through its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Used {
    Secret,
    ConfigMap,
    Claim,
    ServiceAccount,
}

impl Used {
    fn of(resource: &str) -> Option<Used> {
        Some(match resource {
            "secrets" => Used::Secret,
            "configmaps" => Used::ConfigMap,
            "persistentvolumeclaims" => Used::Claim,
            "serviceaccounts" => Used::ServiceAccount,
            _ => return None,
        })
    }
}

/// What one pod bound to a node uses.
#[derive(Debug, Default, PartialEq, Eq)]
struct PodUse {
    node: String,
    namespace: String,
    used: HashSet<(Used, String)>,
}

/// Pods (by store key) and, per node, how many of its pods use each
/// object.
#[derive(Default)]
pub struct PodGraph {
    pods: HashMap<String, PodUse>,
    by_node: HashMap<String, HashMap<(Used, String, String), usize>>,
}

impl PodGraph {
    pub fn clear(&mut self) {
        self.pods.clear();
        self.by_node.clear();
    }

    pub fn put(&mut self, key: &str, value: &[u8]) {
        let pod = match serde_json::from_slice::<PodRefs>(value) {
            Ok(pod) => pod.uses(),
            Err(_) => {
                tracing::warn!(key, "unreadable pod, left out of the node graph");
                None
            }
        };
        // Most writes are status reports that change nothing here.
        if pod.is_some() && self.pods.get(key) == pod.as_ref() {
            return;
        }
        self.remove(key);
        let Some(pod) = pod else { return };
        let counts = self.by_node.entry(pod.node.clone()).or_default();
        for (kind, name) in &pod.used {
            *counts
                .entry((*kind, pod.namespace.clone(), name.clone()))
                .or_default() += 1;
        }
        self.pods.insert(key.to_string(), pod);
    }

    pub fn remove(&mut self, key: &str) {
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        let Some(counts) = self.by_node.get_mut(&pod.node) else {
            return;
        };
        for (kind, name) in pod.used {
            let k = (kind, pod.namespace.clone(), name);
            if let Some(n) = counts.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&k);
                }
            }
        }
        if counts.is_empty() {
            self.by_node.remove(&pod.node);
        }
    }

    fn uses(&self, node: &str, kind: Used, namespace: &str, name: &str) -> bool {
        self.by_node.get(node).is_some_and(|counts| {
            counts.contains_key(&(kind, namespace.to_string(), name.to_string()))
        })
    }

    /// The Node authorizer's decision for `node` doing `attrs`.
    pub fn decide(&self, node: &str, attrs: &Attributes) -> Decision {
        let Target::Resource {
            group,
            resource,
            subresource,
            namespace,
            name,
        } = &attrs.target
        else {
            return Decision::NoOpinion;
        };
        let verb = attrs.verb.as_str();
        let core = group.is_empty();
        let allow_if = |ok: bool| if ok { Decision::Allow } else { Decision::Deny };
        if core && subresource.is_empty() {
            if let Some(kind) = Used::of(resource).filter(|k| *k != Used::ServiceAccount) {
                // One named object at a time, and only what its pods use.
                return allow_if(
                    matches!(verb, "get" | "list" | "watch")
                        && !name.is_empty()
                        && self.uses(node, kind, namespace, name),
                );
            }
        }
        if core && resource == "serviceaccounts" && subresource == "token" {
            return allow_if(
                verb == "create" && self.uses(node, Used::ServiceAccount, namespace, name),
            );
        }
        let own_name = name.is_empty() || name == node;
        let restricted = match (core, resource.as_str()) {
            // Another node's object is never this node's to change.
            (true, "nodes") => !matches!(verb, "get" | "list" | "watch") && !own_name,
            // Pods come from the API, never from a node.
            (true, "pods") => verb == "create" && subresource.is_empty(),
            _ if group == "coordination.k8s.io" && resource == "leases" => {
                namespace == LEASE_NAMESPACE && !matches!(verb, "list" | "watch") && !own_name
            }
            _ => false,
        };
        if restricted {
            return Decision::Deny;
        }
        if NODE_RULES.iter().any(|r| rule_allows(r, attrs)) {
            Decision::Allow
        } else {
            Decision::NoOpinion
        }
    }
}

/// The `system:node` role's rules, which apply to every node.
static NODE_RULES: LazyLock<Vec<PolicyRule>> = LazyLock::new(|| {
    super::bootstrap::node_rules()
        .into_iter()
        .filter_map(|r| serde_json::from_value(r).ok())
        .collect()
});

/// The parts of a pod the graph reads, decoded without the rest (pods are
/// written often: every status report passes here).
#[derive(Deserialize)]
struct PodRefs {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    namespace: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Spec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    image_pull_secrets: Vec<Named>,
    volumes: Vec<Volume>,
    init_containers: Vec<Container>,
    containers: Vec<Container>,
    ephemeral_containers: Vec<Container>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Named {
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Volume {
    secret: Option<SecretVolume>,
    config_map: Option<Named>,
    persistent_volume_claim: Option<ClaimVolume>,
    projected: Option<Projected>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct SecretVolume {
    secret_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ClaimVolume {
    claim_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Projected {
    sources: Vec<ProjectedSource>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ProjectedSource {
    secret: Option<Named>,
    config_map: Option<Named>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Container {
    env: Vec<Env>,
    env_from: Vec<EnvFrom>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Env {
    value_from: Option<EnvSource>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct EnvSource {
    secret_key_ref: Option<Named>,
    config_map_key_ref: Option<Named>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct EnvFrom {
    secret_ref: Option<Named>,
    config_map_ref: Option<Named>,
}

impl PodRefs {
    /// What the pod uses, if it is bound to a node.
    fn uses(self) -> Option<PodUse> {
        let spec = self.spec;
        let node = spec.node_name.filter(|n| !n.is_empty())?;
        let mut used = HashSet::new();
        let mut add = |kind: Used, name: Option<String>| {
            if let Some(n) = name.filter(|n| !n.is_empty()) {
                used.insert((kind, n));
            }
        };
        let account = spec
            .service_account_name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        add(Used::ServiceAccount, Some(account));
        for s in spec.image_pull_secrets {
            add(Used::Secret, s.name);
        }
        for v in spec.volumes {
            add(Used::Secret, v.secret.and_then(|s| s.secret_name));
            add(Used::ConfigMap, v.config_map.and_then(|c| c.name));
            add(
                Used::Claim,
                v.persistent_volume_claim.and_then(|c| c.claim_name),
            );
            for source in v.projected.map(|p| p.sources).unwrap_or_default() {
                add(Used::Secret, source.secret.and_then(|s| s.name));
                add(Used::ConfigMap, source.config_map.and_then(|c| c.name));
            }
        }
        let containers = spec
            .init_containers
            .into_iter()
            .chain(spec.containers)
            .chain(spec.ephemeral_containers);
        for c in containers {
            for e in c.env {
                let from = e.value_from.unwrap_or_default();
                add(Used::Secret, from.secret_key_ref.and_then(|r| r.name));
                add(
                    Used::ConfigMap,
                    from.config_map_key_ref.and_then(|r| r.name),
                );
            }
            for e in c.env_from {
                add(Used::Secret, e.secret_ref.and_then(|r| r.name));
                add(Used::ConfigMap, e.config_map_ref.and_then(|r| r.name));
            }
        }
        Some(PodUse {
            node,
            namespace: self.metadata.namespace,
            used,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str) -> User {
        User {
            name: format!("system:node:{name}"),
            uid: String::new(),
            groups: vec![NODES.into(), "system:authenticated".into()],
            ..Default::default()
        }
    }

    fn get(resource: &str, ns: &str, name: &str) -> Attributes {
        Attributes::resource("get", "", resource, "", Some(ns), Some(name))
    }

    fn graph() -> PodGraph {
        let mut g = PodGraph::default();
        let pod = json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"nodeName": "a", "serviceAccountName": "web",
                     "volumes": [{"name": "tls", "secret": {"secretName": "tls"}},
                                 {"name": "p", "projected": {"sources": [{"configMap": {"name": "settings"}}]}}],
                     "containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "db"}}]}]},
        });
        g.put("shop/web", &serde_json::to_vec(&pod).unwrap());
        let pending = json!({"metadata": {"name": "p", "namespace": "shop"},
                             "spec": {"volumes": [{"name": "s", "secret": {"secretName": "pending"}}]}});
        g.put("shop/p", &serde_json::to_vec(&pending).unwrap());
        g
    }

    #[test]
    fn a_node_reads_only_what_its_pods_use() {
        let g = graph();
        assert_eq!(node_name(&node("a")), Some("a"));
        for (res, name) in [
            ("secrets", "tls"),
            ("secrets", "db"),
            ("configmaps", "settings"),
        ] {
            assert_eq!(
                g.decide("a", &get(res, "shop", name)),
                Decision::Allow,
                "{name}"
            );
            assert_eq!(
                g.decide("b", &get(res, "shop", name)),
                Decision::Deny,
                "{name}"
            );
        }
        assert_eq!(
            g.decide("a", &get("secrets", "shop", "pending")),
            Decision::Deny
        );
        assert_eq!(
            g.decide("a", &get("secrets", "other", "tls")),
            Decision::Deny
        );
        let list = Attributes::resource("list", "", "secrets", "", Some("shop"), None);
        assert_eq!(g.decide("a", &list), Decision::Deny);
        let token = |ns: &str, sa: &str| {
            Attributes::resource("create", "", "serviceaccounts", "token", Some(ns), Some(sa))
        };
        assert_eq!(g.decide("a", &token("shop", "web")), Decision::Allow);
        assert_eq!(g.decide("a", &token("shop", "default")), Decision::Deny);
    }

    #[test]
    fn the_graph_forgets_deleted_and_moved_pods() {
        let mut g = graph();
        g.remove("shop/web");
        assert_eq!(
            g.decide("a", &get("secrets", "shop", "tls")),
            Decision::Deny
        );
        assert!(g.by_node.is_empty());
    }

    #[test]
    fn a_node_writes_only_itself() {
        let g = graph();
        let patch = |res: &str, sub: &str, ns: Option<&str>, name: &str| {
            Attributes::resource("patch", "", res, sub, ns, Some(name))
        };
        assert_eq!(
            g.decide("a", &patch("nodes", "status", None, "a")),
            Decision::Allow
        );
        assert_eq!(
            g.decide("a", &patch("nodes", "status", None, "b")),
            Decision::Deny
        );
        assert_eq!(
            g.decide("a", &patch("nodes", "", None, "b")),
            Decision::Deny
        );
        let lease = |name: &str| {
            Attributes::resource(
                "update",
                "coordination.k8s.io",
                "leases",
                "",
                Some(LEASE_NAMESPACE),
                Some(name),
            )
        };
        assert_eq!(g.decide("a", &lease("a")), Decision::Allow);
        assert_eq!(g.decide("a", &lease("b")), Decision::Deny);
        let create_pod = Attributes::resource("create", "", "pods", "", Some("shop"), None);
        assert_eq!(g.decide("a", &create_pod), Decision::Deny);
        let list_pods = Attributes::resource("list", "", "pods", "", None, None);
        assert_eq!(g.decide("a", &list_pods), Decision::Allow);
        let deployments = Attributes::resource("list", "apps", "deployments", "", None, None);
        assert_eq!(g.decide("a", &deployments), Decision::NoOpinion);
    }
}
