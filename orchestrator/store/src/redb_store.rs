//! Embedded backend on a single redb file.
//!
//! Layout (all in one redb database):
//!
//! * `kv`: key -> latest value with its create/mod revisions. Serves `get` and
//!   lists at the latest revision with one range scan.
//! * `versions`: (key, revision) -> superseded value or tombstone: the MVCC
//!   history behind `kv`. A value moves here when a later write replaces or
//!   deletes it, so a create writes its value once. Lists at past revisions
//!   and replayed watch events read both tables. (Files written by earlier
//!   builds also hold the latest value here; it is the same bytes as in `kv`,
//!   and either copy is read.)
//! * `revlog`: revision -> key. One entry per revision, so watch replay walks
//!   revisions in order and can prove there is no gap.
//! * `meta`: current, compacted and purged revisions.
//!
//! The latest version of every key is also kept in memory, as
//! kube-apiserver's watch cache keeps it: gets and lists at the current
//! revision read that copy, so redb serves writes, history and recovery.
//!
//! A single writer thread owns every write transaction. It drains whatever
//! requests are queued into one durable commit (group commit): nothing waits
//! for a batch to fill, but concurrent writers share one fsync.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Display;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    check_key, check_revision, EventKind, KeyValue, ListOptions, ListResult, Result, Revision,
    Store, StoreError, WatchEvent, WatchProgress, WatchStream,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const VERSIONS: TableDefinition<(&str, i64), &[u8]> = TableDefinition::new("versions");
const REVLOG: TableDefinition<i64, &str> = TableDefinition::new("revlog");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");

const META_CURRENT: &str = "current";
const META_COMPACTED: &str = "compacted";
const META_PURGED: &str = "purged";

const LIVE: u8 = 0;
const TOMBSTONE: u8 = 1;

/// Revisions removed per purge step when the writer has nothing else to do.
const PURGE_IDLE_STEP: i64 = 4096;
/// Revisions removed alongside a write batch, so purging still progresses under
/// constant load without adding much to a write's latency.
const PURGE_BUSY_STEP: i64 = 128;
/// Revisions read per history read of a watch; bounds a catching-up watcher's memory.
const WATCH_HISTORY_CHUNK: i64 = 512;

/// Tuning knobs for [`RedbStore::open_with`].
#[derive(Clone, Debug)]
pub struct RedbOptions {
    /// Committed events kept in memory for live watchers. A watcher that falls
    /// further behind re-reads the missed events from the on-disk history.
    pub watch_buffer: usize,
    /// Most write requests committed together in one transaction.
    pub max_batch: usize,
    /// Request queue length in front of the writer thread.
    pub queue: usize,
    /// Make reopening after a crash near-instant instead of a full scan of
    /// the file, at the cost of slower commits (redb's quick-repair mode).
    pub quick_repair: bool,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            watch_buffer: 4096,
            max_batch: 1024,
            queue: 4096,
            quick_repair: false,
        }
    }
}

/// Counters of a [`RedbStore`], see [`RedbStore::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub revision: Revision,
    pub compacted_revision: Revision,
    /// History at and before this revision has been physically removed (it
    /// trails `compacted_revision` while compaction runs in the background).
    pub purged_revision: Revision,
    /// Successful writes (each one a revision).
    pub writes: u64,
    /// Durable commits; `writes / commits` is the average group-commit size.
    pub commits: u64,
    /// Open watch streams.
    pub watchers: u64,
    /// Times a watcher fell out of the in-memory event buffer and had to
    /// catch up from disk.
    pub watch_lagged: u64,
    /// Events that lagging watchers missed in memory and re-read from disk.
    pub watch_lagged_events: u64,
    /// Lists at the current revision that writes overtook between two of
    /// their in-memory steps, and that were finished from the history.
    pub lists_finished_from_history: u64,
}

#[derive(Default)]
struct Shared {
    current: AtomicI64,
    compacted: AtomicI64,
    purged: AtomicI64,
    writes: AtomicU64,
    commits: AtomicU64,
    watchers: AtomicU64,
    watch_lagged: AtomicU64,
    watch_lagged_events: AtomicU64,
    lists_finished_from_history: AtomicU64,
}

/// A [`Store`] in one redb file.
///
/// * Writes return after a durable (fsync'd) commit. They go through one
///   writer thread that commits whatever is queued together, so throughput
///   grows with the number of concurrent writers while a lone writer still
///   gets one commit per write.
/// * Gets and lists at the current revision read the in-memory copy of the
///   latest versions on the calling task, in steps of a few hundred keys so
///   a long list never holds back the writer for long. Lists at past
///   revisions (or one whose revision moved on between its steps) and watch
///   catch-up read redb's history on the blocking pool, and never wait for
///   writes.
/// * [`watch`](Store::watch) below the compaction point fails immediately
///   with [`StoreError::Compacted`]. Live events come from one in-memory
///   broadcast ([`RedbOptions::watch_buffer`] events); a watcher that falls
///   behind it re-reads the missed events from disk and continues without a
///   gap, and ends with `Compacted` only if a compaction removed history it
///   still needed. It never ends with [`StoreError::WatchOverflow`].
/// * [`compact`](Store::compact) moves the compaction point at once; the old
///   history is then removed in the background in small steps.
///
/// The file stays locked until the store and every watch stream it returned
/// are dropped.
pub struct RedbStore {
    db: Arc<Database>,
    shared: Arc<Shared>,
    latest: Arc<RwLock<Latest>>,
    requests: Option<mpsc::Sender<Request>>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    writer: Option<JoinHandle<()>>,
}

enum Op {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Option<KeyValue>>>,
}

trait OrBackend<T> {
    fn backend(self) -> Result<T>;
}

impl<T, E: Display> OrBackend<T> for std::result::Result<T, E> {
    fn backend(self) -> Result<T> {
        self.map_err(|e| StoreError::Backend(e.to_string()))
    }
}

/// The latest version of every key at `revision`, updated by the writer
/// after each commit and before anyone hears of it.
struct Latest {
    revision: Revision,
    entries: BTreeMap<String, LatestEntry>,
}

struct LatestEntry {
    create_revision: Revision,
    mod_revision: Revision,
    value: Bytes,
}

impl LatestEntry {
    fn of(kv: &KeyValue) -> Self {
        LatestEntry {
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            value: kv.value.clone(),
        }
    }

    fn kv(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
        }
    }
}

/// Keys a list copies from memory per hold of the read lock (tens of µs).
const MEMORY_LIST_STEP: usize = 256;

fn closed() -> StoreError {
    StoreError::Backend("store is closed".into())
}

async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
}

// Record encodings. `kv`: create(8) mod(8) value. `versions`: tag(1)
// create(8) value. Fixed little-endian headers keep decoding allocation-free.

fn encode_latest(create: Revision, modified: Revision, value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 + value.len());
    buf.extend_from_slice(&create.to_le_bytes());
    buf.extend_from_slice(&modified.to_le_bytes());
    buf.extend_from_slice(value);
    buf
}

fn read_i64(bytes: &[u8], at: usize) -> Result<i64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_le_bytes)
        .ok_or_else(|| StoreError::Backend("corrupt record: too short".into()))
}

/// A latest-version record: (create revision, mod revision, value).
fn split_latest(bytes: &[u8]) -> Result<(Revision, Revision, &[u8])> {
    Ok((
        read_i64(bytes, 0)?,
        read_i64(bytes, 8)?,
        bytes.get(16..).unwrap_or_default(),
    ))
}

fn decode_latest(key: &str, bytes: &[u8]) -> Result<KeyValue> {
    let (create_revision, mod_revision, value) = split_latest(bytes)?;
    Ok(KeyValue {
        key: key.to_owned(),
        create_revision,
        mod_revision,
        value: Bytes::copy_from_slice(value),
    })
}

fn encode_version(tag: u8, create: Revision, value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(9 + value.len());
    buf.push(tag);
    buf.extend_from_slice(&create.to_le_bytes());
    buf.extend_from_slice(value);
    buf
}

struct Version<'a> {
    tombstone: bool,
    create_revision: Revision,
    value: &'a [u8],
}

fn decode_version(bytes: &[u8]) -> Result<Version<'_>> {
    let tombstone = match bytes.first() {
        Some(&LIVE) => false,
        Some(&TOMBSTONE) => true,
        _ => return Err(StoreError::Backend("corrupt version record".into())),
    };
    Ok(Version {
        tombstone,
        create_revision: read_i64(bytes, 1)?,
        value: bytes.get(9..).unwrap_or_default(),
    })
}

fn meta_get(meta: &impl ReadableTable<&'static str, i64>, name: &str) -> Result<i64> {
    Ok(meta.get(name).backend()?.map(|g| g.value()).unwrap_or(0))
}

impl RedbStore {
    /// Open (or create) the store file at `path` with default options.
    ///
    /// Blocks while redb opens the file, which after a crash includes its
    /// recovery; call it before serving, or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, RedbOptions::default())
    }

    /// [`open`](Self::open) with explicit options.
    pub fn open_with(path: impl AsRef<Path>, opts: RedbOptions) -> Result<Self> {
        let db = Database::create(path.as_ref()).backend()?;
        let (current, compacted, purged, entries) = {
            let txn = db.begin_write().backend()?;
            let state = {
                // Opening creates missing tables, so readers never see a missing one.
                let kv = txn.open_table(KV).backend()?;
                txn.open_table(VERSIONS).backend()?;
                txn.open_table(REVLOG).backend()?;
                let meta = txn.open_table(META).backend()?;
                let mut entries = BTreeMap::new();
                for entry in kv.iter().backend()? {
                    let (k, v) = entry.backend()?;
                    let (create_revision, mod_revision, value) = split_latest(v.value())?;
                    entries.insert(
                        k.value().to_owned(),
                        LatestEntry {
                            create_revision,
                            mod_revision,
                            value: Bytes::copy_from_slice(value),
                        },
                    );
                }
                (
                    meta_get(&meta, META_CURRENT)?,
                    meta_get(&meta, META_COMPACTED)?,
                    meta_get(&meta, META_PURGED)?,
                    entries,
                )
            };
            txn.commit().backend()?;
            state
        };
        let latest = Arc::new(RwLock::new(Latest {
            revision: current,
            entries,
        }));

        let db = Arc::new(db);
        let shared = Arc::new(Shared::default());
        shared.current.store(current, Ordering::SeqCst);
        shared.compacted.store(compacted, Ordering::SeqCst);
        shared.purged.store(purged, Ordering::SeqCst);

        // broadcast::channel panics on 0 and above usize::MAX / 2.
        let (events, _) = broadcast::channel(opts.watch_buffer.clamp(1, 1 << 24));
        let (requests, rx) = mpsc::channel(opts.queue.max(1));
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            latest: latest.clone(),
            events: events.clone(),
            rx,
            max_batch: opts.max_batch.max(1),
            quick_repair: opts.quick_repair,
            state: WriterState {
                current,
                compacted,
                purged,
            },
            purge_failed: false,
        };
        let writer = std::thread::Builder::new()
            .name("tapestry-store-writer".into())
            .spawn(move || writer.run())
            .backend()?;

        Ok(Self {
            db,
            shared,
            latest,
            requests: Some(requests),
            events,
            writer: Some(writer),
        })
    }

    /// Counters for monitoring.
    pub fn stats(&self) -> StoreStats {
        let s = &self.shared;
        StoreStats {
            revision: s.current.load(Ordering::SeqCst),
            compacted_revision: s.compacted.load(Ordering::SeqCst),
            purged_revision: s.purged.load(Ordering::SeqCst),
            writes: s.writes.load(Ordering::Relaxed),
            commits: s.commits.load(Ordering::Relaxed),
            watchers: s.watchers.load(Ordering::Relaxed),
            watch_lagged: s.watch_lagged.load(Ordering::Relaxed),
            watch_lagged_events: s.watch_lagged_events.load(Ordering::Relaxed),
            lists_finished_from_history: s.lists_finished_from_history.load(Ordering::Relaxed),
        }
    }

    fn read_latest(&self) -> RwLockReadGuard<'_, Latest> {
        // Nothing panics while holding the lock; a poisoned one is still whole.
        self.latest.read().unwrap_or_else(PoisonError::into_inner)
    }

    async fn submit(&self, op: Op) -> Result<Option<KeyValue>> {
        let requests = self.requests.as_ref().ok_or_else(closed)?;
        let (reply, rx) = oneshot::channel();
        requests
            .send(Request { op, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    async fn submit_kv(&self, op: Op) -> Result<KeyValue> {
        self.submit(op)
            .await?
            .ok_or_else(|| StoreError::Backend("writer returned no value".into()))
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has answered everything
        // queued; joining it releases its handle on the file, so the path can be
        // reopened right away.
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.shared.current.load(Ordering::SeqCst))
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(self.shared.compacted.load(Ordering::SeqCst))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        Ok(self.read_latest().entries.get(key).map(|e| e.kv(key)))
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        if let Some(r) = opts.revision {
            check_revision(r)?;
        }
        let mut scan = MemoryScan::new(prefix, &opts);
        // The revision the list reads at: the one asked for (0 means the
        // latest, as in etcd), else fixed by the first step.
        let mut reading = opts.revision.filter(|&r| r > 0);
        let mut stepped = false;
        loop {
            let latest = self.read_latest();
            let revision = *reading.get_or_insert(latest.revision);
            if revision != latest.revision {
                break;
            }
            stepped = true;
            if scan.step(&latest.entries) {
                return Ok(scan.finish(revision));
            }
        }
        if stepped {
            // The latest moved on between steps: the rest comes from the
            // history at the list's revision.
            self.shared
                .lists_finished_from_history
                .fetch_add(1, Ordering::Relaxed);
        }
        let revision = reading;
        let db = self.db.clone();
        blocking(move || {
            let (txn, revision) = list_snapshot(&db, revision)?;
            scan.finish_from_history(&txn, revision)
        })
        .await
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        check_key(key)?;
        self.submit_kv(Op::Create {
            key: key.to_owned(),
            value,
        })
        .await
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_revision: Revision,
    ) -> Result<KeyValue> {
        check_key(key)?;
        self.submit_kv(Op::Update {
            key: key.to_owned(),
            value,
            expected: expected_revision,
        })
        .await
    }

    async fn delete(&self, key: &str, expected_revision: Option<Revision>) -> Result<KeyValue> {
        check_key(key)?;
        self.submit_kv(Op::Delete {
            key: key.to_owned(),
            expected: expected_revision,
        })
        .await
    }

    /// A revision below the compaction point fails here rather than in the
    /// stream; the stream ends with `Compacted` only if it later falls behind
    /// a compaction while catching up.
    async fn watch(&self, prefix: &str, after_revision: Revision) -> Result<WatchStream> {
        Ok(self.watch_with_progress(prefix, after_revision).await?.0)
    }

    async fn watch_with_progress(
        &self,
        prefix: &str,
        after_revision: Revision,
    ) -> Result<(WatchStream, WatchProgress)> {
        check_revision(after_revision)?;
        // Subscribe before reading the current revision: every event after it
        // is then guaranteed to reach `rx` (or show up as lag), and everything
        // up to it is on disk.
        let rx = self.events.subscribe();
        let current = self.shared.current.load(Ordering::SeqCst);
        let compacted = self.shared.compacted.load(Ordering::SeqCst);
        if after_revision < compacted {
            return Err(StoreError::Compacted {
                requested: after_revision,
                compacted,
            });
        }
        self.shared.watchers.fetch_add(1, Ordering::Relaxed);
        let progress = WatchProgress::new(after_revision);
        let state = Watcher {
            db: self.db.clone(),
            shared: self.shared.clone(),
            prefix: prefix.to_owned(),
            rx,
            last: after_revision,
            target: current,
            pending: None,
            buf: VecDeque::new(),
            done: false,
            progress: progress.clone(),
        };
        let stream: WatchStream = Box::pin(futures::stream::unfold(state, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        }));
        Ok((stream, progress))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        check_revision(revision)?;
        self.submit(Op::Compact { revision }).await.map(|_| ())
    }
}

/// A read transaction at `revision` (the latest when none), checked against
/// the store's current and compacted revisions.
fn list_snapshot(db: &Database, revision: Option<Revision>) -> Result<(ReadTransaction, Revision)> {
    let txn = db.begin_read().backend()?;
    let meta = txn.open_table(META).backend()?;
    let current = meta_get(&meta, META_CURRENT)?;
    let compacted = meta_get(&meta, META_COMPACTED)?;
    let revision = revision.unwrap_or(current);
    if revision > current {
        return Err(StoreError::FutureRevision {
            requested: revision,
            current,
        });
    }
    if revision < compacted {
        return Err(StoreError::Compacted {
            requested: revision,
            compacted,
        });
    }
    drop(meta);
    Ok((txn, revision))
}

/// Most items a list returns: its limit, where 0 or none means all.
fn list_limit(opts: &ListOptions) -> usize {
    opts.limit.filter(|&l| l > 0).unwrap_or(usize::MAX)
}

/// Keys under a prefix are contiguous and sort after it, so a scan starts at
/// whichever of prefix / cursor is later and stops at the first key outside
/// the prefix.
fn scan_start<'a>(prefix: &'a str, start_after: Option<&'a str>) -> Bound<&'a str> {
    match start_after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    }
}

/// A list of the latest versions, copied from memory in steps.
struct MemoryScan {
    prefix: String,
    limit: usize,
    /// The last key read; the next step starts after it.
    resume: Option<String>,
    items: Vec<KeyValue>,
    remaining: usize,
}

impl MemoryScan {
    fn new(prefix: &str, opts: &ListOptions) -> Self {
        MemoryScan {
            prefix: prefix.to_owned(),
            limit: list_limit(opts),
            resume: opts.start_after.clone(),
            items: Vec::new(),
            remaining: 0,
        }
    }

    /// Read up to [`MEMORY_LIST_STEP`] keys; true when the prefix is exhausted.
    fn step(&mut self, entries: &BTreeMap<String, LatestEntry>) -> bool {
        let MemoryScan {
            prefix,
            limit,
            resume,
            items,
            remaining,
        } = self;
        let after = resume.take();
        let start = scan_start(prefix, after.as_deref());
        let mut last: Option<&String> = None;
        for (read, (key, entry)) in entries
            .range::<str, _>((start, Bound::Unbounded))
            .enumerate()
        {
            if read == MEMORY_LIST_STEP {
                *resume = last.cloned();
                return false;
            }
            if !key.starts_with(prefix.as_str()) {
                break;
            }
            if items.len() < *limit {
                items.push(entry.kv(key));
            } else {
                *remaining += 1;
            }
            last = Some(key);
        }
        true
    }

    fn finish(self, revision: Revision) -> ListResult {
        ListResult {
            items: self.items,
            revision,
            remaining: self.remaining,
        }
    }

    /// The keys after the last one read, from the history at `revision`.
    fn finish_from_history(self, txn: &ReadTransaction, revision: Revision) -> Result<ListResult> {
        let rest = list_history(
            txn,
            &self.prefix,
            revision,
            self.resume.as_deref(),
            self.limit.saturating_sub(self.items.len()),
        )?;
        let mut items = self.items;
        items.extend(rest.items);
        Ok(ListResult {
            items,
            revision,
            remaining: self.remaining + rest.remaining,
        })
    }
}

/// A list at a past revision: the newest version at or before `revision` of
/// each key. Superseded versions come from the history and the latest ones
/// from `kv`; both tables are scanned in key order and merged.
/// At most `limit` items are returned; the rest are counted.
fn list_history(
    txn: &ReadTransaction,
    prefix: &str,
    revision: Revision,
    start_after: Option<&str>,
    limit: usize,
) -> Result<ListResult> {
    let start = scan_start(prefix, start_after);
    let versions = txn.open_table(VERSIONS).backend()?;
    let kv = txn.open_table(KV).backend()?;
    let mut latest = LatestCursor {
        entries: kv.range::<&str>((start, Bound::Unbounded)).backend()?,
        prefix,
        next: None,
    };
    latest.advance()?;
    let mut found = AsOf {
        revision,
        limit,
        out: ListResult {
            items: Vec::new(),
            revision,
            remaining: 0,
        },
    };
    let lower = match start {
        Bound::Excluded(after) => Bound::Excluded((after, i64::MAX)),
        _ => Bound::Included((prefix, i64::MIN)),
    };
    // The key whose versions are being read, and its newest one so far that
    // is not after `revision`.
    let mut group: Option<(String, Option<(Revision, ValueGuard)>)> = None;
    for entry in versions
        .range::<(&str, i64)>((lower, Bound::Unbounded))
        .backend()?
    {
        let (k, v) = entry.backend()?;
        let (key, rev) = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        if group.as_ref().map(|(g, _)| g.as_str()) != Some(key) {
            if let Some((done, history)) = group.take() {
                found.key(&done, history, &mut latest)?;
            }
            group = Some((key.to_owned(), None));
        }
        if let Some((_, newest)) = group.as_mut() {
            if rev <= revision {
                *newest = Some((rev, v));
            }
        }
    }
    if let Some((done, history)) = group.take() {
        found.key(&done, history, &mut latest)?;
    }
    found.latest_only(&mut latest, None)?;
    Ok(found.out)
}

type ValueGuard = redb::AccessGuard<'static, &'static [u8]>;

/// The latest versions under a prefix, one entry looked ahead.
struct LatestCursor<'p> {
    entries: redb::Range<'static, &'static str, &'static [u8]>,
    prefix: &'p str,
    next: Option<(redb::AccessGuard<'static, &'static str>, ValueGuard)>,
}

impl LatestCursor<'_> {
    /// The next entry under the prefix, or None past it. Called only after
    /// `next` was taken, so a finished cursor is never moved again.
    fn advance(&mut self) -> Result<()> {
        self.next = match self.entries.next() {
            Some(entry) => {
                let (k, v) = entry.backend()?;
                k.value().starts_with(self.prefix).then_some((k, v))
            }
            None => None,
        };
        Ok(())
    }
}

/// Collects a list at a past revision.
struct AsOf {
    revision: Revision,
    limit: usize,
    out: ListResult,
}

impl AsOf {
    /// `key`'s newest version not after the revision, given its newest such
    /// version in the history, after the keys only `kv` holds before it.
    fn key(
        &mut self,
        key: &str,
        history: Option<(Revision, ValueGuard)>,
        latest: &mut LatestCursor<'_>,
    ) -> Result<()> {
        self.latest_only(latest, Some(key))?;
        match latest.next.take() {
            Some((k, v)) if k.value() == key => {
                self.emit(key, history, Some(v.value()))?;
                latest.advance()
            }
            other => {
                latest.next = other;
                self.emit(key, history, None)
            }
        }
    }

    /// Keys with no history, up to `until` (or all that are left).
    fn latest_only(&mut self, latest: &mut LatestCursor<'_>, until: Option<&str>) -> Result<()> {
        while let Some((k, v)) = latest.next.take() {
            if until.is_some_and(|until| k.value() >= until) {
                latest.next = Some((k, v));
                break;
            }
            self.emit(k.value(), None, Some(v.value()))?;
            latest.advance()?;
        }
        Ok(())
    }

    /// The latest version wins when it is not after the revision; otherwise
    /// the newest one from the history does, unless it is a tombstone.
    fn emit(
        &mut self,
        key: &str,
        history: Option<(Revision, ValueGuard)>,
        latest: Option<&[u8]>,
    ) -> Result<()> {
        if let Some(record) = latest {
            let (create_revision, mod_revision, value) = split_latest(record)?;
            if mod_revision <= self.revision {
                self.push(key, create_revision, mod_revision, value);
                return Ok(());
            }
        }
        let Some((rev, guard)) = history else {
            return Ok(());
        };
        let version = decode_version(guard.value())?;
        if !version.tombstone {
            self.push(key, version.create_revision, rev, version.value);
        }
        Ok(())
    }

    fn push(&mut self, key: &str, create_revision: Revision, mod_revision: Revision, value: &[u8]) {
        if self.out.items.len() < self.limit {
            self.out.items.push(KeyValue {
                key: key.to_owned(),
                value: Bytes::copy_from_slice(value),
                create_revision,
                mod_revision,
            });
        } else {
            self.out.remaining += 1;
        }
    }
}

/// The event that revision `rev` (a write of `key`) produced, rebuilt from
/// the version history and, for a version not yet superseded, `kv`.
fn event_at(
    versions: &impl ReadableTable<(&'static str, i64), &'static [u8]>,
    latest: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    rev: Revision,
) -> Result<WatchEvent> {
    let missing = || StoreError::Backend(format!("history of {key} at revision {rev} missing"));
    let (tombstone, create_revision, value) = match versions.get((key, rev)).backend()? {
        Some(guard) => {
            let version = decode_version(guard.value())?;
            (
                version.tombstone,
                version.create_revision,
                Bytes::copy_from_slice(version.value),
            )
        }
        None => {
            let guard = latest.get(key).backend()?.ok_or_else(missing)?;
            let (create_revision, mod_revision, value) = split_latest(guard.value())?;
            if mod_revision != rev {
                return Err(missing());
            }
            (false, create_revision, Bytes::copy_from_slice(value))
        }
    };
    let prev = if create_revision == rev {
        None
    } else {
        // The previous version is live and superseded, so in the history;
        // purging keeps the newest live version at or before the compaction
        // point, so it is present for every revision after that point.
        let mut before = versions
            .range::<(&str, i64)>((key, i64::MIN)..(key, rev))
            .backend()?;
        match before.next_back() {
            Some(entry) => {
                let (k, v) = entry.backend()?;
                let p = decode_version(v.value())?;
                Some(KeyValue {
                    key: key.to_owned(),
                    value: Bytes::copy_from_slice(p.value),
                    create_revision: p.create_revision,
                    mod_revision: k.value().1,
                })
            }
            None => None,
        }
    };
    if tombstone {
        let prev = prev.ok_or_else(missing)?;
        let kv = KeyValue {
            mod_revision: rev,
            ..prev.clone()
        };
        return Ok(WatchEvent {
            kind: EventKind::Deleted,
            kv,
            prev: Some(prev),
        });
    }
    Ok(WatchEvent {
        kind: if prev.is_none() {
            EventKind::Created
        } else {
            EventKind::Modified
        },
        kv: KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: rev,
        },
        prev,
    })
}

/// Events under `prefix` for revisions in `(last, min(target, last + chunk)]`,
/// and the revision read up to.
fn read_history(
    db: &Database,
    prefix: &str,
    last: Revision,
    target: Revision,
) -> Result<(Vec<WatchEvent>, Revision)> {
    let txn = db.begin_read().backend()?;
    let meta = txn.open_table(META).backend()?;
    let compacted = meta_get(&meta, META_COMPACTED)?;
    if last < compacted {
        return Err(StoreError::Compacted {
            requested: last,
            compacted,
        });
    }
    let upto = target.min(last.saturating_add(WATCH_HISTORY_CHUNK));
    let revlog = txn.open_table(REVLOG).backend()?;
    let versions = txn.open_table(VERSIONS).backend()?;
    let latest = txn.open_table(KV).backend()?;
    let mut events = Vec::new();
    let mut expect = last + 1;
    for entry in revlog.range(expect..=upto).backend()? {
        let (r, k) = entry.backend()?;
        let rev = r.value();
        if rev != expect {
            break;
        }
        expect += 1;
        let key = k.value();
        if key.starts_with(prefix) {
            events.push(event_at(&versions, &latest, key, rev)?);
        }
    }
    if expect != upto + 1 {
        return Err(StoreError::Backend(format!(
            "history is missing revision {expect}"
        )));
    }
    Ok((events, upto))
}

/// State of one watch stream.
///
/// Invariant: every revision up to `last` has been delivered or filtered out,
/// and revisions in `(last, target]` are committed and must be read from disk
/// before anything from the live channel is delivered.
struct Watcher {
    db: Arc<Database>,
    shared: Arc<Shared>,
    prefix: String,
    rx: broadcast::Receiver<Arc<WatchEvent>>,
    last: Revision,
    target: Revision,
    /// A live event that arrived ahead of a gap, delivered after the gap is
    /// filled from disk.
    pending: Option<Arc<WatchEvent>>,
    buf: VecDeque<WatchEvent>,
    done: bool,
    /// Revisions up to which everything has been yielded: `last` once
    /// nothing is left in `buf`.
    progress: WatchProgress,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                self.progress.advance(match self.buf.front() {
                    Some(next) => next.revision() - 1,
                    None => self.last,
                });
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            if self.last < self.target {
                let db = self.db.clone();
                let prefix = self.prefix.clone();
                let (last, target) = (self.last, self.target);
                match blocking(move || read_history(&db, &prefix, last, target)).await {
                    Ok((events, upto)) => {
                        self.buf.extend(events);
                        self.last = upto;
                        if self.buf.is_empty() {
                            self.progress.advance(upto);
                        }
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            }
            if let Some(ev) = self.pending.take() {
                self.accept(&ev);
                continue;
            }
            match self.rx.recv().await {
                Ok(ev) => {
                    let rev = ev.revision();
                    if rev <= self.last {
                        // Already replayed from disk.
                    } else if rev == self.last + 1 {
                        self.accept(&ev);
                    } else {
                        // Missed events (lag): fill the gap from disk first.
                        self.target = rev - 1;
                        self.pending = Some(ev);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // The next received event reveals the gap; just count it.
                    self.shared.watch_lagged.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .watch_lagged_events
                        .fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.done = true;
                    return Some(Err(closed()));
                }
            }
        }
    }

    fn accept(&mut self, ev: &WatchEvent) {
        self.last = ev.revision();
        if ev.kv.key.starts_with(&self.prefix) {
            self.buf.push_back(ev.clone());
        } else if self.buf.is_empty() {
            self.progress.advance(self.last);
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct WriterState {
    current: Revision,
    compacted: Revision,
    purged: Revision,
}

struct Writer {
    db: Arc<Database>,
    shared: Arc<Shared>,
    latest: Arc<RwLock<Latest>>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    rx: mpsc::Receiver<Request>,
    max_batch: usize,
    quick_repair: bool,
    state: WriterState,
    /// Stops idle purging from spinning on a persistent storage error; the
    /// next successful write batch clears it.
    purge_failed: bool,
}

struct Tables<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    versions: Table<'t, (&'static str, i64), &'static [u8]>,
    revlog: Table<'t, i64, &'static str>,
    meta: Table<'t, &'static str, i64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(Self {
            kv: txn.open_table(KV).backend()?,
            versions: txn.open_table(VERSIONS).backend()?,
            revlog: txn.open_table(REVLOG).backend()?,
            meta: txn.open_table(META).backend()?,
        })
    }

    fn latest(&self, key: &str) -> Result<Option<KeyValue>> {
        let found = self.kv.get(key).backend()?;
        found.map(|g| decode_latest(key, g.value())).transpose()
    }

    /// Make `value` the latest version of `key` at `rev`; the version it
    /// replaces, if any, moves into the history.
    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        create: Revision,
        rev: Revision,
        replaced: Option<&KeyValue>,
    ) -> Result<()> {
        if let Some(prev) = replaced {
            self.keep_in_history(prev)?;
        }
        self.kv
            .insert(key, encode_latest(create, rev, value).as_slice())
            .backend()?;
        self.revlog.insert(rev, key).backend()?;
        Ok(())
    }

    /// Delete `prev` (the latest version of its key) at `rev`.
    fn remove(&mut self, prev: &KeyValue, rev: Revision) -> Result<()> {
        let key = prev.key.as_str();
        self.keep_in_history(prev)?;
        self.kv.remove(key).backend()?;
        self.versions
            .insert(
                (key, rev),
                encode_version(TOMBSTONE, prev.create_revision, &[]).as_slice(),
            )
            .backend()?;
        self.revlog.insert(rev, key).backend()?;
        Ok(())
    }

    fn keep_in_history(&mut self, version: &KeyValue) -> Result<()> {
        let record = encode_version(LIVE, version.create_revision, &version.value);
        self.versions
            .insert(
                (version.key.as_str(), version.mod_revision),
                record.as_slice(),
            )
            .backend()?;
        Ok(())
    }

    /// Physically drop history no longer reachable after compaction, for at
    /// most `step` revisions past `state.purged`. For each purged revision the
    /// older versions of its key go (this version supersedes them), and the
    /// version itself goes if it is a tombstone. What remains at or before the
    /// compaction point is exactly the newest live version of each key.
    fn purge(&mut self, state: &mut WriterState, step: i64) -> Result<()> {
        let upto = state.compacted.min(state.purged.saturating_add(step));
        if upto <= state.purged {
            return Ok(());
        }
        let mut entries = Vec::new();
        for entry in self.revlog.range(state.purged + 1..=upto).backend()? {
            let (r, k) = entry.backend()?;
            entries.push((r.value(), k.value().to_owned()));
        }
        let mut stale = Vec::new();
        for (rev, key) in &entries {
            let key = key.as_str();
            stale.clear();
            for entry in self
                .versions
                .range::<(&str, i64)>((key, i64::MIN)..(key, *rev))
                .backend()?
            {
                stale.push(entry.backend()?.0.value().1);
            }
            for r in &stale {
                self.versions.remove((key, *r)).backend()?;
            }
            let tombstone = match self.versions.get((key, *rev)).backend()? {
                Some(g) => decode_version(g.value())?.tombstone,
                None => false,
            };
            if tombstone {
                self.versions.remove((key, *rev)).backend()?;
            }
            self.revlog.remove(*rev).backend()?;
        }
        state.purged = upto;
        self.meta.insert(META_PURGED, upto).backend()?;
        Ok(())
    }
}

type Outcome = (Result<Option<KeyValue>>, Option<WatchEvent>);

fn apply_op(t: &mut Tables<'_>, state: &mut WriterState, op: &Op) -> Result<Outcome> {
    let next = state.current + 1;
    Ok(match op {
        Op::Create { key, value } => {
            if t.latest(key)?.is_some() {
                return Ok((Err(StoreError::AlreadyExists(key.clone())), None));
            }
            t.put(key, value, next, next, None)?;
            state.current = next;
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: next,
                mod_revision: next,
            };
            let ev = WatchEvent {
                kind: EventKind::Created,
                kv: kv.clone(),
                prev: None,
            };
            (Ok(Some(kv)), Some(ev))
        }
        Op::Update {
            key,
            value,
            expected,
        } => {
            let Some(prev) = t.latest(key)? else {
                return Ok((Err(StoreError::NotFound(key.clone())), None));
            };
            if prev.mod_revision != *expected {
                let err = StoreError::Conflict {
                    key: key.clone(),
                    expected: *expected,
                    current: prev.mod_revision,
                };
                return Ok((Err(err), None));
            }
            t.put(key, value, prev.create_revision, next, Some(&prev))?;
            state.current = next;
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: prev.create_revision,
                mod_revision: next,
            };
            let ev = WatchEvent {
                kind: EventKind::Modified,
                kv: kv.clone(),
                prev: Some(prev),
            };
            (Ok(Some(kv)), Some(ev))
        }
        Op::Delete { key, expected } => {
            let Some(prev) = t.latest(key)? else {
                return Ok((Err(StoreError::NotFound(key.clone())), None));
            };
            if let Some(expected) = *expected {
                if prev.mod_revision != expected {
                    let err = StoreError::Conflict {
                        key: key.clone(),
                        expected,
                        current: prev.mod_revision,
                    };
                    return Ok((Err(err), None));
                }
            }
            t.remove(&prev, next)?;
            state.current = next;
            let kv = KeyValue {
                mod_revision: next,
                ..prev.clone()
            };
            let ev = WatchEvent {
                kind: EventKind::Deleted,
                kv: kv.clone(),
                prev: Some(prev),
            };
            (Ok(Some(kv)), Some(ev))
        }
        Op::Compact { revision } => {
            let revision = *revision;
            let result = if revision > state.current {
                Err(StoreError::FutureRevision {
                    requested: revision,
                    current: state.current,
                })
            } else if revision < state.compacted {
                Err(StoreError::Compacted {
                    requested: revision,
                    compacted: state.compacted,
                })
            } else {
                // Only the logical point moves here; the history behind it is
                // purged in small steps so a large compaction never stalls writes.
                state.compacted = revision;
                Ok(None)
            };
            (result, None)
        }
    })
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        loop {
            let purge_pending = self.state.purged < self.state.compacted && !self.purge_failed;
            let first = if purge_pending {
                match self.rx.try_recv() {
                    Ok(req) => req,
                    Err(TryRecvError::Empty) => {
                        self.purge_idle();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match self.rx.blocking_recv() {
                    Some(req) => req,
                    None => break,
                }
            };
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch);
        }
    }

    fn commit_batch(&mut self, batch: &mut Vec<Request>) {
        let mut state = self.state;
        let result = (|| {
            let mut txn = self.db.begin_write().backend()?;
            txn.set_quick_repair(self.quick_repair);
            let mut outcomes = Vec::with_capacity(batch.len());
            {
                let mut t = Tables::open(&txn)?;
                for req in batch.iter() {
                    outcomes.push(apply_op(&mut t, &mut state, &req.op)?);
                }
                if state.purged < state.compacted {
                    t.purge(&mut state, PURGE_BUSY_STEP)?;
                }
                if state == self.state {
                    // Every request failed its precondition: nothing to persist.
                    drop(t);
                    txn.abort().backend()?;
                    return Ok(outcomes);
                }
                t.meta.insert(META_CURRENT, state.current).backend()?;
                t.meta.insert(META_COMPACTED, state.compacted).backend()?;
            }
            txn.commit().backend()?;
            Ok::<_, StoreError>(outcomes)
        })();

        match result {
            Ok(outcomes) => {
                let writes = state.current - self.state.current;
                self.state = state;
                self.purge_failed = false;
                self.remember_latest(&outcomes);
                self.publish_state(writes);
                // Publish after the commit and in revision order; watchers rely
                // on both.
                let mut replies = Vec::with_capacity(batch.len());
                for (req, (result, event)) in batch.drain(..).zip(outcomes) {
                    if let Some(event) = event {
                        // An error only means nobody is watching right now.
                        let _ = self.events.send(Arc::new(event));
                    }
                    replies.push((req.reply, result));
                }
                for (reply, result) in replies {
                    // The caller may have given up; the write stands regardless.
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store write batch failed");
                for req in batch.drain(..) {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Apply a committed batch to the in-memory latest versions, before any
    /// reply or event, so whoever hears of a write can read it.
    fn remember_latest(&self, outcomes: &[Outcome]) {
        let mut latest = self.latest.write().unwrap_or_else(PoisonError::into_inner);
        for event in outcomes.iter().filter_map(|(_, event)| event.as_ref()) {
            let key = &event.kv.key;
            if event.kind == EventKind::Deleted {
                latest.entries.remove(key);
            } else if let Some(entry) = latest.entries.get_mut(key) {
                *entry = LatestEntry::of(&event.kv);
            } else {
                latest
                    .entries
                    .insert(key.clone(), LatestEntry::of(&event.kv));
            }
        }
        latest.revision = self.state.current;
    }

    fn purge_idle(&mut self) {
        let mut state = self.state;
        let result = (|| {
            let mut txn = self.db.begin_write().backend()?;
            // Losing a purge step in a crash only means redoing it, so it does
            // not need its own fsync; the next durable commit persists it.
            txn.set_durability(Durability::None).backend()?;
            {
                let mut t = Tables::open(&txn)?;
                t.purge(&mut state, PURGE_IDLE_STEP)?;
            }
            txn.commit().backend()
        })();
        match result {
            Ok(()) => {
                self.state = state;
                self.publish_state(0);
            }
            Err(e) => {
                tracing::warn!(error = %e, "store history purge failed");
                self.purge_failed = true;
            }
        }
    }

    fn publish_state(&self, writes: i64) {
        let s = &self.shared;
        s.current.store(self.state.current, Ordering::SeqCst);
        s.compacted.store(self.state.compacted, Ordering::SeqCst);
        s.purged.store(self.state.purged, Ordering::SeqCst);
        if writes > 0 {
            s.writes
                .fetch_add(u64::try_from(writes).unwrap_or(0), Ordering::Relaxed);
            s.commits.fetch_add(1, Ordering::Relaxed);
        }
    }
}
