//! Every active namespace has a `default` ServiceAccount (pods default to
//! it) and the `kube-root-ca.crt` ConfigMap holding the cluster CA (what
//! pods' service account volumes mount as `ca.crt`).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
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
    if ns.metadata.deletion_timestamp.is_some() {
        return Ok(Requeue::Done);
    }
    if let Some(ca) = &ctx.config.root_ca {
        publish_root_ca(&ctx, &key, ca).await?;
    }
    if ctx.serviceaccounts.get(Some(&key), "default").is_some() {
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

const ROOT_CA: &str = "kube-root-ca.crt";

/// Creates or corrects the namespace's `kube-root-ca.crt`.
async fn publish_root_ca(ctx: &Ctx, ns: &str, ca: &str) -> anyhow::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let data = BTreeMap::from([("ca.crt".to_string(), ca.to_string())]);
    let result = match api.get_opt(ROOT_CA).await? {
        Some(cm) if cm.data.as_ref() == Some(&data) => return Ok(()),
        Some(mut cm) => {
            cm.data = Some(data);
            api.replace(ROOT_CA, &PostParams::default(), &cm).await
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CA.into()),
                    namespace: Some(ns.to_string()),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm).await
        }
    };
    match result {
        Ok(_) => Ok(()),
        // Written meanwhile by another, or the namespace is terminating.
        Err(e) if is_status(&e, 409) || is_status(&e, 403) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
