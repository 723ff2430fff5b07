//! Backend on an etcd cluster (the real server, over its v3 gRPC API), for
//! several API servers sharing one store.
//!
//! The store's revision is etcd's, so resourceVersions are etcd revisions
//! as in Kubernetes. Writes are single transactions that compare the key's
//! create or mod revision, so preconditions hold across every server using
//! the cluster. etcd does not say how far it has been compacted; as
//! kube-apiserver does, the compaction point is kept in a key of its own
//! (outside every prefix the API server uses), written after each
//! compaction.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};

use crate::{
    check_key, check_revision, EventKind, KeyValue, ListOptions, ListResult, Result, Revision,
    Store, StoreError, WatchEvent, WatchStream,
};

/// Keys read per request of a list.
const LIST_PAGE: usize = 256;
/// Largest gRPC message taken from etcd: a page of large objects, or a watch
/// response replaying many events. A full page of objects of 4 MiB fits (the
/// API server takes bodies up to 3 MiB; etcd's own default is 1.5 MiB per
/// request); the memory is only taken when a message is that large.
const MAX_MESSAGE: usize = LIST_PAGE * 4 * 1024 * 1024;

/// Where the compaction point lives. Its writes are revisions like any other.
const COMPACTED_KEY: &str = "/tapestry.io/compacted-revision";
/// Zero-padded, so that etcd's byte-wise value comparison is numeric.
fn encode_revision(revision: Revision) -> String {
    format!("{revision:020}")
}

/// A [`Store`] on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// The first key after every key starting with `prefix` (etcd's range end
/// for a prefix); `\0` (all keys) when there is none.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: kv
            .key_str()
            .map_err(|e| StoreError::Backend(format!("etcd: key is not UTF-8: {e}")))?
            .to_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Backend("etcd: response without a header".into()))
}

/// The key a failed transaction read in its `or_else` branch, if it exists.
fn read_in_else(response: &etcd_client::TxnResponse) -> Result<Option<KeyValue>> {
    for op in response.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            return get.kvs().first().map(key_value).transpose();
        }
    }
    Ok(None)
}

/// TLS to etcd: the CA that signed its serving certificate and this
/// client's certificate and key (for etcd's `--client-cert-auth`), PEM.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl EtcdStore {
    /// Connect to the cluster at `endpoints` (`host:port` or URLs) and check
    /// it answers.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        Self::connect_with(endpoints, None).await
    }

    /// [`EtcdStore::connect`], over TLS with a client certificate when
    /// `tls` is given (`host:port` endpoints are then `https://`).
    pub async fn connect_with(endpoints: &[String], tls: Option<EtcdTls>) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(StoreError::Backend("etcd: no endpoints given".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(30), Duration::from_secs(10));
        let mut endpoints = endpoints.to_vec();
        if let Some(tls) = tls {
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(tls.ca_pem))
                    .identity(etcd_client::Identity::from_pem(tls.cert_pem, tls.key_pem)),
            );
            for e in &mut endpoints {
                if !e.contains("://") {
                    *e = format!("https://{e}");
                }
            }
        }
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(backend)?;
        let store = EtcdStore { client };
        store.current_revision().await?;
        Ok(store)
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    }

    /// A revision etcd refused, as the store's error for it.
    async fn revision_error(&self, e: etcd_client::Error, requested: Revision) -> StoreError {
        let message = e.to_string();
        if message.contains("required revision has been compacted") {
            match self.compacted_revision().await {
                Ok(compacted) => StoreError::Compacted {
                    requested,
                    compacted,
                },
                Err(e) => e,
            }
        } else if message.contains("required revision is a future revision") {
            match self.current_revision().await {
                Ok(current) => StoreError::FutureRevision { requested, current },
                Err(e) => e,
            }
        } else {
            backend(e)
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn current_revision(&self) -> Result<Revision> {
        let response = self
            .kv()
            .get(COMPACTED_KEY, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(backend)?;
        header_revision(response.header())
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        let response = self.kv().get(COMPACTED_KEY, None).await.map_err(backend)?;
        match response.kvs().first() {
            None => Ok(0),
            Some(kv) => kv
                .value_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    StoreError::Backend(format!("etcd: {COMPACTED_KEY} holds no revision"))
                }),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let response = self.kv().get(key, None).await.map_err(backend)?;
        response.kvs().first().map(key_value).transpose()
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult> {
        let mut start = match &opts.start_after {
            // The first key after `start_after`.
            Some(after) => {
                let mut key = after.as_bytes().to_vec();
                key.push(0);
                key
            }
            None => prefix.as_bytes().to_vec(),
        };
        if let Some(r) = opts.revision {
            check_revision(r)?;
        }
        let mut revision = match opts.revision {
            Some(r) if r > 0 => {
                // etcd keeps no record of how far it compacted; refuse what
                // this store's compaction point says is gone, as the other
                // backends do, even where etcd still holds it.
                let compacted = self.compacted_revision().await?;
                if r < compacted {
                    return Err(StoreError::Compacted {
                        requested: r,
                        compacted,
                    });
                }
                Some(r)
            }
            _ => None,
        };
        let wanted = opts.limit.filter(|l| *l > 0);
        let end = prefix_end(prefix);
        let mut items = Vec::new();
        let mut kv = self.kv();
        // In pages, all at the revision of the first, so that no response
        // outgrows a gRPC message however long the list.
        loop {
            let page = wanted.map_or(LIST_PAGE, |w| (w - items.len()).min(LIST_PAGE));
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(i64::try_from(page).unwrap_or(i64::MAX));
            if let Some(r) = revision {
                options = options.with_revision(r);
            }
            let response = match kv.get(start.clone(), Some(options)).await {
                Ok(r) => r,
                Err(e) => return Err(self.revision_error(e, revision.unwrap_or(0)).await),
            };
            if revision.is_none() {
                revision = Some(header_revision(response.header())?);
            }
            let got = response.kvs().len();
            for kv in response.kvs() {
                items.push(key_value(kv)?);
            }
            // Keys in [start, end) at this revision, this page's included.
            let in_range = usize::try_from(response.count()).unwrap_or(0);
            if !response.more() || got < page || wanted == Some(items.len()) {
                return Ok(ListResult {
                    items,
                    revision: revision.unwrap_or(0),
                    remaining: in_range.saturating_sub(got),
                });
            }
            if let Some(last) = items.last() {
                start = last.key.as_bytes().to_vec();
                start.push(0);
            }
        }
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        check_key(key)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.to_vec(), None)]);
        let response = self.kv().txn(txn).await.map_err(backend)?;
        if !response.succeeded() {
            return Err(StoreError::AlreadyExists(key.to_owned()));
        }
        let revision = header_revision(response.header())?;
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: revision,
            mod_revision: revision,
        })
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_revision: Revision,
    ) -> Result<KeyValue> {
        check_key(key)?;
        let txn = Txn::new()
            .when([
                // An absent key has mod revision 0 too.
                Compare::create_revision(key, CompareOp::Greater, 0),
                Compare::mod_revision(key, CompareOp::Equal, expected_revision),
            ])
            .and_then([TxnOp::put(
                key,
                value.to_vec(),
                Some(PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = self.kv().txn(txn).await.map_err(backend)?;
        if !response.succeeded() {
            return Err(match read_in_else(&response)? {
                None => StoreError::NotFound(key.to_owned()),
                Some(current) => StoreError::Conflict {
                    key: key.to_owned(),
                    expected: expected_revision,
                    current: current.mod_revision,
                },
            });
        }
        let revision = header_revision(response.header())?;
        let create_revision = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Put(put) => put.prev_key().map(|kv| kv.create_revision()),
                _ => None,
            })
            .ok_or_else(|| StoreError::Backend("etcd: update without its previous value".into()))?;
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
        })
    }

    async fn delete(&self, key: &str, expected_revision: Option<Revision>) -> Result<KeyValue> {
        check_key(key)?;
        let mut compares = vec![Compare::create_revision(key, CompareOp::Greater, 0)];
        if let Some(expected) = expected_revision {
            compares.push(Compare::mod_revision(key, CompareOp::Equal, expected));
        }
        let txn = Txn::new()
            .when(compares)
            .and_then([TxnOp::delete(
                key,
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = self.kv().txn(txn).await.map_err(backend)?;
        if !response.succeeded() {
            return Err(match (read_in_else(&response)?, expected_revision) {
                (Some(current), Some(expected)) => StoreError::Conflict {
                    key: key.to_owned(),
                    expected,
                    current: current.mod_revision,
                },
                _ => StoreError::NotFound(key.to_owned()),
            });
        }
        let revision = header_revision(response.header())?;
        let prev = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Delete(delete) => delete.prev_kvs().first().map(key_value),
                _ => None,
            })
            .transpose()?
            .ok_or_else(|| StoreError::Backend("etcd: delete without its previous value".into()))?;
        Ok(KeyValue {
            mod_revision: revision,
            ..prev
        })
    }

    async fn watch(&self, prefix: &str, after_revision: Revision) -> Result<WatchStream> {
        check_revision(after_revision)?;
        let compacted = self.compacted_revision().await?;
        if after_revision < compacted {
            return Err(StoreError::Compacted {
                requested: after_revision,
                compacted,
            });
        }
        let options = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(after_revision + 1)
            .with_prev_key();
        let stream = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(prefix, Some(options))
            .await
            .map_err(backend)?;
        let state = EtcdWatch {
            stream,
            pending: VecDeque::new(),
            after_revision,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut w| async move {
                let item = w.next().await?;
                Some((item, w))
            },
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        check_revision(revision)?;
        let current = self.current_revision().await?;
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        let compacted = self.compacted_revision().await?;
        if revision < compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted,
            });
        }
        if revision == compacted {
            return Ok(());
        }
        if let Err(e) = self.kv().compact(revision, None).await {
            // Another server may have compacted further meanwhile; only the
            // recorded point below matters.
            if !e
                .to_string()
                .contains("required revision has been compacted")
            {
                return Err(backend(e));
            }
        }
        // Record the point, never moving it back, against other servers
        // compacting at the same time: raise it if lower, create it if
        // absent (a value comparison with an absent key is false).
        let recorded = encode_revision(revision);
        loop {
            let raise = Txn::new()
                .when([Compare::value(
                    COMPACTED_KEY,
                    CompareOp::Less,
                    recorded.clone(),
                )])
                .and_then([TxnOp::put(COMPACTED_KEY, recorded.clone(), None)])
                .or_else([TxnOp::get(COMPACTED_KEY, None)]);
            let response = self.kv().txn(raise).await.map_err(backend)?;
            if response.succeeded() || read_in_else(&response)?.is_some() {
                return Ok(());
            }
            let create = Txn::new()
                .when([Compare::create_revision(COMPACTED_KEY, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(COMPACTED_KEY, recorded.clone(), None)]);
            if self.kv().txn(create).await.map_err(backend)?.succeeded() {
                return Ok(());
            }
        }
    }
}

struct EtcdWatch {
    stream: etcd_client::WatchStream,
    pending: VecDeque<Result<WatchEvent>>,
    after_revision: Revision,
    done: bool,
}

impl EtcdWatch {
    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            let response = match self.stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.done = true;
                    return Some(Err(StoreError::Backend("etcd: watch stream ended".into())));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(backend(e)));
                }
            };
            if response.compact_revision() > 0 {
                self.done = true;
                return Some(Err(StoreError::Compacted {
                    requested: self.after_revision,
                    compacted: response.compact_revision(),
                }));
            }
            if response.canceled() {
                self.done = true;
                return Some(Err(StoreError::Backend(format!(
                    "etcd: watch cancelled: {}",
                    response.cancel_reason()
                ))));
            }
            for event in response.events() {
                let item = watch_event(event);
                if let Ok(e) = &item {
                    self.after_revision = e.revision();
                }
                self.pending.push_back(item);
            }
        }
    }
}

fn watch_event(event: &etcd_client::Event) -> Result<WatchEvent> {
    let kv = event
        .kv()
        .ok_or_else(|| StoreError::Backend("etcd: watch event without a key".into()))?;
    let prev = event.prev_kv().map(key_value).transpose()?;
    // A deletion's key is a tombstone of version 0; a put's version is at
    // least 1. Read from the key, not from `Event::event_type`, which panics
    // on an event type it does not know.
    if kv.version() == 0 {
        // etcd's deletion event carries only the key and the revision; the
        // deleted value is its previous one.
        let prev = prev.ok_or_else(|| {
            StoreError::Backend("etcd: deletion event without the deleted value".into())
        })?;
        return Ok(WatchEvent {
            kind: EventKind::Deleted,
            kv: KeyValue {
                mod_revision: kv.mod_revision(),
                ..prev.clone()
            },
            prev: Some(prev),
        });
    }
    let kv = key_value(kv)?;
    let kind = if kv.create_revision == kv.mod_revision {
        EventKind::Created
    } else {
        EventKind::Modified
    };
    Ok(WatchEvent { kind, kv, prev })
}
