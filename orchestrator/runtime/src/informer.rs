//! A shared [`Informer`] per resource: one watch feeding a reflector store
//! and change handlers.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::lock;

type Handler<K> = Box<dyn Fn(&K, bool) + Send + Sync>;

/// One watch of a resource shared by every controller that reads it: the
/// objects live once in the reflector store, and each change is handed to
/// the registered handlers (which usually just enqueue keys).
pub struct Informer<K: Resource<DynamicType = ()> + Clone + 'static> {
    pub store: Store<K>,
    writer: Mutex<Option<reflector::store::Writer<K>>>,
    handlers: Mutex<Vec<Handler<K>>>,
    api: Api<K>,
    config: watcher::Config,
    synced: tokio::sync::watch::Sender<bool>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    pub fn new(api: Api<K>, config: watcher::Config) -> Arc<Self> {
        let (store, writer) = reflector::store();
        Arc::new(Informer {
            store,
            writer: Mutex::new(Some(writer)),
            handlers: Mutex::new(Vec::new()),
            api,
            config,
            synced: tokio::sync::watch::channel(false).0,
        })
    }

    /// Call `f(object, deleted)` for every change, starting with the
    /// initial list. Register before [`Informer::start`].
    pub fn on_change(&self, f: impl Fn(&K, bool) + Send + Sync + 'static) {
        lock(&self.handlers).push(Box::new(f));
    }

    /// Start the watch; it runs (re-listing after errors, with backoff)
    /// until `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        let Some(writer) = lock(&self.writer).take() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let stream = reflector::reflector(
                writer,
                watcher::watcher(me.api.clone(), me.config.clone()).default_backoff(),
            );
            futures::pin_mut!(stream);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    None => return,
                    Some(Ok(Event::Apply(o))) => me.dispatch(&o, false),
                    Some(Ok(Event::Delete(o))) => me.dispatch(&o, true),
                    // The store swaps in a (re)list only at InitDone, so the
                    // listed objects are handed out from there.
                    Some(Ok(Event::InitDone)) => {
                        me.synced.send_replace(true);
                        for o in me.store.state() {
                            me.dispatch(&o, false);
                        }
                    }
                    Some(Ok(Event::Init | Event::InitApply(_))) => {}
                    Some(Err(e)) => tracing::warn!(kind = %K::kind(&()), "watch failed: {e}"),
                }
            }
        });
    }

    fn dispatch(&self, obj: &K, deleted: bool) {
        for h in lock(&self.handlers).iter() {
            h(obj, deleted);
        }
    }

    /// Wait until the initial list is in the store.
    pub async fn ready(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn get(&self, namespace: Option<&str>, name: &str) -> Option<Arc<K>> {
        let mut r = ObjectRef::new(name);
        if let Some(ns) = namespace {
            r = r.within(ns);
        }
        self.store.get(&r)
    }

    /// Objects in `namespace` for which `f` holds.
    pub fn list_in(&self, namespace: &str, f: impl Fn(&K) -> bool) -> Vec<Arc<K>> {
        self.store
            .state_filter(|o| o.meta().namespace.as_deref() == Some(namespace) && f(o))
    }
}

/// `namespace/name` (or `name` for cluster-scoped objects).
pub fn key_of<K: Resource>(o: &K) -> String {
    match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, key),
    }
}
