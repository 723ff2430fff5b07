//! batch/v1 Jobs.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use serde_json::{json, Map, Value};

use crate::error::Cause;
use crate::registry::{names, selectable, Behaviour, Generation, ResourceDef};
use crate::resources::podspec::{default_pod_spec, validate_pod_spec};
use crate::rest::status::StatusRest;
use crate::tables::{
    age, col, container_names_and_images, human_duration, i, name, s, selector_string, wide,
    TableDef, AGE, NAME,
};

const UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
const NAME_LABEL: &str = "batch.kubernetes.io/job-name";

pub fn definition() -> ResourceDef {
    ResourceDef {
        categories: names(&["all"]),
        subresources: vec![StatusRest::def()],
        generation: Generation::Spec,
        behaviour: Arc::new(JobBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Status", "Status of the job."),
                col(
                    "Completions",
                    "The desired number of successfully finished pods the job should be run with.",
                ),
                col("Duration", "Time required to complete the job."),
                AGE,
                wide("Containers", "Names of each container in the template."),
                wide(
                    "Images",
                    "Images referenced by each container in the template.",
                ),
                wide(
                    "Selector",
                    "A label query over pods that should match the pod count.",
                ),
            ],
            cells: job_cells,
        }),
        field_selectors: selectable(&[("status.successful", "/status/succeeded")]),
        ..ResourceDef::of::<Job>()
    }
}

fn job_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let (names, images) = container_names_and_images(o.pointer("/spec/template/spec"));
    let has = |t: &str| {
        o.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == "True"))
    };
    let status = if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else if o.pointer("/spec/suspend") == Some(&json!(true)) {
        "Suspended"
    } else {
        "Running"
    };
    let completions = match o.pointer("/spec/completions").and_then(Value::as_i64) {
        Some(c) => format!("{}/{c}", i(o, "/status/succeeded")),
        None => format!(
            "{}/1 of {}",
            i(o, "/status/succeeded"),
            i(o, "/spec/parallelism")
        ),
    };
    let parse = |p: &str| chrono::DateTime::parse_from_rfc3339(s(o, p)).ok();
    let duration = match (parse("/status/startTime"), parse("/status/completionTime")) {
        (Some(start), Some(end)) => human_duration((end - start).num_seconds()),
        (Some(start), None) => {
            human_duration((now - start.with_timezone(&chrono::Utc)).num_seconds())
        }
        _ => String::new(),
    };
    vec![
        name(o),
        json!(status),
        json!(completions),
        json!(duration),
        age(o, now),
        json!(names),
        json!(images),
        json!(selector_string(o.pointer("/spec/selector"))),
    ]
}

struct JobBehaviour;

fn object<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = m.entry(key).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("object just ensured")
}

impl Behaviour for JobBehaviour {
    fn default(&self, obj: &mut Value) {
        let uid = s(obj, "/metadata/uid").to_string();
        let job_name = s(obj, "/metadata/name").to_string();
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        if spec.get("completions").is_none() && spec.get("parallelism").is_none() {
            spec.insert("completions".into(), json!(1));
        }
        spec.entry("parallelism").or_insert(json!(1));
        spec.entry("backoffLimit").or_insert(json!(6));
        spec.entry("completionMode").or_insert(json!("NonIndexed"));
        spec.entry("suspend").or_insert(json!(false));
        spec.entry("podReplacementPolicy")
            .or_insert(json!("TerminatingOrFailed"));
        // The selector (and the template labels it needs) is generated from
        // the Job's uid unless the user asked for a manual selector.
        let manual = spec.get("manualSelector") == Some(&json!(true));
        if !manual && !uid.is_empty() {
            spec.entry("selector")
                .or_insert_with(|| json!({"matchLabels": {UID_LABEL: uid}}));
            let template = object(spec, "template");
            let labels = object(object(template, "metadata"), "labels");
            labels.entry(UID_LABEL).or_insert(json!(uid));
            labels.entry(NAME_LABEL).or_insert(json!(job_name));
            labels.entry("controller-uid").or_insert(json!(uid));
            labels.entry("job-name").or_insert(json!(job_name));
        }
        if let Some(template_spec) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
            default_pod_spec(template_spec);
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({});
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        match obj.get("spec") {
            None => vec![Cause::required("spec")],
            Some(spec) => validate_job_spec(spec, "spec"),
        }
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        for (field, pointer) in [
            ("spec.selector", "/spec/selector"),
            ("spec.template", "/spec/template"),
            ("spec.completions", "/spec/completions"),
        ] {
            if new.pointer(pointer) != old.pointer(pointer) {
                causes.push(Cause::invalid(
                    field,
                    new.pointer(pointer).unwrap_or(&Value::Null),
                    "field is immutable",
                ));
            }
        }
        causes
    }
}

/// A Job's spec at `path` (`spec`, or a CronJob's `spec.jobTemplate.spec`).
pub(crate) fn validate_job_spec(spec: &Value, path: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    for f in [
        "completions",
        "parallelism",
        "backoffLimit",
        "activeDeadlineSeconds",
    ] {
        if let Some(n) = spec.get(f).and_then(Value::as_i64) {
            if n < 0 {
                causes.push(Cause::invalid(
                    format!("{path}.{f}"),
                    &json!(n),
                    "must be greater than or equal to 0",
                ));
            }
        }
    }
    match spec.pointer("/template/spec") {
        None => causes.push(Cause::required(format!("{path}.template.spec"))),
        Some(pod_spec) => {
            causes.extend(validate_pod_spec(
                pod_spec,
                &format!("{path}.template.spec"),
            ));
            let restart = pod_spec.get("restartPolicy").and_then(Value::as_str);
            if !matches!(restart, Some("Never" | "OnFailure")) {
                causes.push(Cause::unsupported(
                    format!("{path}.template.spec.restartPolicy"),
                    &json!(restart),
                    &["OnFailure", "Never"],
                ));
            }
        }
    }
    causes
}
