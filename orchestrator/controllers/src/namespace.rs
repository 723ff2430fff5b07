//! Namespace deletion: once a namespace is Terminating, everything in it is
//! deleted (every namespaced resource the server lists in discovery); when
//! nothing is left the `kubernetes` finalizer is removed through
//! namespaces/finalize and the API server drops the namespace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::{verbs, Discovery, Scope};
use kube::{Api, ResourceExt};

use crate::Ctx;
use tapestry_runtime::{is_status, key_of, lock, Queue, Requeue};

const FINALIZER: &str = "kubernetes";
/// Discovery is read again after this long (resources rarely change).
const DISCOVERY_TTL: Duration = Duration::from_secs(60);

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.namespaces.on_change(move |n, deleted| {
        if !deleted {
            q.add(key_of(n));
        }
    });
}

pub(crate) async fn namespaced_resources(ctx: &Ctx) -> anyhow::Result<Vec<ApiResource>> {
    if let Some((at, list)) = lock(&ctx.discovery).as_ref() {
        if at.elapsed() < DISCOVERY_TTL {
            return Ok(list.clone());
        }
    }
    let discovery = Discovery::new(ctx.client.clone()).run().await?;
    let list: Vec<ApiResource> = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .filter(|(_, caps)| {
            caps.scope == Scope::Namespaced
                && caps.supports_operation(verbs::LIST)
                && caps.supports_operation(verbs::DELETE)
        })
        .map(|(r, _)| r)
        .collect();
    *lock(&ctx.discovery) = Some((Instant::now(), list.clone()));
    Ok(list)
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let Some(ns) = ctx.namespaces.get(None, &key) else {
        return Ok(Requeue::Done);
    };
    if ns.metadata.deletion_timestamp.is_none() {
        return Ok(Requeue::Done);
    }
    let finalizers = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.clone())
        .unwrap_or_default();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Requeue::Done);
    }
    let mut remaining = 0usize;
    for res in namespaced_resources(&ctx).await? {
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &key, &res);
        let list = match api.list(&ListParams::default()).await {
            Ok(l) => l,
            Err(e) if is_status(&e, 404) || is_status(&e, 405) => continue,
            Err(e) => return Err(e.into()),
        };
        for o in &list.items {
            remaining += 1;
            if o.metadata.deletion_timestamp.is_none() {
                match api.delete(&o.name_any(), &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    if remaining > 0 {
        // Graceful pod deletions and finalizers take a moment.
        return Ok(Requeue::After(Duration::from_secs(1)));
    }
    let mut done: Namespace = (*ns).clone();
    let kept: Vec<String> = finalizers.into_iter().filter(|f| f != FINALIZER).collect();
    done.spec.get_or_insert_with(Default::default).finalizers = Some(kept);
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    match api
        .replace_subresource("finalize", &key, &PostParams::default(), &done)
        .await
    {
        Ok(_) => Ok(Requeue::Done),
        Err(e) if is_status(&e, 404) => Ok(Requeue::Done),
        Err(e) => Err(e.into()),
    }
}
