//! core/v1 LimitRanges: the resource bounds of a namespace's containers
//! and pods. Kubernetes' defaults and validation, and the LimitRanger
//! admission of pods: missing container requests and limits are filled
//! from `defaultRequest` and `default`, then a pod outside `min`, `max` or
//! `maxLimitRequestRatio` is refused.

use std::sync::Arc;

use k8s_openapi::api::core::v1::LimitRange;
use serde_json::{json, Map, Value};
use tapestry_apimachinery::quantity::{format_milli, is_binary, milli_of, parse_milli};
use tapestry_store::{ListOptions, Store};

use crate::error::{ApiError, ApiResult, Cause};
use crate::objects::meta_str;
use crate::registry::{names, Behaviour, ResourceDef};
use crate::tables::{col, name, s, TableDef, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["limits"]),
        behaviour: Arc::new(LimitRangeBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col(
                    "Created At",
                    "CreationTimestamp is a timestamp representing the server time when this object was created.",
                ),
            ],
            cells: |o, _| vec![name(o), json!(s(o, "/metadata/creationTimestamp"))],
        }),
        ..ResourceDef::of::<LimitRange>()
    }
}

struct LimitRangeBehaviour;

const LIMIT_TYPES: [&str; 3] = ["Container", "PersistentVolumeClaim", "Pod"];
const LISTS: [&str; 5] = [
    "max",
    "min",
    "default",
    "defaultRequest",
    "maxLimitRequestRatio",
];

fn list<'a>(item: &'a Value, field: &str) -> Option<&'a Map<String, Value>> {
    item.get(field).and_then(Value::as_object)
}

fn shown(v: &Value) -> String {
    match v.as_str().and_then(parse_milli) {
        Some(m) => format_milli(m, v.as_str().is_some_and(is_binary)),
        None => v.to_string(),
    }
}

impl Behaviour for LimitRangeBehaviour {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    /// A Container item's `default` comes from `max`, its `defaultRequest`
    /// from `default`, then from `min`.
    fn default(&self, obj: &mut Value) {
        let items = obj
            .pointer_mut("/spec/limits")
            .and_then(Value::as_array_mut);
        for item in items.into_iter().flatten() {
            if item.get("type").and_then(Value::as_str) != Some("Container") {
                continue;
            }
            let Some(m) = item.as_object_mut() else {
                continue;
            };
            let from = |m: &Map<String, Value>, f: &str| {
                m.get(f)
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default()
            };
            let mut default = from(m, "default");
            for (k, v) in from(m, "max") {
                default.entry(k).or_insert(v);
            }
            let mut request = from(m, "defaultRequest");
            for (k, v) in default.iter().chain(from(m, "min").iter()) {
                request.entry(k.clone()).or_insert(v.clone());
            }
            if !default.is_empty() {
                m.insert("default".into(), Value::Object(default));
            }
            if !request.is_empty() {
                m.insert("defaultRequest".into(), Value::Object(request));
            }
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let items = obj.pointer("/spec/limits").and_then(Value::as_array);
        for (k, item) in items.into_iter().flatten().enumerate() {
            let path = format!("spec.limits[{k}]");
            let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
            if kind.is_empty() {
                causes.push(Cause::required(format!("{path}.type")));
            } else if !LIMIT_TYPES.contains(&kind) {
                causes.push(Cause::unsupported(
                    format!("{path}.type"),
                    &json!(kind),
                    &LIMIT_TYPES,
                ));
            }
            for field in LISTS {
                for (r, v) in list(item, field).into_iter().flatten() {
                    let f = format!("{path}.{field}[{r}]");
                    match milli_of(v) {
                        None => causes.push(Cause::invalid(
                            f,
                            v,
                            "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                        )),
                        Some(q) if q < 0 => causes.push(Cause::invalid(
                            f,
                            v,
                            "must be greater than or equal to 0",
                        )),
                        Some(_) => {}
                    }
                }
            }
            if kind == "Pod" {
                for field in ["default", "defaultRequest"] {
                    if list(item, field).is_some_and(|m| !m.is_empty()) {
                        causes.push(Cause::forbidden(
                            format!("{path}.{field}"),
                            "may not be specified when `type` is 'Pod'",
                        ));
                    }
                }
            }
            let get = |field: &str, r: &str| list(item, field).and_then(|m| m.get(r));
            let mut resources: Vec<&String> = LISTS
                .iter()
                .filter_map(|f| list(item, f))
                .flat_map(|m| m.keys())
                .collect();
            resources.sort();
            resources.dedup();
            for r in resources {
                let (min, max) = (get("min", r), get("max", r));
                let (default, request) = (get("default", r), get("defaultRequest", r));
                let ratio = get("maxLimitRequestRatio", r);
                let q = |v: Option<&Value>| v.and_then(milli_of);
                let bad = |field: &str, v: &Value, detail: String| {
                    Cause::invalid(format!("{path}.{field}[{r}]"), v, detail)
                };
                if let (Some(a), Some(b)) = (q(min), q(max)) {
                    if a > b {
                        let (mn, mx) = (min.unwrap_or(&Value::Null), max.unwrap_or(&Value::Null));
                        causes.push(bad(
                            "min",
                            mn,
                            format!(
                                "min value {} is greater than max value {}",
                                shown(mn),
                                shown(mx)
                            ),
                        ));
                    }
                }
                if let (Some(d), Some(dv)) = (q(request), request) {
                    if let Some(mv) = max.filter(|m| q(Some(m)).is_some_and(|m| d > m)) {
                        causes.push(bad(
                            "defaultRequest",
                            dv,
                            format!(
                                "default request value {} is greater than max value {}",
                                shown(dv),
                                shown(mv)
                            ),
                        ));
                    }
                    if let Some(lv) = default.filter(|l| q(Some(l)).is_some_and(|l| d > l)) {
                        causes.push(bad(
                            "defaultRequest",
                            dv,
                            format!(
                                "default request value {} is greater than default limit value {}",
                                shown(dv),
                                shown(lv)
                            ),
                        ));
                    }
                    if let Some(mv) = min.filter(|m| q(Some(m)).is_some_and(|m| m > d)) {
                        causes.push(bad(
                            "min",
                            mv,
                            format!(
                                "min value {} is greater than default request value {}",
                                shown(mv),
                                shown(dv)
                            ),
                        ));
                    }
                }
                if let (Some(d), Some(dv)) = (q(default), default) {
                    if let Some(mv) = max.filter(|m| q(Some(m)).is_some_and(|m| d > m)) {
                        causes.push(bad(
                            "default",
                            dv,
                            format!(
                                "default value {} is greater than max value {}",
                                shown(dv),
                                shown(mv)
                            ),
                        ));
                    }
                    if let Some(mv) = min.filter(|m| q(Some(m)).is_some_and(|m| m > d)) {
                        causes.push(bad(
                            "min",
                            mv,
                            format!(
                                "min value {} is greater than default value {}",
                                shown(mv),
                                shown(dv)
                            ),
                        ));
                    }
                }
                if let (Some(rt), Some(rv)) = (q(ratio), ratio) {
                    if rt < 1000 {
                        causes.push(bad(
                            "maxLimitRequestRatio",
                            rv,
                            format!("ratio {} is less than 1", shown(rv)),
                        ));
                    }
                    if let (Some(a), Some(b)) = (q(min), q(max)) {
                        if a > 0 && rt * a > b * 1000 {
                            causes.push(bad(
                                "maxLimitRequestRatio",
                                rv,
                                format!(
                                    "ratio {} is greater than max/min = {:.6}",
                                    shown(rv),
                                    b as f64 / a as f64
                                ),
                            ));
                        }
                    }
                }
            }
        }
        causes
    }
}

/// The LimitRanger admission of a pod being created: defaults filled in,
/// then the bounds checked. The LimitRanges are read from `store`.
pub async fn admit_pod(store: &dyn Store, pod: &mut Value) -> ApiResult<()> {
    let ns = meta_str(pod, "namespace").to_string();
    let ranges = store
        .list(
            &format!("/registry/limitranges/{ns}/"),
            ListOptions::default(),
        )
        .await
        .map_err(ApiError::internal)?;
    let items: Vec<Value> = ranges
        .items
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
        .flat_map(|r| {
            r.pointer("/spec/limits")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    if items.is_empty() {
        return Ok(());
    }
    for item in items.iter().filter(|i| s(i, "/type") == "Container") {
        apply_defaults(pod, item);
    }
    let errors: Vec<String> = items.iter().flat_map(|i| check(pod, i)).collect();
    match errors.len() {
        0 => Ok(()),
        1 => Err(forbidden(pod, &errors[0])),
        _ => Err(forbidden(pod, &format!("[{}]", errors.join(", ")))),
    }
}

fn forbidden(pod: &Value, message: &str) -> ApiError {
    ApiError::Forbidden(format!(
        "pods \"{}\" is forbidden: {message}",
        meta_str(pod, "name")
    ))
}

/// Fill each container's missing requests from `defaultRequest` and
/// missing limits from `default`.
pub fn apply_defaults(pod: &mut Value, item: &Value) {
    for list_name in ["initContainers", "containers"] {
        let containers = pod
            .pointer_mut(&format!("/spec/{list_name}"))
            .and_then(Value::as_array_mut);
        for c in containers.into_iter().flatten() {
            let Some(c) = c.as_object_mut() else { continue };
            let resources = c.entry("resources").or_insert_with(|| json!({}));
            let Some(resources) = resources.as_object_mut() else {
                continue;
            };
            for (field, target) in [("defaultRequest", "requests"), ("default", "limits")] {
                let Some(defaults) = list(item, field).filter(|m| !m.is_empty()) else {
                    continue;
                };
                let slot = resources.entry(target).or_insert_with(|| json!({}));
                let Some(slot) = slot.as_object_mut() else {
                    continue;
                };
                for (r, v) in defaults {
                    // A default request never exceeds the limit the
                    // container sets itself.
                    slot.entry(r.clone()).or_insert_with(|| v.clone());
                }
            }
            if resources
                .get("requests")
                .is_some_and(|r| r.as_object().is_some_and(Map::is_empty))
            {
                resources.remove("requests");
            }
            if resources
                .get("limits")
                .is_some_and(|r| r.as_object().is_some_and(Map::is_empty))
            {
                resources.remove("limits");
            }
        }
    }
}

/// An amount of a container (its own) or of the pod (the sum of its
/// containers, or its largest init container's if more).
fn amounts(pod: &Value, kind: &str, resource: &str, per_pod: bool) -> Vec<Option<Value>> {
    let get = |c: &Value| c.pointer(&format!("/resources/{kind}/{resource}")).cloned();
    let containers: Vec<&Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let inits: Vec<&Value> = pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if !per_pod {
        return inits
            .iter()
            .chain(containers.iter())
            .map(|c| get(c))
            .collect();
    }
    let mut any_missing = false;
    let mut binary = false;
    let mut sum = 0i128;
    for c in &containers {
        match get(c)
            .as_ref()
            .and_then(|v| Some((milli_of(v)?, v.as_str()?.to_string())))
        {
            Some((m, text)) => {
                sum += m;
                binary |= is_binary(&text);
            }
            None => any_missing = true,
        }
    }
    for c in &inits {
        if let Some(m) = get(c).as_ref().and_then(milli_of) {
            sum = sum.max(m);
        }
    }
    if any_missing {
        return vec![None];
    }
    vec![Some(json!(format_milli(sum, binary)))]
}

/// Kubernetes' refusals of one LimitRange item for the pod.
fn check(pod: &Value, item: &Value) -> Vec<String> {
    let kind = s(item, "/type");
    let per_pod = match kind {
        "Container" => false,
        "Pod" => true,
        _ => return Vec::new(),
    };
    let mut errors = Vec::new();
    for (r, min) in list(item, "min").into_iter().flatten() {
        let Some(lo) = milli_of(min) else { continue };
        for request in amounts(pod, "requests", r, per_pod) {
            match request {
                None => errors.push(format!(
                    "minimum {r} usage per {kind} is {}.  No request is specified",
                    shown(min)
                )),
                Some(v) if milli_of(&v).is_some_and(|q| q < lo) => errors.push(format!(
                    "minimum {r} usage per {kind} is {}, but request is {}",
                    shown(min),
                    shown(&v)
                )),
                Some(_) => {}
            }
        }
    }
    for (r, max) in list(item, "max").into_iter().flatten() {
        let Some(hi) = milli_of(max) else { continue };
        for limit in amounts(pod, "limits", r, per_pod) {
            match limit {
                None => errors.push(format!(
                    "maximum {r} usage per {kind} is {}.  No limit is specified",
                    shown(max)
                )),
                Some(v) if milli_of(&v).is_some_and(|q| q > hi) => errors.push(format!(
                    "maximum {r} usage per {kind} is {}, but limit is {}",
                    shown(max),
                    shown(&v)
                )),
                Some(_) => {}
            }
        }
    }
    for (r, ratio) in list(item, "maxLimitRequestRatio").into_iter().flatten() {
        let Some(most) = milli_of(ratio) else {
            continue;
        };
        let limits = amounts(pod, "limits", r, per_pod);
        let requests = amounts(pod, "requests", r, per_pod);
        for (limit, request) in limits.into_iter().zip(requests) {
            let limit = limit.as_ref().and_then(milli_of);
            let request = request.as_ref().and_then(milli_of).filter(|q| *q > 0);
            match (limit, request) {
                (None, _) => errors.push(format!(
                    "{r} max limit to request ratio per {kind} is {}, but no limit is specified",
                    shown(ratio)
                )),
                (Some(_), None) => errors.push(format!(
                    "{r} max limit to request ratio per {kind} is {}, but no request is specified or request is 0",
                    shown(ratio)
                )),
                (Some(l), Some(q)) if l * 1000 > most * q => errors.push(format!(
                    "{r} max limit to request ratio per {kind} is {}, but provided ratio is {:.6}",
                    shown(ratio),
                    l as f64 / q as f64
                )),
                _ => {}
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(spec: Value) -> Vec<String> {
        LimitRangeBehaviour
            .validate(&json!({"spec": spec}))
            .into_iter()
            .map(|c| c.field)
            .collect()
    }

    #[test]
    fn limit_ranges_are_validated_as_kubernetes_does() {
        assert!(fields(json!({"limits": [{"type": "Container",
            "max": {"cpu": "1"}, "min": {"cpu": "100m"}, "default": {"cpu": "500m"}}]}))
        .is_empty());
        assert_eq!(fields(json!({"limits": [{}]})), ["spec.limits[0].type"]);
        assert_eq!(
            fields(json!({"limits": [{"type": "Node"}]})),
            ["spec.limits[0].type"]
        );
        assert_eq!(
            fields(json!({"limits": [{"type": "Container", "max": {"cpu": "lots"}}]})),
            ["spec.limits[0].max[cpu]"]
        );
        assert_eq!(
            fields(
                json!({"limits": [{"type": "Container", "max": {"cpu": "1"}, "min": {"cpu": "2"}}]})
            ),
            ["spec.limits[0].min[cpu]"]
        );
        assert_eq!(
            fields(json!({"limits": [{"type": "Pod", "default": {"cpu": "1"}}]})),
            ["spec.limits[0].default"]
        );
        assert_eq!(
            fields(
                json!({"limits": [{"type": "Container", "maxLimitRequestRatio": {"cpu": "500m"}}]})
            ),
            ["spec.limits[0].maxLimitRequestRatio[cpu]"]
        );
        let bad = LimitRangeBehaviour.validate(&json!({"spec": {"limits": [{"type": "Container",
            "max": {"cpu": "1"}, "default": {"cpu": "2"}}]}}));
        assert_eq!(bad[0].field, "spec.limits[0].default[cpu]");
        assert_eq!(
            bad[0].message,
            "Invalid value: \"2\": default value 2 is greater than max value 1"
        );
    }

    #[test]
    fn container_defaults_come_from_max_then_default_then_min() {
        let mut lr = json!({"spec": {"limits": [{"type": "Container",
            "max": {"cpu": "1"}, "min": {"memory": "64Mi"}}]}});
        LimitRangeBehaviour.default(&mut lr);
        assert_eq!(lr["spec"]["limits"][0]["default"], json!({"cpu": "1"}));
        assert_eq!(
            lr["spec"]["limits"][0]["defaultRequest"],
            json!({"cpu": "1", "memory": "64Mi"})
        );
    }

    #[test]
    fn pods_get_defaults_and_are_held_to_the_bounds() {
        let item = json!({"type": "Container", "default": {"cpu": "500m"},
            "defaultRequest": {"cpu": "100m"}, "max": {"cpu": "1"}, "min": {"cpu": "50m"}});
        let mut pod = json!({"metadata": {"name": "x"}, "spec": {"containers": [
            {"name": "a"},
            {"name": "b", "resources": {"limits": {"cpu": "800m"}, "requests": {"cpu": "800m"}}},
        ]}});
        apply_defaults(&mut pod, &item);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "500m"}})
        );
        assert_eq!(
            pod["spec"]["containers"][1]["resources"]["limits"]["cpu"],
            "800m"
        );
        assert!(check(&pod, &item).is_empty());
        let big = json!({"spec": {"containers": [{"name": "a",
            "resources": {"limits": {"cpu": "2"}, "requests": {"cpu": "2"}}}]}});
        assert_eq!(
            check(&big, &item),
            ["maximum cpu usage per Container is 1, but limit is 2"]
        );
        let ratio = json!({"type": "Container", "maxLimitRequestRatio": {"cpu": "2"}});
        let wide = json!({"spec": {"containers": [{"name": "a",
            "resources": {"limits": {"cpu": "2"}, "requests": {"cpu": "500m"}}}]}});
        assert_eq!(
            check(&wide, &ratio),
            ["cpu max limit to request ratio per Container is 2, but provided ratio is 4.000000"]
        );
        let per_pod = json!({"type": "Pod", "max": {"memory": "1Gi"}});
        let two = json!({"spec": {"containers": [
            {"name": "a", "resources": {"limits": {"memory": "768Mi"}}},
            {"name": "b", "resources": {"limits": {"memory": "512Mi"}}},
        ]}});
        assert_eq!(
            check(&two, &per_pod),
            ["maximum memory usage per Pod is 1Gi, but limit is 1280Mi"]
        );
    }
}
