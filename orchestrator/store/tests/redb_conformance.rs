//! The shared conformance suite on `RedbStore`, plus what only an embedded
//! file store has: reopening, crash durability, history purging.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tapestry_store::conformance::Guarded;
use tapestry_store::{
    ListOptions, RedbOptions, RedbStore, Revision, Store, StoreError, WatchEvent,
};
use tempfile::TempDir;

/// A store in its own temporary directory, removed when the test ends.
type TempStore = Guarded<RedbStore, TempDir>;

fn temp_store() -> TempStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RedbStore::open(dir.path().join("store.redb")).expect("open");
    Guarded { store, guard: dir }
}

tapestry_store::store_conformance_suite!(async { temp_store() });

fn v(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next(w: &mut tapestry_store::WatchStream) -> WatchEvent {
    match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        other => panic!("expected a watch event, got {other:?}"),
    }
}

#[tokio::test]
async fn data_and_revision_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let (a, gone) = {
        let s = RedbStore::open(&path).expect("open");
        let a = s.create("/a", v("1")).await.expect("create");
        let a = s
            .update("/a", v("2"), a.mod_revision)
            .await
            .expect("update");
        s.create("/b", v("b")).await.expect("create");
        let gone = s.delete("/b", None).await.expect("delete");
        (a, gone)
    };
    let s = RedbStore::open(&path).expect("reopen");
    assert_eq!(s.current_revision().await.expect("rev"), 4);
    assert_eq!(s.get("/a").await.expect("get"), Some(a.clone()));
    assert_eq!(s.get("/b").await.expect("get"), None);

    // History survives too: past lists and watch replay.
    let at2 = s
        .list(
            "/",
            ListOptions {
                revision: Some(3),
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(at2.items.len(), 2);
    let mut w = s.watch("/", 2).await.expect("watch");
    assert_eq!(next(&mut w).await.revision(), 3);
    assert_eq!(next(&mut w).await.kv, gone);

    let c = s.create("/c", v("c")).await.expect("create");
    assert_eq!(c.mod_revision, 5);
    assert_eq!(next(&mut w).await.kv, c);
}

/// The list at every revision so far.
async fn every_list(s: &RedbStore) -> Vec<tapestry_store::ListResult> {
    let mut lists = Vec::new();
    for revision in 1..=s.current_revision().await.expect("rev") {
        let opts = ListOptions {
            revision: Some(revision),
            ..Default::default()
        };
        lists.push(s.list("/", opts).await.expect("list"));
    }
    lists
}

/// Files from builds that also kept each key's latest value in the history
/// table read exactly as files that keep only superseded values there.
#[tokio::test]
async fn history_holding_latest_copies_reads_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let (lists, events) = {
        let s = RedbStore::open(&path).expect("open");
        let a = s.create("/a", v("a1")).await.expect("create");
        s.create("/b", v("b1")).await.expect("create");
        s.update("/a", v("a2"), a.mod_revision)
            .await
            .expect("update");
        s.delete("/b", None).await.expect("delete");
        s.create("/c", v("c1")).await.expect("create");
        s.create("/b", v("b2")).await.expect("recreate");
        let mut w = s.watch("/", 0).await.expect("watch");
        let mut events = Vec::new();
        for _ in 0..6 {
            events.push(next(&mut w).await);
        }
        (every_list(&s).await, events)
    };
    {
        // What those builds wrote: each latest value under (key, its
        // revision) in `versions` as a live record: tag 0, create revision.
        let kv_table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("kv");
        let versions_table: redb::TableDefinition<(&str, i64), &[u8]> =
            redb::TableDefinition::new("versions");
        let db = redb::Database::create(&path).expect("open file");
        let txn = db.begin_write().expect("txn");
        {
            use redb::ReadableTable;
            let kv = txn.open_table(kv_table).expect("kv");
            let mut versions = txn.open_table(versions_table).expect("versions");
            for entry in kv.iter().expect("iter") {
                let (k, record) = entry.expect("entry");
                let record = record.value();
                let modified = i64::from_le_bytes(record[8..16].try_into().expect("len"));
                let mut copy = vec![0u8];
                copy.extend_from_slice(&record[..8]);
                copy.extend_from_slice(&record[16..]);
                versions
                    .insert((k.value(), modified), copy.as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let s = RedbStore::open(&path).expect("reopen");
    assert_eq!(every_list(&s).await, lists);
    let mut w = s.watch("/", 0).await.expect("watch");
    for want in &events {
        assert_eq!(&next(&mut w).await, want);
    }
    // Writes and purging carry on over the copies.
    let a = s.get("/a").await.expect("get").expect("a");
    let a3 = s
        .update("/a", v("a3"), a.mod_revision)
        .await
        .expect("update");
    assert_eq!(next(&mut w).await.prev, Some(a));
    s.compact(a3.mod_revision).await.expect("compact");
    wait_purged(&s).await;
    let now = s.list("/", ListOptions::default()).await.expect("list");
    let at_compaction = s
        .list(
            "/",
            ListOptions {
                revision: Some(a3.mod_revision),
                ..Default::default()
            },
        )
        .await
        .expect("list at compaction");
    assert_eq!(now.items, at_compaction.items);
    assert_eq!(now.items.len(), 3);
}

#[tokio::test]
async fn compaction_point_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    {
        let s = RedbStore::open(&path).expect("open");
        for i in 0..10 {
            s.create(&format!("/k{i}"), v("x")).await.expect("create");
        }
        s.compact(6).await.expect("compact");
    }
    let s = RedbStore::open(&path).expect("reopen");
    assert_eq!(s.compacted_revision().await.expect("compacted"), 6);
    let old = s
        .list(
            "/",
            ListOptions {
                revision: Some(5),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(
        old,
        Err(StoreError::Compacted { compacted: 6, .. })
    ));
    assert!(matches!(
        s.watch("/", 5).await,
        Err(StoreError::Compacted { compacted: 6, .. })
    ));
    let at6 = s
        .list(
            "/",
            ListOptions {
                revision: Some(6),
                ..Default::default()
            },
        )
        .await
        .expect("list at the compaction point");
    assert_eq!(at6.items.len(), 6);
}

/// Wait until the background purge has caught up with the compaction point.
async fn wait_purged(s: &RedbStore) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.stats().purged_revision < s.stats().compacted_revision {
        assert!(Instant::now() < deadline, "purge did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_history_still_answers_reads_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let s = RedbStore::open(&path).expect("open");

    // Many generations of a few keys, with deletes and re-creates, so the
    // purge has superseded versions and tombstones to remove.
    let mut rev_states: Vec<Vec<(String, Bytes, Revision, Revision)>> = vec![vec![]];
    for round in 0..30 {
        for k in 0..5 {
            let key = format!("/p/{k}");
            match (round + k) % 4 {
                3 => {
                    if s.get(&key).await.expect("get").is_some() {
                        s.delete(&key, None).await.expect("delete");
                    } else {
                        s.create(&key, v(&format!("{round}")))
                            .await
                            .expect("create");
                    }
                }
                _ => match s.get(&key).await.expect("get") {
                    Some(kv) => {
                        s.update(&key, v(&format!("{round}")), kv.mod_revision)
                            .await
                            .expect("update");
                    }
                    None => {
                        s.create(&key, v(&format!("{round}")))
                            .await
                            .expect("create");
                    }
                },
            }
            let state = s.list("/p/", ListOptions::default()).await.expect("list");
            rev_states.push(
                state
                    .items
                    .into_iter()
                    .map(|kv| (kv.key, kv.value, kv.create_revision, kv.mod_revision))
                    .collect(),
            );
        }
    }
    let end = s.current_revision().await.expect("rev");
    assert_eq!(end, 150);

    let mut w = s.watch("/p/", 100).await.expect("watch");
    for point in [40, 41, 100] {
        s.compact(point).await.expect("compact");
        wait_purged(&s).await;
        for rev in point..=end {
            let got = s
                .list(
                    "/p/",
                    ListOptions {
                        revision: Some(rev),
                        ..Default::default()
                    },
                )
                .await
                .expect("list");
            let got: Vec<_> = got
                .items
                .into_iter()
                .map(|kv| (kv.key, kv.value, kv.create_revision, kv.mod_revision))
                .collect();
            assert_eq!(
                got, rev_states[rev as usize],
                "state at {rev} after compacting {point}"
            );
        }
    }
    // A watch opened before the compaction replays with correct prev values.
    let mut last = 100;
    for _ in 100..end {
        let ev = next(&mut w).await;
        assert_eq!(ev.revision(), last + 1);
        last = ev.revision();
        if let Some(prev) = &ev.prev {
            assert!(prev.mod_revision < ev.revision());
        }
    }
    drop(w);
    drop(s);

    let s = RedbStore::open(&path).expect("reopen");
    assert_eq!(s.compacted_revision().await.expect("compacted"), 100);
    wait_purged(&s).await;
    let mut w = s.watch("/p/", 100).await.expect("watch");
    assert_eq!(next(&mut w).await.revision(), 101);
}

/// A list of the latest versions that writes overtake between its
/// in-memory steps is finished from the history at its own revision: it is
/// still exactly the state at that revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_overtaken_by_writes_are_one_snapshot() {
    const KEYS: usize = 3000;
    let s = Arc::new(temp_store());
    let creates = (0..KEYS).map(|i| {
        let s = s.clone();
        async move { s.create(&format!("/k/{i:05}"), v("0")).await }
    });
    for created in futures::future::join_all(creates).await {
        created.expect("create");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (s, stop) = (s.clone(), stop.clone());
            tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    round += 1;
                    let key = format!("/k/{:05}", (w * 997 + round as usize * 13) % KEYS);
                    let kv = s.get(&key).await.expect("get").expect("present");
                    // Another writer may have got there first.
                    let _ = s.update(&key, v(&round.to_string()), kv.mod_revision).await;
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut checked = 0;
    while s.stats().lists_finished_from_history < 3 {
        assert!(
            Instant::now() < deadline,
            "no list was overtaken by writes in 30 s ({} lists)",
            checked
        );
        let latest = s.list("/k/", ListOptions::default()).await.expect("list");
        assert_eq!(latest.items.len(), KEYS);
        let at = ListOptions {
            revision: Some(latest.revision),
            ..Default::default()
        };
        let history = s.list("/k/", at).await.expect("list at its revision");
        assert_eq!(latest, history);
        checked += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_catches_up_from_disk_and_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = RedbStore::open_with(
        dir.path().join("s.redb"),
        RedbOptions {
            watch_buffer: 8,
            ..Default::default()
        },
    )
    .expect("open");
    let mut w = s.watch("/", 0).await.expect("watch");
    let kvs: Vec<_> = futures::stream::iter(0..500)
        .map(|i| {
            let s = &s;
            async move { s.create(&format!("/k{i:04}"), v("x")).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(kvs.iter().all(Result::is_ok));
    for rev in 1..=500 {
        assert_eq!(next(&mut w).await.revision(), rev);
    }
    let stats = s.stats();
    assert!(stats.watch_lagged >= 1, "{stats:?}");
    assert!(stats.watch_lagged_events >= 1, "{stats:?}");
    assert_eq!(stats.watchers, 1);
    assert_eq!(stats.writes, 500);
    drop(w);
    assert_eq!(s.stats().watchers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watchers_on_one_prefix() {
    let store = Arc::new(temp_store());
    let base = store.current_revision().await.expect("rev");
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let mut w = store.watch("/registry/pods/", base).await.expect("watch");
        tasks.push(tokio::spawn(async move {
            let mut last = base;
            for _ in 0..100 {
                let ev = next(&mut w).await;
                assert_eq!(ev.revision(), last + 1);
                last = ev.revision();
            }
        }));
    }
    let started = Instant::now();
    for i in 0..100 {
        store
            .create(&format!("/registry/pods/default/p{i}"), v("{}"))
            .await
            .expect("create");
    }
    for t in tasks {
        t.await.expect("watcher");
    }
    eprintln!(
        "1000 watchers x 100 events delivered in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bad_input_is_an_error_not_a_panic() {
    let s = temp_store();
    assert!(s.create("", v("x")).await.is_err());
    assert!(s.get("").await.is_err());
    assert!(s.watch("/", -1).await.is_err());
    assert!(s.compact(-5).await.is_err());
    let neg = ListOptions {
        revision: Some(-1),
        ..Default::default()
    };
    assert!(s.list("/", neg).await.is_err());
    // Cursor outside the prefix, odd bytes and big values are fine.
    let weird = "/\u{0}\u{10FFFF}/é";
    s.create(weird, Bytes::from(vec![0u8; 1 << 20]))
        .await
        .expect("create");
    let listed = s
        .list(
            "/",
            ListOptions {
                start_after: Some(String::new()),
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].value.len(), 1 << 20);
}

const CHILD_ENV: &str = "TAPESTRY_STORE_DURABILITY_CHILD";

/// Runs only as the child of `acknowledged_writes_survive_sigkill`: writes as
/// fast as it can and prints every acknowledged write until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Arc::new(RedbStore::open(path).expect("open"));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("/durable/{t:02}/{i:08}");
                let value = format!("value-{t}-{i}");
                let kv = store.create(&key, v(&value)).await.expect("create");
                let mut out = std::io::stdout().lock();
                writeln!(out, "ACK {key} {} {value}", kv.mod_revision).expect("stdout");
                out.flush().expect("stdout");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "durability_child_writer", "--nocapture"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");

    let reader = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // A line cut short by the kill has no newline; it was never
            // fully reported, so it proves nothing.
            let Some(line) = line.strip_suffix('\n') else {
                break;
            };
            let parts: Vec<_> = line.split(' ').collect();
            if let ["ACK", key, rev, value] = parts[..] {
                let rev: Revision = rev.parse().expect("revision");
                acked.push((key.to_owned(), rev, value.to_owned()));
            }
        }
        acked
    });

    // Let it get well into its stride, then kill it mid-write.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        child.try_wait().expect("child status").is_none(),
        "child exited on its own"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap child");
    let acked = tokio::task::spawn_blocking(move || reader.join().expect("reader"))
        .await
        .expect("join");
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );

    let s = RedbStore::open(&path).expect("reopen after kill");
    let max_acked = acked.iter().map(|a| a.1).max().unwrap_or(0);
    let current = s.current_revision().await.expect("rev");
    assert!(
        current >= max_acked,
        "revision went back: {current} < {max_acked}"
    );
    for (key, rev, value) in &acked {
        let kv = s
            .get(key)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("acknowledged {key} lost"));
        assert_eq!(kv.mod_revision, *rev);
        assert_eq!(&kv.value[..], value.as_bytes());
    }
    let next_kv = s.create("/after-crash", v("x")).await.expect("create");
    assert_eq!(next_kv.mod_revision, current + 1);
    eprintln!(
        "{} acknowledged writes survived SIGKILL (store at revision {current})",
        acked.len()
    );
}

/// Throughput and latency numbers; run with
/// `cargo test --release -p tapestry-store --test redb_conformance -- --ignored --nocapture perf`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn perf() {
    let s = temp_store();
    let value = Bytes::from(vec![b'x'; 1024]);

    let n = 500;
    let t = Instant::now();
    for i in 0..n {
        s.create(&format!("/seq/{i:06}"), value.clone())
            .await
            .expect("create");
    }
    let e = t.elapsed();
    eprintln!(
        "sequential creates: {:.0}/s ({:?} each)",
        f64::from(n) / e.as_secs_f64(),
        e / n
    );

    for inflight in [16, 64, 256] {
        let n = 20_000;
        let before = s.stats();
        let t = Instant::now();
        let results: Vec<_> = futures::stream::iter(0..n)
            .map(|i| {
                let (s, value) = (&s, value.clone());
                async move { s.create(&format!("/c{inflight}/{i:06}"), value).await }
            })
            .buffer_unordered(inflight)
            .collect()
            .await;
        assert!(results.iter().all(Result::is_ok));
        let e = t.elapsed();
        let after = s.stats();
        eprintln!(
            "{inflight} concurrent creates: {:.0}/s ({:.1} writes per commit)",
            f64::from(n) / e.as_secs_f64(),
            (after.writes - before.writes) as f64 / (after.commits - before.commits) as f64
        );
    }
    let stats = s.stats();
    eprintln!(
        "writes {} in {} commits ({:.1} per commit)",
        stats.writes,
        stats.commits,
        stats.writes as f64 / stats.commits as f64
    );

    let rev = s.current_revision().await.expect("rev");
    // Churn so the past-revision list has history to skip.
    for i in 0..2000 {
        let k = format!("/c64/{i:06}");
        let kv = s.get(&k).await.expect("get").expect("present");
        s.update(&k, value.clone(), kv.mod_revision)
            .await
            .expect("update");
    }
    for (label, revision) in [
        ("latest", None),
        ("past", Some(rev)),
        ("latest", None),
        ("past", Some(rev)),
    ] {
        let t = Instant::now();
        let l = s
            .list(
                "/c64/",
                ListOptions {
                    revision,
                    limit: Some(10_000),
                    start_after: None,
                },
            )
            .await
            .expect("list");
        eprintln!(
            "list 10k of 20k keys (1 KiB values) at {label}: {:?} (remaining {})",
            t.elapsed(),
            l.remaining
        );
    }
    let t = Instant::now();
    for i in 0..10_000 {
        s.get(&format!("/c64/{i:06}")).await.expect("get");
    }
    eprintln!("get: {:?} each", t.elapsed() / 10_000);

    // Read latency while writes are being committed.
    let s = Arc::new(s);
    let load = {
        let s = s.clone();
        let value = value.clone();
        tokio::spawn(async move {
            let results: Vec<_> = futures::stream::iter(0..10_000)
                .map(|i| {
                    let (s, value) = (&s, value.clone());
                    async move { s.create(&format!("/load/{i:06}"), value).await }
                })
                .buffer_unordered(64)
                .collect()
                .await;
            assert!(results.iter().all(Result::is_ok));
        })
    };
    let mut worst = Duration::ZERO;
    let mut reads = 0u32;
    let t = Instant::now();
    while !load.is_finished() {
        let t1 = Instant::now();
        s.get(&format!("/c64/{:06}", reads % 10_000))
            .await
            .expect("get");
        worst = worst.max(t1.elapsed());
        reads += 1;
    }
    eprintln!(
        "get during writes: {:?} average, {worst:?} worst ({reads} reads)",
        t.elapsed() / reads.max(1)
    );
    load.await.expect("load");

    let dir = tempfile::tempdir().expect("tempdir");
    let opts = RedbOptions {
        quick_repair: true,
        ..Default::default()
    };
    let q = RedbStore::open_with(dir.path().join("q.redb"), opts).expect("open");
    for inflight in [1, 64] {
        let n = if inflight == 1 { 500 } else { 20_000 };
        let t = Instant::now();
        let results: Vec<_> = futures::stream::iter(0..n)
            .map(|i| {
                let (q, value) = (&q, value.clone());
                async move { q.create(&format!("/q{inflight}/{i:06}"), value).await }
            })
            .buffer_unordered(inflight)
            .collect()
            .await;
        assert!(results.iter().all(Result::is_ok));
        eprintln!(
            "quick_repair, {inflight} concurrent creates: {:.0}/s",
            f64::from(n) / t.elapsed().as_secs_f64()
        );
    }
}

fn small_buffer_store(dir: &TempDir) -> RedbStore {
    RedbStore::open_with(
        dir.path().join("s.redb"),
        RedbOptions {
            watch_buffer: 4,
            ..Default::default()
        },
    )
    .expect("open")
}

/// `writers` tasks at once, each creating `/{writer}/{i:04}` for `i` below
/// `per_writer`.
async fn create_concurrently(s: &Arc<RedbStore>, writers: usize, per_writer: usize) {
    let tasks: Vec<_> = (0..writers)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    s.create(&format!("/{t}/{i:04}"), v("x"))
                        .await
                        .expect("create");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erratic_watchers_with_tiny_buffer_stay_gap_free() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(small_buffer_store(&dir));
    const WRITES: i64 = 2000;
    let mut watchers = Vec::new();
    for n in 0..20u64 {
        let mut w = s.watch("/", 0).await.expect("watch");
        watchers.push(tokio::spawn(async move {
            // Deterministic but uneven pauses, so watchers lag at different points.
            let mut seed = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for rev in 1..=WRITES {
                assert_eq!(next(&mut w).await.revision(), rev);
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if seed % 97 == 0 {
                    tokio::time::sleep(Duration::from_millis(seed % 20)).await;
                }
            }
        }));
    }
    create_concurrently(&s, 8, WRITES as usize / 8).await;
    for w in watchers {
        w.await.expect("watcher");
    }
    assert!(s.stats().watch_lagged > 0);
}

/// Watchers of one prefix among writes to others see revisions with gaps;
/// events lost to a tiny buffer must still be noticed and filled from
/// disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_prefix_watchers_see_exactly_their_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(small_buffer_store(&dir));
    const PER_PREFIX: usize = 300;
    let mut watchers = Vec::new();
    for n in 0..6u64 {
        let prefix = format!("/{}/", n % 3);
        let mut w = s.watch(&prefix, 0).await.expect("watch");
        watchers.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..PER_PREFIX {
                let ev = next(&mut w).await;
                assert_eq!(ev.kv.key, format!("{prefix}{i:04}"));
                assert!(ev.revision() > last);
                last = ev.revision();
                if (i as u64 + n).is_multiple_of(50) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    create_concurrently(&s, 3, PER_PREFIX).await;
    for w in watchers {
        w.await.expect("watcher");
    }
    assert!(s.stats().watch_lagged > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_overtaken_by_compaction_ends_with_compacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = small_buffer_store(&dir);
    let mut w = s.watch("/", 0).await.expect("watch");
    for i in 0..100 {
        s.create(&format!("/k{i}"), v("x")).await.expect("create");
    }
    s.compact(50).await.expect("compact");

    let mut delivered = 0;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            Ok(Some(Ok(ev))) => {
                delivered += 1;
                assert_eq!(ev.revision(), delivered);
            }
            Ok(Some(Err(e))) => break e,
            other => panic!("expected events then an error, got {other:?}"),
        }
    };
    assert!(
        matches!(err, StoreError::Compacted { compacted: 50, .. }),
        "{err:?}"
    );
    assert!(
        delivered < 50,
        "delivered {delivered} events past the compaction point"
    );
    assert!(w.next().await.is_none(), "stream continued after its error");

    // A watcher that kept up is unaffected by the same compaction.
    let mut ok = s.watch("/", 50).await.expect("watch");
    assert_eq!(next(&mut ok).await.revision(), 51);
}

#[tokio::test]
async fn watch_from_a_future_revision_waits_for_it() {
    let s = temp_store();
    s.create("/a", v("1")).await.expect("create");
    let mut w = s.watch("/", 3).await.expect("watch");
    for k in ["/b", "/c", "/d"] {
        s.create(k, v("1")).await.expect("create");
    }
    let ev = next(&mut w).await;
    assert_eq!((ev.revision(), ev.kv.key.as_str()), (4, "/d"));
}

/// Small deterministic generator so failures reproduce.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

type State = std::collections::BTreeMap<String, tapestry_store::KeyValue>;

/// Random writes checked against an in-memory model: every list (any
/// revision, prefix, page size) and every watch replay must match the model,
/// across several compactions and a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_a_model_across_compactions_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut states: Vec<State> = vec![State::new()];
    let mut s = RedbStore::open(&path).expect("open");

    let write = async |s: &RedbStore, states: &mut Vec<State>, rng: &mut Rng| {
        let mut state = states.last().cloned().expect("state");
        let key = format!("/m/{}", rng.below(15));
        let rev = states.len() as Revision;
        let existing = state.get(&key).cloned();
        match (existing, rng.below(6)) {
            (None, 0) => {
                let r = s.update(&key, v("x"), 1).await;
                assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
                return;
            }
            (None, _) => {
                let value = v(&format!("c{rev}"));
                let kv = s.create(&key, value.clone()).await.expect("create");
                assert_eq!(kv.mod_revision, rev);
                state.insert(key.clone(), kv);
            }
            (Some(_), 0) => {
                let r = s.create(&key, v("x")).await;
                assert!(matches!(r, Err(StoreError::AlreadyExists(_))), "{r:?}");
                return;
            }
            (Some(old), 1) => {
                let r = s.update(&key, v("x"), old.mod_revision - 1).await;
                assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
                return;
            }
            (Some(old), 2) => {
                let expected = (rng.below(2) == 0).then_some(old.mod_revision);
                let kv = s.delete(&key, expected).await.expect("delete");
                assert_eq!(kv.mod_revision, rev);
                state.remove(&key);
            }
            (Some(old), _) => {
                let kv = s
                    .update(&key, v(&format!("u{rev}")), old.mod_revision)
                    .await
                    .expect("update");
                assert_eq!(kv.mod_revision, rev);
                assert_eq!(kv.create_revision, old.create_revision);
                state.insert(key.clone(), kv);
            }
        }
        states.push(state);
    };

    let check = async |s: &RedbStore, states: &[State], rng: &mut Rng| {
        let end = states.len() as Revision - 1;
        let compacted = s.compacted_revision().await.expect("compacted");
        for _ in 0..25 {
            let rev = compacted.max(1) + rng.below((end - compacted.max(1) + 1) as u64) as Revision;
            let prefix = if rng.below(2) == 0 { "/m/" } else { "/m/1" };
            let want: Vec<_> = states[rev as usize]
                .values()
                .filter(|kv| kv.key.starts_with(prefix))
                .cloned()
                .collect();
            let limit = 1 + rng.below(6) as usize;
            let mut got = Vec::new();
            let mut cursor = None;
            loop {
                let page = s
                    .list(
                        prefix,
                        ListOptions {
                            revision: Some(rev),
                            limit: Some(limit),
                            start_after: cursor.clone(),
                        },
                    )
                    .await
                    .expect("list");
                assert_eq!(page.remaining, want.len() - got.len() - page.items.len());
                cursor = page.items.last().map(|kv| kv.key.clone());
                got.extend(page.items);
                if page.remaining == 0 {
                    break;
                }
            }
            assert_eq!(got, want, "list {prefix} at {rev} (compacted {compacted})");
        }
        for _ in 0..5 {
            let after = compacted + rng.below((end - compacted) as u64) as Revision;
            let mut w = s.watch("/m/", after).await.expect("watch");
            for rev in after + 1..=end {
                let (before, now) = (&states[rev as usize - 1], &states[rev as usize]);
                let key = now
                    .iter()
                    .find(|(_, kv)| kv.mod_revision == rev)
                    .map(|(k, _)| k.clone())
                    .or_else(|| before.keys().find(|k| !now.contains_key(*k)).cloned())
                    .expect("a key changed");
                let ev = next(&mut w).await;
                let prev = before.get(&key).cloned();
                let (kind, kv) = match now.get(&key) {
                    Some(kv) if prev.is_none() => (tapestry_store::EventKind::Created, kv.clone()),
                    Some(kv) => (tapestry_store::EventKind::Modified, kv.clone()),
                    None => {
                        let mut kv = prev.clone().expect("deleted key existed");
                        kv.mod_revision = rev;
                        (tapestry_store::EventKind::Deleted, kv)
                    }
                };
                assert_eq!(
                    ev,
                    WatchEvent { kind, kv, prev },
                    "watch from {after}, event {rev}"
                );
            }
        }
    };

    while states.len() < 700 {
        write(&s, &mut states, &mut rng).await;
    }
    check(&s, &states, &mut rng).await;
    for point in [1, 150, 151, 400] {
        s.compact(point).await.expect("compact");
        wait_purged(&s).await;
        check(&s, &states, &mut rng).await;
        if point == 151 {
            drop(s);
            s = RedbStore::open(&path).expect("reopen");
            check(&s, &states, &mut rng).await;
        }
        for _ in 0..100 {
            write(&s, &mut states, &mut rng).await;
        }
        check(&s, &states, &mut rng).await;
    }
}

/// A quiet watch still learns how far the store has got, from history and
/// from live writes elsewhere, but never past an event it has not yielded.
#[tokio::test]
async fn watch_progress_follows_writes_to_other_prefixes() {
    let s = temp_store();
    s.create("/other/a", v("a")).await.expect("create");
    let (mut w, progress) = s
        .store
        .watch_with_progress("/quiet/", 0)
        .await
        .expect("watch");
    assert_eq!(progress.revision(), 0);
    // Catching up from history: nothing for this prefix up to revision 1.
    let idle = tokio::time::timeout(Duration::from_millis(200), w.next()).await;
    assert!(idle.is_err(), "no event expected for the quiet prefix");
    assert_eq!(progress.revision(), 1);

    let b = s.create("/other/b", v("b")).await.expect("create");
    let idle = tokio::time::timeout(Duration::from_millis(200), w.next()).await;
    assert!(idle.is_err(), "no event expected for the quiet prefix");
    assert_eq!(progress.revision(), b.mod_revision);

    let mine = s.create("/quiet/x", v("x")).await.expect("create");
    let after = s.create("/other/c", v("c")).await.expect("create");
    assert!(
        progress.revision() < mine.mod_revision,
        "progress passed an event not yet yielded"
    );
    assert_eq!(next(&mut w).await.kv, mine);
    let idle = tokio::time::timeout(Duration::from_millis(200), w.next()).await;
    assert!(idle.is_err(), "only one event for the quiet prefix");
    assert_eq!(progress.revision(), after.mod_revision);
}
