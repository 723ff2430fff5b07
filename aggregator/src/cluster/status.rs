//! Writing what the aggregator knows into the objects' status.
//!
//! The reconciler publishes a snapshot (every status field this
//! aggregator owns, per object) every period and whenever a policy stops;
//! [`run`] writes the objects whose part changed since it last wrote them,
//! at most [`MAX_WRITES_PER_ROUND`] per snapshot, taking up next time
//! where it left off, so a large fleet costs bounded work per period and
//! no object waits forever.
//!
//! Writes are server-side apply patches of the status subresource under
//! the field manager [`FIELD_MANAGER`], forced: the fleet manager owns the
//! other status fields under its own manager, and apply keeps the two
//! apart. Leaving a field out of a later patch removes it (that is how a
//! policy's `stopped` goes when it runs again).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::future::BoxFuture;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tapestry_proto::crd::{TapPolicy, TapTool, GROUP, VERSION};
use tokio::sync::watch;

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "tapestry-aggregator";

/// Objects written per snapshot at most.
pub const MAX_WRITES_PER_ROUND: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    TapPolicy,
    TapTool,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TapPolicy => "TapPolicy",
            Kind::TapTool => "TapTool",
        }
    }
}

/// One object's status, identified by kind and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatusKey {
    pub kind: Kind,
    pub name: String,
}

/// The owned status fields of every object the aggregator reports on.
pub type Snapshot = BTreeMap<StatusKey, Value>;

/// Where status goes: the API server, or a test's recorder.
pub trait StatusWriter: Send + Sync + 'static {
    /// Applies `status` (the owned fields only) to the object's status.
    fn write<'a>(
        &'a self,
        key: &'a StatusKey,
        status: &'a Value,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Writes changed statuses from each snapshot until the sender goes away.
pub async fn run(mut snapshots: watch::Receiver<Arc<Snapshot>>, writer: Arc<dyn StatusWriter>) {
    let mut written: HashMap<StatusKey, Value> = HashMap::new();
    let mut last: Option<StatusKey> = None;
    while snapshots.changed().await.is_ok() {
        let snap = snapshots.borrow_and_update().clone();
        written.retain(|k, _| snap.contains_key(k));
        let changed: Vec<&StatusKey> = snap
            .iter()
            .filter(|(k, v)| written.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        // Round robin: start after the last object written.
        let start = last
            .as_ref()
            .map_or(0, |l| changed.partition_point(|k| *k <= l));
        let order = changed[start..].iter().chain(changed[..start].iter());
        for &key in order.take(MAX_WRITES_PER_ROUND) {
            let status = &snap[key];
            match writer.write(key, status).await {
                Ok(()) => {
                    written.insert(key.clone(), status.clone());
                }
                Err(e) => tracing::warn!(
                    kind = key.kind.as_str(),
                    name = %key.name,
                    "writing status: {e}"
                ),
            }
            last = Some(key.clone());
        }
    }
}

/// Status writes through the Kubernetes API.
pub struct KubeStatus {
    policies: Api<TapPolicy>,
    tools: Api<TapTool>,
}

impl KubeStatus {
    pub fn new(client: Client) -> KubeStatus {
        KubeStatus {
            policies: Api::all(client.clone()),
            tools: Api::all(client),
        }
    }
}

impl StatusWriter for KubeStatus {
    fn write<'a>(
        &'a self,
        key: &'a StatusKey,
        status: &'a Value,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let body = json!({
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": key.kind.as_str(),
                "metadata": {"name": key.name},
                "status": status,
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let patch = Patch::Apply(&body);
            let r = match key.kind {
                Kind::TapPolicy => self
                    .policies
                    .patch_status(&key.name, &params, &patch)
                    .await
                    .map(drop),
                Kind::TapTool => self
                    .tools
                    .patch_status(&key.name, &params, &patch)
                    .await
                    .map(drop),
            };
            r.map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Value)>>);

    impl StatusWriter for Recorder {
        fn write<'a>(
            &'a self,
            key: &'a StatusKey,
            status: &'a Value,
        ) -> BoxFuture<'a, Result<(), String>> {
            self.0
                .lock()
                .unwrap()
                .push((key.name.clone(), status.clone()));
            Box::pin(async { Ok(()) })
        }
    }

    fn snap(entries: &[(&str, u64)]) -> Arc<Snapshot> {
        Arc::new(
            entries
                .iter()
                .map(|(n, v)| {
                    (
                        StatusKey {
                            kind: Kind::TapTool,
                            name: n.to_string(),
                        },
                        json!({ "clients": v }),
                    )
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn writes_only_what_changed_and_at_most_a_round_at_a_time() {
        let rec = Arc::new(Recorder::default());
        let (tx, rx) = watch::channel(Arc::new(Snapshot::new()));
        let task = tokio::spawn(run(rx, rec.clone()));
        let names: Vec<String> = (0..MAX_WRITES_PER_ROUND + 10)
            .map(|i| format!("t{i:03}"))
            .collect();
        let all: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(50));

        tx.send_replace(snap(&all));
        settle().await;
        assert_eq!(rec.0.lock().unwrap().len(), MAX_WRITES_PER_ROUND);
        // The next round takes the rest, then nothing is left to write.
        tx.send_replace(snap(&all));
        settle().await;
        assert_eq!(rec.0.lock().unwrap().len(), MAX_WRITES_PER_ROUND + 10);
        tx.send_replace(snap(&all));
        settle().await;
        assert_eq!(rec.0.lock().unwrap().len(), MAX_WRITES_PER_ROUND + 10);
        // One change, one write.
        let mut changed = all.clone();
        changed[3].1 = 2;
        tx.send_replace(snap(&changed));
        settle().await;
        {
            let w = rec.0.lock().unwrap();
            assert_eq!(w.len(), MAX_WRITES_PER_ROUND + 11);
            assert_eq!(
                w.last().unwrap(),
                &("t003".to_string(), json!({"clients": 2}))
            );
        }
        drop(tx);
        task.await.unwrap();
    }
}
