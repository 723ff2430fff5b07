//! Authorization: every authenticated request is checked against the
//! stored Roles, ClusterRoles and their bindings, as kube-apiserver's RBAC
//! authorizer does. Members of `system:masters` may do anything (they can
//! always repair RBAC); everyone else gets what some binding grants them
//! and nothing more.
//!
//! Nodes are first put to the Node authorizer ([`node`]), which decides
//! what their pods need.
//!
//! The rules live in memory ([`Index`]), loaded before the server takes
//! requests and kept current by a watch of each of the four kinds, so a
//! decision reads no store. ClusterRoles with an `aggregationRule` grant
//! their own rules plus those of every ClusterRole their selectors pick.

pub mod bootstrap;
pub mod escalation;
mod index;
pub mod node;
pub mod review;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::rbac::v1::PolicyRule;
use tapestry_apimachinery::tokens::User;
use tapestry_store::{EventKind, ListOptions};
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};
use crate::registry::ResourceDef;
use crate::rest::Api;

pub use index::Index;
use index::Kind;

/// The group whose members are never refused.
pub const MASTERS: &str = "system:masters";
/// Every authenticated user is in this group.
pub const AUTHENTICATED: &str = "system:authenticated";

/// What a request does, in the terms roles grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, `impersonate`, `bind`, `escalate`, ...; for
    /// non-resource URLs the lowercase HTTP method.
    pub verb: String,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Resource {
        group: String,
        resource: String,
        subresource: String,
        namespace: String,
        name: String,
    },
    NonResource {
        path: String,
    },
}

impl Attributes {
    pub fn resource(
        verb: &str,
        group: &str,
        resource: &str,
        subresource: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Attributes {
        Attributes {
            verb: verb.to_string(),
            target: Target::Resource {
                group: group.to_string(),
                resource: resource.to_string(),
                subresource: subresource.to_string(),
                namespace: namespace.unwrap_or_default().to_string(),
                name: name.unwrap_or_default().to_string(),
            },
        }
    }

    pub fn non_resource(method: &http::Method, path: &str) -> Attributes {
        Attributes {
            verb: method.as_str().to_ascii_lowercase(),
            target: Target::NonResource {
                path: path.to_string(),
            },
        }
    }

    /// kube-apiserver's wording of a refusal, e.g. `pods is forbidden:
    /// User "x" cannot list resource "pods" in API group "" in the
    /// namespace "y"`.
    pub fn forbidden(&self, user: &User) -> ApiError {
        let who = format!("User \"{}\"", user.name);
        ApiError::Forbidden(match &self.target {
            Target::NonResource { path } => {
                format!("forbidden: {who} cannot {} path \"{path}\"", self.verb)
            }
            Target::Resource {
                group,
                resource,
                subresource,
                namespace,
                name,
            } => {
                let qualified = qualified_resource(resource, group);
                let subject = if name.is_empty() {
                    qualified
                } else {
                    format!("{qualified} \"{name}\"")
                };
                let full = full_resource(resource, subresource);
                let scope = if namespace.is_empty() {
                    "at the cluster scope".to_string()
                } else {
                    format!("in the namespace \"{namespace}\"")
                };
                format!(
                    "{subject} is forbidden: {who} cannot {} resource \"{full}\" in API group \"{group}\" {scope}",
                    self.verb
                )
            }
        })
    }
}

/// `resource/subresource` as rules name it, or `resource` alone.
pub fn full_resource(resource: &str, subresource: &str) -> String {
    if subresource.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}/{subresource}")
    }
}

/// `resource.group` as Kubernetes names a resource in messages (`resource`
/// alone in the core group).
pub fn qualified_resource(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

/// Whether one rule grants `attrs`.
pub fn rule_allows(rule: &PolicyRule, attrs: &Attributes) -> bool {
    let has = |list: &Option<Vec<String>>, value: &str| {
        list.iter().flatten().any(|v| v == "*" || v == value)
    };
    if !rule.verbs.iter().any(|v| v == "*" || *v == attrs.verb) {
        return false;
    }
    match &attrs.target {
        Target::NonResource { path } => rule.non_resource_urls.iter().flatten().any(|u| {
            u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
        }),
        Target::Resource {
            group,
            resource,
            subresource,
            name,
            ..
        } => {
            if !has(&rule.api_groups, group) {
                return false;
            }
            let combined = full_resource(resource, subresource);
            let resource_ok = rule.resources.iter().flatten().any(|r| {
                r == "*"
                    || *r == combined
                    || (!subresource.is_empty()
                        && r.strip_prefix("*/") == Some(subresource.as_str()))
            });
            let names = rule.resource_names.as_deref().unwrap_or_default();
            resource_ok && (names.is_empty() || names.iter().any(|n| n == name))
        }
    }
}

/// Decides requests from the rules in its [`Index`].
pub struct Authorizer {
    index: RwLock<Index>,
    always_allow: bool,
}

impl Authorizer {
    /// Loads every role and binding, then follows them until `shutdown`.
    /// With `always_allow`, every request is allowed (the roles are still
    /// served and reviewed).
    pub async fn start(
        api: Arc<Api>,
        always_allow: bool,
        shutdown: CancellationToken,
    ) -> ApiResult<Arc<Authorizer>> {
        let authz = Arc::new(Authorizer {
            index: RwLock::new(Index::default()),
            always_allow,
        });
        for kind in Kind::ALL {
            let def = api
                .registry
                .get(kind.group(), "v1", kind.plural())
                .ok_or_else(|| ApiError::Internal(format!("{} are not served", kind.plural())))?;
            let from = authz.load(&api, &def, kind).await?;
            tokio::spawn(
                authz
                    .clone()
                    .follow(api.clone(), def, kind, from, shutdown.clone()),
            );
        }
        Ok(authz)
    }

    pub fn allows(&self, user: &User, attrs: &Attributes) -> bool {
        if self.always_allow || user.groups.iter().any(|g| g == MASTERS) {
            return true;
        }
        let index = self.index();
        if let Some(node) = node::node_name(user) {
            match index.graph.decide(node, attrs) {
                node::Decision::Allow => return true,
                node::Decision::Deny => return false,
                node::Decision::NoOpinion => {}
            }
        }
        index.allows(user, attrs)
    }

    /// `Ok` if allowed, else kube-apiserver's 403.
    pub fn check(&self, user: &User, attrs: &Attributes) -> ApiResult<()> {
        if self.allows(user, attrs) {
            Ok(())
        } else {
            Err(attrs.forbidden(user))
        }
    }

    /// Every rule that applies to `user` in `namespace` (cluster-wide
    /// grants included), for rules reviews and escalation checks.
    pub fn rules_for(&self, user: &User, namespace: &str) -> Vec<PolicyRule> {
        if user.groups.iter().any(|g| g == MASTERS) {
            return bootstrap::cluster_admin_rules();
        }
        self.index().rules_for(user, namespace)
    }

    /// The rules of the role a binding in `namespace` refers to.
    pub fn role_rules(&self, kind: &str, name: &str, namespace: &str) -> Option<Vec<PolicyRule>> {
        self.index().role_rules(kind, name, namespace)
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    async fn load(&self, api: &Api, def: &ResourceDef, kind: Kind) -> ApiResult<i64> {
        let prefix = def.key_prefix(None);
        let list = api
            .store
            .list(&prefix, ListOptions::default())
            .await
            .map_err(ApiError::internal)?;
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        index.clear(kind);
        for kv in &list.items {
            index.put(kind, &kv.key[prefix.len()..], &kv.value);
        }
        index.settle(kind);
        Ok(list.revision)
    }

    async fn follow(
        self: Arc<Self>,
        api: Arc<Api>,
        def: Arc<ResourceDef>,
        kind: Kind,
        mut from: i64,
        shutdown: CancellationToken,
    ) {
        let prefix = def.key_prefix(None);
        loop {
            if let Ok(mut events) = api.store.watch(&prefix, from).await {
                loop {
                    let event = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        e = events.next() => e,
                    };
                    let Some(Ok(event)) = event else { break };
                    let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
                    let key = &event.kv.key[prefix.len().min(event.kv.key.len())..];
                    match event.kind {
                        EventKind::Deleted => index.remove(kind, key),
                        _ => index.put(kind, key, &event.kv.value),
                    }
                    index.settle(kind);
                }
            }
            // The watch broke (compaction, a store restart): list again.
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                match self.load(&api, &def, kind).await {
                    Ok(rev) => {
                        from = rev;
                        break;
                    }
                    Err(e) => tracing::warn!(kind = kind.plural(), "reloading RBAC: {e}"),
                }
            }
        }
    }
}

/// The user a request acts as: `requester`, or whom its
/// `Impersonate-User` / `Impersonate-Group` / `Impersonate-Uid` headers
/// name (`kubectl --as`, `--as-group`), if `requester` may `impersonate`
/// each of them.
pub fn acting_user(
    authz: &Authorizer,
    requester: User,
    headers: &http::HeaderMap,
) -> ApiResult<User> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let (users, groups, uids) = (
        values("impersonate-user"),
        values("impersonate-group"),
        values("impersonate-uid"),
    );
    if users.is_empty() {
        if groups.is_empty() && uids.is_empty() {
            return Ok(requester);
        }
        return Err(ApiError::BadRequest(
            "impersonating groups or a uid requires impersonating a user (Impersonate-User)".into(),
        ));
    }
    let name = users[0].clone();
    let mut checks = Vec::new();
    let mut implied = Vec::new();
    match name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    {
        Some((ns, sa)) => {
            checks.push(Attributes::resource(
                "impersonate",
                "",
                "serviceaccounts",
                "",
                Some(ns),
                Some(sa),
            ));
            implied = vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{ns}"),
            ];
        }
        None => checks.push(Attributes::resource(
            "impersonate",
            "",
            "users",
            "",
            None,
            Some(&name),
        )),
    }
    for g in &groups {
        checks.push(Attributes::resource(
            "impersonate",
            "",
            "groups",
            "",
            None,
            Some(g),
        ));
    }
    for u in &uids {
        checks.push(Attributes::resource(
            "impersonate",
            "authentication.k8s.io",
            "uids",
            "",
            None,
            Some(u),
        ));
    }
    for c in &checks {
        authz.check(&requester, c)?;
    }
    let mut groups = groups;
    groups.extend(implied);
    Ok(authenticated(&User {
        name,
        uid: uids.into_iter().next().unwrap_or_default(),
        groups,
        ..Default::default()
    }))
}

/// `user` as the authorizer sees it: with `system:authenticated`.
pub fn authenticated(user: &User) -> User {
    let mut u = user.clone();
    if !u.groups.iter().any(|g| g == AUTHENTICATED) {
        u.groups.push(AUTHENTICATED.to_string());
    }
    u
}

#[cfg(test)]
mod tests;
