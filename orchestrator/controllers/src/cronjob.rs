//! CronJob controller (Kubernetes' CronJobControllerV2): starts a Job from
//! the template at each scheduled time, named `<cronjob>-<scheduled time
//! in minutes since the epoch>` so a time is never run twice, honours
//! `concurrencyPolicy`, `suspend` and `startingDeadlineSeconds`, deletes
//! the oldest finished Jobs beyond the history limits, and reports
//! `status.active`, `lastScheduleTime` and `lastSuccessfulTime`.
//!
//! Time comes from the configured [`Clock`](crate::Clock), so tests move
//! it instead of waiting for the schedule.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::util::{controlled_by, controller_ref};
use crate::Ctx;
use tapestry_runtime::cron::Schedule;
use tapestry_runtime::{key_of, not_found, split_key, Queue, Requeue};

/// The annotation carrying a Job's scheduled time (RFC 3339, in the
/// CronJob's time zone).
pub const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// More missed times than this since the last run earn a warning.
const TOO_MANY_MISSED: usize = 100;

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.cronjobs.on_change(move |cj, _| q.add(key_of(cj)));
    let q = queue.clone();
    ctx.jobs.on_change(move |j, _| {
        if let Some(r) = controller_ref(j).filter(|r| r.kind == "CronJob") {
            q.add(format!("{}/{}", j.namespace().unwrap_or_default(), r.name));
        }
    });
    // A manual clock that moves makes every CronJob look again.
    if let Some(mut moves) = ctx.config.clock.moves() {
        let q = queue.clone();
        let c = Arc::downgrade(ctx);
        tokio::spawn(async move {
            while moves.changed().await.is_ok() {
                let Some(ctx) = c.upgrade() else { return };
                for k in crate::keys(&ctx.cronjobs) {
                    q.add(k);
                }
            }
        });
    }
}

/// The job name for a scheduled time.
pub fn job_name(cronjob: &str, at: DateTime<Utc>) -> String {
    format!("{cronjob}-{}", at.timestamp().div_euclid(60))
}

/// What the schedule calls for at `now`.
#[derive(Debug, PartialEq)]
enum Step {
    /// Nothing is due.
    Idle,
    /// The due run is already started.
    Done,
    /// Forbid, and a run is still active.
    Blocked,
    /// Start the run of `at`; `too_many_missed` when more than
    /// [`TOO_MANY_MISSED`] times went by unrun.
    Run {
        at: DateTime<Utc>,
        too_many_missed: bool,
    },
}

/// What is due at `now`, as Kubernetes decides: the most recent
/// scheduled time after the last run (or the creation) and, with a
/// starting deadline, not before `now - deadline`.
#[allow(clippy::too_many_arguments)]
fn step(
    schedule: &Schedule,
    name: &str,
    created: DateTime<Utc>,
    last_schedule: Option<DateTime<Utc>>,
    deadline: Option<i64>,
    forbid: bool,
    active: &[String],
    now: DateTime<Utc>,
) -> Step {
    let mut earliest = last_schedule.unwrap_or(created);
    // A deadline too large for the calendar is no deadline.
    let back = deadline
        .and_then(chrono::Duration::try_seconds)
        .and_then(|d| now.checked_sub_signed(d));
    if let Some(back) = back {
        earliest = earliest.max(back);
    }
    let Some(at) = schedule.latest_until(now).filter(|t| *t > earliest) else {
        return Step::Idle;
    };
    let too_many_missed =
        schedule.count_between(earliest, now, TOO_MANY_MISSED + 1) > TOO_MANY_MISSED;
    // A due time later than `now - deadline` is never past its deadline,
    // so there is no missed-deadline case left to report (Kubernetes'
    // MissSchedule check cannot fire either).
    if active.contains(&job_name(name, at)) || last_schedule == Some(at) {
        return Step::Done;
    }
    if forbid && !active.is_empty() {
        return Step::Blocked;
    }
    Step::Run {
        at,
        too_many_missed,
    }
}

fn to_chrono(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
        .unwrap_or_default()
}

fn to_time(t: DateTime<Utc>) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or_default())
}

/// `Complete` or `Failed` once the Job finished.
fn finished(j: &Job) -> Option<&'static str> {
    let conditions = j.status.as_ref()?.conditions.as_ref()?;
    ["Complete", "Failed"].into_iter().find(|t| {
        conditions
            .iter()
            .any(|c| c.type_ == *t && c.status == "True")
    })
}

fn job_ref(j: &Job) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: j.metadata.name.clone(),
        namespace: j.metadata.namespace.clone(),
        uid: j.metadata.uid.clone(),
        resource_version: j.metadata.resource_version.clone(),
        ..Default::default()
    }
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let cronjobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), ns);
    // Read fresh: the status this controller wrote last decides what runs.
    let Some(cj) = cronjobs.get_opt(name).await? else {
        return Ok(Requeue::Done);
    };
    let now = ctx.config.clock.now();
    let uid = cj.uid().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let jobs = ctx.jobs.list_in(ns, |j| controlled_by(j, &uid));
    let spec = cj.spec.clone().unwrap_or_default();
    let before = cj.status.clone().unwrap_or_default();
    let mut status = before.clone();
    let mut active = status.active.take().unwrap_or_default();

    // What became of the Jobs it started.
    for j in &jobs {
        let listed = active.iter().any(|r| r.uid == j.metadata.uid);
        match finished(j) {
            None if !listed => ctx.recorder.record(
                &cj,
                true,
                "UnexpectedJob",
                format!(
                    "Saw a job that the controller did not create or forgot: {}",
                    j.name_any()
                ),
            ),
            Some(how) if listed => {
                active.retain(|r| r.uid != j.metadata.uid);
                ctx.recorder.record(
                    &cj,
                    false,
                    "SawCompletedJob",
                    format!("Saw completed job: {}, condition: {how}", j.name_any()),
                );
            }
            _ => {}
        }
        if finished(j) == Some("Complete") {
            let done = j.status.as_ref().and_then(|s| s.completion_time.clone());
            if let Some(done) = done {
                if status
                    .last_successful_time
                    .as_ref()
                    .is_none_or(|t| to_chrono(t) < to_chrono(&done))
                {
                    status.last_successful_time = Some(done);
                }
            }
        }
    }
    // Listed Jobs that are gone (asked of the server: the cache may not
    // show a Job just created).
    let known: HashSet<Option<String>> = jobs.iter().map(|j| j.metadata.uid.clone()).collect();
    let mut kept = Vec::new();
    for r in active {
        if known.contains(&r.uid) {
            kept.push(r);
            continue;
        }
        let name = r.name.clone().unwrap_or_default();
        match jobs_api.get_opt(&name).await? {
            Some(j) if j.metadata.uid == r.uid => kept.push(r),
            _ => {}
        }
    }
    let mut active = kept;

    let mut requeue = Requeue::Done;
    if cj.metadata.deletion_timestamp.is_none() {
        match Schedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
            Err(e) => ctx.recorder.record(
                &cj,
                true,
                "UnparseableSchedule",
                format!("unparseable schedule: {:?} : {e}", spec.schedule),
            ),
            Ok(_) if spec.suspend == Some(true) => {}
            Ok(schedule) => {
                let names: Vec<String> = active.iter().filter_map(|r| r.name.clone()).collect();
                let created = cj
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(to_chrono)
                    .unwrap_or(now);
                let last = status.last_schedule_time.as_ref().map(to_chrono);
                let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
                match step(
                    &schedule,
                    name,
                    created,
                    last,
                    spec.starting_deadline_seconds,
                    policy == "Forbid",
                    &names,
                    now,
                ) {
                    Step::Idle | Step::Done => {}
                    Step::Blocked => ctx.recorder.record(
                        &cj,
                        false,
                        "JobAlreadyActive",
                        "Not starting job because prior execution is running and concurrency policy is Forbid".into(),
                    ),
                    Step::Run {
                        at,
                        too_many_missed,
                    } => {
                        if too_many_missed {
                            ctx.recorder.record(
                                &cj,
                                true,
                                "TooManyMissedTimes",
                                "too many missed start times. Set or decrease .spec.startingDeadlineSeconds or check clock skew".into(),
                            );
                        }
                        if policy == "Replace" {
                            for r in std::mem::take(&mut active) {
                                let job = r.name.unwrap_or_default();
                                delete_job(&ctx, &cj, &jobs_api, &job).await?;
                            }
                        }
                        let job = start_job(&ctx, &cj, &jobs_api, &schedule, at).await?;
                        if !active.iter().any(|r| r.uid == job.metadata.uid)
                            && finished(&job).is_none()
                        {
                            active.push(job_ref(&job));
                        }
                        status.last_schedule_time = Some(to_time(at));
                    }
                }
                if let Some(next) = schedule.next_after(now) {
                    let wait = (next - now).to_std().unwrap_or_default();
                    requeue = Requeue::After(wait + Duration::from_millis(100));
                }
            }
        }
        // The history limits.
        let mut succeeded: Vec<&Arc<Job>> = Vec::new();
        let mut failed: Vec<&Arc<Job>> = Vec::new();
        for j in &jobs {
            match finished(j) {
                Some("Complete") => succeeded.push(j),
                Some(_) => failed.push(j),
                None => {}
            }
        }
        for (mut finished, limit) in [
            (succeeded, spec.successful_jobs_history_limit),
            (failed, spec.failed_jobs_history_limit),
        ] {
            let Some(limit) = limit else { continue };
            let excess = finished.len().saturating_sub(limit.max(0) as usize);
            // Oldest first: by start time (never started last), then name.
            finished.sort_by_key(|j| {
                let start = j.status.as_ref().and_then(|s| s.start_time.as_ref());
                (start.is_none(), start.map(to_chrono), j.name_any())
            });
            for j in finished.into_iter().take(excess) {
                delete_job(&ctx, &cj, &jobs_api, &j.name_any()).await?;
                active.retain(|r| r.uid != j.metadata.uid);
            }
        }
    }

    status.active = (!active.is_empty()).then_some(active);
    if status != before {
        let patch = json!({"status": {
            "active": status.active,
            "lastScheduleTime": status.last_schedule_time,
            "lastSuccessfulTime": status.last_successful_time,
        }});
        cronjobs
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(requeue)
}

/// Create the Job of the run at `at` (or find it, if an earlier attempt
/// created it).
async fn start_job(
    ctx: &Ctx,
    cj: &CronJob,
    api: &Api<Job>,
    schedule: &Schedule,
    at: DateTime<Utc>,
) -> anyhow::Result<Job> {
    let template = cj
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .unwrap_or_default();
    let tm = template.metadata.unwrap_or_default();
    let mut annotations = tm.annotations.unwrap_or_default();
    annotations.insert(
        SCHEDULED_TIMESTAMP.into(),
        at.with_timezone(&schedule.time_zone())
            .to_rfc3339_opts(SecondsFormat::Secs, true),
    );
    let name = job_name(&cj.name_any(), at);
    let job = Job {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: tm.labels,
            annotations: Some(annotations),
            owner_references: Some(vec![crate::util::owner_ref(cj)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    };
    match api.create(&PostParams::default(), &job).await {
        Ok(job) => {
            ctx.recorder
                .record(cj, false, "SuccessfulCreate", format!("Created job {name}"));
            Ok(job)
        }
        Err(e) if tapestry_runtime::is_status(&e, 409) => {
            let existing = api.get(&name).await?;
            if !controlled_by(&existing, &cj.uid().unwrap_or_default()) {
                anyhow::bail!("job {name} exists and is not controlled by this CronJob");
            }
            Ok(existing)
        }
        Err(e) => {
            ctx.recorder
                .record(cj, true, "FailedCreate", format!("Error creating job: {e}"));
            Err(e.into())
        }
    }
}

/// Delete a Job and its pods.
async fn delete_job(ctx: &Ctx, cj: &CronJob, api: &Api<Job>, name: &str) -> anyhow::Result<()> {
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {
            ctx.recorder
                .record(cj, false, "SuccessfulDelete", format!("Deleted job {name}"));
            Ok(())
        }
        Err(e) if not_found(&e) => Ok(()),
        Err(e) => {
            ctx.recorder
                .record(cj, true, "FailedDelete", format!("Deleted job: {e}"));
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn every_minute() -> Schedule {
        Schedule::parse("*/1 * * * *", None).unwrap()
    }

    #[test]
    fn job_names_carry_the_minute() {
        assert_eq!(
            job_name("tick", at("2026-01-10T07:01:00Z")),
            format!("tick-{}", at("2026-01-10T07:01:00Z").timestamp() / 60)
        );
    }

    #[test]
    fn the_most_recent_due_time_runs_once() {
        let s = every_minute();
        let created = at("2026-01-10T07:00:10Z");
        // Nothing due before the first scheduled time.
        assert_eq!(
            step(
                &s,
                "t",
                created,
                None,
                None,
                false,
                &[],
                at("2026-01-10T07:00:50Z")
            ),
            Step::Idle
        );
        let due = step(
            &s,
            "t",
            created,
            None,
            None,
            false,
            &[],
            at("2026-01-10T07:01:05Z"),
        );
        assert_eq!(
            due,
            Step::Run {
                at: at("2026-01-10T07:01:00Z"),
                too_many_missed: false
            }
        );
        // Once it ran, it is not due again.
        let last = Some(at("2026-01-10T07:01:00Z"));
        assert_eq!(
            step(
                &s,
                "t",
                created,
                last,
                None,
                false,
                &[],
                at("2026-01-10T07:01:30Z")
            ),
            Step::Idle
        );
        // Several missed times: only the latest runs.
        assert_eq!(
            step(
                &s,
                "t",
                created,
                last,
                None,
                false,
                &[],
                at("2026-01-10T07:05:30Z")
            ),
            Step::Run {
                at: at("2026-01-10T07:05:00Z"),
                too_many_missed: false
            }
        );
    }

    #[test]
    fn forbid_waits_for_the_active_run() {
        let s = every_minute();
        let created = at("2026-01-10T07:00:10Z");
        let last = Some(at("2026-01-10T07:01:00Z"));
        let active = vec![job_name("t", at("2026-01-10T07:01:00Z"))];
        let now = at("2026-01-10T07:02:05Z");
        assert_eq!(
            step(&s, "t", created, last, None, true, &active, now),
            Step::Blocked
        );
        // Allow (and Replace) start it anyway.
        assert!(matches!(
            step(&s, "t", created, last, None, false, &active, now),
            Step::Run { .. }
        ));
    }

    #[test]
    fn the_starting_deadline_skips_late_runs() {
        let s = every_minute();
        let created = at("2026-01-10T07:00:10Z");
        // Due at 07:01:00, deadline 10s, now 07:01:30: too late, not run.
        assert_eq!(
            step(
                &s,
                "t",
                created,
                None,
                Some(10),
                false,
                &[],
                at("2026-01-10T07:01:30Z")
            ),
            Step::Idle
        );
        assert!(matches!(
            step(
                &s,
                "t",
                created,
                None,
                Some(60),
                false,
                &[],
                at("2026-01-10T07:01:30Z")
            ),
            Step::Run { .. }
        ));
    }

    #[test]
    fn too_many_missed_times_run_once_with_a_warning() {
        let s = every_minute();
        let created = at("2026-01-10T07:00:10Z");
        let now = at("2026-01-11T07:00:30Z");
        assert_eq!(
            step(&s, "t", created, None, None, false, &[], now),
            Step::Run {
                at: at("2026-01-11T07:00:00Z"),
                too_many_missed: true
            }
        );
        // A deadline bounds the look back: few missed within it.
        assert_eq!(
            step(&s, "t", created, None, Some(200), false, &[], now),
            Step::Run {
                at: at("2026-01-11T07:00:00Z"),
                too_many_missed: false
            }
        );
    }
}
