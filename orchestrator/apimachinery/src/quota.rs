//! ResourceQuota accounting, as the API server's quota admission and the
//! quota controller both read it: what one object uses of each resource a
//! quota can hold (`pods`, `requests.cpu`, `count/deployments.apps`, ...),
//! whether a quota's scopes cover a pod, and the messages Kubernetes
//! answers with. Quantities are in thousandths ([`crate::quantity`]).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::quantity::{format_milli, is_binary, milli_of, parse_milli};

/// Resource name → amount in thousandths of its unit (a count of 1 is 1000).
pub type Usage = BTreeMap<String, i128>;

const ONE: i128 = 1000;

/// The compute resources a pod's containers request or limit, and the
/// names quota gives the requests without the `requests.` prefix.
const COMPUTE: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];

/// `count/<resource>[.<group>]`, the object-count name of any resource.
pub fn count_name(group: &str, resource: &str) -> String {
    if group.is_empty() {
        format!("count/{resource}")
    } else {
        format!("count/{resource}.{group}")
    }
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Whether a pod has finished and so uses no quota.
pub fn pod_is_terminal(pod: &Value) -> bool {
    matches!(s(pod, "/status/phase"), "Succeeded" | "Failed")
}

/// A pod's effective request or limit (`kind` is `requests` or `limits`)
/// of `resource`: the sum over its containers, or the largest of its init
/// containers' if that is more, as the scheduler and quota both take it.
/// None: no container sets it.
fn pod_amount(spec: &Value, kind: &str, resource: &str) -> Option<i128> {
    let amount = |c: &Value| {
        c.get("resources")
            .and_then(|r| r.get(kind))
            .and_then(|r| r.get(resource))
            .and_then(milli_of)
    };
    let list = |name: &str| {
        spec.get(name)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut set = false;
    let mut sum = 0i128;
    for c in list("containers") {
        if let Some(a) = amount(&c) {
            set = true;
            sum += a;
        }
    }
    for c in list("initContainers") {
        if let Some(a) = amount(&c) {
            set = true;
            sum = sum.max(a);
        }
    }
    set.then_some(sum)
}

/// What `obj`, an object of `resource` in `group`, uses of every resource
/// quota counts for it. Finished pods use nothing.
pub fn usage(group: &str, resource: &str, obj: &Value) -> Usage {
    let mut u = Usage::new();
    match (group, resource) {
        ("", "pods") => {
            if pod_is_terminal(obj) {
                return u;
            }
            u.insert("pods".into(), ONE);
            let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
            for r in COMPUTE {
                if let Some(a) = pod_amount(&spec, "requests", r) {
                    u.insert(r.to_string(), a);
                    u.insert(format!("requests.{r}"), a);
                }
                if let Some(a) = pod_amount(&spec, "limits", r) {
                    u.insert(format!("limits.{r}"), a);
                }
            }
        }
        ("", "services") => {
            u.insert("services".into(), ONE);
            let ports = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map_or(0, Vec::len) as i128;
            match s(obj, "/spec/type") {
                "NodePort" => {
                    u.insert("services.nodeports".into(), ports * ONE);
                }
                "LoadBalancer" => {
                    u.insert("services.loadbalancers".into(), ONE);
                    u.insert("services.nodeports".into(), ports * ONE);
                }
                _ => {}
            }
        }
        ("", "configmaps" | "secrets" | "replicationcontrollers" | "resourcequotas") => {
            u.insert(resource.to_string(), ONE);
        }
        ("", "persistentvolumeclaims") => {
            u.insert("persistentvolumeclaims".into(), ONE);
            let class = s(obj, "/spec/storageClassName");
            if !class.is_empty() {
                u.insert(
                    format!("{class}.storageclass.storage.k8s.io/persistentvolumeclaims"),
                    ONE,
                );
            }
            let storage = obj
                .pointer("/spec/resources/requests/storage")
                .and_then(milli_of);
            if let Some(storage) = storage {
                u.insert("requests.storage".into(), storage);
                if !class.is_empty() {
                    u.insert(
                        format!("{class}.storageclass.storage.k8s.io/requests.storage"),
                        storage,
                    );
                }
            }
        }
        _ => {}
    }
    u.insert(count_name(group, resource), ONE);
    u
}

/// Whether a pod falls under one scope (`Terminating`, `BestEffort`, ...)
/// or a scopeSelector expression on it.
fn pod_in_scope(pod: &Value, scope: &str, operator: &str, values: &[&str]) -> bool {
    let terminating = pod
        .pointer("/spec/activeDeadlineSeconds")
        .and_then(Value::as_i64)
        .is_some_and(|s| s >= 0);
    let best_effort = ["containers", "initContainers"].iter().all(|list| {
        pod.pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .all(|c| {
                ["requests", "limits"].iter().all(|k| {
                    c.pointer(&format!("/resources/{k}"))
                        .and_then(Value::as_object)
                        .is_none_or(|m| m.keys().all(|r| !COMPUTE[..2].contains(&r.as_str())))
                })
            })
    });
    match scope {
        "Terminating" => terminating,
        "NotTerminating" => !terminating,
        "BestEffort" => best_effort,
        "NotBestEffort" => !best_effort,
        "PriorityClass" => {
            let class = s(pod, "/spec/priorityClassName");
            match operator {
                "In" => values.contains(&class),
                "NotIn" => !values.contains(&class),
                "Exists" => !class.is_empty(),
                "DoesNotExist" => class.is_empty(),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Whether the quota with `spec` covers `obj` of `resource` in `group`:
/// an unscoped quota covers everything, a scoped one only the pods in all
/// its scopes.
pub fn covers(spec: &Value, group: &str, resource: &str, obj: &Value) -> bool {
    let scopes: Vec<&str> = spec
        .get("scopes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let expressions: Vec<&Value> = spec
        .pointer("/scopeSelector/matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if scopes.is_empty() && expressions.is_empty() {
        return true;
    }
    if (group, resource) != ("", "pods") {
        return false;
    }
    scopes
        .iter()
        .all(|scope| pod_in_scope(obj, scope, "Exists", &[]))
        && expressions.iter().all(|e| {
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            pod_in_scope(obj, s(e, "/scopeName"), s(e, "/operator"), &values)
        })
}

/// The resources of `hard` a pod must set in every container, and the
/// containers that do not: Kubernetes' `must specify limits.cpu for: c;
/// requests.memory for: c,d` (None: nothing is missing).
pub fn missing_in_pod(hard: &BTreeMap<String, String>, pod: &Value) -> Option<String> {
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for list in ["initContainers", "containers"] {
        let containers = pod
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for c in containers {
            for name in hard.keys() {
                let (kind, r) = match name.split_once('.') {
                    Some(("requests", r)) => ("requests", r),
                    Some(("limits", r)) => ("limits", r),
                    None if COMPUTE[..2].contains(&name.as_str()) => ("requests", name.as_str()),
                    _ => continue,
                };
                if !COMPUTE[..2].contains(&r) {
                    continue;
                }
                if c.pointer(&format!("/resources/{kind}/{r}")).is_none() {
                    missing
                        .entry(name.clone())
                        .or_default()
                        .push(s(c, "/name").to_string());
                }
            }
        }
    }
    if missing.is_empty() {
        return None;
    }
    let parts: Vec<String> = missing
        .iter()
        .map(|(r, cs)| format!("{r} for: {}", cs.join(",")))
        .collect();
    Some(format!("must specify {}", parts.join("; ")))
}

/// A quota's limits, read from `spec.hard` (name → the quantity as
/// written); entries that are not quantities are left out (validation
/// refuses them).
pub fn hard(spec: &Value) -> BTreeMap<String, String> {
    spec.get("hard")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .filter(|(_, v)| parse_milli(v).is_some())
        .collect()
}

/// Charge `request` to a quota that holds `hard` and has used `used`:
/// the new usage of the resources `hard` limits, or the exceeded
/// resources' `requested: ..., used: ..., limited: ...` text.
pub fn charge(
    hard: &BTreeMap<String, String>,
    used: &Usage,
    request: &Usage,
) -> Result<Usage, String> {
    let mut next = used.clone();
    let mut exceeded = Vec::new();
    for (name, limit) in hard {
        let Some(&asked) = request.get(name).filter(|a| **a > 0) else {
            continue;
        };
        let limit_milli = parse_milli(limit).unwrap_or(0);
        let now = used.get(name).copied().unwrap_or(0);
        if now + asked > limit_milli {
            exceeded.push((name, asked, now, limit));
        }
        next.insert(name.clone(), now + asked);
    }
    if exceeded.is_empty() {
        return Ok(next);
    }
    let (mut requested, mut using, mut limited) = (Vec::new(), Vec::new(), Vec::new());
    for (n, asked, now, limit) in exceeded {
        let binary = is_binary(limit);
        requested.push(format!("{n}={}", format_milli(asked, binary)));
        using.push(format!("{n}={}", format_milli(now, binary)));
        limited.push(format!("{n}={limit}"));
    }
    Err(format!(
        "requested: {}, used: {}, limited: {}",
        requested.join(","),
        using.join(","),
        limited.join(",")
    ))
}

/// Usage as a quota's `status.used` writes it, in the units of `hard`.
pub fn to_quantities(hard: &BTreeMap<String, String>, used: &Usage) -> BTreeMap<String, String> {
    hard.iter()
        .map(|(name, limit)| {
            let v = used.get(name).copied().unwrap_or(0);
            (name.clone(), format_milli(v, is_binary(limit)))
        })
        .collect()
}

/// `status.used` read back (unknown or unreadable entries left out).
pub fn read_used(status: &Value) -> Usage {
    status
        .get("used")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), parse_milli(v.as_str()?)?)))
        .collect()
}

/// The `(group, resource)` whose objects use the quota resource `name`
/// (`requests.cpu`: pods; `count/deployments.apps`: deployments in apps),
/// or None for a name quota does not count.
pub fn source(name: &str) -> Option<(String, String)> {
    let core = |r: &str| Some((String::new(), r.to_string()));
    if let Some(counted) = name.strip_prefix("count/") {
        return match counted.split_once('.') {
            Some((r, g)) => Some((g.to_string(), r.to_string())),
            None => core(counted),
        };
    }
    if name.contains(".storageclass.storage.k8s.io/") || name == "requests.storage" {
        return core("persistentvolumeclaims");
    }
    if name.starts_with("services") {
        return core("services");
    }
    match name {
        "pods" => core("pods"),
        "configmaps"
        | "secrets"
        | "replicationcontrollers"
        | "resourcequotas"
        | "persistentvolumeclaims" => core(name),
        _ => {
            let r = name
                .strip_prefix("requests.")
                .or_else(|| name.strip_prefix("limits."))
                .unwrap_or(name);
            COMPUTE
                .contains(&r)
                .then(|| (String::new(), "pods".to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hard(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_pod_uses_its_containers_requests_and_limits() {
        let pod = json!({"spec": {
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1"}}},
                {"name": "b", "resources": {"requests": {"cpu": "200m"}}},
            ],
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "500m"}}}],
        }});
        let u = usage("", "pods", &pod);
        assert_eq!(u["pods"], 1000);
        assert_eq!(u["count/pods"], 1000);
        assert_eq!(u["requests.cpu"], 500);
        assert_eq!(u["cpu"], 500);
        assert_eq!(u["limits.cpu"], 1000);
        assert_eq!(u["requests.memory"], 64 * 1024 * 1024 * 1000);
        assert!(!u.contains_key("limits.memory"));
        let done = json!({"spec": {}, "status": {"phase": "Succeeded"}});
        assert!(usage("", "pods", &done).is_empty());
        assert_eq!(
            usage("apps", "deployments", &json!({})),
            Usage::from([("count/deployments.apps".to_string(), 1000)])
        );
    }

    #[test]
    fn charges_past_the_limit_are_refused_with_kubernetes_words() {
        let h = hard(&[("pods", "2"), ("requests.cpu", "1")]);
        let used = Usage::from([("pods".to_string(), 2000), ("requests.cpu".into(), 100)]);
        let req = Usage::from([("pods".to_string(), 1000), ("requests.cpu".into(), 100)]);
        assert_eq!(
            charge(&h, &used, &req).unwrap_err(),
            "requested: pods=1, used: pods=2, limited: pods=2"
        );
        let used = Usage::from([("pods".to_string(), 1000)]);
        let next = charge(&h, &used, &req).unwrap();
        assert_eq!(
            to_quantities(&h, &next),
            hard(&[("pods", "2"), ("requests.cpu", "100m")])
        );
    }

    #[test]
    fn a_pod_must_set_what_the_quota_limits() {
        let h = hard(&[
            ("limits.cpu", "2"),
            ("requests.memory", "1Gi"),
            ("pods", "3"),
        ]);
        let pod = json!({"spec": {"containers": [
            {"name": "c", "resources": {"limits": {"cpu": "1"}}},
            {"name": "d"},
        ]}});
        assert_eq!(
            missing_in_pod(&h, &pod).unwrap(),
            "must specify limits.cpu for: d; requests.memory for: c,d"
        );
        assert!(missing_in_pod(&hard(&[("pods", "1")]), &pod).is_none());
    }

    #[test]
    fn each_quota_resource_is_used_by_one_kind() {
        let src = |n: &str| source(n).map(|(g, r)| format!("{g}/{r}"));
        assert_eq!(src("limits.memory").as_deref(), Some("/pods"));
        assert_eq!(src("cpu").as_deref(), Some("/pods"));
        assert_eq!(
            src("requests.storage").as_deref(),
            Some("/persistentvolumeclaims")
        );
        assert_eq!(
            src("count/deployments.apps").as_deref(),
            Some("apps/deployments")
        );
        assert_eq!(src("count/secrets").as_deref(), Some("/secrets"));
        assert_eq!(src("services.nodeports").as_deref(), Some("/services"));
        assert_eq!(src("nvidia.com/gpu"), None);
    }

    #[test]
    fn scoped_quotas_cover_only_their_pods() {
        let spec = json!({"scopes": ["BestEffort"]});
        let best_effort = json!({"spec": {"containers": [{"name": "c"}]}});
        let burstable = json!({"spec": {"containers": [{"name": "c",
            "resources": {"requests": {"cpu": "1"}}}]}});
        assert!(covers(&spec, "", "pods", &best_effort));
        assert!(!covers(&spec, "", "pods", &burstable));
        assert!(!covers(&spec, "", "services", &json!({})));
        assert!(covers(&json!({}), "", "services", &json!({})));
        let by_class = json!({"scopeSelector": {"matchExpressions": [
            {"scopeName": "PriorityClass", "operator": "In", "values": ["high"]}]}});
        let high = json!({"spec": {"priorityClassName": "high"}});
        assert!(covers(&by_class, "", "pods", &high));
        assert!(!covers(&by_class, "", "pods", &best_effort));
    }
}
