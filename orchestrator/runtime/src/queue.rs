//! A deduplicating bounded [`Queue`] of object keys and [`run_worker`],
//! which drives an idempotent reconcile function from it.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::lock;

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
