//! The small runtime every controller is built from, in the shape of
//! kube-runtime: a shared [`Informer`] per resource (one watch feeding a
//! reflector store and change handlers), a deduplicating bounded [`Queue`]
//! of object keys, and [`run_worker`], which drives an idempotent reconcile
//! function from the queue.

use std::collections::{HashSet, VecDeque};
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

/// A deduplicating FIFO of keys, with client-go's workqueue guarantee: a
/// key is never handed to two workers at once. A key queued twice is
/// reconciled once; one queued while it is being reconciled is handed out
/// again when that reconcile is [`done`](Queue::done). Bounded: past
/// `capacity` queued keys new keys are dropped and counted; the periodic
/// resync every controller runs brings them back.
pub struct Queue {
    state: Mutex<QueueState>,
    notify: Notify,
    capacity: usize,
    pub dropped: AtomicU64,
}

#[derive(Default)]
struct QueueState {
    queue: VecDeque<String>,
    /// Keys waiting to be reconciled (queued, or to queue once done).
    dirty: HashSet<String>,
    /// Keys a worker holds.
    processing: HashSet<String>,
}

impl Queue {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            capacity,
            dropped: AtomicU64::new(0),
        })
    }

    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        let mut st = lock(&self.state);
        if st.dirty.contains(&key) {
            return;
        }
        if st.processing.contains(&key) {
            st.dirty.insert(key);
            return;
        }
        if st.queue.len() >= self.capacity {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.dirty.insert(key.clone());
        st.queue.push_back(key);
        drop(st);
        self.notify.notify_one();
    }

    /// Queue `key` again after `delay` (requeues and retries).
    pub fn add_after(self: &Arc<Self>, key: String, delay: Duration) {
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    pub fn len(&self) -> usize {
        lock(&self.state).queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next key, held by the caller until [`Queue::done`].
    pub async fn next(&self) -> String {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = lock(&self.state);
                if let Some(k) = st.queue.pop_front() {
                    st.dirty.remove(&k);
                    st.processing.insert(k.clone());
                    if !st.queue.is_empty() {
                        self.notify.notify_one();
                    }
                    return k;
                }
            }
            notified.await;
        }
    }

    /// The worker is finished with `key`; if it was added meanwhile, it is
    /// queued again (past the bound too: it was already counted in).
    pub fn done(&self, key: &str) {
        let mut st = lock(&self.state);
        st.processing.remove(key);
        if st.dirty.contains(key) {
            st.queue.push_back(key.to_string());
            drop(st);
            self.notify.notify_one();
        }
    }
}

/// What a reconcile asks for after it ran.
pub enum Requeue {
    Done,
    After(Duration),
}

/// Drive `reconcile` from `queue` until `shutdown`. Failed reconciles are
/// retried with a growing delay; every `resync` the `all_keys` are queued
/// again so nothing stays missed (dropped queue entries, lost events).
pub async fn run_worker<R, Fut, A>(
    name: &'static str,
    queue: Arc<Queue>,
    shutdown: CancellationToken,
    resync: Duration,
    all_keys: A,
    reconcile: R,
) where
    R: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<Requeue>>,
    A: Fn() -> Vec<String> + Send + 'static,
{
    run_workers(name, 1, queue, shutdown, resync, all_keys, reconcile).await
}

/// [`run_worker`] with `workers` reconciles in flight at once (for
/// reconciles that are independent per key, like hollow pods).
pub async fn run_workers<R, Fut, A>(
    name: &'static str,
    workers: usize,
    queue: Arc<Queue>,
    shutdown: CancellationToken,
    resync: Duration,
    all_keys: A,
    reconcile: R,
) where
    R: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<Requeue>>,
    A: Fn() -> Vec<String> + Send + 'static,
{
    let q = queue.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(resync);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    for k in all_keys() {
                        q.add(k);
                    }
                }
            }
        }
    });
    let failures: Mutex<std::collections::HashMap<String, u32>> = Default::default();
    let worker = || async {
        loop {
            let key = tokio::select! {
                _ = shutdown.cancelled() => return,
                k = queue.next() => k,
            };
            tracing::trace!(controller = name, %key, "reconciling");
            let result = reconcile(key.clone()).await;
            queue.done(&key);
            match result {
                Ok(r) => {
                    lock(&failures).remove(&key);
                    if let Requeue::After(d) = r {
                        queue.add_after(key, d);
                    }
                }
                Err(e) => {
                    let n = {
                        let mut f = lock(&failures);
                        let n = f.entry(key.clone()).or_insert(0);
                        *n = (*n + 1).min(7);
                        *n
                    };
                    let delay = Duration::from_millis(250 << n).min(Duration::from_secs(30));
                    tracing::debug!(controller = name, %key, "reconcile failed, retrying in {delay:?}: {e:#}");
                    queue.add_after(key, delay);
                }
            }
        }
    };
    futures::future::join_all((0..workers.max(1)).map(|_| worker())).await;
}

/// Whether a kube error is an HTTP status with this code.
pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

pub fn not_found(e: &kube::Error) -> bool {
    is_status(e, 404)
}

/// Treat NotFound (already gone) as success.
pub fn ignore_not_found<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Workers never hold one key at once, and a key added while it is
    /// held is reconciled once more afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_is_never_reconciled_twice_at_once() {
        let queue = Queue::new(16);
        let holding = Arc::new(AtomicU64::new(0));
        let overlaps = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let (h, o, n) = (holding.clone(), overlaps.clone(), runs.clone());
        let workers = tokio::spawn(run_workers(
            "test",
            4,
            queue.clone(),
            shutdown.clone(),
            Duration::from_secs(3600),
            Vec::new,
            move |_key| {
                let (h, o, n) = (h.clone(), o.clone(), n.clone());
                async move {
                    if h.fetch_add(1, Ordering::SeqCst) > 0 {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    h.fetch_sub(1, Ordering::SeqCst);
                    n.fetch_add(1, Ordering::SeqCst);
                    Ok(Requeue::Done)
                }
            },
        ));
        queue.add("k");
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Added twice while a worker holds it.
        queue.add("k");
        queue.add("k");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            overlaps.load(Ordering::SeqCst),
            0,
            "reconciled concurrently"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert!(queue.is_empty());
        shutdown.cancel();
        workers.abort();
    }
}
