//! Garbage collection by ownerReferences, as kube-controller-manager does:
//! - a dependent whose owners are all gone is deleted (background deletion
//!   of the owner);
//! - an owner carrying the `foregroundDeletion` finalizer has its
//!   dependents deleted first, and loses the finalizer once none is left;
//! - an owner carrying the `orphan` finalizer has its ownerReference
//!   removed from every dependent, then loses the finalizer.
//!
//! Kinds the controllers have informers for are tracked through them;
//! every other kind the server serves (ConfigMaps, Secrets, the kinds of
//! CRDs) through a metadata-only watch each, started and stopped as
//! discovery changes ([`follow_kinds`]), so what operators create and own
//! is collected too.
//!
//! Kinds are named `group/Kind` (`/Pod`, `apps/Deployment`,
//! `example.com/Widget`). Keys are `dep|<kind>|ns/name` (check one
//! dependent), `own|<kind>|ns/name` (finish one owner's deletion) or
//! `gone|<kind>|uid` (wake a vanished owner's dependents).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::discovery::{verbs, Discovery, Scope};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use tapestry_runtime::{ignore_not_found, not_found, split_key, Informer, Queue, Requeue};

/// uid, whether it is being deleted, finalizers.
type ObjState = (String, bool, Vec<String>);
/// namespace, name and ownerReferences of a dependent.
type Dependent = (Option<String>, String, Vec<OwnerReference>);

/// What the collector reads of one tracked kind's objects: their metadata.
trait MetaSource: Send + Sync {
    fn get(&self, namespace: Option<&str>, name: &str) -> Option<ObjectMeta>;
    fn all(&self) -> Vec<ObjectMeta>;
}

impl<K> MetaSource for Arc<Informer<K>>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn get(&self, namespace: Option<&str>, name: &str) -> Option<ObjectMeta> {
        Informer::get(self, namespace, name).map(|o| o.meta().clone())
    }

    fn all(&self) -> Vec<ObjectMeta> {
        self.store
            .state()
            .iter()
            .map(|o| o.meta().clone())
            .collect()
    }
}

/// A custom kind's objects, from its metadata watch.
impl MetaSource for (Store<PartialObjectMeta<DynamicObject>>, ApiResource) {
    fn get(&self, namespace: Option<&str>, name: &str) -> Option<ObjectMeta> {
        let mut r = ObjectRef::new_with(name, self.1.clone());
        if let Some(ns) = namespace {
            r = r.within(ns);
        }
        self.0.get(&r).map(|o| o.metadata.clone())
    }

    fn all(&self) -> Vec<ObjectMeta> {
        self.0.state().iter().map(|o| o.metadata.clone()).collect()
    }
}

/// What the collector needs to know about one kind it tracks.
pub struct Tracked {
    /// `group/Kind`.
    pub kind: String,
    pub resource: ApiResource,
    pub namespaced: bool,
    source: Box<dyn MetaSource>,
}

fn kind_id(group: &str, kind: &str) -> String {
    format!("{group}/{kind}")
}

/// The `group/Kind` an owner reference names.
fn owner_kind(r: &OwnerReference) -> String {
    let group = r.api_version.rsplit_once('/').map_or("", |(g, _)| g);
    kind_id(group, &r.kind)
}

impl Tracked {
    /// A built-in kind, read from its informer.
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
        Tracked {
            kind: kind_id(&K::group(&()), &K::kind(&())),
            resource: ApiResource::erase::<K>(&()),
            namespaced,
            source: Box::new(informer.clone()),
        }
    }

    /// (uid, being deleted, finalizers) of one object.
    fn find(&self, ns: Option<&str>, name: &str) -> Option<ObjState> {
        let m = self.source.get(ns, name)?;
        Some((
            m.uid.unwrap_or_default(),
            m.deletion_timestamp.is_some(),
            m.finalizers.unwrap_or_default(),
        ))
    }

    /// Dependents (namespace, name, ownerReferences) of an owner uid.
    fn dependents(&self, uid: &str) -> Vec<Dependent> {
        self.source
            .all()
            .into_iter()
            .filter(|m| {
                m.owner_references
                    .as_ref()
                    .is_some_and(|rs| rs.iter().any(|r| r.uid == uid))
            })
            .map(|m| {
                (
                    m.namespace,
                    m.name.unwrap_or_default(),
                    m.owner_references.unwrap_or_default(),
                )
            })
            .collect()
    }

    fn owner_refs(&self, ns: Option<&str>, name: &str) -> Option<Vec<OwnerReference>> {
        self.source
            .get(ns, name)
            .map(|m| m.owner_references.unwrap_or_default())
    }

    /// Keys of the objects the collector may have to act on.
    fn keys(&self) -> Vec<String> {
        self.source
            .all()
            .into_iter()
            .filter(|m| {
                m.owner_references.as_ref().is_some_and(|r| !r.is_empty())
                    || m.deletion_timestamp.is_some()
            })
            .map(|m| match m.namespace {
                Some(ns) => format!("{ns}/{}", m.name.unwrap_or_default()),
                None => m.name.unwrap_or_default(),
            })
            .collect()
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

/// The kinds the collector tracks: built-ins fixed at start, custom kinds
/// as their CRDs are established.
#[derive(Default)]
pub struct Kinds {
    kinds: RwLock<Vec<Arc<Tracked>>>,
    /// The queue changes are handed to (set when the collector starts).
    queue: std::sync::OnceLock<Arc<Queue>>,
}

impl Kinds {
    pub fn new(builtin: Vec<Tracked>) -> Self {
        Kinds {
            kinds: RwLock::new(builtin.into_iter().map(Arc::new).collect()),
            queue: Default::default(),
        }
    }

    fn all(&self) -> Vec<Arc<Tracked>> {
        self.kinds.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn get(&self, kind: &str) -> Option<Arc<Tracked>> {
        self.kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|t| t.kind == kind)
            .cloned()
    }
}

/// Queue what one change of an object of `kind` may call for.
fn on_change(queue: &Queue, kind: &str, meta: &ObjectMeta, deleted: bool) {
    let name = meta.name.clone().unwrap_or_default();
    let key = match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    };
    let fins = meta.finalizers.as_deref().unwrap_or_default();
    let has_owners = meta
        .owner_references
        .as_ref()
        .is_some_and(|r| !r.is_empty());
    if !deleted
        && meta.deletion_timestamp.is_some()
        && fins
            .iter()
            .any(|f| f == "orphan" || f == "foregroundDeletion")
    {
        queue.add(format!("own|{kind}|{key}"));
    }
    if has_owners && !deleted {
        queue.add(format!("dep|{kind}|{key}"));
    }
    if deleted || meta.deletion_timestamp.is_some() {
        // Its dependents may be orphans now, and its owners may be
        // waiting for it (foreground deletion).
        queue.add(format!(
            "gone|{kind}|{}",
            meta.uid.clone().unwrap_or_default()
        ));
        for r in meta.owner_references.iter().flatten() {
            let ns = meta
                .namespace
                .as_ref()
                .map(|n| format!("{n}/"))
                .unwrap_or_default();
            queue.add(format!("own|{}|{ns}{}", owner_kind(r), r.name));
        }
    }
}

/// Register the change handlers of one tracked built-in kind.
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
    let kind = kind_id(&K::group(&()), &K::kind(&()));
    informer.on_change(move |o, deleted| on_change(&q, &kind, o.meta(), deleted));
}

/// Hand the collector's queue to the kinds followed later.
pub fn set_queue(ctx: &Ctx, queue: &Arc<Queue>) {
    let _ = ctx.gc_kinds.queue.set(queue.clone());
}

/// Kinds the collector never follows, as kube-controller-manager has it:
/// events are many and own nothing.
const IGNORED: &[(&str, &str)] = &[("", "events"), ("events.k8s.io", "events")];

/// Follow every kind the server lists that can be listed, watched and
/// deleted and that no informer covers (ConfigMaps, Secrets, the kinds of
/// CRDs...): a metadata-only watch each, feeding the collector like the
/// informers do. Discovery is read again whenever a CRD changes, so a new
/// custom kind is followed as soon as it is served. Runs until `shutdown`.
pub async fn follow_kinds(
    ctx: Arc<Ctx>,
    crds: Arc<Informer<CustomResourceDefinition>>,
    shutdown: CancellationToken,
) {
    let changed = Arc::new(tokio::sync::Notify::new());
    let notify = changed.clone();
    crds.on_change(move |_, _| notify.notify_one());
    crds.start(shutdown.clone());
    // Kind → the token that stops its watch.
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        match Discovery::new(ctx.client.clone()).run().await {
            Ok(discovery) => {
                let wanted: HashMap<String, (ApiResource, bool)> = discovery
                    .groups()
                    .flat_map(|g| g.recommended_resources())
                    .filter(|(r, caps)| {
                        [verbs::LIST, verbs::WATCH, verbs::DELETE]
                            .iter()
                            .all(|v| caps.supports_operation(v))
                            && !IGNORED.contains(&(r.group.as_str(), r.plural.as_str()))
                    })
                    .map(|(r, caps)| {
                        (
                            kind_id(&r.group, &r.kind),
                            (r, caps.scope == Scope::Namespaced),
                        )
                    })
                    .filter(|(kind, _)| {
                        running.contains_key(kind) || ctx.gc_kinds.get(kind).is_none()
                    })
                    .collect();
                running.retain(|kind, stop| {
                    let keep = wanted.contains_key(kind);
                    if !keep {
                        stop.cancel();
                        ctx.gc_kinds
                            .kinds
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|t| &t.kind != kind);
                    }
                    keep
                });
                for (kind, (ar, namespaced)) in wanted {
                    if running.contains_key(&kind) {
                        continue;
                    }
                    let stop = shutdown.child_token();
                    tracing::debug!(%kind, "collecting garbage of a kind");
                    track_kind(&ctx, ar, namespaced, stop.clone());
                    running.insert(kind, stop);
                }
            }
            Err(e) => tracing::warn!("discovery for garbage collection failed: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed.notified() => {}
            // Discovery failed or kinds came another way: look again.
            _ = tokio::time::sleep(REDISCOVER) => {}
        }
    }
}

/// How often discovery is read again without a CRD change.
const REDISCOVER: std::time::Duration = std::time::Duration::from_secs(60);

/// Watch one kind's metadata until `stop`, tracking it meanwhile.
fn track_kind(ctx: &Arc<Ctx>, ar: ApiResource, namespaced: bool, stop: CancellationToken) {
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let kind = kind_id(&ar.group, &ar.kind);
    ctx.gc_kinds
        .kinds
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::new(Tracked {
            kind: kind.clone(),
            resource: ar.clone(),
            namespaced,
            source: Box::new((store.clone(), ar.clone())),
        }));
    // Metadata-only lists and watches: the collector reads nothing else.
    let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(ctx.client.clone(), &ar);
    let queue = ctx.gc_kinds.queue.get().cloned();
    tokio::spawn(async move {
        let stream = reflector::reflector(
            writer,
            watcher::watcher(api, watcher::Config::default()).default_backoff(),
        );
        futures::pin_mut!(stream);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = stream.next() => next,
            };
            let Some(queue) = &queue else { continue };
            match next {
                None => return,
                Some(Ok(Event::Apply(o))) => on_change(queue, &kind, &o.metadata, false),
                Some(Ok(Event::Delete(o))) => on_change(queue, &kind, &o.metadata, true),
                Some(Ok(Event::InitDone)) => {
                    for o in store.state() {
                        on_change(queue, &kind, &o.metadata, false);
                    }
                }
                Some(Ok(Event::Init | Event::InitApply(_))) => {}
                Some(Err(e)) => tracing::debug!(%kind, "metadata watch failed: {e}"),
            }
        }
    });
}

pub fn all_keys(ctx: &Ctx) -> Vec<String> {
    ctx.gc_kinds
        .all()
        .iter()
        .flat_map(|t| {
            t.keys()
                .into_iter()
                .map(|k| format!("dep|{}|{k}", t.kind))
                .collect::<Vec<_>>()
        })
        .collect()
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
            for t in ctx.gc_kinds.all() {
                for (ns, name, _) in t.dependents(rest) {
                    let key = match ns {
                        Some(ns) => format!("{ns}/{name}"),
                        None => name,
                    };
                    check_dependent(&ctx, &t.kind, &key).await?;
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
    let Some(t) = ctx.gc_kinds.get(&owner_kind(r)) else {
        // Owners of kinds not served (or not yet followed) are assumed
        // alive: nothing is deleted on a guess.
        return Ok(Some((false, Vec::new())));
    };
    let ns = if t.namespaced { ns } else { None };
    if let Some((uid, deleting, fins)) = t.find(ns, &r.name) {
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
    let Some(t) = ctx.gc_kinds.get(kind) else {
        return Ok(Requeue::Done);
    };
    let (ns, name) = split_key(key);
    let Some(refs) = t.owner_refs(ns, name) else {
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
        let already = t.find(ns, name).is_some_and(|(_, deleting, _)| deleting);
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
    let Some(t) = ctx.gc_kinds.get(kind) else {
        return Ok(Requeue::Done);
    };
    let (ns, name) = split_key(key);
    let ns = if t.namespaced { ns } else { None };
    let Some((uid, deleting, fins)) = t.find(ns, name) else {
        return Ok(Requeue::Done);
    };
    if !deleting {
        return Ok(Requeue::Done);
    }
    let dependents: Vec<(Arc<Tracked>, Dependent)> = ctx
        .gc_kinds
        .all()
        .into_iter()
        .flat_map(|d| {
            d.dependents(&uid)
                .into_iter()
                .map(move |dependent| (d.clone(), dependent))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut done = None;
    if fins.iter().any(|f| f == "orphan") {
        for (d, (dns, dname, refs)) in &dependents {
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
            for (d, (dns, dname, _)) in &dependents {
                let deleting = d.find(dns.as_deref(), dname).is_some_and(|(_, x, _)| x);
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
