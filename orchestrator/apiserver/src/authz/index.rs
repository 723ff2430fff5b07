//! The roles, bindings and pods an [`super::Authorizer`] decides from.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use serde::de::DeserializeOwned;
use tapestry_apimachinery::tokens::User;
use tapestry_runtime::selector::selects;

use super::node::PodGraph;
use super::{rule_allows, Attributes, Target};

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    ClusterRole,
    Role,
    ClusterRoleBinding,
    RoleBinding,
    /// Pods, for the Node authorizer's graph.
    Pod,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::ClusterRole,
        Kind::Role,
        Kind::ClusterRoleBinding,
        Kind::RoleBinding,
        Kind::Pod,
    ];

    pub fn plural(self) -> &'static str {
        match self {
            Kind::ClusterRole => "clusterroles",
            Kind::Role => "roles",
            Kind::ClusterRoleBinding => "clusterrolebindings",
            Kind::RoleBinding => "rolebindings",
            Kind::Pod => "pods",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            Kind::Pod => "",
            _ => crate::resources::rbac::GROUP,
        }
    }
}

/// A binding as decisions use it.
struct Binding {
    role: RoleRef,
    subjects: Vec<Subject>,
}

/// Store keys below each kind's prefix (`NAME`, or `NAMESPACE/NAME`) to
/// what they hold.
#[derive(Default)]
pub struct Index {
    cluster_roles: BTreeMap<String, ClusterRole>,
    /// Each ClusterRole's own rules plus those it aggregates.
    effective: HashMap<String, Arc<Vec<PolicyRule>>>,
    roles: HashMap<(String, String), Arc<Vec<PolicyRule>>>,
    cluster_bindings: BTreeMap<String, Binding>,
    /// Namespace → binding name → binding.
    bindings: HashMap<String, BTreeMap<String, Binding>>,
    /// What each node's pods use.
    pub graph: PodGraph,
}

fn parse<T: DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    serde_json::from_slice(value)
        .inspect_err(|e| tracing::warn!(key, "unreadable RBAC object, ignored: {e}"))
        .ok()
}

fn split(key: &str) -> (String, String) {
    match key.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (String::new(), key.to_string()),
    }
}

impl Index {
    pub fn clear(&mut self, kind: Kind) {
        match kind {
            Kind::ClusterRole => self.cluster_roles.clear(),
            Kind::Role => self.roles.clear(),
            Kind::ClusterRoleBinding => self.cluster_bindings.clear(),
            Kind::RoleBinding => self.bindings.clear(),
            Kind::Pod => self.graph.clear(),
        }
    }

    pub fn put(&mut self, kind: Kind, key: &str, value: &[u8]) {
        match kind {
            Kind::ClusterRole => {
                if let Some(r) = parse::<ClusterRole>(key, value) {
                    self.cluster_roles.insert(key.to_string(), r);
                }
            }
            Kind::Role => {
                if let Some(r) = parse::<Role>(key, value) {
                    self.roles
                        .insert(split(key), Arc::new(r.rules.unwrap_or_default()));
                }
            }
            Kind::ClusterRoleBinding => {
                if let Some(b) = parse::<ClusterRoleBinding>(key, value) {
                    let binding = Binding {
                        role: b.role_ref,
                        subjects: b.subjects.unwrap_or_default(),
                    };
                    self.cluster_bindings.insert(key.to_string(), binding);
                }
            }
            Kind::RoleBinding => {
                if let Some(b) = parse::<RoleBinding>(key, value) {
                    let (ns, name) = split(key);
                    let binding = Binding {
                        role: b.role_ref,
                        subjects: b.subjects.unwrap_or_default(),
                    };
                    self.bindings.entry(ns).or_default().insert(name, binding);
                }
            }
            Kind::Pod => self.graph.put(key, value),
        }
    }

    pub fn remove(&mut self, kind: Kind, key: &str) {
        match kind {
            Kind::ClusterRole => {
                self.cluster_roles.remove(key);
            }
            Kind::Role => {
                self.roles.remove(&split(key));
            }
            Kind::ClusterRoleBinding => {
                self.cluster_bindings.remove(key);
            }
            Kind::RoleBinding => {
                let (ns, name) = split(key);
                if let Some(b) = self.bindings.get_mut(&ns) {
                    b.remove(&name);
                    if b.is_empty() {
                        self.bindings.remove(&ns);
                    }
                }
            }
            Kind::Pod => self.graph.remove(key),
        }
    }

    /// Recompute what depends on other objects of `kind` (aggregation).
    pub fn settle(&mut self, kind: Kind) {
        if !matches!(kind, Kind::ClusterRole) {
            return;
        }
        let mut effective = HashMap::with_capacity(self.cluster_roles.len());
        for (name, role) in &self.cluster_roles {
            let mut rules = role.rules.clone().unwrap_or_default();
            let selectors = role
                .aggregation_rule
                .as_ref()
                .and_then(|a| a.cluster_role_selectors.as_ref());
            for selector in selectors.into_iter().flatten() {
                for (other_name, other) in &self.cluster_roles {
                    let labels = other.metadata.labels.clone().unwrap_or_default();
                    if other_name != name && selects(selector, &labels) {
                        rules.extend(other.rules.clone().unwrap_or_default());
                    }
                }
            }
            effective.insert(name.clone(), Arc::new(rules));
        }
        self.effective = effective;
    }

    pub fn role_rules(&self, kind: &str, name: &str, namespace: &str) -> Option<Vec<PolicyRule>> {
        let rules = match kind {
            "ClusterRole" => self.effective.get(name)?,
            "Role" => self.roles.get(&(namespace.to_string(), name.to_string()))?,
            _ => return None,
        };
        Some(rules.as_ref().clone())
    }

    fn rules_of(&self, role: &RoleRef, namespace: &str) -> Option<&Arc<Vec<PolicyRule>>> {
        match role.kind.as_str() {
            "ClusterRole" => self.effective.get(&role.name),
            "Role" => self.roles.get(&(namespace.to_string(), role.name.clone())),
            _ => None,
        }
    }

    /// The bindings that apply in `namespace` ("" for cluster-wide only),
    /// each with the namespace its Roles and service accounts live in.
    fn bindings_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = (&'a Binding, &'a str)> {
        let local = self
            .bindings
            .get_key_value(namespace)
            .into_iter()
            .flat_map(|(ns, b)| b.values().map(move |b| (b, ns.as_str())));
        self.cluster_bindings.values().map(|b| (b, "")).chain(local)
    }

    pub fn allows(&self, user: &User, attrs: &Attributes) -> bool {
        let namespace = match &attrs.target {
            Target::Resource { namespace, .. } => namespace.as_str(),
            Target::NonResource { .. } => "",
        };
        self.bindings_in(namespace).any(|(b, ns)| {
            binds(b, ns, user)
                && self
                    .rules_of(&b.role, ns)
                    .is_some_and(|rules| rules.iter().any(|r| rule_allows(r, attrs)))
        })
    }

    pub fn rules_for(&self, user: &User, namespace: &str) -> Vec<PolicyRule> {
        self.bindings_in(namespace)
            .filter(|(b, ns)| binds(b, ns, user))
            .filter_map(|(b, ns)| self.rules_of(&b.role, ns))
            .flat_map(|rules| rules.iter().cloned())
            .collect()
    }
}

/// Whether a binding (in namespace `ns`, "" for cluster bindings) names
/// the user.
fn binds(b: &Binding, ns: &str, user: &User) -> bool {
    b.subjects.iter().any(|s| match s.kind.as_str() {
        "User" => s.name == user.name,
        "Group" => user.groups.contains(&s.name),
        "ServiceAccount" => {
            let sa_ns = s
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(ns);
            user.name
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
                == Some((sa_ns, s.name.as_str()))
        }
        _ => false,
    })
}
