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
type ErrorHandler = Box<dyn Fn(Option<&watcher::Error>) + Send + Sync>;
type Trim<K> = fn(&mut K);

/// One watch of a resource shared by every controller that reads it: the
/// objects live once in the reflector store, and each change is handed to
/// the registered handlers (which usually just enqueue keys).
pub struct Informer<K: Resource<DynamicType = ()> + Clone + 'static> {
    pub store: Store<K>,
    writer: Mutex<Option<reflector::store::Writer<K>>>,
    handlers: Mutex<Vec<Handler<K>>>,
    error_handlers: Mutex<Vec<ErrorHandler>>,
    api: Api<K>,
    config: watcher::Config,
    trim: Option<Trim<K>>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    pub fn new(api: Api<K>, config: watcher::Config) -> Arc<Self> {
        Self::with_trim(api, config, None)
    }

    /// Like [`Informer::new`], but every object passes through `trim`
    /// before it is stored, so a reader that needs a few fields does not
    /// keep thousands of whole objects (managed fields, images, ...).
    pub fn trimmed(api: Api<K>, config: watcher::Config, trim: Trim<K>) -> Arc<Self> {
        Self::with_trim(api, config, Some(trim))
    }

    fn with_trim(api: Api<K>, config: watcher::Config, trim: Option<Trim<K>>) -> Arc<Self> {
        let (store, writer) = reflector::store();
        Arc::new(Informer {
            store,
            writer: Mutex::new(Some(writer)),
            handlers: Mutex::new(Vec::new()),
            error_handlers: Mutex::new(Vec::new()),
            api,
            config,
            trim,
            synced: tokio::sync::watch::channel(false).0,
        })
    }

    /// Call `f(object, deleted)` for every change, starting with the
    /// initial list. Objects deleted while the watch was down are handed
    /// out as deleted after the next list. Register before
    /// [`Informer::start`].
    pub fn on_change(&self, f: impl Fn(&K, bool) + Send + Sync + 'static) {
        lock(&self.handlers).push(Box::new(f));
    }

    /// Call `f(Some(error))` each time the watch fails (it retries with
    /// backoff) and `f(None)` once the API server answers again. Without
    /// such a handler failures are logged as warnings (with one, at debug
    /// level: the handler reports them). Register before
    /// [`Informer::start`].
    pub fn on_watch_error(&self, f: impl Fn(Option<&watcher::Error>) + Send + Sync + 'static) {
        lock(&self.error_handlers).push(Box::new(f));
    }

    /// Start the watch; it runs (re-listing after errors, with backoff)
    /// until `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        let Some(writer) = lock(&self.writer).take() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let trim = me.trim.unwrap_or(|_| {});
            let stream = reflector::reflector(
                writer,
                watcher::watcher(me.api.clone(), me.config.clone())
                    .default_backoff()
                    .modify(trim),
            );
            futures::pin_mut!(stream);
            // What the store held when a (re)list began: the list replaces
            // it at once, so what is missing from it was deleted meanwhile.
            let mut before: Vec<Arc<K>> = Vec::new();
            let mut failing = false;
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                let event = match next {
                    None => return,
                    Some(Err(e)) => {
                        failing = true;
                        me.watch_failed(Some(&e));
                        continue;
                    }
                    Some(Ok(ev)) => ev,
                };
                // `Init` comes before the list request, so it proves nothing.
                if failing && !matches!(event, Event::Init) {
                    failing = false;
                    me.watch_failed(None);
                }
                match event {
                    Event::Apply(o) => me.dispatch(&o, false),
                    Event::Delete(o) => me.dispatch(&o, true),
                    Event::Init => before = me.store.state(),
                    // The store swaps in a (re)list only at InitDone, so the
                    // listed objects are handed out from there.
                    Event::InitDone => {
                        me.synced.send_replace(true);
                        for old in before.drain(..) {
                            let now = me.store.get(&ObjectRef::from_obj(old.as_ref()));
                            if now.is_none_or(|n| n.meta().uid != old.meta().uid) {
                                me.dispatch(&old, true);
                            }
                        }
                        for o in me.store.state() {
                            me.dispatch(&o, false);
                        }
                    }
                    Event::InitApply(_) => {}
                }
            }
        });
    }

    fn watch_failed(&self, error: Option<&watcher::Error>) {
        let handlers = lock(&self.error_handlers);
        match error {
            Some(e) if handlers.is_empty() => {
                tracing::warn!(kind = %K::kind(&()), "watch failed: {e}")
            }
            Some(e) => tracing::debug!(kind = %K::kind(&()), "watch failed: {e}"),
            None => {}
        }
        for h in handlers.iter() {
            h(error);
        }
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

/// A trim for [`Informer::trimmed`] that no reader of metadata misses:
/// managed fields and kubectl's last-applied copy of the object.
pub fn trim_metadata<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::client::Body;
    use serde_json::json;
    use std::time::Duration;

    fn config_map(name: &str, uid: &str) -> serde_json::Value {
        json!({"metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": "1"}})
    }

    /// An API server whose first watch fails with 410 Gone: the informer
    /// lists again, and what vanished or was replaced meanwhile (`a`, and
    /// `b` under a new uid) is handed out as deleted.
    #[tokio::test]
    async fn a_relist_hands_out_what_vanished_as_deleted() {
        let lists = Arc::new(Mutex::new(vec![
            vec![config_map("b", "uid-3")],
            vec![config_map("a", "uid-1"), config_map("b", "uid-2")],
        ]));
        let watches = Arc::new(Mutex::new(0));
        let service = tower::service_fn(move |req: http::Request<Body>| {
            let watch = req.uri().query().unwrap_or("").contains("watch=true");
            let (lists, watches) = (lists.clone(), watches.clone());
            async move {
                let body = if watch {
                    let first = {
                        let mut n = lock(&watches);
                        *n += 1;
                        *n == 1
                    };
                    if !first {
                        std::future::pending::<()>().await;
                    }
                    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                        "status": "Failure", "reason": "Expired", "code": 410}})
                } else {
                    let items = lock(&lists).pop().unwrap_or_default();
                    json!({"kind": "ConfigMapList", "apiVersion": "v1",
                        "metadata": {"resourceVersion": "2"}, "items": items})
                };
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::from(
                    body.to_string().into_bytes(),
                )))
            }
        });
        let client = kube::Client::new(service, "ns");
        let informer =
            Informer::<ConfigMap>::new(Api::namespaced(client, "ns"), Default::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        informer.on_change(move |cm, deleted| {
            let uid = cm.metadata.uid.clone().unwrap_or_default();
            lock(&s).push(format!(
                "{}{} {uid}",
                if deleted { "-" } else { "+" },
                cm.name_any()
            ));
        });
        let e = errors.clone();
        informer.on_watch_error(move |err| lock(&e).push(err.is_some()));
        let shutdown = CancellationToken::new();
        informer.start(shutdown.clone());
        let want = ["+a uid-1", "+b uid-2", "-a uid-1", "-b uid-2", "+b uid-3"];
        for _ in 0..100 {
            if lock(&seen).len() >= want.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        // Each list is handed out in the store's order; deletes come first.
        let mut seen = lock(&seen).clone();
        seen[..2].sort();
        seen[2..4].sort();
        assert_eq!(seen, want);
        assert_eq!(*lock(&errors), [true, false], "failed once, then recovered");
        assert_eq!(informer.store.state().len(), 1);
    }
}
