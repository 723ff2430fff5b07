//! The orchestrator's storage layer.
//!
//! A [`Store`] has etcd's semantics: a single cluster-wide revision that
//! increases by one with every successful write, per-key create/modify
//! revisions, compare-and-swap updates, prefix lists at a revision with
//! pagination, and watches that replay every change after a revision in order
//! and without gaps. Revisions older than the compaction point are gone, and
//! asking for them yields [`StoreError::Compacted`] (HTTP 410 Gone upstream).
//!
//! [`RedbStore`] is the embedded backend; [`EtcdStore`] puts the store on an
//! etcd cluster, so several API servers can share it. Every backend must
//! pass the suite in [`conformance`] (see [`store_conformance_suite!`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub mod conformance;
mod etcd_store;
mod redb_store;

pub use etcd_store::{EtcdStore, EtcdTls};
pub use redb_store::{RedbOptions, RedbStore, StoreStats};

/// A store revision. Revision 0 means "nothing written yet"; the first write
/// gets revision 1.
pub type Revision = i64;

/// One key with its value and revisions, as etcd's `mvccpb.KeyValue`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the write that created this incarnation of the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key (its resourceVersion).
    pub mod_revision: Revision,
}

/// Options for [`Store::list`].
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// Read at this revision instead of the latest. Must not be compacted and
    /// must not be in the future. `Some(0)` means the latest, as in etcd.
    pub revision: Option<Revision>,
    /// Return at most this many keys (0 or None = no limit).
    pub limit: Option<usize>,
    /// Return only keys strictly greater than this one (pagination cursor).
    pub start_after: Option<String>,
}

/// Result of [`Store::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListResult {
    /// Matching keys in ascending key order.
    pub items: Vec<KeyValue>,
    /// The revision the list was read at. A watch started from it sees every
    /// later change.
    pub revision: Revision,
    /// Number of matching keys left after this page (0 when complete).
    pub remaining: usize,
}

/// What happened to a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key did not exist before this write.
    Created,
    Modified,
    Deleted,
}

/// One change delivered by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For Created/Modified the new value; for Deleted the value just before
    /// deletion, with `mod_revision` set to the deletion revision.
    pub kv: KeyValue,
    /// The value before this write (None for Created).
    pub prev: Option<KeyValue>,
}

impl WatchEvent {
    /// The revision of the write that produced this event.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    /// A CAS update or delete saw a different revision than expected.
    #[error("key {key} was modified (expected revision {expected}, current {current})")]
    Conflict {
        key: String,
        expected: Revision,
        current: Revision,
    },
    /// The requested revision has been compacted away.
    #[error("revision {requested} has been compacted (oldest available is {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    /// The requested revision is newer than the store's current revision.
    #[error("revision {requested} is in the future (current is {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    /// A watcher fell too far behind and was closed; it should resume from
    /// its last seen revision.
    #[error("watch closed: consumer too slow")]
    WatchOverflow,
    #[error("store backend: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Inputs every backend refuses the same way.
fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::Backend("invalid key: empty".into()));
    }
    Ok(())
}

fn check_revision(revision: Revision) -> Result<()> {
    if revision < 0 {
        return Err(StoreError::Backend(format!(
            "invalid revision {revision}: must not be negative"
        )));
    }
    Ok(())
}

/// A stream of watch events. Ends with an `Err` when the watch cannot
/// continue (compaction overtook it, overflow, backend failure).
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

/// How far a watch has got: every event of its prefix at or below
/// [`WatchProgress::revision`] has already been yielded by its stream, even
/// when no event of that prefix happened for a long time. Watch bookmarks
/// carry it, so a client resuming a quiet watch does not fall behind the
/// compaction point.
#[derive(Clone, Debug, Default)]
pub struct WatchProgress(Arc<AtomicI64>);

impl WatchProgress {
    pub fn new(revision: Revision) -> Self {
        Self(Arc::new(AtomicI64::new(revision)))
    }

    pub fn revision(&self) -> Revision {
        self.0.load(Ordering::Acquire)
    }

    /// Record progress; never moves backwards.
    pub fn advance(&self, revision: Revision) {
        self.0.fetch_max(revision, Ordering::AcqRel);
    }
}

/// The storage contract shared by every backend.
///
/// Every successful write returns the stored [`KeyValue`] whose
/// `mod_revision` is the new store revision; once it returns, the write is
/// durable (survives SIGKILL of the process).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The latest committed revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// The oldest revision still readable (the compaction point).
    async fn compacted_revision(&self) -> Result<Revision>;

    /// The latest value of one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Keys starting with `prefix`, in key order.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult>;

    /// Create `key`; fails with `AlreadyExists` if it is present.
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue>;

    /// Replace `key` if its `mod_revision` equals `expected_revision`.
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_revision: Revision,
    ) -> Result<KeyValue>;

    /// Delete `key` (if `expected_revision` is given, only at that revision).
    /// Returns the deleted value with `mod_revision` set to the deletion's
    /// revision.
    async fn delete(&self, key: &str, expected_revision: Option<Revision>) -> Result<KeyValue>;

    /// Every change to keys under `prefix` with revision > `after_revision`,
    /// in revision order, without gaps, then live changes as they commit.
    /// An `after_revision` below the compaction point fails with `Compacted`
    /// (returned here by [`RedbStore`]; a backend may instead yield it as the
    /// stream's first item).
    async fn watch(&self, prefix: &str, after_revision: Revision) -> Result<WatchStream>;

    /// [`Store::watch`] with a handle on how far the stream has got. A
    /// backend that cannot tell reports only the starting revision.
    async fn watch_with_progress(
        &self,
        prefix: &str,
        after_revision: Revision,
    ) -> Result<(WatchStream, WatchProgress)> {
        let stream = self.watch(prefix, after_revision).await?;
        Ok((stream, WatchProgress::new(after_revision)))
    }

    /// Discard history at and before `revision` (reads and watches older than
    /// `revision` then fail with `Compacted`). Compacting at the current
    /// compaction point again is a no-op; an older revision fails with
    /// `Compacted`, a future one with `FutureRevision`.
    async fn compact(&self, revision: Revision) -> Result<()>;
}
