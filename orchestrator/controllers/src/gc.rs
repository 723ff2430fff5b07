//! Garbage collection by ownerReferences, as kube-controller-manager does:
//! - a dependent whose owners are all gone is deleted (background deletion
//!   of the owner);
//! - an owner carrying the `foregroundDeletion` finalizer has its
//!   dependents deleted first, and loses the finalizer once none is left;
//! - an owner carrying the `orphan` finalizer has its ownerReference
//!   removed from every dependent, then loses the finalizer.
//!
//! Keys are `dep|Kind|ns/name` (check one dependent) or `own|Kind|ns/name`
//! (finish one owner's deletion).

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::runtime::{ignore_not_found, key_of, not_found, split_key, Informer, Queue, Requeue};
use crate::Ctx;

/// uid, whether it is being deleted, finalizers.
type ObjState = (String, bool, Vec<String>);
/// namespace, name and ownerReferences of a dependent.
type Dependent = (Option<String>, String, Vec<OwnerReference>);
type Refs = Vec<OwnerReference>;
type FindFn = Box<dyn Fn(Option<&str>, &str) -> Option<ObjState> + Send + Sync>;
type DependentsFn = Box<dyn Fn(&str) -> Vec<Dependent> + Send + Sync>;
type RefsFn = Box<dyn Fn(Option<&str>, &str) -> Option<Refs> + Send + Sync>;

/// What the collector needs to know about one kind it tracks.
pub struct Tracked {
    pub kind: &'static str,
    pub resource: ApiResource,
    pub namespaced: bool,
    /// (uid, being deleted, finalizers) of one object.
    find: FindFn,
    /// Dependents (namespace, name, ownerReferences) of an owner uid.
    dependents: DependentsFn,
    owner_refs: RefsFn,
    all_keys: Box<dyn Fn() -> Vec<String> + Send + Sync>,
}

impl Tracked {
    pub fn new<K>(informer: &Arc<Informer<K>>, namespaced: bool) -> Tracked
    where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let kind = K::kind(&()).into_owned().leak();
        let (i1, i2, i3, i4) = (
            informer.clone(),
            informer.clone(),
            informer.clone(),
            informer.clone(),
        );
        Tracked {
            kind,
            resource: ApiResource::erase::<K>(&()),
            namespaced,
            find: Box::new(move |ns, name| {
                let o = i1.get(ns, name)?;
                Some((
                    o.uid().unwrap_or_default(),
                    o.meta().deletion_timestamp.is_some(),
                    o.finalizers().to_vec(),
                ))
            }),
            dependents: Box::new(move |uid| {
                i2.store
                    .state_filter(|o| {
                        o.meta()
                            .owner_references
                            .as_ref()
                            .is_some_and(|rs| rs.iter().any(|r| r.uid == uid))
                    })
                    .into_iter()
                    .map(|o| {
                        (
                            o.namespace(),
                            o.name_any(),
                            o.meta().owner_references.clone().unwrap_or_default(),
                        )
                    })
                    .collect()
            }),
            owner_refs: Box::new(move |ns, name| {
                i3.get(ns, name)
                    .map(|o| o.meta().owner_references.clone().unwrap_or_default())
            }),
            all_keys: Box::new(move || {
                i4.store
                    .state()
                    .iter()
                    .filter(|o| {
                        o.meta()
                            .owner_references
                            .as_ref()
                            .is_some_and(|r| !r.is_empty())
                            || o.meta().deletion_timestamp.is_some()
                    })
                    .map(|o| key_of(o.as_ref()))
                    .collect()
            }),
        }
    }

    fn api(&self, ctx: &Ctx, ns: Option<&str>) -> Api<DynamicObject> {
        match ns {
            Some(ns) if self.namespaced => {
                Api::namespaced_with(ctx.client.clone(), ns, &self.resource)
            }
            _ => Api::all_with(ctx.client.clone(), &self.resource),
        }
    }
}

/// Register the change handlers of one tracked kind.
pub fn watch<K>(informer: &Arc<Informer<K>>, queue: &Arc<Queue>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let q = queue.clone();
    let kind = K::kind(&()).into_owned();
    informer.on_change(move |o, deleted| {
        let key = key_of(o);
        let fins = o.finalizers();
        if !deleted
            && o.meta().deletion_timestamp.is_some()
            && fins
                .iter()
                .any(|f| f == "orphan" || f == "foregroundDeletion")
        {
            q.add(format!("own|{kind}|{key}"));
        }
        if o.meta()
            .owner_references
            .as_ref()
            .is_some_and(|r| !r.is_empty())
            && !deleted
        {
            q.add(format!("dep|{kind}|{key}"));
        }
        if deleted || o.meta().deletion_timestamp.is_some() {
            // Its dependents may be orphans now, and its owners may be
            // waiting for it (foreground deletion).
            q.add(format!("gone|{kind}|{}", o.uid().unwrap_or_default()));
            for r in o.meta().owner_references.iter().flatten() {
                let ns = o.namespace().map(|n| format!("{n}/")).unwrap_or_default();
                q.add(format!("own|{}|{ns}{}", r.kind, r.name));
            }
        }
    });
}

pub fn all_keys(ctx: &Ctx) -> Vec<String> {
    ctx.gc_kinds
        .iter()
        .flat_map(|t| {
            (t.all_keys)()
                .into_iter()
                .map(move |k| format!("dep|{}|{k}", t.kind))
        })
        .collect()
}

fn tracked<'a>(ctx: &'a Ctx, kind: &str) -> Option<&'a Tracked> {
    ctx.gc_kinds.iter().find(|t| t.kind == kind)
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let mut parts = key.splitn(3, '|');
    let (Some(what), Some(kind), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(Requeue::Done);
    };
    match what {
        "dep" => check_dependent(&ctx, kind, rest).await,
        "own" => finish_owner(&ctx, kind, rest).await,
        "gone" => {
            // Wake every dependent of the vanished uid.
            for t in &ctx.gc_kinds {
                for (ns, name, _) in (t.dependents)(rest) {
                    let key = match ns {
                        Some(ns) => format!("{ns}/{name}"),
                        None => name,
                    };
                    check_dependent(&ctx, t.kind, &key).await?;
                }
            }
            Ok(Requeue::Done)
        }
        _ => Ok(Requeue::Done),
    }
}

/// Whether the owner `r` (of an object in `ns`) still exists: the cache
/// first, then a live read, so an owner the cache has not seen yet is never
/// taken for gone.
async fn owner_state(
    ctx: &Ctx,
    ns: Option<&str>,
    r: &OwnerReference,
) -> anyhow::Result<Option<(bool, Vec<String>)>> {
    let Some(t) = tracked(ctx, &r.kind) else {
        // Owners of kinds we do not track are assumed alive.
        return Ok(Some((false, Vec::new())));
    };
    let ns = if t.namespaced { ns } else { None };
    if let Some((uid, deleting, fins)) = (t.find)(ns, &r.name) {
        if uid == r.uid {
            return Ok(Some((deleting, fins)));
        }
    }
    match t.api(ctx, ns).get(&r.name).await {
        Ok(o) if o.uid().as_deref() == Some(r.uid.as_str()) => Ok(Some((
            o.metadata.deletion_timestamp.is_some(),
            o.finalizers().to_vec(),
        ))),
        Ok(_) => Ok(None),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn check_dependent(ctx: &Ctx, kind: &str, key: &str) -> anyhow::Result<Requeue> {
    let Some(t) = tracked(ctx, kind) else {
        return Ok(Requeue::Done);
    };
    let (ns, name) = split_key(key);
    let Some(refs) = (t.owner_refs)(ns, name) else {
        return Ok(Requeue::Done);
    };
    if refs.is_empty() {
        return Ok(Requeue::Done);
    }
    let mut alive = Vec::new();
    let mut foreground = false;
    for r in &refs {
        if let Some((deleting, fins)) = owner_state(ctx, ns, r).await? {
            if deleting && fins.iter().any(|f| f == "foregroundDeletion") {
                foreground = true;
            } else {
                alive.push(r.clone());
            }
        }
    }
    let api = t.api(ctx, ns);
    if alive.is_empty() {
        let dp = if foreground {
            DeleteParams::foreground()
        } else {
            DeleteParams::background()
        };
        let already = (t.find)(ns, name).is_some_and(|(_, deleting, _)| deleting);
        if !already || foreground {
            tracing::debug!(%kind, %key, "deleting dependent whose owners are gone");
            ignore_not_found(api.delete(name, &dp).await)?;
        }
    } else if alive.len() < refs.len() && !foreground {
        let patch = json!({"metadata": {"ownerReferences": alive}});
        ignore_not_found(
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        )?;
    }
    Ok(Requeue::Done)
}

async fn finish_owner(ctx: &Ctx, kind: &str, key: &str) -> anyhow::Result<Requeue> {
    let Some(t) = tracked(ctx, kind) else {
        return Ok(Requeue::Done);
    };
    let (ns, name) = split_key(key);
    let ns = if t.namespaced { ns } else { None };
    let Some((uid, deleting, fins)) = (t.find)(ns, name) else {
        return Ok(Requeue::Done);
    };
    if !deleting {
        return Ok(Requeue::Done);
    }
    let dependents: Vec<(&Tracked, Option<String>, String, Vec<OwnerReference>)> = ctx
        .gc_kinds
        .iter()
        .flat_map(|d| {
            (d.dependents)(&uid)
                .into_iter()
                .map(move |(n, m, r)| (d, n, m, r))
        })
        .collect();
    let mut done = None;
    if fins.iter().any(|f| f == "orphan") {
        for (d, dns, dname, refs) in &dependents {
            let kept: Vec<&OwnerReference> = refs.iter().filter(|r| r.uid != uid).collect();
            // null removes the field rather than leaving an empty list.
            let kept = if kept.is_empty() {
                json!(null)
            } else {
                json!(kept)
            };
            let patch = json!({"metadata": {"ownerReferences": kept}});
            ignore_not_found(
                d.api(ctx, dns.as_deref())
                    .patch(dname, &PatchParams::default(), &Patch::Merge(patch))
                    .await,
            )?;
        }
        done = Some("orphan");
    } else if fins.iter().any(|f| f == "foregroundDeletion") {
        if dependents.is_empty() {
            done = Some("foregroundDeletion");
        } else {
            for (d, dns, dname, _) in &dependents {
                let deleting = (d.find)(dns.as_deref(), dname).is_some_and(|(_, x, _)| x);
                if !deleting {
                    ignore_not_found(
                        d.api(ctx, dns.as_deref())
                            .delete(dname, &DeleteParams::foreground())
                            .await,
                    )?;
                }
            }
            return Ok(Requeue::After(std::time::Duration::from_secs(1)));
        }
    }
    if let Some(f) = done {
        let remaining: Vec<&String> = fins.iter().filter(|x| x.as_str() != f).collect();
        let patch = json!({"metadata": {"finalizers": remaining}});
        ignore_not_found(
            t.api(ctx, ns)
                .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await,
        )?;
    }
    Ok(Requeue::Done)
}
