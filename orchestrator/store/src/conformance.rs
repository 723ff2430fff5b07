//! Backend-independent tests of the [`Store`] contract.
//!
//! A backend runs the whole suite from an integration test with
//!
//! ```ignore
//! tapestry_store::store_conformance_suite!(async { make_store().await });
//! ```
//!
//! which expands to one `#[tokio::test]` per check, each on a fresh store from
//! the expression (evaluated once per test). The calling crate needs `tokio`
//! with the `macros` and `rt-multi-thread` features.
//!
//! The checks assume nothing about the backend beyond the trait, and not that
//! the store starts empty: each test works under its own unique key prefix and
//! relative to the revision it starts from. They do assume that nobody else
//! writes to the store while a test runs, since they check exact revisions,
//! and several tests compact the store (which is store-wide).
//!
//! A backend whose store needs something kept alive with it (a temporary
//! directory, a server process) wraps both in a [`Guarded`]. A backend that
//! needs an outside server which may be missing uses
//! `store_conformance_suite!(optional ...)` with a future of an `Option`:
//! `None` skips the check. Each check is also a public function, so a
//! backend can run single checks by hand.
//!
//! The functions panic on failure, like any test.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::{
    EventKind, KeyValue, ListOptions, ListResult, Revision, Store, StoreError, WatchEvent,
    WatchStream,
};

/// Expand to one `#[tokio::test]` per conformance check. The argument is an
/// expression producing a future of a fresh store (anything implementing
/// [`Store`]); it is evaluated once per test.
#[macro_export]
macro_rules! store_conformance_suite {
    // Internal arms first: a leading `@` is no expression.
    (@tests $mode:ident $factory:expr) => {
        $crate::store_conformance_suite!(@each $mode $factory;
            revisions_increase_by_one,
            create_existing_key_fails,
            update_and_delete_check_preconditions,
            recreated_key_gets_new_create_revision,
            invalid_keys_are_errors,
            list_isolates_prefixes,
            list_limit_and_remaining,
            long_lists_are_whole_and_consistent,
            list_pages_at_fixed_revision_during_writes,
            list_at_past_revisions,
            future_revision_fails,
            compaction_keeps_state_at_its_revision,
            list_before_compaction_point_fails,
            watch_before_compaction_point_fails,
            compact_rejects_older_revision,
            watch_event_kinds_and_prev_values,
            watch_replays_then_follows_live_with_prefix_filter,
            watch_from_current_revision_sees_only_new_events,
            watch_started_during_writes_is_gap_free,
            concurrent_writers_get_consecutive_revisions,
            many_watchers_see_every_event_in_order,
            slow_watcher_still_sees_every_event,
        );
    };
    (@each required $factory:expr; $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                $crate::conformance::$test($factory.await).await;
            }
        )+
    };
    (@each optional $factory:expr; $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let Some(store) = $factory.await else { return };
                $crate::conformance::$test(store).await;
            }
        )+
    };
    (optional $factory:expr) => {
        $crate::store_conformance_suite!(@tests optional $factory);
    };
    ($factory:expr) => {
        $crate::store_conformance_suite!(@tests required $factory);
    };
}

/// A store and what must live as long as it (a temporary directory, a
/// server process); it is a [`Store`] by delegation.
pub struct Guarded<S, G> {
    pub store: S,
    pub guard: G,
}

impl<S, G> std::ops::Deref for Guarded<S, G> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.store
    }
}

#[async_trait::async_trait]
impl<S: Store, G: Send + Sync + 'static> Store for Guarded<S, G> {
    async fn current_revision(&self) -> crate::Result<Revision> {
        self.store.current_revision().await
    }
    async fn compacted_revision(&self) -> crate::Result<Revision> {
        self.store.compacted_revision().await
    }
    async fn get(&self, key: &str) -> crate::Result<Option<KeyValue>> {
        self.store.get(key).await
    }
    async fn list(&self, prefix: &str, opts: ListOptions) -> crate::Result<ListResult> {
        self.store.list(prefix, opts).await
    }
    async fn create(&self, key: &str, value: Bytes) -> crate::Result<KeyValue> {
        self.store.create(key, value).await
    }
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> crate::Result<KeyValue> {
        self.store.update(key, value, expected).await
    }
    async fn delete(&self, key: &str, expected: Option<Revision>) -> crate::Result<KeyValue> {
        self.store.delete(key, expected).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> crate::Result<WatchStream> {
        self.store.watch(prefix, after).await
    }
    async fn watch_with_progress(
        &self,
        prefix: &str,
        after: Revision,
    ) -> crate::Result<(WatchStream, crate::WatchProgress)> {
        self.store.watch_with_progress(prefix, after).await
    }
    async fn compact(&self, revision: Revision) -> crate::Result<()> {
        self.store.compact(revision).await
    }
}

/// How long any single wait may take before the test fails instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(60);

static ROOT_SEQ: AtomicU64 = AtomicU64::new(0);

/// A key prefix no other test (in this or an earlier run) uses, so the suite
/// also works against a long-lived shared server.
fn root(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seq = ROOT_SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "/conformance-{nanos:x}-{}-{seq}/{test}/",
        std::process::id()
    )
}

fn val(s: impl Into<String>) -> Bytes {
    Bytes::from(s.into())
}

fn at(revision: Revision) -> ListOptions {
    ListOptions {
        revision: Some(revision),
        ..Default::default()
    }
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

async fn next_event(w: &mut WatchStream) -> WatchEvent {
    match within("waiting for a watch event", w.next()).await {
        Some(Ok(ev)) => ev,
        Some(Err(e)) => panic!("watch failed: {e}"),
        None => panic!("watch ended unexpectedly"),
    }
}

async fn next_events(w: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_event(w).await);
    }
    out
}

async fn current<S: Store>(store: &S) -> Revision {
    store.current_revision().await.expect("current_revision")
}

async fn list<S: Store>(store: &S, prefix: &str, opts: ListOptions) -> ListResult {
    store.list(prefix, opts).await.expect("list")
}

fn keys(items: &[KeyValue]) -> Vec<&str> {
    items.iter().map(|kv| kv.key.as_str()).collect()
}

/// Create every key, `concurrency` requests in flight at a time.
async fn create_all<S: Store>(
    store: &S,
    kvs: Vec<(String, Bytes)>,
    concurrency: usize,
) -> Vec<KeyValue> {
    futures::stream::iter(kvs)
        .map(|(k, v)| async move { store.create(&k, v).await })
        .buffer_unordered(concurrency)
        .try_collect()
        .await
        .expect("create")
}

fn assert_consecutive(events: &[WatchEvent], first: Revision) {
    for (i, ev) in events.iter().enumerate() {
        let want = first + i as Revision;
        assert_eq!(ev.revision(), want, "event {i} out of order or missing");
    }
}

fn assert_compacted(result: Result<ListResult, StoreError>) {
    match result {
        Err(StoreError::Compacted { .. }) => {}
        other => panic!("expected Compacted, got {other:?}"),
    }
}

/// A watch below the compaction point fails, either at once or as the first
/// item of the stream.
async fn assert_watch_compacted(result: Result<WatchStream, StoreError>) {
    match result {
        Err(StoreError::Compacted { .. }) => {}
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(mut w) => match within("first item of a compacted watch", w.next()).await {
            Some(Err(StoreError::Compacted { .. })) => {}
            other => panic!("expected Compacted as the first item, got {other:?}"),
        },
    }
}

pub async fn revisions_increase_by_one<S: Store>(store: S) {
    let r = root("revisions");
    let (k1, k2) = (format!("{r}a"), format!("{r}b"));
    let base = current(&store).await;

    let a = store.create(&k1, val("1")).await.expect("create a");
    assert_eq!((a.create_revision, a.mod_revision), (base + 1, base + 1));
    assert_eq!((a.key.as_str(), &a.value[..]), (k1.as_str(), &b"1"[..]));
    assert_eq!(current(&store).await, base + 1);

    let b = store.create(&k2, val("x")).await.expect("create b");
    assert_eq!(b.mod_revision, base + 2);

    let a2 = store
        .update(&k1, val("2"), a.mod_revision)
        .await
        .expect("update");
    assert_eq!((a2.create_revision, a2.mod_revision), (base + 1, base + 3));
    assert_eq!(&a2.value[..], b"2");

    let gone = store.delete(&k2, None).await.expect("delete");
    assert_eq!(gone.mod_revision, base + 4);
    assert_eq!(gone.create_revision, base + 2);
    assert_eq!(&gone.value[..], b"x");

    assert_eq!(current(&store).await, base + 4);
    assert_eq!(store.get(&k1).await.expect("get"), Some(a2));
    assert_eq!(store.get(&k2).await.expect("get"), None);
}

pub async fn create_existing_key_fails<S: Store>(store: S) {
    let k = format!("{}k", root("dup"));
    let first = store.create(&k, val("one")).await.expect("create");
    let rev = current(&store).await;
    match store.create(&k, val("two")).await {
        Err(StoreError::AlreadyExists(key)) => assert_eq!(key, k),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        current(&store).await,
        rev,
        "a failed create used a revision"
    );
    assert_eq!(store.get(&k).await.expect("get"), Some(first));
}

pub async fn update_and_delete_check_preconditions<S: Store>(store: S) {
    let r = root("cas");
    let k = format!("{r}k");
    let missing = format!("{r}missing");
    let base = current(&store).await;

    assert!(matches!(
        store.update(&missing, val("v"), base).await,
        Err(StoreError::NotFound(key)) if key == missing
    ));
    assert!(matches!(
        store.delete(&missing, None).await,
        Err(StoreError::NotFound(key)) if key == missing
    ));

    let v1 = store.create(&k, val("1")).await.expect("create");
    let v2 = store
        .update(&k, val("2"), v1.mod_revision)
        .await
        .expect("update at the current revision");
    let rev = current(&store).await;

    match store.update(&k, val("3"), v1.mod_revision).await {
        Err(StoreError::Conflict {
            key,
            expected,
            current,
        }) => {
            assert_eq!(key, k);
            assert_eq!(expected, v1.mod_revision);
            assert_eq!(current, v2.mod_revision);
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    match store.delete(&k, Some(v1.mod_revision)).await {
        Err(StoreError::Conflict {
            expected, current, ..
        }) => {
            assert_eq!(expected, v1.mod_revision);
            assert_eq!(current, v2.mod_revision);
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(current(&store).await, rev, "failed writes used revisions");
    assert_eq!(store.get(&k).await.expect("get"), Some(v2.clone()));

    let gone = store
        .delete(&k, Some(v2.mod_revision))
        .await
        .expect("delete at the current revision");
    assert_eq!(gone.mod_revision, rev + 1);
    assert!(matches!(
        store.update(&k, val("4"), v2.mod_revision).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn recreated_key_gets_new_create_revision<S: Store>(store: S) {
    let k = format!("{}k", root("recreate"));
    let first = store.create(&k, val("1")).await.expect("create");
    store.delete(&k, None).await.expect("delete");
    let second = store.create(&k, val("2")).await.expect("recreate");
    assert_eq!(second.create_revision, first.create_revision + 2);
    assert_eq!(second.create_revision, second.mod_revision);
    let got = store.get(&k).await.expect("get").expect("present");
    assert_eq!(got.create_revision, second.create_revision);
}

pub async fn invalid_keys_are_errors<S: Store>(store: S) {
    let rev = current(&store).await;
    assert!(store.create("", val("v")).await.is_err());
    assert!(store.update("", val("v"), rev).await.is_err());
    assert!(store.delete("", None).await.is_err());
    assert_eq!(current(&store).await, rev);
}

pub async fn list_isolates_prefixes<S: Store>(store: S) {
    let r = root("isolation");
    let pods = format!("{r}registry/pods/");
    let podsx = format!("{r}registry/podsx/");
    for k in [
        format!("{pods}ns1/a"),
        format!("{podsx}ns1/a"),
        format!("{pods}ns1/b"),
        format!("{r}registry/pods"),
        format!("{pods}ns2/a"),
        format!("{r}registry/pod/x"),
    ] {
        store.create(&k, val("v")).await.expect("create");
    }
    let rev = current(&store).await;
    let want = [
        format!("{pods}ns1/a"),
        format!("{pods}ns1/b"),
        format!("{pods}ns2/a"),
    ];
    let got = list(&store, &pods, ListOptions::default()).await;
    assert_eq!(keys(&got.items), want);
    assert_eq!((got.revision, got.remaining), (rev, 0));

    let got = list(&store, &podsx, ListOptions::default()).await;
    assert_eq!(keys(&got.items), [format!("{podsx}ns1/a")]);

    let got = list(&store, &format!("{pods}ns1/"), ListOptions::default()).await;
    assert_eq!(keys(&got.items), &want[..2]);

    // A write after the fact must not change what a past-revision list sees.
    store
        .create(&format!("{podsx}ns1/b"), val("v"))
        .await
        .expect("create");
    let got = list(&store, &pods, at(rev)).await;
    assert_eq!(keys(&got.items), want);
}

pub async fn list_limit_and_remaining<S: Store>(store: S) {
    let p = root("limit");
    for i in 0..10 {
        store
            .create(&format!("{p}{i:02}"), val(format!("v{i}")))
            .await
            .expect("create");
    }
    let rev = current(&store).await;

    let all = list(
        &store,
        &p,
        ListOptions {
            limit: Some(0),
            ..Default::default()
        },
    )
    .await;
    assert_eq!((all.items.len(), all.remaining), (10, 0));

    let mut seen = Vec::new();
    let mut cursor = None;
    for remaining in [7, 4, 1, 0] {
        let page = list(
            &store,
            &p,
            ListOptions {
                revision: None,
                limit: Some(3),
                start_after: cursor.clone(),
            },
        )
        .await;
        assert_eq!(page.revision, rev);
        assert_eq!(page.remaining, remaining);
        cursor = page.items.last().map(|kv| kv.key.clone());
        seen.extend(page.items);
    }
    assert_eq!(seen, all.items);

    let tail = list(
        &store,
        &p,
        ListOptions {
            start_after: Some(format!("{p}05")),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(keys(&tail.items), keys(&all.items[6..]));

    let past_end = list(
        &store,
        &p,
        ListOptions {
            start_after: Some(format!("{p}99")),
            ..Default::default()
        },
    )
    .await;
    assert!(past_end.items.is_empty());
    assert_eq!(past_end.remaining, 0);
}

/// Lists longer than any internal step of a backend: every key once, in
/// order, with its value, and all of them as of one revision even while
/// other writes land.
pub async fn long_lists_are_whole_and_consistent<S: Store>(store: S) {
    const KEYS: usize = 1000;
    let p = root("long");
    let kvs = (0..KEYS)
        .map(|i| (format!("{p}{i:04}"), val(format!("v{i}"))))
        .collect();
    create_all(&store, kvs, 64).await;
    // A neighbouring prefix that sorts right after this one.
    let neighbour = format!("{}~/", p.trim_end_matches('/'));
    store
        .create(&format!("{neighbour}0"), val("other"))
        .await
        .expect("create");

    let all = list(&store, &p, ListOptions::default()).await;
    assert_eq!(all.items.len(), KEYS);
    assert_eq!(all.remaining, 0);
    for (i, kv) in all.items.iter().enumerate() {
        assert_eq!(kv.key, format!("{p}{i:04}"));
        assert_eq!(kv.value, val(format!("v{i}")));
    }

    let page = list(
        &store,
        &p,
        ListOptions {
            limit: Some(300),
            start_after: Some(format!("{p}0099")),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(keys(&page.items), keys(&all.items[100..400]));
    assert_eq!(page.remaining, KEYS - 400);

    // Rewrite keys while listing: each list must equal the list at its
    // revision read back from history.
    let writer = async {
        for round in 0..3 {
            for i in (0..KEYS).step_by(7) {
                let key = format!("{p}{i:04}");
                let kv = store.get(&key).await.expect("get").expect("present");
                store
                    .update(&key, val(format!("r{round}-{i}")), kv.mod_revision)
                    .await
                    .expect("update");
            }
        }
    };
    let reader = async {
        let mut lists = Vec::new();
        for _ in 0..20 {
            lists.push(list(&store, &p, ListOptions::default()).await);
            tokio::task::yield_now().await;
        }
        lists
    };
    let ((), lists) = tokio::join!(writer, reader);
    for live in lists {
        assert_eq!(live.items.len(), KEYS);
        assert!(live.items.iter().all(|kv| kv.mod_revision <= live.revision));
        let past = list(&store, &p, at(live.revision)).await;
        assert_eq!(past.items, live.items, "list at {} differs", live.revision);
    }
}

pub async fn list_pages_at_fixed_revision_during_writes<S: Store>(store: S) {
    let store = Arc::new(store);
    let p = root("paging");
    let initial: Vec<_> = (0..120)
        .map(|i| (format!("{p}{i:03}"), val(format!("v{i}"))))
        .collect();
    create_all(&*store, initial, 16).await;
    let snapshot = list(&*store, &p, ListOptions::default()).await;
    assert_eq!(snapshot.items.len(), 120);

    // Churn the same keys (updates, deletes, inserts between existing keys)
    // while the pages are read.
    let writer = {
        let store = store.clone();
        let p = p.clone();
        tokio::spawn(async move {
            for i in 0..120 {
                let k = format!("{p}{i:03}");
                match i % 3 {
                    0 => {
                        store.delete(&k, None).await.expect("delete");
                    }
                    1 => {
                        let kv = store.get(&k).await.expect("get").expect("present");
                        store
                            .update(&k, val("changed"), kv.mod_revision)
                            .await
                            .expect("update");
                    }
                    _ => {
                        store
                            .create(&format!("{k}-new"), val("new"))
                            .await
                            .expect("create");
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    };

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = list(
            &*store,
            &p,
            ListOptions {
                revision: Some(snapshot.revision),
                limit: Some(7),
                start_after: cursor.clone(),
            },
        )
        .await;
        assert_eq!(page.revision, snapshot.revision);
        assert_eq!(page.remaining + seen.len() + page.items.len(), 120);
        cursor = page.items.last().map(|kv| kv.key.clone());
        seen.extend(page.items);
        if page.remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    within("writer", writer).await.expect("writer task");
    assert_eq!(seen, snapshot.items);

    // The old snapshot is still readable after all the writes.
    let again = list(&*store, &p, at(snapshot.revision)).await;
    assert_eq!(again.items, snapshot.items);
    let latest = list(&*store, &p, ListOptions::default()).await;
    assert_eq!(latest.items.len(), 120 - 40 + 40);
    assert_ne!(latest.items, snapshot.items);
}

pub async fn list_at_past_revisions<S: Store>(store: S) {
    let p = root("past");
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    let a1 = store.create(&a, val("a1")).await.expect("create a");
    let b1 = store.create(&b, val("b1")).await.expect("create b");
    let a2 = store
        .update(&a, val("a2"), a1.mod_revision)
        .await
        .expect("update a");
    store.delete(&b, None).await.expect("delete b");
    let c1 = store.create(&c, val("c1")).await.expect("create c");
    let r1 = a1.mod_revision;

    let expected: [(Revision, Vec<&KeyValue>); 5] = [
        (r1, vec![&a1]),
        (r1 + 1, vec![&a1, &b1]),
        (r1 + 2, vec![&a2, &b1]),
        (r1 + 3, vec![&a2]),
        (r1 + 4, vec![&a2, &c1]),
    ];
    for (rev, want) in expected {
        let got = list(&store, &p, at(rev)).await;
        assert_eq!(got.revision, rev);
        let want: Vec<KeyValue> = want.into_iter().cloned().collect();
        assert_eq!(got.items, want, "state at revision {rev}");
    }
    // Revision 0 would mean "latest", so only look before r1 if it exists.
    if r1 > 1 {
        let before = list(&store, &p, at(r1 - 1)).await;
        assert!(before.items.is_empty());
    }

    let paged = list(
        &store,
        &p,
        ListOptions {
            revision: Some(r1 + 2),
            limit: Some(1),
            start_after: None,
        },
    )
    .await;
    assert_eq!(paged.items, vec![a2.clone()]);
    assert_eq!(paged.remaining, 1);
}

pub async fn future_revision_fails<S: Store>(store: S) {
    let p = root("future");
    store
        .create(&format!("{p}k"), val("v"))
        .await
        .expect("create");
    let rev = current(&store).await;
    match store.list(&p, at(rev + 1)).await {
        Err(StoreError::FutureRevision { requested, .. }) => assert_eq!(requested, rev + 1),
        other => panic!("expected FutureRevision, got {other:?}"),
    }
    match store.compact(rev + 1).await {
        Err(StoreError::FutureRevision { requested, .. }) => assert_eq!(requested, rev + 1),
        other => panic!("expected FutureRevision, got {other:?}"),
    }
    assert_eq!(list(&store, &p, at(rev)).await.items.len(), 1);
}

/// Writes the history used by the compaction tests and returns the base
/// revision: a created at +1, modified at +2 and +5; x created at +3, deleted
/// at +4. Compacting at +3 keeps a@+2 and x@+3 readable at +3.
async fn compaction_history<S: Store>(store: &S, p: &str) -> Revision {
    let base = current(store).await;
    let (a, x) = (format!("{p}a"), format!("{p}x"));
    let a1 = store.create(&a, val("a1")).await.expect("create");
    let a2 = store
        .update(&a, val("a2"), a1.mod_revision)
        .await
        .expect("update");
    store.create(&x, val("x1")).await.expect("create");
    store.delete(&x, None).await.expect("delete");
    store
        .update(&a, val("a3"), a2.mod_revision)
        .await
        .expect("update");
    assert_eq!(current(store).await, base + 5);
    base
}

pub async fn compaction_keeps_state_at_its_revision<S: Store>(store: S) {
    let p = root("compaction");
    let base = compaction_history(&store, &p).await;
    store.compact(base + 3).await.expect("compact");
    assert_eq!(
        store.compacted_revision().await.expect("compacted"),
        base + 3
    );
    // Compacting at the compaction point again is harmless.
    store.compact(base + 3).await.expect("compact again");

    // A few more writes give a background purge time to run; every read
    // below must still be exact.
    let other = root("compaction-other");
    for i in 0..3 {
        store
            .create(&format!("{other}{i}"), val("v"))
            .await
            .expect("create");
    }

    let at3 = list(&store, &p, at(base + 3)).await;
    let summary: Vec<_> = at3
        .items
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.clone(),
                kv.create_revision,
                kv.mod_revision,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (format!("{p}a"), val("a2"), base + 1, base + 2),
            (format!("{p}x"), val("x1"), base + 3, base + 3),
        ]
    );
    let at4 = list(&store, &p, at(base + 4)).await;
    assert_eq!(keys(&at4.items), [format!("{p}a")]);
    assert_eq!(at4.items[0].mod_revision, base + 2);
    let latest = list(&store, &p, ListOptions::default()).await;
    assert_eq!(latest.items.len(), 1);
    assert_eq!(
        (latest.items[0].mod_revision, &latest.items[0].value[..]),
        (base + 5, &b"a3"[..])
    );

    // A watch from the compaction point itself still replays everything after it.
    let mut w = store
        .watch(&p, base + 3)
        .await
        .expect("watch at compaction point");
    let evs = next_events(&mut w, 2).await;
    assert_consecutive(&evs, base + 4);
    assert_eq!(evs[0].kind, EventKind::Deleted);
    assert_eq!(&evs[0].kv.value[..], b"x1");
    assert_eq!(evs[1].kind, EventKind::Modified);
    let prev = evs[1].prev.as_ref().expect("prev of a modification");
    assert_eq!((prev.mod_revision, &prev.value[..]), (base + 2, &b"a2"[..]));
}

pub async fn list_before_compaction_point_fails<S: Store>(store: S) {
    let p = root("list-compacted");
    let base = compaction_history(&store, &p).await;
    store.compact(base + 3).await.expect("compact");
    assert_compacted(store.list(&p, at(base + 2)).await);
    assert_compacted(store.list(&p, at(base + 1)).await);
    assert_compacted(
        store
            .list(
                &p,
                ListOptions {
                    revision: Some(base + 1),
                    limit: Some(1),
                    start_after: Some(format!("{p}a")),
                },
            )
            .await,
    );
    assert_eq!(list(&store, &p, at(base + 3)).await.items.len(), 2);
}

pub async fn watch_before_compaction_point_fails<S: Store>(store: S) {
    let p = root("watch-compacted");
    let base = compaction_history(&store, &p).await;
    store.compact(base + 3).await.expect("compact");
    assert_watch_compacted(store.watch(&p, base + 2).await).await;
    assert_watch_compacted(store.watch(&p, base).await).await;
    // Another prefix is no excuse: compaction is store-wide.
    assert_watch_compacted(store.watch(&root("elsewhere"), base + 1).await).await;
}

pub async fn compact_rejects_older_revision<S: Store>(store: S) {
    let p = root("compact-older");
    let base = compaction_history(&store, &p).await;
    store.compact(base + 4).await.expect("compact");
    match store.compact(base + 2).await {
        Err(StoreError::Compacted { .. }) => {}
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert_eq!(
        store.compacted_revision().await.expect("compacted"),
        base + 4
    );
}

pub async fn watch_event_kinds_and_prev_values<S: Store>(store: S) {
    let p = root("kinds");
    let k = format!("{p}k");
    let base = current(&store).await;
    let mut live = store.watch(&p, base).await.expect("watch");

    let v1 = store.create(&k, val("1")).await.expect("create");
    let v2 = store
        .update(&k, val("2"), v1.mod_revision)
        .await
        .expect("update");
    let gone = store.delete(&k, None).await.expect("delete");

    let check = |evs: &[WatchEvent]| {
        assert_consecutive(evs, base + 1);
        assert_eq!(evs[0].kind, EventKind::Created);
        assert_eq!(evs[0].kv, v1);
        assert_eq!(evs[0].prev, None);

        assert_eq!(evs[1].kind, EventKind::Modified);
        assert_eq!(evs[1].kv, v2);
        assert_eq!(evs[1].prev.as_ref(), Some(&v1));

        assert_eq!(evs[2].kind, EventKind::Deleted);
        assert_eq!(evs[2].kv, gone);
        assert_eq!(&evs[2].kv.value[..], b"2");
        assert_eq!(evs[2].kv.create_revision, v1.create_revision);
        assert_eq!(evs[2].kv.mod_revision, base + 3);
        assert_eq!(evs[2].prev.as_ref(), Some(&v2));
    };
    check(&next_events(&mut live, 3).await);
    let mut replay = store.watch(&p, base).await.expect("watch");
    check(&next_events(&mut replay, 3).await);
}

pub async fn watch_replays_then_follows_live_with_prefix_filter<S: Store>(store: S) {
    let r = root("replay");
    let pods = format!("{r}registry/pods/");
    let podsx = format!("{r}registry/podsx/");
    let base = current(&store).await;

    // History: revisions base+1 ..= base+6.
    let a = store
        .create(&format!("{pods}a"), val("a1"))
        .await
        .expect("c");
    store
        .create(&format!("{podsx}a"), val("x"))
        .await
        .expect("c");
    let b = store
        .create(&format!("{pods}b"), val("b1"))
        .await
        .expect("c");
    store
        .update(&format!("{pods}a"), val("a2"), a.mod_revision)
        .await
        .expect("u");
    store
        .delete(&format!("{pods}b"), Some(b.mod_revision))
        .await
        .expect("d");
    store
        .create(&format!("{r}registry/pods"), val("p"))
        .await
        .expect("c");

    let mut w = store.watch(&pods, base + 1).await.expect("watch");
    let replayed = next_events(&mut w, 3).await;
    let revs: Vec<_> = replayed.iter().map(WatchEvent::revision).collect();
    assert_eq!(revs, [base + 3, base + 4, base + 5]);
    let kinds: Vec<_> = replayed.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        [EventKind::Created, EventKind::Modified, EventKind::Deleted]
    );

    // Live: interleave matching and non-matching writes.
    let mut want = Vec::new();
    for i in 0..20 {
        let (prefix, matching) = if i % 3 == 0 {
            (&podsx, false)
        } else {
            (&pods, true)
        };
        let kv = store
            .create(&format!("{prefix}live{i}"), val(format!("{i}")))
            .await
            .expect("create");
        if matching {
            want.push(kv);
        }
    }
    let marker = store
        .create(&format!("{pods}zz"), val("end"))
        .await
        .expect("c");
    want.push(marker);

    let got = next_events(&mut w, want.len()).await;
    let got_kvs: Vec<_> = got.iter().map(|e| e.kv.clone()).collect();
    assert_eq!(got_kvs, want);
    assert!(got.iter().all(|e| e.kind == EventKind::Created));
}

pub async fn watch_from_current_revision_sees_only_new_events<S: Store>(store: S) {
    let p = root("from-current");
    for i in 0..5 {
        store
            .create(&format!("{p}old{i}"), val("v"))
            .await
            .expect("c");
    }
    let rev = current(&store).await;
    let mut w = store.watch(&p, rev).await.expect("watch");
    let new = store.create(&format!("{p}new"), val("v")).await.expect("c");
    let ev = next_event(&mut w).await;
    assert_eq!(ev.kv, new);
    assert_eq!(ev.revision(), rev + 1);
}

pub async fn watch_started_during_writes_is_gap_free<S: Store>(store: S) {
    let store = Arc::new(store);
    let p = root("handoff");
    let base = current(&*store).await;
    const WRITES: usize = 600;

    let writer = {
        let store = store.clone();
        let p = p.clone();
        tokio::spawn(async move {
            let kvs = (0..WRITES)
                .map(|i| (format!("{p}{i:04}"), val(format!("{i}"))))
                .collect();
            create_all(&*store, kvs, 8).await;
        })
    };

    // Start watchers at various points while writes are in flight, each
    // from a revision a little in the past, so replay hands over to live
    // delivery while events keep arriving.
    let mut watchers = Vec::new();
    for _ in 0..12 {
        let now = current(&*store).await;
        let from = (now - 3).max(base);
        let w = store.watch(&p, from).await.expect("watch");
        watchers.push((from, w));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    within("writer", writer).await.expect("writer task");
    let end = base + WRITES as Revision;
    assert_eq!(current(&*store).await, end);

    for (from, mut w) in watchers {
        let n = usize::try_from(end - from).expect("positive");
        let evs = next_events(&mut w, n).await;
        assert_consecutive(&evs, from + 1);
    }
}

pub async fn concurrent_writers_get_consecutive_revisions<S: Store>(store: S) {
    let store = Arc::new(store);
    let p = root("concurrent");
    let base = current(&*store).await;
    const TASKS: usize = 16;
    const PER_TASK: usize = 50;

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..PER_TASK {
                let k = format!("{p}{t:02}/{i:03}");
                let kv = store
                    .create(&k, val(format!("{t}-{i}")))
                    .await
                    .expect("create");
                // Alternate with CAS updates so writers also contend on existing keys.
                let kv = if i % 2 == 0 {
                    store
                        .update(&k, val(format!("{t}-{i}-u")), kv.mod_revision)
                        .await
                        .expect("update")
                } else {
                    kv
                };
                out.push(kv);
            }
            out
        }));
    }
    let mut revisions = Vec::new();
    let mut latest = BTreeMap::new();
    for task in tasks {
        for kv in within("writer task", task).await.expect("writer task") {
            revisions.push(kv.mod_revision);
            if kv.create_revision != kv.mod_revision {
                revisions.push(kv.create_revision);
            }
            latest.insert(kv.key.clone(), kv);
        }
    }
    revisions.sort_unstable();
    let total = TASKS * PER_TASK * 3 / 2;
    let want: Vec<Revision> = (base + 1..=base + total as Revision).collect();
    assert_eq!(revisions, want, "revisions not unique and consecutive");
    assert_eq!(current(&*store).await, base + total as Revision);

    let listed = list(&*store, &p, ListOptions::default()).await;
    let listed: BTreeMap<_, _> = listed
        .items
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect();
    assert_eq!(listed, latest);
}

pub async fn many_watchers_see_every_event_in_order<S: Store>(store: S) {
    let store = Arc::new(store);
    let p = root("fanout");
    let base = current(&*store).await;
    const WATCHERS: usize = 100;
    const WRITES: usize = 300;

    let mut tasks = Vec::new();
    for _ in 0..WATCHERS {
        let mut w = store.watch(&p, base).await.expect("watch");
        tasks.push(tokio::spawn(async move {
            let evs = next_events(&mut w, WRITES).await;
            evs.into_iter()
                .map(|e| (e.revision(), e.kv.key))
                .collect::<Vec<_>>()
        }));
    }
    let kvs = (0..WRITES)
        .map(|i| (format!("{p}{i:04}"), val(format!("{i}"))))
        .collect();
    let mut written: Vec<_> = create_all(&*store, kvs, 8)
        .await
        .into_iter()
        .map(|kv| (kv.mod_revision, kv.key))
        .collect();
    written.sort();

    for task in tasks {
        let seen = within("watcher task", task).await.expect("watcher task");
        assert_eq!(seen, written);
    }
}

pub async fn slow_watcher_still_sees_every_event<S: Store>(store: S) {
    let store = Arc::new(store);
    let p = root("slow");
    let other = root("slow-other");
    const WRITES: usize = 10_000;

    let first = store
        .create(&format!("{p}first"), val("v"))
        .await
        .expect("c");
    let mut w = store
        .watch(&p, first.mod_revision - 1)
        .await
        .expect("watch");
    assert_eq!(next_event(&mut w).await.kv, first);

    // The watcher is not polled while all of this is written; every tenth
    // write is outside its prefix.
    let kvs = (0..WRITES)
        .map(|i| {
            let prefix = if i % 10 == 9 { &other } else { &p };
            (format!("{prefix}{i:05}"), val(format!("value-{i}")))
        })
        .collect();
    let mut want: Vec<KeyValue> = create_all(&*store, kvs, 32)
        .await
        .into_iter()
        .filter(|kv| kv.key.starts_with(&p))
        .collect();
    want.sort_by_key(|kv| kv.mod_revision);

    let mut seen = HashSet::new();
    let mut last = first.mod_revision;
    for expected in &want {
        let ev = next_event(&mut w).await;
        assert!(ev.revision() > last, "events out of order");
        assert!(seen.insert(ev.revision()), "duplicate event");
        last = ev.revision();
        assert_eq!(&ev.kv, expected);
        assert_eq!(ev.kind, EventKind::Created);
    }

    // And it is live again afterwards.
    let after = store
        .create(&format!("{p}after"), val("v"))
        .await
        .expect("c");
    assert_eq!(next_event(&mut w).await.kv, after);
}

/// An etcd server (the `etcd` binary) on free loopback ports, its data in a
/// fresh directory under the system's temporary directory; killed and
/// removed when dropped. For tests of [`crate::EtcdStore`] and of servers
/// sharing one.
pub struct EtcdServer {
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// The client URL, `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl EtcdServer {
    /// Start one, or `None` with a message when `etcd` is not installed.
    /// Under CI (`CI` set) a missing `etcd` fails instead.
    pub fn start() -> Option<EtcdServer> {
        use std::process::{Command, Stdio};
        let found = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "etcd is not installed, and CI must run the tests that need it"
            );
            eprintln!("skipped: the etcd binary is not installed (apt-get install etcd-server)");
            return None;
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "tapestry-etcd-{}-{nanos:x}-{}",
            std::process::id(),
            ROOT_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd");
        let server = EtcdServer { child, dir, url };
        // Listening is enough: requests wait for it to be ready to serve.
        let address = format!("127.0.0.1:{client}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "etcd did not listen on {address} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    /// The value of `tapestry server --store` for this server.
    pub fn store_arg(&self) -> String {
        format!("etcd://{}", self.url.trim_start_matches("http://"))
    }

    /// A store on this server, once it answers (within 20 seconds).
    pub async fn store(&self) -> crate::EtcdStore {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match crate::EtcdStore::connect(std::slice::from_ref(&self.url)).await {
                Ok(store) => return store,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("etcd at {}: {e}", self.url)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}
