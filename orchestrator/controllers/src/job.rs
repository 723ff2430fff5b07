//! Job controller: runs pods from the template until `completions` of them
//! succeeded, at most `parallelism` at a time, and fails the Job once more
//! than `backoffLimit` pods failed.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use crate::runtime::{ignore_not_found, key_of, split_key, Queue, Requeue};
use crate::util::{controlled_by, controller_ref, is_ready, is_terminating, owner_ref};
use crate::Ctx;

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.jobs.on_change(move |j, _| q.add(key_of(j)));
    let q = queue.clone();
    ctx.pods.on_change(move |p, _| {
        if let Some(r) = controller_ref(p).filter(|r| r.kind == "Job") {
            q.add(format!("{}/{}", p.namespace().unwrap_or_default(), r.name));
        }
    });
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn has_condition(job: &Job, t: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let Some(job) = ctx.jobs.get(Some(ns), name) else {
        return Ok(Requeue::Done);
    };
    if is_terminating(job.as_ref()) {
        return Ok(Requeue::Done);
    }
    let uid = job.uid().unwrap_or_default();
    let pods = ctx.pods.list_in(ns, |p| controlled_by(p, &uid));
    let spec = job.spec.clone().unwrap_or_default();
    // A finished pod stays counted after it is deleted (or, through a stale
    // writer, leaves its phase), as Kubernetes' tracking finalizers keep it:
    // the counts never go down.
    let counted = |phase_name: &str, recorded: Option<i32>| {
        let live = pods.iter().filter(|p| phase(p) == phase_name).count() as i32;
        live.max(recorded.unwrap_or(0))
    };
    let recorded = job.status.as_ref();
    let succeeded = counted("Succeeded", recorded.and_then(|s| s.succeeded));
    let failed = counted("Failed", recorded.and_then(|s| s.failed));
    let active: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| !is_terminating(p.as_ref()) && !matches!(phase(p), "Succeeded" | "Failed"))
        .collect();
    let terminating = pods.iter().filter(|p| is_terminating(p.as_ref())).count() as i32;
    let finished = has_condition(&job, "Complete") || has_condition(&job, "Failed");
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let suspended = spec.suspend == Some(true);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);

    let complete = match completions {
        Some(c) => succeeded >= c,
        // Work-queue jobs finish when one pod succeeded and none runs.
        None => succeeded > 0 && active.is_empty(),
    };
    let failed_job = failed > backoff_limit;
    let now = Timestamp::now().to_string();
    let mut conditions: Vec<Value> = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    let mut completion_time = job
        .status
        .as_ref()
        .and_then(|s| s.completion_time.clone())
        .map(|t| json!(t));
    if !finished {
        if complete || failed_job {
            // Stop what still runs.
            for p in &active {
                ignore_not_found(
                    pods_api
                        .delete(&p.name_any(), &DeleteParams::default())
                        .await,
                )?;
            }
            let cond = |t: &str, reason: &str, message: &str| {
                json!({"type": t, "status": "True", "reason": reason, "message": message,
                       "lastProbeTime": now, "lastTransitionTime": now})
            };
            if complete {
                conditions.push(cond(
                    "SuccessCriteriaMet",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                ));
                conditions.push(cond(
                    "Complete",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                ));
                completion_time = Some(json!(now));
                ctx.recorder
                    .record(job.as_ref(), false, "Completed", "Job completed".into());
            } else {
                conditions.push(cond(
                    "FailureTarget",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                ));
                conditions.push(cond(
                    "Failed",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                ));
                ctx.recorder.record(
                    job.as_ref(),
                    true,
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit".into(),
                );
            }
        } else if !suspended
            && ctx
                .rs_expectations
                .satisfied(&format!("job/{key}"), ns, &ctx.pods)
        {
            let remaining = match completions {
                Some(c) => (c - succeeded).max(0),
                None => parallelism,
            };
            let want = parallelism.min(remaining) - active.len() as i32;
            if want > 0 {
                let owner = owner_ref(job.as_ref());
                let template = spec.template.clone();
                let created: Vec<Result<String, kube::Error>> = futures::stream::iter(0..want)
                    .map(|_| {
                        let pod = Pod {
                            metadata: ObjectMeta {
                                generate_name: Some(format!("{}-", job.name_any())),
                                labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
                                annotations: template
                                    .metadata
                                    .as_ref()
                                    .and_then(|m| m.annotations.clone()),
                                owner_references: Some(vec![owner.clone()]),
                                ..Default::default()
                            },
                            spec: template.spec.clone(),
                            status: None,
                        };
                        let api = pods_api.clone();
                        async move {
                            api.create(&PostParams::default(), &pod)
                                .await
                                .map(|p| p.name_any())
                        }
                    })
                    .buffer_unordered(8)
                    .collect()
                    .await;
                // Expect every pod that was created even when another
                // failed, so a retry does not create them again.
                let mut names = HashSet::new();
                let mut failed = None;
                for r in created {
                    match r {
                        Ok(pod) => {
                            ctx.recorder.record(
                                job.as_ref(),
                                false,
                                "SuccessfulCreate",
                                format!("Created pod: {pod}"),
                            );
                            names.insert(pod);
                        }
                        Err(e) => failed = failed.or(Some(e)),
                    }
                }
                ctx.rs_expectations
                    .set(&format!("job/{key}"), names, HashSet::new());
                if let Some(e) = failed {
                    return Err(e.into());
                }
            }
        } else if suspended {
            for p in &active {
                ignore_not_found(
                    pods_api
                        .delete(&p.name_any(), &DeleteParams::default())
                        .await,
                )?;
            }
        }
    }
    let start_time = job
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .map(|t| json!(t))
        .unwrap_or_else(|| json!(now));
    let ready = active.iter().filter(|p| is_ready(p)).count();
    let status = json!({
        "active": active.len(),
        "succeeded": succeeded,
        "failed": failed,
        "terminating": terminating,
        "ready": ready,
        "startTime": start_time,
        "completionTime": completion_time,
        "conditions": if conditions.is_empty() { Value::Null } else { json!(conditions) },
    });
    let current = serde_json::to_value(job.status.clone().unwrap_or_default())?;
    let same = [
        "active",
        "succeeded",
        "failed",
        "terminating",
        "ready",
        "conditions",
    ]
    .iter()
    .all(|f| {
        let a = current.get(*f).filter(|v| !v.is_null() && **v != json!(0));
        let b = status.get(*f).filter(|v| !v.is_null() && **v != json!(0));
        a == b
    }) && current.get("startTime").is_some();
    if !same {
        let api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    Ok(Requeue::Done)
}
