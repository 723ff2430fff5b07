//! batch/v1 CronJobs: Jobs from a template on a cron schedule. The
//! schedule and time zone are parsed at admission (the parser the
//! controller uses), and the job template is validated as a Job's spec.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::CronJob;
use serde_json::{json, Value};

use super::job::validate_job_spec;
use crate::error::Cause;
use crate::registry::{names, Behaviour, Generation, ResourceDef};
use crate::resources::podspec::default_pod_spec;
use crate::rest::status::StatusRest;
use crate::tables::{
    age, col, container_names_and_images, len, name, s, selector_string, since, wide, TableDef,
    AGE, NAME,
};
use tapestry_runtime::cron::{parse_cron, parse_time_zone};

/// A CronJob's name leaves room for the `-<minutes>` suffix of its Jobs.
const MAX_NAME: usize = 52;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["cj"]),
        categories: names(&["all"]),
        subresources: vec![StatusRest::def()],
        generation: Generation::Spec,
        behaviour: Arc::new(CronJobBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col(
                    "Schedule",
                    "The schedule in Cron format, see https://en.wikipedia.org/wiki/Cron.",
                ),
                col(
                    "Timezone",
                    "The time zone name for the given schedule, see https://en.wikipedia.org/wiki/List_of_tz_database_time_zones.",
                ),
                col(
                    "Suspend",
                    "This flag tells the controller to suspend subsequent executions, it does not apply to already started executions.",
                ),
                col("Active", "A list of pointers to currently running jobs."),
                col(
                    "Last Schedule",
                    "Information when was the last time the job was successfully scheduled.",
                ),
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
            cells: cronjob_cells,
        }),
        ..ResourceDef::of::<CronJob>()
    }
}

fn cronjob_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let (names, images) =
        container_names_and_images(o.pointer("/spec/jobTemplate/spec/template/spec"));
    let suspend = match o.pointer("/spec/suspend").and_then(Value::as_bool) {
        None => "<unset>",
        Some(true) => "True",
        Some(false) => "False",
    };
    let last = match s(o, "/status/lastScheduleTime") {
        "" => "<none>".to_string(),
        t => since(t, now),
    };
    let time_zone = match s(o, "/spec/timeZone") {
        "" => "<none>",
        tz => tz,
    };
    vec![
        name(o),
        json!(s(o, "/spec/schedule")),
        json!(time_zone),
        json!(suspend),
        json!(len(o, "/status/active")),
        json!(last),
        age(o, now),
        json!(names),
        json!(images),
        json!(selector_string(
            o.pointer("/spec/jobTemplate/spec/selector")
        )),
    ]
}

struct CronJobBehaviour;

impl Behaviour for CronJobBehaviour {
    fn default(&self, obj: &mut Value) {
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        spec.entry("concurrencyPolicy").or_insert(json!("Allow"));
        spec.entry("suspend").or_insert(json!(false));
        spec.entry("successfulJobsHistoryLimit").or_insert(json!(3));
        spec.entry("failedJobsHistoryLimit").or_insert(json!(1));
        if let Some(pod_spec) = obj.pointer_mut("/spec/jobTemplate/spec/template/spec") {
            default_pod_spec(pod_spec);
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({});
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let name = s(obj, "/metadata/name");
        if name.len() > MAX_NAME {
            causes.push(Cause::invalid(
                "metadata.name",
                &json!(name),
                format!("must be no more than {MAX_NAME} characters"),
            ));
        }
        let Some(spec) = obj.get("spec") else {
            causes.push(Cause::required("spec"));
            return causes;
        };
        match spec.get("schedule").and_then(Value::as_str) {
            None | Some("") => causes.push(Cause::required("spec.schedule")),
            Some(schedule) => {
                if let Err(e) = parse_cron(schedule) {
                    causes.push(Cause::invalid("spec.schedule", &json!(schedule), e));
                }
            }
        }
        if let Some(tz) = spec.get("timeZone").and_then(Value::as_str) {
            if let Err(e) = parse_time_zone(tz) {
                causes.push(Cause::invalid("spec.timeZone", &json!(tz), e));
            }
        }
        let policy = spec.get("concurrencyPolicy").and_then(Value::as_str);
        if !matches!(policy, Some("Allow" | "Forbid" | "Replace")) {
            causes.push(Cause::unsupported(
                "spec.concurrencyPolicy",
                &json!(policy),
                &["Allow", "Forbid", "Replace"],
            ));
        }
        for f in [
            "startingDeadlineSeconds",
            "successfulJobsHistoryLimit",
            "failedJobsHistoryLimit",
        ] {
            if let Some(n) = spec.get(f).and_then(Value::as_i64) {
                if n < 0 {
                    causes.push(Cause::invalid(
                        format!("spec.{f}"),
                        &json!(n),
                        "must be greater than or equal to 0",
                    ));
                }
            }
        }
        match spec.pointer("/jobTemplate/spec") {
            None => causes.push(Cause::required("spec.jobTemplate.spec")),
            Some(job_spec) => causes.extend(validate_job_spec(job_spec, "spec.jobTemplate.spec")),
        }
        causes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cronjob(spec: Value) -> Value {
        json!({"metadata": {"name": "nightly", "namespace": "default"}, "spec": spec})
    }

    fn job_template(restart: &str) -> Value {
        json!({"spec": {"template": {"spec": {
            "restartPolicy": restart,
            "containers": [{"name": "c", "image": "busybox"}]}}}})
    }

    fn errors(mut o: Value) -> Vec<String> {
        CronJobBehaviour.default(&mut o);
        CronJobBehaviour
            .validate(&o)
            .into_iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect()
    }

    #[test]
    fn defaults_are_kubernetes_defaults() {
        let mut o =
            cronjob(json!({"schedule": "*/5 * * * *", "jobTemplate": job_template("Never")}));
        CronJobBehaviour.default(&mut o);
        assert_eq!(o["spec"]["concurrencyPolicy"], "Allow");
        assert_eq!(o["spec"]["suspend"], false);
        assert_eq!(o["spec"]["successfulJobsHistoryLimit"], 3);
        assert_eq!(o["spec"]["failedJobsHistoryLimit"], 1);
        assert!(CronJobBehaviour.validate(&o).is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let e = errors(cronjob(
            json!({"schedule": "every minute", "jobTemplate": job_template("Never")}),
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("spec.schedule: Invalid value: \"every minute\": "),
            "{e:?}"
        );
        assert_eq!(
            errors(cronjob(json!({"jobTemplate": job_template("Never")}))),
            vec!["spec.schedule: Required value"]
        );
        assert_eq!(
            errors(cronjob(
                json!({"schedule": "@hourly", "timeZone": "Nowhere/Land",
                                  "jobTemplate": job_template("Never")})
            )),
            vec!["spec.timeZone: Invalid value: \"Nowhere/Land\": unknown time zone Nowhere/Land"]
        );
        assert_eq!(
            errors(cronjob(json!({"schedule": "@hourly", "concurrencyPolicy": "Sometimes",
                                  "jobTemplate": job_template("Never")}))),
            vec!["spec.concurrencyPolicy: Unsupported value: \"Sometimes\": supported values: \"Allow\", \"Forbid\", \"Replace\""]
        );
        assert_eq!(
            errors(cronjob(json!({"schedule": "@hourly", "jobTemplate": job_template("Always")}))),
            vec!["spec.jobTemplate.spec.template.spec.restartPolicy: Unsupported value: \"Always\": supported values: \"OnFailure\", \"Never\""]
        );
        let mut long =
            cronjob(json!({"schedule": "@hourly", "jobTemplate": job_template("Never")}));
        long["metadata"]["name"] = json!("x".repeat(53));
        assert_eq!(errors(long).len(), 1);
    }
}
