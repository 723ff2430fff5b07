//! Resource quota controller: keeps each ResourceQuota's `status.hard`
//! (its `spec.hard`) and `status.used`, recomputed from the objects of the
//! namespace as the API server lists them now, so deleted and finished
//! objects give their usage back.
//!
//! The API server's quota admission charges `status.used` with a
//! compare-and-swap before it stores the object it admitted. A recount
//! that would lower a usage could therefore miss an object charged but
//! not stored yet; it is written only once the quota has stayed unchanged
//! for [`SETTLE`] (no charge in between) and the objects were listed after
//! that, and the write itself is a compare-and-swap on the quota read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ResourceQuota;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use tapestry_apimachinery::quota::{self, Usage};

use crate::Ctx;
use tapestry_runtime::{is_status, key_of, lock, split_key, Queue, Requeue};

/// How long a quota must stay unchanged before a recount may lower it.
const SETTLE: Duration = Duration::from_secs(2);

/// Quota key → (resourceVersion, when first seen wanting to go down).
fn pending() -> &'static Mutex<HashMap<String, (String, Instant)>> {
    static PENDING: OnceLock<Mutex<HashMap<String, (String, Instant)>>> = OnceLock::new();
    PENDING.get_or_init(Default::default)
}

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.quotas.on_change(move |rq, deleted| {
        if !deleted {
            q.add(key_of(rq));
        }
    });
    // Pods, Services and claims going away or finishing give usage back.
    let wake = |quotas: Arc<tapestry_runtime::Informer<ResourceQuota>>, q: Arc<Queue>| {
        move |ns: String| {
            for rq in quotas.list_in(&ns, |_| true) {
                q.add(key_of(rq.as_ref()));
            }
        }
    };
    let w = wake(ctx.quotas.clone(), queue.clone());
    ctx.pods
        .on_change(move |p, _| w(p.namespace().unwrap_or_default()));
    let w = wake(ctx.quotas.clone(), queue.clone());
    ctx.services
        .on_change(move |s, _| w(s.namespace().unwrap_or_default()));
    let w = wake(ctx.quotas.clone(), queue.clone());
    ctx.volumes
        .claims
        .on_change(move |c, _| w(c.namespace().unwrap_or_default()));
}

/// The served resource `resource` of `group`, as discovery names it.
async fn api_resource(
    ctx: &Ctx,
    group: &str,
    resource: &str,
) -> anyhow::Result<Option<ApiResource>> {
    let all = crate::namespace::namespaced_resources(ctx).await?;
    Ok(all
        .into_iter()
        .find(|r| r.group == group && r.plural == resource))
}

/// What the objects of the namespace use of each resource of `hard`.
async fn count(ctx: &Ctx, ns: &str, rq: &Value) -> anyhow::Result<Usage> {
    let spec = rq.get("spec").cloned().unwrap_or(Value::Null);
    let hard = quota::hard(&spec);
    let sources: BTreeSet<(String, String)> =
        hard.keys().filter_map(|k| quota::source(k)).collect();
    let mut used: Usage = hard.keys().map(|k| (k.clone(), 0)).collect();
    for (group, resource) in sources {
        let Some(ar) = api_resource(ctx, &group, &resource).await? else {
            continue;
        };
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
        for obj in api.list(&ListParams::default()).await?.items {
            let obj = serde_json::to_value(&obj)?;
            if !quota::covers(&spec, &group, &resource, &obj) {
                continue;
            }
            for (k, v) in quota::usage(&group, &resource, &obj) {
                if let Some(total) = used.get_mut(&k) {
                    *total += v;
                }
            }
        }
    }
    Ok(used)
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let api: Api<ResourceQuota> = Api::namespaced(ctx.client.clone(), ns);
    // Read fresh, not from the cache: the charges admission makes are
    // what a recount must not undo.
    let current = match api.get_opt(name).await? {
        Some(rq) => rq,
        None => {
            lock(pending()).remove(&key);
            return Ok(Requeue::Done);
        }
    };
    let rv = current.resource_version().unwrap_or_default();
    let rq = serde_json::to_value(&current)?;
    let spec = rq.get("spec").cloned().unwrap_or(Value::Null);
    let hard = quota::hard(&spec);
    let status = rq.get("status").cloned().unwrap_or(Value::Null);
    let recorded = quota::read_used(&status);
    let used = count(&ctx, ns, &rq).await?;
    let lowers = used
        .iter()
        .any(|(k, v)| recorded.get(k).is_some_and(|r| r > v));
    if lowers {
        let mut waiting = lock(pending());
        match waiting.get(&key) {
            Some((seen, at)) if *seen == rv && at.elapsed() >= SETTLE => {
                // Listed after the quota stayed unchanged for SETTLE.
                waiting.remove(&key);
            }
            Some((seen, at)) if *seen == rv => {
                return Ok(Requeue::After(SETTLE.saturating_sub(at.elapsed())));
            }
            _ => {
                waiting.insert(key.clone(), (rv.clone(), Instant::now()));
                return Ok(Requeue::After(SETTLE));
            }
        }
    } else {
        lock(pending()).remove(&key);
    }
    let hard_status: BTreeMap<String, String> = hard.clone();
    let used_status = quota::to_quantities(&hard, &used);
    let unchanged = status.get("hard") == Some(&json!(hard_status))
        && status.get("used") == Some(&json!(used_status));
    if unchanged {
        return Ok(Requeue::Done);
    }
    let mut next = rq.clone();
    next["status"] = json!({"hard": hard_status, "used": used_status});
    let next: ResourceQuota = serde_json::from_value(next)?;
    // The read's resourceVersion rides along: a charge in between is a
    // conflict, and the quota is counted again.
    match api
        .replace_status(name, &PostParams::default(), &next)
        .await
    {
        Ok(_) => Ok(Requeue::Done),
        Err(e) if is_status(&e, 409) => Ok(Requeue::After(Duration::from_millis(50))),
        Err(e) if is_status(&e, 404) => Ok(Requeue::Done),
        Err(e) => Err(e.into()),
    }
}
