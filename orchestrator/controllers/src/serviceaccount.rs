//! Every active namespace has a `default` ServiceAccount (pods default to
//! it).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};

use crate::Ctx;
use tapestry_runtime::{is_status, key_of, Queue, Requeue};

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.namespaces.on_change(move |n: &Namespace, deleted| {
        if !deleted && n.metadata.deletion_timestamp.is_none() {
            q.add(key_of(n));
        }
    });
    // A deleted default account comes back.
    let q = queue.clone();
    ctx.serviceaccounts
        .on_change(move |sa: &ServiceAccount, deleted| {
            if deleted && sa.name_any() == "default" {
                q.add(sa.namespace().unwrap_or_default());
            }
        });
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let Some(ns) = ctx.namespaces.get(None, &key) else {
        return Ok(Requeue::Done);
    };
    if ns.metadata.deletion_timestamp.is_some()
        || ctx.serviceaccounts.get(Some(&key), "default").is_some()
    {
        return Ok(Requeue::Done);
    }
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &key);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            namespace: Some(key.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &sa).await {
        Ok(_) => Ok(Requeue::Done),
        // Exists already, or the namespace started terminating meanwhile.
        Err(e) if is_status(&e, 409) || is_status(&e, 403) => Ok(Requeue::Done),
        Err(e) => Err(e.into()),
    }
}
