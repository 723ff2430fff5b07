//! Discovery documents: /version, /api, /apis and per group-version
//! resource lists, from what the registry serves at the time of the
//! request (so custom resources appear as soon as they are served), in
//! both the classic form and the aggregated one (apidiscovery.k8s.io/v2)
//! that kubectl asks for first.

use std::cmp::Ordering;

use serde_json::{json, Value};

use crate::registry::{ResourceDef, Served};

/// The Kubernetes API version this server implements.
pub const KUBE_MAJOR: &str = "1";
pub const KUBE_MINOR: &str = "33";
pub const KUBE_GIT_VERSION: &str = "v1.33.0+tapestry";

pub fn version() -> Value {
    json!({
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": KUBE_GIT_VERSION,
        "gitCommit": env!("CARGO_PKG_VERSION"),
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "n/a",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }),
    })
}

pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// Kubernetes' version priority (`CompareKubeAwareVersionStrings`): GA
/// before beta before alpha, higher versions first within each, then
/// versions of other shapes in lexical order.
pub fn version_priority(a: &str, b: &str) -> Ordering {
    /// (stability rank, major, minor); stability 3 GA, 2 beta, 1 alpha.
    fn parse(v: &str) -> Option<(u8, u64, u64)> {
        let rest = v.strip_prefix('v')?;
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let major: u64 = rest[..digits].parse().ok().filter(|m| *m > 0)?;
        let tail = &rest[digits..];
        let (stability, minor) = if tail.is_empty() {
            (3, 0)
        } else if let Some(n) = tail.strip_prefix("beta") {
            (2, n.parse().ok()?)
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (1, n.parse().ok()?)
        } else {
            return None;
        };
        Some((stability, major, minor))
    }
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// The review kinds ([`crate::authz::review`]): created and answered, never
/// stored. `(group, plural, kind, namespaced)`, all in version v1.
const REVIEWS: &[(&str, &str, &str, bool)] = &[
    (
        "authentication.k8s.io",
        "selfsubjectreviews",
        "SelfSubjectReview",
        false,
    ),
    (
        "authentication.k8s.io",
        "tokenreviews",
        "TokenReview",
        false,
    ),
    (
        "authorization.k8s.io",
        "localsubjectaccessreviews",
        "LocalSubjectAccessReview",
        true,
    ),
    (
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        false,
    ),
    (
        "authorization.k8s.io",
        "selfsubjectrulesreviews",
        "SelfSubjectRulesReview",
        false,
    ),
    (
        "authorization.k8s.io",
        "subjectaccessreviews",
        "SubjectAccessReview",
        false,
    ),
];

fn reviews_in<'a>(
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'static (&'static str, &'static str, &'static str, bool)> + 'a {
    REVIEWS
        .iter()
        .filter(move |r| r.0 == group && version == "v1")
}

/// Group → versions, each group's versions in priority order (built-ins
/// keep the order they are registered in, which is theirs).
fn groups(served: &Served) -> Vec<(&str, Vec<&str>)> {
    let mut groups = served.groups();
    for (_, versions) in &mut groups {
        versions.sort_by(|a, b| version_priority(a, b));
    }
    for (group, ..) in REVIEWS {
        if !groups.iter().any(|(g, _)| g == group) {
            groups.push((group, vec!["v1"]));
        }
    }
    groups.push((
        crate::resourcemetrics::GROUP,
        vec![crate::resourcemetrics::VERSION],
    ));
    groups
}

fn group_doc(group: &str, versions: &[&str]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

pub fn group_list(served: &Served) -> Value {
    let groups: Vec<Value> = groups(served)
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| group_doc(g, &vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(served: &Served, name: &str) -> Option<Value> {
    groups(served)
        .into_iter()
        .find(|(g, _)| *g == name && !g.is_empty())
        .map(|(g, vs)| {
            let mut doc = group_doc(g, &vs);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            doc
        })
}

/// Verbs every served resource supports.
pub const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

pub fn resource_list(served: &Served, group: &str, version: &str) -> Option<Value> {
    let defs = served.in_group_version(group, version);
    let metrics = crate::resourcemetrics::discovery_resources(group, version);
    if defs.is_empty() && reviews_in(group, version).next().is_none() && metrics.is_empty() {
        return None;
    }
    let mut resources: Vec<Value> = reviews_in(group, version)
        .map(|(_, plural, kind, namespaced)| {
            json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced,
                   "kind": kind, "verbs": ["create"]})
        })
        .chain(metrics)
        .collect();
    for def in &defs {
        let mut r = json!({
            "name": def.plural,
            "singularName": def.singular,
            "namespaced": def.namespaced,
            "kind": def.kind,
            "verbs": VERBS,
        });
        if !def.short_names.is_empty() {
            r["shortNames"] = json!(def.short_names);
        }
        if !def.categories.is_empty() {
            r["categories"] = json!(def.categories);
        }
        resources.push(r);
        for sub in &def.subresources {
            let d = sub.rest.discovery(def);
            let mut r = json!({
                "name": format!("{}/{}", def.plural, sub.kind.name()),
                "singularName": "",
                "namespaced": def.namespaced,
                "kind": d.kind,
                "verbs": d.verbs,
            });
            if let Some((g, v)) = d.group_version {
                r["group"] = json!(g);
                r["version"] = json!(v);
            }
            resources.push(r);
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// The aggregated discovery version a client's Accept header asks for
/// (`application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList`),
/// if any: the first listed that this server speaks.
pub fn aggregated_version(accept: &str) -> Option<&'static str> {
    accept.split(',').find_map(|media| {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        let has = |p: &str| params.contains(&p);
        if !params
            .first()
            .is_some_and(|t| t.starts_with("application/json"))
            || !has("g=apidiscovery.k8s.io")
            || !has("as=APIGroupDiscoveryList")
        {
            return None;
        }
        if has("v=v2") {
            Some("v2")
        } else if has("v=v2beta1") {
            Some("v2beta1")
        } else {
            None
        }
    })
}

/// `/api` (`core`) or `/apis` (every other group) as one aggregated
/// document: every group, version and resource with its subresources.
pub fn aggregated(served: &Served, core: bool, api_version: &str) -> Value {
    let items: Vec<Value> = groups(served)
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(group, versions)| {
            let versions: Vec<Value> =
                versions
                    .iter()
                    .map(|version| {
                        let resources: Vec<Value> = served
                        .in_group_version(group, version)
                        .iter()
                        .map(|def| aggregated_resource(def))
                        .chain(reviews_in(group, version).map(|(group, plural, kind, namespaced)| {
                            json!({
                                "resource": plural,
                                "responseKind": {"group": group, "version": "v1", "kind": kind},
                                "scope": if *namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": kind.to_lowercase(),
                                "verbs": ["create"],
                            })
                        }))
                        .chain(crate::resourcemetrics::aggregated_resources(group, version))
                        .collect();
                        json!({"version": version, "resources": resources, "freshness": "Current"})
                    })
                    .collect();
            let metadata = if core {
                json!({"creationTimestamp": null})
            } else {
                json!({"name": group, "creationTimestamp": null})
            };
            json!({"metadata": metadata, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{api_version}"),
        "metadata": {},
        "items": items,
    })
}

fn aggregated_resource(def: &ResourceDef) -> Value {
    let subresources: Vec<Value> = def
        .subresources
        .iter()
        .map(|sub| {
            let d = sub.rest.discovery(def);
            let (group, version) = d
                .group_version
                .unwrap_or((def.group.as_str(), def.version.as_str()));
            json!({
                "subresource": sub.kind.name(),
                "responseKind": {"group": group, "version": version, "kind": d.kind},
                "verbs": d.verbs,
            })
        })
        .collect();
    let mut r = json!({
        "resource": def.plural,
        "responseKind": {"group": def.group, "version": def.version, "kind": def.kind},
        "scope": if def.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": def.singular,
        "verbs": VERBS,
    });
    if !def.short_names.is_empty() {
        r["shortNames"] = json!(def.short_names);
    }
    if !def.categories.is_empty() {
        r["categories"] = json!(def.categories);
    }
    if !subresources.is_empty() {
        r["subresources"] = json!(subresources);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_as_kubernetes_sorts_them() {
        let mut versions = vec![
            "v1alpha1",
            "v1",
            "foo1",
            "v2beta2",
            "v11alpha2",
            "v2",
            "v1beta1",
            "v10beta3",
            "foo10",
            "v12alpha1",
            "v10",
            "v3beta1",
        ];
        versions.sort_by(|a, b| version_priority(a, b));
        assert_eq!(
            versions,
            [
                "v10",
                "v2",
                "v1",
                "v10beta3",
                "v3beta1",
                "v2beta2",
                "v1beta1",
                "v12alpha1",
                "v11alpha2",
                "v1alpha1",
                "foo1",
                "foo10"
            ]
        );
    }

    #[test]
    fn aggregated_discovery_is_negotiated_from_accept() {
        let kubectl = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(kubectl), Some("v2"));
        assert_eq!(
            aggregated_version(
                "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
            ),
            Some("v2beta1")
        );
        assert_eq!(aggregated_version("application/json"), None);
        assert_eq!(aggregated_version(""), None);
    }
}
