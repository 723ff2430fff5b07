//! HorizontalPodAutoscalers: the replica count of a scalable workload
//! follows its pods' resource use (the controller manager's
//! horizontal-pod-autoscaler controller acts on them).
//!
//! autoscaling/v2 is the storage version. autoscaling/v1 is a view of the
//! same objects: its `targetCPUUtilizationPercentage` is v2's CPU
//! utilization metric, and what v1 has no field for (other metrics, the
//! scaling behaviour, conditions, other current metrics) travels in
//! annotations, as Kubernetes does, so an object read and written back
//! through v1 keeps it.

use std::sync::Arc;

use k8s_openapi::api::autoscaling::{v1, v2};
use serde_json::{json, Map, Value};

use crate::error::Cause;
use crate::registry::{names, Behaviour, Generation, ResourceDef};
use crate::rest::status::StatusRest;
use crate::tables::{age, col, name, s, TableDef, AGE, NAME};
use crate::validation::path_segment_errors;
use tapestry_apimachinery::quantity::milli_of;

/// v2 metrics other than v1's CPU utilization target (v2 JSON).
pub const METRICS_ANNOTATION: &str = "autoscaling.tapestry.io/metrics";
/// v2 current metrics other than v1's current CPU utilization (v2 JSON).
pub const CURRENT_METRICS_ANNOTATION: &str = "autoscaling.tapestry.io/current-metrics";
/// Status conditions, in the form Kubernetes keeps them on v1 objects.
pub const CONDITIONS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/conditions";
/// `spec.behavior`, in the form Kubernetes keeps it on v1 objects.
pub const BEHAVIOR_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/behavior";

/// The utilization Kubernetes targets when an autoscaler names no metric.
pub const DEFAULT_CPU_UTILIZATION: i64 = 80;
/// Kubernetes' bounds on behaviour windows and policy periods.
const MAX_STABILIZATION_WINDOW: i64 = 3600;
const MAX_PERIOD: i64 = 1800;

fn common(mut def: ResourceDef) -> ResourceDef {
    def.short_names = names(&["hpa"]);
    def.categories = names(&["all"]);
    def.subresources = vec![StatusRest::def()];
    def.generation = Generation::Spec;
    def.storage = "horizontalpodautoscalers".into();
    def
}

fn columns() -> Vec<crate::tables::Column> {
    vec![
        NAME,
        col(
            "Reference",
            "reference to scaled resource; horizontal pod autoscaler will learn the current resource consumption and will set the desired number of pods by using its Scale subresource.",
        ),
        col(
            "Targets",
            "metrics contains the specifications for which to use to calculate the desired replica count (the maximum replica count across all metrics will be used).",
        ),
        col(
            "MinPods",
            "minReplicas is the lower limit for the number of replicas to which the autoscaler can scale down.",
        ),
        col(
            "MaxPods",
            "maxReplicas is the upper limit for the number of replicas to which the autoscaler can scale up.",
        ),
        col(
            "Replicas",
            "currentReplicas is current number of replicas of pods managed by this autoscaler, as last seen by the autoscaler.",
        ),
        AGE,
    ]
}

pub fn definition_v2() -> ResourceDef {
    ResourceDef {
        behaviour: Arc::new(HpaV2),
        table: Arc::new(TableDef {
            columns: columns(),
            cells: cells_v2,
        }),
        ..common(ResourceDef::of::<v2::HorizontalPodAutoscaler>())
    }
}

pub fn definition_v1() -> ResourceDef {
    ResourceDef {
        behaviour: Arc::new(HpaV1),
        table: Arc::new(TableDef {
            columns: columns(),
            cells: |o, now| cells_v2(&v1_to_v2(o.clone()), now),
        }),
        ..common(ResourceDef::of::<v1::HorizontalPodAutoscaler>())
    }
}

/// A quantity as printed: strings as written, numbers as numbers.
fn shown(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "<unknown>".into(),
    }
}

/// The TARGETS cell: `cpu: 35%/50%` per metric, two at most, as kubectl
/// prints it against Kubernetes.
pub fn format_targets(o: &Value) -> String {
    let specs = o
        .pointer("/spec/metrics")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if specs.is_empty() {
        return "<none>".into();
    }
    let current = o
        .pointer("/status/currentMetrics")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    const MAX_SHOWN: usize = 2;
    let mut list = Vec::new();
    for (i, spec) in specs.iter().enumerate().take(MAX_SHOWN) {
        let status = current.get(i);
        let kind = spec.get("type").and_then(Value::as_str).unwrap_or("");
        let source = match kind {
            "Resource" => "resource",
            "ContainerResource" => "containerResource",
            "Pods" => "pods",
            "Object" => "object",
            "External" => "external",
            _ => {
                list.push("<unknown>".to_string());
                continue;
            }
        };
        let src = spec.get(source).cloned().unwrap_or(Value::Null);
        let cur = status.and_then(|st| st.get(source)).map(|c| &c["current"]);
        let target = &src["target"];
        let label = match kind {
            "Resource" | "ContainerResource" => src["name"].as_str().unwrap_or("").to_string(),
            _ => src
                .pointer("/metric/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        };
        let text = if let Some(u) = target.get("averageUtilization").and_then(Value::as_i64) {
            let now = cur
                .and_then(|c| c.get("averageUtilization"))
                .and_then(Value::as_i64)
                .map_or("<unknown>".to_string(), |c| format!("{c}%"));
            format!("{now}/{u}%")
        } else if let Some(v) = target.get("averageValue") {
            format!(
                "{}/{}",
                shown(cur.and_then(|c| c.get("averageValue"))),
                shown(Some(v))
            )
        } else {
            format!(
                "{}/{}",
                shown(cur.and_then(|c| c.get("value"))),
                shown(target.get("value"))
            )
        };
        list.push(format!("{label}: {text}"));
    }
    let mut out = list.join(", ");
    if specs.len() > MAX_SHOWN {
        out.push_str(&format!(" + {} more...", specs.len() - MAX_SHOWN));
    }
    out
}

fn cells_v2(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let reference = format!(
        "{}/{}",
        s(o, "/spec/scaleTargetRef/kind"),
        s(o, "/spec/scaleTargetRef/name")
    );
    let min = match o.pointer("/spec/minReplicas").and_then(Value::as_i64) {
        Some(n) => json!(n.to_string()),
        None => json!("<unset>"),
    };
    vec![
        name(o),
        json!(reference),
        json!(format_targets(o)),
        min,
        json!(o
            .pointer("/spec/maxReplicas")
            .and_then(Value::as_i64)
            .unwrap_or(0)),
        json!(o
            .pointer("/status/currentReplicas")
            .and_then(Value::as_i64)
            .unwrap_or(0)),
        age(o, now),
    ]
}

/// Kubernetes' default scaling rules: scale up at once by up to 4 pods or
/// 100% per 15 s; scale down by up to 100% per 15 s. The scale-down window
/// stays unset, as in Kubernetes, so the controller manager's
/// `--horizontal-pod-autoscaler-downscale-stabilization` (5 m) applies.
pub fn default_rules(up: bool) -> Value {
    if up {
        json!({"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
            {"type": "Pods", "value": 4, "periodSeconds": 15},
            {"type": "Percent", "value": 100, "periodSeconds": 15}]})
    } else {
        json!({"selectPolicy": "Max", "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15}]})
    }
}

/// v2 defaults: minReplicas 1, a CPU utilization target of 80% when no
/// metric is named, and the unset parts of a given behaviour filled in.
pub fn default_v2(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("minReplicas").or_insert(json!(1));
    let no_metrics = spec
        .get("metrics")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty);
    if no_metrics {
        spec.insert(
            "metrics".into(),
            json!([{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": DEFAULT_CPU_UTILIZATION}}}]),
        );
    }
    if let Some(behavior) = spec.get_mut("behavior").and_then(Value::as_object_mut) {
        for (key, up) in [("scaleUp", true), ("scaleDown", false)] {
            let defaults = default_rules(up);
            let rules = behavior.entry(key).or_insert_with(|| defaults.clone());
            if let Some(r) = rules.as_object_mut() {
                for f in ["stabilizationWindowSeconds", "selectPolicy", "policies"] {
                    let Some(default) = defaults.get(f) else {
                        continue;
                    };
                    if r.get(f).is_none_or(Value::is_null) {
                        r.insert(f.into(), default.clone());
                    }
                }
            }
        }
    }
}

fn check_target(target: &Value, path: &str, causes: &mut Vec<Cause>) {
    match target.get("type").and_then(Value::as_str) {
        None | Some("") => causes.push(Cause::required_because(
            format!("{path}.type"),
            "must specify a metric target type",
        )),
        Some("Utilization" | "Value" | "AverageValue") => {}
        Some(t) => causes.push(Cause::invalid(
            format!("{path}.type"),
            &json!(t),
            "must be either Utilization, Value, or AverageValue",
        )),
    }
    for f in ["value", "averageValue"] {
        if let Some(v) = target.get(f).filter(|v| !v.is_null()) {
            if milli_of(v).is_none_or(|m| m <= 0) {
                causes.push(Cause::invalid(format!("{path}.{f}"), v, "must be positive"));
            }
        }
    }
    if let Some(u) = target.get("averageUtilization").and_then(Value::as_i64) {
        if u < 1 {
            causes.push(Cause::invalid(
                format!("{path}.averageUtilization"),
                &json!(u),
                "must be greater than 0",
            ));
        }
    }
}

fn check_metric(m: &Value, path: &str, causes: &mut Vec<Cause>) {
    const TYPES: [&str; 5] = [
        "ContainerResource",
        "External",
        "Object",
        "Pods",
        "Resource",
    ];
    let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
    let field = match kind {
        "" => {
            causes.push(Cause::required_because(
                format!("{path}.type"),
                "must specify a metric source type",
            ));
            return;
        }
        "Resource" => "resource",
        "ContainerResource" => "containerResource",
        "Pods" => "pods",
        "Object" => "object",
        "External" => "external",
        other => {
            causes.push(Cause::unsupported(
                format!("{path}.type"),
                &json!(other),
                &TYPES,
            ));
            return;
        }
    };
    for other in [
        "resource",
        "containerResource",
        "pods",
        "object",
        "external",
    ] {
        if other != field && m.get(other).is_some_and(|v| !v.is_null()) {
            causes.push(Cause::forbidden(
                format!("{path}.{other}"),
                "must populate the given metric source only",
            ));
        }
    }
    let Some(src) = m.get(field).filter(|v| !v.is_null()) else {
        causes.push(Cause::required_because(
            format!("{path}.{field}"),
            "must populate information for the given metric source",
        ));
        return;
    };
    let src_path = format!("{path}.{field}");
    let target = src.get("target").cloned().unwrap_or(json!({}));
    check_target(&target, &format!("{src_path}.target"), causes);
    let has = |f: &str| target.get(f).is_some_and(|v| !v.is_null());
    match field {
        "resource" | "containerResource" => {
            if src
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                causes.push(Cause::required_because(
                    format!("{src_path}.name"),
                    "must specify a resource name",
                ));
            }
            if field == "containerResource"
                && src
                    .get("container")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
            {
                causes.push(Cause::required_because(
                    format!("{src_path}.container"),
                    "must specify a container",
                ));
            }
            if !has("averageUtilization") && !has("averageValue") {
                causes.push(Cause::required_because(
                    format!("{src_path}.target.averageUtilization"),
                    "must set either a target raw value or a target utilization",
                ));
            }
            if has("averageUtilization") && has("averageValue") {
                causes.push(Cause::forbidden(
                    format!("{src_path}.target.averageValue"),
                    "may not set both a target raw value and a target utilization",
                ));
            }
        }
        "pods" => {
            if !has("averageValue") {
                causes.push(Cause::required_because(
                    format!("{src_path}.target.averageValue"),
                    "must specify a positive target averageValue",
                ));
            }
        }
        _ => {
            if !has("value") && !has("averageValue") {
                causes.push(Cause::required_because(
                    format!("{src_path}.target.averageValue"),
                    "must set either a target value or averageValue",
                ));
            }
        }
    }
    if matches!(field, "pods" | "object" | "external")
        && src
            .pointer("/metric/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
    {
        causes.push(Cause::required_because(
            format!("{src_path}.metric.name"),
            "must specify a metric name",
        ));
    }
}

fn check_rules(rules: &Value, path: &str, causes: &mut Vec<Cause>) {
    if rules.is_null() {
        return;
    }
    if let Some(w) = rules
        .get("stabilizationWindowSeconds")
        .and_then(Value::as_i64)
    {
        if w < 0 {
            causes.push(Cause::invalid(
                format!("{path}.stabilizationWindowSeconds"),
                &json!(w),
                "must be greater than or equal to zero",
            ));
        } else if w > MAX_STABILIZATION_WINDOW {
            causes.push(Cause::invalid(
                format!("{path}.stabilizationWindowSeconds"),
                &json!(w),
                format!("must be less than or equal to {MAX_STABILIZATION_WINDOW}"),
            ));
        }
    }
    if let Some(p) = rules.get("selectPolicy").and_then(Value::as_str) {
        if !["Disabled", "Max", "Min"].contains(&p) {
            causes.push(Cause::unsupported(
                format!("{path}.selectPolicy"),
                &json!(p),
                &["Disabled", "Max", "Min"],
            ));
        }
    }
    let policies = rules
        .get("policies")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if policies.is_empty() {
        causes.push(Cause::required_because(
            format!("{path}.policies"),
            "must specify at least one Policy",
        ));
    }
    for (i, p) in policies.iter().enumerate() {
        let at = format!("{path}.policies[{i}]");
        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
        if !["Percent", "Pods"].contains(&kind) {
            causes.push(Cause::unsupported(
                format!("{at}.type"),
                &json!(kind),
                &["Percent", "Pods"],
            ));
        }
        let value = p.get("value").and_then(Value::as_i64).unwrap_or(0);
        if value <= 0 {
            causes.push(Cause::invalid(
                format!("{at}.value"),
                &json!(value),
                "must be greater than zero",
            ));
        }
        let period = p.get("periodSeconds").and_then(Value::as_i64).unwrap_or(0);
        if period <= 0 {
            causes.push(Cause::invalid(
                format!("{at}.periodSeconds"),
                &json!(period),
                "must be greater than zero",
            ));
        } else if period > MAX_PERIOD {
            causes.push(Cause::invalid(
                format!("{at}.periodSeconds"),
                &json!(period),
                format!("must be less than or equal to {MAX_PERIOD}"),
            ));
        }
    }
}

/// Kubernetes' validation of a v2 autoscaler, field by field.
pub fn validate_v2(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let Some(spec) = obj.get("spec") else {
        causes.push(Cause::required("spec"));
        return causes;
    };
    for f in ["kind", "name"] {
        let path = format!("spec.scaleTargetRef.{f}");
        match spec
            .pointer(&format!("/scaleTargetRef/{f}"))
            .and_then(Value::as_str)
        {
            None | Some("") => causes.push(Cause::required(path)),
            Some(v) => {
                for msg in path_segment_errors(v, false) {
                    causes.push(Cause::invalid(path.clone(), &json!(v), msg));
                }
            }
        }
    }
    let min = spec.get("minReplicas").and_then(Value::as_i64);
    let max = spec.get("maxReplicas").and_then(Value::as_i64).unwrap_or(0);
    if let Some(min) = min.filter(|m| *m < 1) {
        causes.push(Cause::invalid(
            "spec.minReplicas",
            &json!(min),
            "must be greater than or equal to 1",
        ));
    }
    if max < 1 {
        causes.push(Cause::invalid(
            "spec.maxReplicas",
            &json!(max),
            "must be greater than 0",
        ));
    }
    if min.is_some_and(|min| max < min) {
        causes.push(Cause::invalid(
            "spec.maxReplicas",
            &json!(max),
            "must be greater than or equal to `minReplicas`",
        ));
    }
    if let Some(metrics) = spec.get("metrics").and_then(Value::as_array) {
        for (i, m) in metrics.iter().enumerate() {
            check_metric(m, &format!("spec.metrics[{i}]"), &mut causes);
        }
    }
    if let Some(b) = spec.get("behavior").filter(|b| !b.is_null()) {
        check_rules(&b["scaleUp"], "spec.behavior.scaleUp", &mut causes);
        check_rules(&b["scaleDown"], "spec.behavior.scaleDown", &mut causes);
    }
    causes
}

fn validate_status(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    for f in ["currentReplicas", "desiredReplicas"] {
        if let Some(n) = obj.pointer(&format!("/status/{f}")).and_then(Value::as_i64) {
            if n < 0 {
                causes.push(Cause::invalid(
                    format!("status.{f}"),
                    &json!(n),
                    "must be greater than or equal to 0",
                ));
            }
        }
    }
    causes
}

struct HpaV2;

impl Behaviour for HpaV2 {
    fn default(&self, obj: &mut Value) {
        default_v2(obj);
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({"currentReplicas": 0, "desiredReplicas": 0});
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        validate_v2(obj)
    }

    fn validate_status_update(&self, new: &Value, _old: &Value) -> Vec<Cause> {
        validate_status(new)
    }
}

/// autoscaling/v1: converted to and from the v2 storage form.
struct HpaV1;

impl Behaviour for HpaV1 {
    fn default(&self, obj: &mut Value) {
        if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            spec.entry("minReplicas").or_insert(json!(1));
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({"currentReplicas": 0, "desiredReplicas": 0});
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        if let Some(t) = obj
            .pointer("/spec/targetCPUUtilizationPercentage")
            .and_then(Value::as_i64)
        {
            if t < 1 {
                causes.push(Cause::invalid(
                    "spec.targetCPUUtilizationPercentage",
                    &json!(t),
                    "must be greater than 0",
                ));
            }
        }
        for a in [METRICS_ANNOTATION, BEHAVIOR_ANNOTATION] {
            if let Some(text) = annotation(obj, a) {
                if serde_json::from_str::<Value>(text).is_err() {
                    causes.push(Cause::invalid(
                        format!("metadata.annotations[{a}]"),
                        &json!(text),
                        "must be valid JSON",
                    ));
                }
            }
        }
        // The rest as v2 sees it (the CPU target converted is checked above).
        let mut v2 = v1_to_v2(obj.clone());
        if let Some(t) = v2.pointer_mut("/spec/metrics/0/resource/target/averageUtilization") {
            if t.as_i64().is_some_and(|t| t < 1) {
                *t = json!(1);
            }
        }
        causes.extend(validate_v2(&v2));
        causes
    }

    fn validate_status_update(&self, new: &Value, _old: &Value) -> Vec<Cause> {
        validate_status(new)
    }

    fn to_storage(&self, obj: Value) -> Value {
        v1_to_v2(obj)
    }

    fn to_served(&self, obj: Value) -> Value {
        v2_to_v1(obj)
    }

    fn serves_stored_form(&self) -> bool {
        false
    }
}

fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.pointer("/metadata/annotations")?.get(key)?.as_str()
}

/// Take the annotation `key` off `obj` and parse it as JSON.
fn take_annotation(obj: &mut Value, key: &str) -> Option<Value> {
    let annotations = obj
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)?;
    let text = annotations.remove(key)?;
    if annotations.is_empty() {
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("annotations");
        }
    }
    serde_json::from_str(text.as_str()?).ok()
}

fn set_annotation(obj: &mut Value, key: &str, value: &Value) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(a) = annotations.as_object_mut() {
        a.insert(key.into(), json!(value.to_string()));
    }
}

/// Whether a v2 metric is v1's CPU utilization target.
fn is_cpu_utilization(m: &Value) -> bool {
    m["type"] == "Resource"
        && m.pointer("/resource/name") == Some(&json!("cpu"))
        && m.pointer("/resource/target/type") == Some(&json!("Utilization"))
        && m.pointer("/resource/target/averageUtilization").is_some()
}

/// The stored v2 form as autoscaling/v1 serves it.
pub fn v2_to_v1(mut obj: Value) -> Value {
    let Some(o) = obj.as_object_mut() else {
        return obj;
    };
    o.insert("apiVersion".into(), json!("autoscaling/v1"));
    let spec = o.remove("spec").unwrap_or(json!({}));
    let status = o.remove("status");
    let mut v1_spec = Map::new();
    for f in ["scaleTargetRef", "minReplicas", "maxReplicas"] {
        if let Some(v) = spec.get(f) {
            v1_spec.insert(f.into(), v.clone());
        }
    }
    let mut others = Vec::new();
    let mut cpu_taken = false;
    for m in spec
        .get("metrics")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        if !cpu_taken && is_cpu_utilization(&m) {
            cpu_taken = true;
            v1_spec.insert(
                "targetCPUUtilizationPercentage".into(),
                m["resource"]["target"]["averageUtilization"].clone(),
            );
        } else {
            others.push(m);
        }
    }
    o.insert("spec".into(), Value::Object(v1_spec));
    if !others.is_empty() {
        set_annotation(&mut obj, METRICS_ANNOTATION, &Value::Array(others));
    }
    if let Some(b) = spec.get("behavior").filter(|b| !b.is_null()) {
        set_annotation(&mut obj, BEHAVIOR_ANNOTATION, b);
    }
    let Some(status) = status else {
        return obj;
    };
    let mut v1_status = Map::new();
    for f in [
        "observedGeneration",
        "lastScaleTime",
        "currentReplicas",
        "desiredReplicas",
    ] {
        if let Some(v) = status.get(f) {
            v1_status.insert(f.into(), v.clone());
        }
    }
    let mut others = Vec::new();
    let mut cpu_taken = false;
    for m in status
        .get("currentMetrics")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let current = m.pointer("/resource/current/averageUtilization").cloned();
        match current {
            Some(u)
                if !cpu_taken
                    && m["type"] == "Resource"
                    && m.pointer("/resource/name") == Some(&json!("cpu")) =>
            {
                cpu_taken = true;
                v1_status.insert("currentCPUUtilizationPercentage".into(), u);
            }
            _ => others.push(m),
        }
    }
    if !others.is_empty() {
        set_annotation(&mut obj, CURRENT_METRICS_ANNOTATION, &Value::Array(others));
    }
    if let Some(c) = status
        .get("conditions")
        .filter(|c| c.as_array().is_some_and(|a| !a.is_empty()))
    {
        set_annotation(&mut obj, CONDITIONS_ANNOTATION, c);
    }
    obj["status"] = Value::Object(v1_status);
    obj
}

/// An autoscaling/v1 object in its v2 storage form (the annotations that
/// carry v2-only data are folded back in).
pub fn v1_to_v2(mut obj: Value) -> Value {
    let more_metrics = take_annotation(&mut obj, METRICS_ANNOTATION);
    let behavior = take_annotation(&mut obj, BEHAVIOR_ANNOTATION);
    let more_current = take_annotation(&mut obj, CURRENT_METRICS_ANNOTATION);
    let conditions = take_annotation(&mut obj, CONDITIONS_ANNOTATION);
    let Some(o) = obj.as_object_mut() else {
        return obj;
    };
    o.insert("apiVersion".into(), json!("autoscaling/v2"));
    let spec = o.remove("spec").unwrap_or(json!({}));
    let mut v2_spec = Map::new();
    for f in ["scaleTargetRef", "minReplicas", "maxReplicas"] {
        if let Some(v) = spec.get(f) {
            v2_spec.insert(f.into(), v.clone());
        }
    }
    let mut metrics = Vec::new();
    if let Some(t) = spec
        .get("targetCPUUtilizationPercentage")
        .filter(|t| !t.is_null())
    {
        metrics.push(json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": t}}}));
    }
    if let Some(Value::Array(more)) = more_metrics {
        metrics.extend(more);
    }
    if !metrics.is_empty() {
        v2_spec.insert("metrics".into(), Value::Array(metrics));
    }
    if let Some(b) = behavior.filter(Value::is_object) {
        v2_spec.insert("behavior".into(), b);
    }
    o.insert("spec".into(), Value::Object(v2_spec));
    if let Some(status) = o.remove("status") {
        let mut v2_status = Map::new();
        for f in [
            "observedGeneration",
            "lastScaleTime",
            "currentReplicas",
            "desiredReplicas",
        ] {
            if let Some(v) = status.get(f) {
                v2_status.insert(f.into(), v.clone());
            }
        }
        let mut current = Vec::new();
        if let Some(u) = status
            .get("currentCPUUtilizationPercentage")
            .filter(|u| !u.is_null())
        {
            current.push(json!({"type": "Resource", "resource": {"name": "cpu",
                "current": {"averageUtilization": u}}}));
        }
        if let Some(Value::Array(more)) = more_current {
            current.extend(more);
        }
        if !current.is_empty() {
            v2_status.insert("currentMetrics".into(), Value::Array(current));
        }
        if let Some(c) = conditions.filter(Value::is_array) {
            v2_status.insert("conditions".into(), c);
        }
        o.insert("status".into(), Value::Object(v2_status));
    }
    // v1 has no way to say "no metric": Kubernetes applies the CPU default
    // on conversion.
    default_v2(&mut obj);
    obj
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa(spec: Value) -> Value {
        json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "web", "namespace": "default"}, "spec": spec})
    }

    fn errors(mut o: Value) -> Vec<String> {
        HpaV2.default(&mut o);
        HpaV2.validate(&o).into_iter().map(|c| c.render()).collect()
    }

    fn target() -> Value {
        json!({"kind": "Deployment", "name": "web", "apiVersion": "apps/v1"})
    }

    #[test]
    fn defaults_are_kubernetes_defaults() {
        let mut o = hpa(json!({"scaleTargetRef": target(), "maxReplicas": 5}));
        HpaV2.default(&mut o);
        assert_eq!(o["spec"]["minReplicas"], 1);
        assert_eq!(
            o["spec"]["metrics"],
            json!([{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 80}}}])
        );
        assert!(o["spec"].get("behavior").is_none());
        let mut o = hpa(json!({"scaleTargetRef": target(), "maxReplicas": 5,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 10}}}));
        HpaV2.default(&mut o);
        assert_eq!(o["spec"]["behavior"]["scaleUp"], default_rules(true));
        assert_eq!(
            o["spec"]["behavior"]["scaleDown"],
            json!({"stabilizationWindowSeconds": 10, "selectPolicy": "Max",
                   "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]})
        );
        assert!(HpaV2.validate(&o).is_empty());
        // A scale-down window left out stays out: the controller's flag rules.
        let mut o = hpa(json!({"scaleTargetRef": target(), "maxReplicas": 5,
            "behavior": {"scaleUp": {"stabilizationWindowSeconds": 10}}}));
        HpaV2.default(&mut o);
        assert!(o["spec"]["behavior"]["scaleDown"]
            .get("stabilizationWindowSeconds")
            .is_none());
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            errors(hpa(
                json!({"scaleTargetRef": target(), "minReplicas": 2, "maxReplicas": 0})
            )),
            vec![
                "spec.maxReplicas: Invalid value: 0: must be greater than 0",
                "spec.maxReplicas: Invalid value: 0: must be greater than or equal to `minReplicas`"
            ]
        );
        assert_eq!(
            errors(hpa(
                json!({"scaleTargetRef": target(), "minReplicas": 0, "maxReplicas": 3})
            )),
            vec!["spec.minReplicas: Invalid value: 0: must be greater than or equal to 1"]
        );
        assert_eq!(
            errors(hpa(json!({"scaleTargetRef": {}, "maxReplicas": 3}))),
            vec![
                "spec.scaleTargetRef.kind: Required value",
                "spec.scaleTargetRef.name: Required value"
            ]
        );
        assert_eq!(
            errors(hpa(json!({"scaleTargetRef": target(), "maxReplicas": 3, "metrics": [
                {"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 0}}},
                {"type": "Magic"},
                {"type": "Resource", "resource": {"name": "memory",
                    "target": {"type": "Percent", "averageValue": "100Mi"}}},
            ]}))),
            vec![
                "spec.metrics[0].resource.target.averageUtilization: Invalid value: 0: must be greater than 0",
                "spec.metrics[1].type: Unsupported value: \"Magic\": supported values: \"ContainerResource\", \"External\", \"Object\", \"Pods\", \"Resource\"",
                "spec.metrics[2].resource.target.type: Invalid value: \"Percent\": must be either Utilization, Value, or AverageValue",
            ]
        );
        assert_eq!(
            errors(hpa(json!({"scaleTargetRef": target(), "maxReplicas": 3,
                "behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 15}],
                             "selectPolicy": "Sometimes"}}}))),
            vec![
                "spec.behavior.scaleUp.selectPolicy: Unsupported value: \"Sometimes\": supported values: \"Disabled\", \"Max\", \"Min\"",
                "spec.behavior.scaleUp.policies[0].value: Invalid value: 0: must be greater than zero",
            ]
        );
    }

    #[test]
    fn v1_and_v2_convert_without_loss() {
        let mut v2 = hpa(
            json!({"scaleTargetRef": target(), "minReplicas": 2, "maxReplicas": 5,
            "metrics": [
                {"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 50}}},
                {"type": "Resource", "resource": {"name": "memory",
                    "target": {"type": "AverageValue", "averageValue": "100Mi"}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 10}}}),
        );
        HpaV2.default(&mut v2);
        v2["status"] = json!({"currentReplicas": 2, "desiredReplicas": 3,
            "currentMetrics": [
                {"type": "Resource", "resource": {"name": "cpu",
                    "current": {"averageUtilization": 70, "averageValue": "70m"}}},
                {"type": "Resource", "resource": {"name": "memory",
                    "current": {"averageValue": "10Mi"}}}],
            "conditions": [{"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale"}]});
        let v1 = v2_to_v1(v2.clone());
        assert_eq!(v1["apiVersion"], "autoscaling/v1");
        assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50);
        assert_eq!(v1["status"]["currentCPUUtilizationPercentage"], 70);
        assert!(annotation(&v1, METRICS_ANNOTATION)
            .unwrap()
            .contains("memory"));
        assert!(annotation(&v1, CONDITIONS_ANNOTATION)
            .unwrap()
            .contains("AbleToScale"));
        let back = v1_to_v2(v1);
        assert_eq!(back["spec"], v2["spec"]);
        assert_eq!(back["status"]["conditions"], v2["status"]["conditions"]);
        assert_eq!(
            back["status"]["currentMetrics"][1],
            v2["status"]["currentMetrics"][1]
        );
        assert!(back["metadata"].get("annotations").is_none());
        assert_eq!(format_targets(&back), "cpu: 70%/50%, memory: 10Mi/100Mi");
    }

    #[test]
    fn targets_print_as_kubectl_prints_them() {
        let mut o = hpa(
            json!({"scaleTargetRef": target(), "maxReplicas": 5, "metrics": [
            {"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 50}}}]}),
        );
        assert_eq!(format_targets(&o), "cpu: <unknown>/50%");
        o["status"] = json!({"currentReplicas": 1, "currentMetrics": [{"type": "Resource",
            "resource": {"name": "cpu", "current": {"averageUtilization": 35}}}]});
        assert_eq!(format_targets(&o), "cpu: 35%/50%");
        let cells = cells_v2(&o, chrono::Utc::now());
        assert_eq!(cells[1], "Deployment/web");
        assert_eq!(cells[3], "<unset>");
        assert_eq!(cells[4], 5);
        assert_eq!(cells[5], 1);
    }
}
