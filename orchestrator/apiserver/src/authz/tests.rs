use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::json;
use tapestry_apimachinery::tokens::User;

use super::index::{Index, Kind};
use super::*;

fn user(name: &str, groups: &[&str]) -> User {
    authenticated(&User {
        name: name.into(),
        uid: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..Default::default()
    })
}

fn put(index: &mut Index, kind: Kind, key: &str, obj: serde_json::Value) {
    index.put(kind, key, &serde_json::to_vec(&obj).unwrap());
    index.settle(kind);
}

fn pods(verb: &str, ns: &str) -> Attributes {
    Attributes::resource(verb, "", "pods", "", Some(ns), None)
}

#[test]
fn rules_match_verbs_groups_resources_subresources_and_names() {
    let r: PolicyRule = serde_json::from_value(json!({
        "apiGroups": [""], "resources": ["pods", "*/status"], "verbs": ["get", "list"]}))
    .unwrap();
    assert!(rule_allows(&r, &pods("list", "a")));
    assert!(!rule_allows(&r, &pods("delete", "a")));
    let status = Attributes::resource("get", "", "pods", "status", Some("a"), Some("p"));
    assert!(rule_allows(&r, &status));
    let exec = Attributes::resource("get", "", "pods", "exec", Some("a"), Some("p"));
    assert!(!rule_allows(&r, &exec), "pods does not grant pods/exec");
    let apps = Attributes::resource("get", "apps", "pods", "", Some("a"), None);
    assert!(!rule_allows(&r, &apps));
    let named: PolicyRule = serde_json::from_value(json!({
        "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["one"], "verbs": ["get"]}))
    .unwrap();
    let get = |n: &str| Attributes::resource("get", "", "secrets", "", Some("a"), Some(n));
    assert!(rule_allows(&named, &get("one")));
    assert!(!rule_allows(&named, &get("two")));
    assert!(
        !rule_allows(&named, &get("")),
        "a named rule grants no list"
    );
    let urls: PolicyRule = serde_json::from_value(
        json!({"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]}),
    )
    .unwrap();
    let path = |p: &str| Attributes::non_resource(&http::Method::GET, p);
    assert!(rule_allows(&urls, &path("/apis/apps/v1")));
    assert!(rule_allows(&urls, &path("/version")));
    assert!(!rule_allows(&urls, &path("/metrics")));
}

#[test]
fn bindings_grant_in_their_namespace_and_cluster_bindings_everywhere() {
    let mut index = Index::default();
    put(
        &mut index,
        Kind::ClusterRole,
        "view",
        json!({"metadata": {"name": "view"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}),
    );
    put(
        &mut index,
        Kind::RoleBinding,
        "a/alice-view",
        json!({
        "metadata": {"name": "alice-view", "namespace": "a"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "name": "alice"}, {"kind": "ServiceAccount", "name": "bot"}]}),
    );
    let alice = user("alice", &[]);
    assert!(index.allows(&alice, &pods("list", "a")));
    assert!(!index.allows(&alice, &pods("list", "b")));
    assert!(!index.allows(&alice, &pods("delete", "a")));
    let bot = user("system:serviceaccount:a:bot", &[]);
    assert!(
        index.allows(&bot, &pods("list", "a")),
        "the binding's namespace is the SA's"
    );
    let other_bot = user("system:serviceaccount:b:bot", &[]);
    assert!(!index.allows(&other_bot, &pods("list", "a")));

    put(
        &mut index,
        Kind::ClusterRoleBinding,
        "ops",
        json!({"metadata": {"name": "ops"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "Group", "name": "ops"}]}),
    );
    assert!(index.allows(&user("bob", &["ops"]), &pods("list", "b")));
    index.remove(Kind::ClusterRoleBinding, "ops");
    assert!(!index.allows(&user("bob", &["ops"]), &pods("list", "b")));
}

#[test]
fn aggregated_cluster_roles_grant_what_their_selectors_pick() {
    let mut index = Index::default();
    put(
        &mut index,
        Kind::ClusterRole,
        "monitoring",
        json!({"metadata": {"name": "monitoring"},
        "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"rbac.example.com/aggregate-to-monitoring": "true"}}]}}),
    );
    put(
        &mut index,
        Kind::ClusterRoleBinding,
        "m",
        json!({"metadata": {"name": "m"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "monitoring"},
        "subjects": [{"kind": "User", "name": "mo"}]}),
    );
    let mo = user("mo", &[]);
    assert!(!index.allows(&mo, &pods("list", "a")));
    put(
        &mut index,
        Kind::ClusterRole,
        "pods-reader",
        json!({"metadata": {"name": "pods-reader",
        "labels": {"rbac.example.com/aggregate-to-monitoring": "true"}},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}),
    );
    assert!(index.allows(&mo, &pods("list", "a")));
}

#[test]
fn refusals_are_worded_like_kube_apiservers() {
    let alice = user("alice", &[]);
    let msg = |a: Attributes| a.forbidden(&alice).to_status()["message"].clone();
    assert_eq!(
        msg(Attributes::resource("list", "", "secrets", "", Some("a"), None)),
        "secrets is forbidden: User \"alice\" cannot list resource \"secrets\" in API group \"\" in the namespace \"a\""
    );
    assert_eq!(
        msg(Attributes::resource("get", "apps", "deployments", "scale", Some("a"), Some("web"))),
        "deployments.apps \"web\" is forbidden: User \"alice\" cannot get resource \"deployments/scale\" in API group \"apps\" in the namespace \"a\""
    );
    assert_eq!(
        msg(Attributes::resource("list", "", "nodes", "", None, None)),
        "nodes is forbidden: User \"alice\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"
    );
    assert_eq!(
        msg(Attributes::non_resource(&http::Method::GET, "/metrics")),
        "forbidden: User \"alice\" cannot get path \"/metrics\""
    );
}
