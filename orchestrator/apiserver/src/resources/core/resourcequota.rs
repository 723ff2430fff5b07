//! core/v1 ResourceQuotas: how much a namespace may hold. Kubernetes'
//! validation, the status subresource the quota controller keeps
//! (`status.hard`, `status.used`), kubectl's columns, and the quota
//! admission every create in a namespace goes through: the object's usage
//! ([`tapestry_apimachinery::quota`]) is charged to each quota covering
//! it with a compare-and-swap of the quota's stored `status.used`
//! (retried on conflict), or the create is refused with Kubernetes'
//! `exceeded quota` message. Concurrent creates therefore never overrun a
//! quota; the controller gives back what deleted objects used.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use k8s_openapi::api::core::v1::ResourceQuota;
use serde_json::{json, Value};
use tapestry_apimachinery::quantity::{format_milli, is_binary, parse_milli};
use tapestry_apimachinery::quota;
use tapestry_store::{ListOptions, Store, StoreError};

use crate::error::{ApiError, ApiResult, Cause};
use crate::objects::meta_str;
use crate::registry::{names, Behaviour, ResourceDef};
use crate::rest::status::StatusRest;
use crate::tables::{age, col, name, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["quota"]),
        subresources: vec![StatusRest::def()],
        behaviour: Arc::new(QuotaBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                AGE,
                col("Request", "The requested resources (used/hard)."),
                col("Limit", "The limited resources (used/hard)."),
            ],
            cells: |o, now| {
                let (request, limit) = columns(o);
                vec![name(o), age(o, now), json!(request), json!(limit)]
            },
        }),
        ..ResourceDef::of::<ResourceQuota>()
    }
}

/// kubectl's REQUEST and LIMIT cells: `name: used/hard` of each resource
/// of `spec.hard` in name order, the `limits.*` ones in LIMIT.
fn columns(o: &Value) -> (String, String) {
    let (mut request, mut limit) = (Vec::new(), Vec::new());
    let hard = o.pointer("/spec/hard").and_then(Value::as_object);
    for r in hard.into_iter().flatten().map(|(k, _)| k) {
        let read = |which: &str| {
            o.pointer(&format!("/status/{which}"))
                .and_then(|m| m.get(r))
                .and_then(Value::as_str)
                .and_then(|v| Some(format_milli(parse_milli(v)?, is_binary(v))))
                .unwrap_or_else(|| "0".into())
        };
        let cell = format!("{r}: {}/{}", read("used"), read("hard"));
        if r.split_once('.').is_some_and(|(p, _)| p == "limits") {
            limit.push(cell);
        } else {
            request.push(cell);
        }
    }
    (request.join(", "), limit.join(", "))
}

struct QuotaBehaviour;

const SCOPES: [&str; 6] = [
    "BestEffort",
    "CrossNamespacePodAffinity",
    "NotBestEffort",
    "NotTerminating",
    "PriorityClass",
    "Terminating",
];

/// Resources whose quantities are counts.
fn is_integer_resource(r: &str) -> bool {
    r.starts_with("count/")
        || r.ends_with("/persistentvolumeclaims")
        || [
            "pods",
            "services",
            "replicationcontrollers",
            "resourcequotas",
            "secrets",
            "configmaps",
            "persistentvolumeclaims",
            "services.nodeports",
            "services.loadbalancers",
        ]
        .contains(&r)
}

fn validate_list(obj: &Value, pointer: &str, field: &str, causes: &mut Vec<Cause>) {
    for (r, v) in obj
        .pointer(pointer)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let f = format!("{field}[{r}]");
        if r.is_empty() || r.contains(' ') {
            causes.push(Cause::invalid(
                &f,
                &json!(r),
                "must be a standard resource for quota",
            ));
            continue;
        }
        match v.as_str().and_then(parse_milli) {
            None => causes.push(Cause::invalid(
                &f,
                v,
                "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
            )),
            Some(q) if q < 0 => causes.push(Cause::invalid(
                &f,
                v,
                "must be greater than or equal to 0",
            )),
            Some(q) if is_integer_resource(r) && q % 1000 != 0 => {
                causes.push(Cause::invalid(&f, v, "must be an integer"))
            }
            Some(_) => {}
        }
    }
}

impl Behaviour for QuotaBehaviour {
    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        validate_list(obj, "/spec/hard", "spec.hard", &mut causes);
        let scopes = obj.pointer("/spec/scopes").and_then(Value::as_array);
        for (k, scope) in scopes.into_iter().flatten().enumerate() {
            let sc = scope.as_str().unwrap_or("");
            if !SCOPES.contains(&sc) {
                causes.push(Cause::unsupported(
                    format!("spec.scopes[{k}]"),
                    scope,
                    &SCOPES,
                ));
            }
        }
        let terminating =
            |list: &[&str]| list.contains(&"Terminating") && list.contains(&"NotTerminating");
        let effort =
            |list: &[&str]| list.contains(&"BestEffort") && list.contains(&"NotBestEffort");
        let names: Vec<&str> = scopes
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if terminating(&names) || effort(&names) {
            causes.push(Cause::invalid(
                "spec.scopes",
                &json!(names),
                "conflicting scopes",
            ));
        }
        let expressions = obj
            .pointer("/spec/scopeSelector/matchExpressions")
            .and_then(Value::as_array);
        for (k, e) in expressions.into_iter().flatten().enumerate() {
            let path = format!("spec.scopeSelector.matchExpressions[{k}]");
            let scope = e.get("scopeName").and_then(Value::as_str).unwrap_or("");
            if !SCOPES.contains(&scope) {
                causes.push(Cause::unsupported(
                    format!("{path}.scopeName"),
                    &json!(scope),
                    &SCOPES,
                ));
            }
            let op = e.get("operator").and_then(Value::as_str).unwrap_or("");
            let values = e.get("values").and_then(Value::as_array);
            match op {
                "In" | "NotIn" if values.is_none_or(Vec::is_empty) => causes.push(
                    Cause::required_because(
                        format!("{path}.values"),
                        "must be at least one value when `operator` is 'In' or 'NotIn' for scope selector",
                    ),
                ),
                "Exists" | "DoesNotExist" if values.is_some_and(|v| !v.is_empty()) => {
                    causes.push(Cause::invalid(
                        format!("{path}.values"),
                        e.get("values").unwrap_or(&Value::Null),
                        "must be no value when `operator` is 'Exist' or 'DoesNotExist' for scope selector",
                    ))
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => causes.push(Cause::unsupported(
                    format!("{path}.operator"),
                    &json!(other),
                    &["DoesNotExist", "Exists", "In", "NotIn"],
                )),
            }
        }
        causes
    }

    fn validate_status_update(&self, new: &Value, _old: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        validate_list(new, "/status/hard", "status.hard", &mut causes);
        validate_list(new, "/status/used", "status.used", &mut causes);
        causes
    }
}

/// How often a charge is tried again when another writer changed the
/// quota in between.
const CHARGE_ATTEMPTS: usize = 64;

/// The quota admission of `obj`, a new object of `resource` in `group`
/// (`plural` names it in messages): charged to every quota of its
/// namespace that covers it, or refused. A dry run only checks.
pub async fn admit(
    store: &dyn Store,
    group: &str,
    resource: &str,
    obj: &Value,
    dry_run: bool,
) -> ApiResult<()> {
    let ns = meta_str(obj, "namespace");
    if ns.is_empty() {
        return Ok(());
    }
    let prefix = format!("/registry/resourcequotas/{ns}/");
    let quotas = store
        .list(&prefix, ListOptions::default())
        .await
        .map_err(ApiError::internal)?;
    if quotas.items.is_empty() {
        return Ok(());
    }
    let request = quota::usage(group, resource, obj);
    let refuse = |message: String| {
        ApiError::Forbidden(format!(
            "{resource} \"{}\" is forbidden: {message}",
            meta_str(obj, "name")
        ))
    };
    for kv in quotas.items {
        let mut kv = kv;
        for attempt in 0.. {
            let Ok(mut q) = serde_json::from_slice::<Value>(&kv.value) else {
                break;
            };
            let qname = meta_str(&q, "name").to_string();
            let spec = q.get("spec").cloned().unwrap_or(Value::Null);
            if !quota::covers(&spec, group, resource, obj) {
                break;
            }
            let hard = quota::hard(&spec);
            if (group, resource) == ("", "pods") && !quota::pod_is_terminal(obj) {
                if let Some(missing) = quota::missing_in_pod(&hard, obj) {
                    return Err(refuse(format!("failed quota: {qname}: {missing}")));
                }
            }
            let charged: BTreeMap<String, String> = hard
                .into_iter()
                .filter(|(r, _)| request.get(r).is_some_and(|a| *a > 0))
                .collect();
            if charged.is_empty() {
                break;
            }
            let status = q.get("status").cloned().unwrap_or(Value::Null);
            let used = quota::read_used(&status);
            let unknown: Vec<&str> = charged
                .keys()
                .filter(|r| !used.contains_key(*r))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                return Err(refuse(format!(
                    "status unknown for quota: {qname}, resources: {}",
                    unknown.join(",")
                )));
            }
            let next = quota::charge(&charged, &used, &request)
                .map_err(|e| refuse(format!("exceeded quota: {qname}, {e}")))?;
            if dry_run {
                break;
            }
            if !q.get("status").is_some_and(Value::is_object) {
                q["status"] = json!({});
            }
            if !q["status"].get("used").is_some_and(Value::is_object) {
                q["status"]["used"] = json!({});
            }
            for (r, v) in quota::to_quantities(&charged, &next) {
                q["status"]["used"][r] = json!(v);
            }
            let bytes = Bytes::from(serde_json::to_vec(&q).map_err(ApiError::internal)?);
            match store.update(&kv.key, bytes, kv.mod_revision).await {
                Ok(_) => break,
                Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound(_))
                    if attempt + 1 < CHARGE_ATTEMPTS =>
                {
                    match store.get(&kv.key).await.map_err(ApiError::internal)? {
                        Some(fresh) => kv = fresh,
                        None => break,
                    }
                }
                Err(e) => return Err(ApiError::internal(e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(spec: Value) -> Vec<String> {
        QuotaBehaviour
            .validate(&json!({"spec": spec}))
            .into_iter()
            .map(|c| c.field)
            .collect()
    }

    #[test]
    fn quotas_are_validated_as_kubernetes_does() {
        assert!(fields(json!({"hard": {"pods": "2", "requests.cpu": "1"}})).is_empty());
        assert_eq!(fields(json!({"hard": {"pods": "-1"}})), ["spec.hard[pods]"]);
        assert_eq!(
            fields(json!({"hard": {"pods": "1.5"}})),
            ["spec.hard[pods]"]
        );
        assert_eq!(fields(json!({"hard": {"cpu": "x"}})), ["spec.hard[cpu]"]);
        assert_eq!(fields(json!({"scopes": ["Sometimes"]})), ["spec.scopes[0]"]);
        assert_eq!(
            fields(json!({"scopeSelector": {"matchExpressions": [
                {"scopeName": "PriorityClass", "operator": "In"}]}})),
            ["spec.scopeSelector.matchExpressions[0].values"]
        );
    }

    #[test]
    fn kubectl_columns_show_used_over_hard() {
        let q = json!({"spec": {"hard": {"pods": "2", "requests.cpu": "1", "limits.memory": "1Gi"}},
            "status": {"hard": {"pods": "2", "requests.cpu": "1", "limits.memory": "1Gi"},
                       "used": {"pods": "1", "requests.cpu": "100m"}}});
        assert_eq!(
            columns(&q),
            (
                "pods: 1/2, requests.cpu: 100m/1".to_string(),
                "limits.memory: 0/1Gi".to_string()
            )
        );
    }

    #[tokio::test]
    async fn concurrent_charges_never_overrun_a_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(tapestry_store::RedbStore::open(dir.path().join("db")).unwrap());
        let q = json!({"apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": {"name": "q", "namespace": "ns"},
            "spec": {"hard": {"pods": "5"}}, "status": {"hard": {"pods": "5"}, "used": {"pods": "0"}}});
        store
            .create(
                "/registry/resourcequotas/ns/q",
                Bytes::from(serde_json::to_vec(&q).unwrap()),
            )
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for k in 0..12 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let pod = json!({"metadata": {"name": format!("p{k}"), "namespace": "ns"},
                    "spec": {"containers": [{"name": "c"}]}});
                admit(&*store, "", "pods", &pod, false).await
            }));
        }
        let mut refused = Vec::new();
        let mut admitted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => admitted += 1,
                Err(e) => refused.push(e.to_string()),
            }
        }
        assert_eq!(admitted, 5);
        assert!(
            refused[0]
                .contains("exceeded quota: q, requested: pods=1, used: pods=5, limited: pods=5"),
            "{refused:?}"
        );
        let kv = store
            .get("/registry/resourcequotas/ns/q")
            .await
            .unwrap()
            .unwrap();
        let stored: Value = serde_json::from_slice(&kv.value).unwrap();
        assert_eq!(stored["status"]["used"]["pods"], "5");
    }
}
