//! Job controller: runs pods from the template until `completions` of them
//! succeeded, at most `parallelism` at a time, and fails the Job once more
//! than `backoffLimit` pods failed. Pods carry a tracking finalizer until
//! their outcome is in the Job's status, so each finished pod is counted
//! exactly once, deleted or not.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use crate::util::{controlled_by, controller_ref, is_ready, is_terminating, owner_ref};
use crate::Ctx;
use tapestry_runtime::{ignore_not_found, key_of, lock, split_key, Queue, Requeue};

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.jobs.on_change(move |j, _| q.add(key_of(j)));
    let q = queue.clone();
    ctx.pods.on_change(move |p, _| {
        let ns = p.namespace().unwrap_or_default();
        match controller_ref(p).filter(|r| r.kind == "Job") {
            Some(r) => q.add(format!("{ns}/{}", r.name)),
            // Orphaned (`--cascade=orphan`) while still tracked.
            None if tracked(p) => q.add(format!("{ORPHAN_KEY}{ns}/{}", p.name_any())),
            None => {}
        }
    });
}

/// Kept on every pod the Job controller creates until the pod's outcome is
/// in the Job's status, so a finished pod that is deleted still counts.
pub const TRACKING_FINALIZER: &str = "batch.kubernetes.io/job-tracking";
/// Queue keys of tracked pods that no Job controls any more.
const ORPHAN_KEY: &str = "orphan:";

fn tracked(p: &Pod) -> bool {
    p.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == TRACKING_FINALIZER))
}

/// How a finished pod counts: `Some(true)` succeeded; `Some(false)` failed,
/// or deleted before it succeeded (as Kubernetes counts it).
fn outcome(p: &Pod) -> Option<bool> {
    match phase(p) {
        "Succeeded" => Some(true),
        "Failed" => Some(false),
        _ if is_terminating(p) => Some(false),
        _ => None,
    }
}

/// Pods (by UID, per Job key) whose tracking finalizer this controller
/// removed but whose update the pod watch has not shown yet: they are
/// counted already, whatever a stale copy says. Keyed like the queue, so a
/// Job that is gone takes its entry with it; a Job recreated under the same
/// name finds none of its pods there and drops the entry.
pub type Released = Mutex<HashMap<String, HashSet<String>>>;

/// Remove the tracking finalizer from `pods`; the UIDs of those it removed
/// it from. One that conflicts (the pod changed) is left for its next event
/// to bring back here.
async fn release(api: &Api<Pod>, pods: &[&Arc<Pod>]) -> anyhow::Result<Vec<String>> {
    let mut released = Vec::new();
    for p in pods {
        let keep: Vec<&String> = p
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != TRACKING_FINALIZER)
            .collect();
        // Pinned to the version read, so no other finalizer is lost.
        let patch =
            json!({"metadata": {"finalizers": keep, "resourceVersion": p.resource_version()}});
        match api
            .patch(
                &p.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => released.extend(p.uid()),
            Err(e) if tapestry_runtime::not_found(&e) => released.extend(p.uid()),
            Err(e) if tapestry_runtime::is_status(&e, 409) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(released)
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
    if let Some(pod_key) = key.strip_prefix(ORPHAN_KEY) {
        let (ns, name) = split_key(pod_key);
        let ns = ns.unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
        if let Some(p) = ctx.pods.get(Some(ns), name) {
            if tracked(&p) && controller_ref(p.as_ref()).is_none_or(|r| r.kind != "Job") {
                release(&api, &[&p]).await?;
            }
        }
        return Ok(Requeue::Done);
    }
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let job = ctx.jobs.get(Some(ns), name);
    // Tracked pods of a Job that is gone, being deleted, or was replaced by
    // one of the same name are only let go.
    let live_uid = job
        .as_ref()
        .filter(|j| !is_terminating(j.as_ref()))
        .and_then(|j| j.uid());
    let let_go = ctx.pods.list_in(ns, |p| {
        tracked(p)
            && controller_ref(p).is_some_and(|r| {
                r.kind == "Job" && r.name == name && Some(&r.uid) != live_uid.as_ref()
            })
    });
    release(&pods_api, &let_go.iter().collect::<Vec<_>>()).await?;
    let job = match job {
        Some(job) if live_uid.is_some() => job,
        _ => {
            lock(&ctx.job_released).remove(&key);
            return Ok(Requeue::Done);
        }
    };
    let uid = job.uid().unwrap_or_default();
    let pods = ctx.pods.list_in(ns, |p| controlled_by(p, &uid));
    let spec = job.spec.clone().unwrap_or_default();
    let finished = has_condition(&job, "Complete") || has_condition(&job, "Failed");

    // Count finished pods as Kubernetes does: note their UIDs in
    // uncountedTerminatedPods, drop their tracking finalizers, then fold
    // them into the counters. Each step is stored before the next, so a
    // pod is counted once whatever fails in between.
    let recorded = job.status.clone().unwrap_or_default();
    let uncounted = recorded
        .uncounted_terminated_pods
        .clone()
        .unwrap_or_default();
    let mut uncounted_succeeded: Vec<String> = uncounted.succeeded.unwrap_or_default();
    let mut uncounted_failed: Vec<String> = uncounted.failed.unwrap_or_default();
    let noted_before = uncounted_succeeded.len() + uncounted_failed.len();
    let mut to_release: Vec<&Arc<Pod>> = Vec::new();
    let already_released: HashSet<String> = {
        let mut released = lock(&ctx.job_released);
        let mine = released.entry(key.clone()).or_default();
        // Forget the pods the watch has shown released (or gone).
        mine.retain(|r| {
            pods.iter()
                .any(|p| tracked(p) && p.uid().as_ref() == Some(r))
        });
        let mine = mine.clone();
        if mine.is_empty() {
            released.remove(&key);
        }
        mine
    };
    for p in pods
        .iter()
        .filter(|p| tracked(p) && !p.uid().is_some_and(|u| already_released.contains(&u)))
    {
        let Some(succeeded) = outcome(p) else {
            continue;
        };
        let pod_uid = p.uid().unwrap_or_default();
        let noted = uncounted_succeeded.contains(&pod_uid) || uncounted_failed.contains(&pod_uid);
        // Once the Job is finished, pods it stops are not counted.
        if !noted && !finished {
            if succeeded {
                uncounted_succeeded.push(pod_uid);
            } else {
                uncounted_failed.push(pod_uid);
            }
        }
        to_release.push(p);
    }
    let noted_now = uncounted_succeeded.len() + uncounted_failed.len() > noted_before;
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    // Status writes are pinned to the version read: counts computed from a
    // stale copy must not overwrite newer ones (a conflict retries).
    let mut job_version = job.resource_version();
    if noted_now {
        let noted = jobs_api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"resourceVersion": job_version},
                    "status": {"uncountedTerminatedPods": {
                        "succeeded": uncounted_succeeded, "failed": uncounted_failed}}})),
            )
            .await?;
        job_version = noted.resource_version();
    }
    let released_now = release(&pods_api, &to_release).await?;
    let released = released_now.len() == to_release.len();
    lock(&ctx.job_released)
        .entry(key.clone())
        .or_default()
        .extend(released_now);
    let mut succeeded = recorded.succeeded.unwrap_or(0);
    let mut failed = recorded.failed.unwrap_or(0);
    if released {
        succeeded += uncounted_succeeded.len() as i32;
        failed += uncounted_failed.len() as i32;
        uncounted_succeeded.clear();
        uncounted_failed.clear();
    }
    // Decisions count the noted pods too.
    let succeeded_all = succeeded + uncounted_succeeded.len() as i32;
    let failed_all = failed + uncounted_failed.len() as i32;

    let active: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| !is_terminating(p.as_ref()) && !matches!(phase(p), "Succeeded" | "Failed"))
        .collect();
    let terminating = pods.iter().filter(|p| is_terminating(p.as_ref())).count() as i32;
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let suspended = spec.suspend == Some(true);

    let complete = match completions {
        Some(c) => succeeded_all >= c,
        // Work-queue jobs finish when one pod succeeded and none runs.
        None => succeeded_all > 0 && active.is_empty(),
    };
    let failed_job = failed_all > backoff_limit;
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
                Some(c) => (c - succeeded_all).max(0),
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
                                finalizers: Some(vec![TRACKING_FINALIZER.to_string()]),
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
        "uncountedTerminatedPods": {"succeeded": uncounted_succeeded, "failed": uncounted_failed},
    });
    let current = serde_json::to_value(job.status.clone().unwrap_or_default())?;
    let same = [
        "active",
        "succeeded",
        "failed",
        "terminating",
        "ready",
        "conditions",
        "uncountedTerminatedPods",
    ]
    .iter()
    .all(|f| {
        let a = current.get(*f).filter(|v| !v.is_null() && **v != json!(0));
        let b = status.get(*f).filter(|v| !v.is_null() && **v != json!(0));
        a == b
    }) && current.get("startTime").is_some();
    if !same {
        jobs_api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"resourceVersion": job_version}, "status": status}),
                ),
            )
            .await?;
    }
    Ok(Requeue::Done)
}
