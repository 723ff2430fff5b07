//! gRPC ingest (`tapestry.tap.v2.TapIngest`): one long-lived stream per
//! tap. Each batch's records are read in place (every packet's bytes a
//! slice of the received message) and handed to the policies; the tap
//! gets an acknowledgement for what was taken in. Sequence numbers run on
//! across a tap's streams, so batches lost in flight show as gaps and are
//! counted: a new stream's first acknowledgement tells the tap how far
//! this aggregator got, and both ends count the same loss.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::StreamExt as _;
use tapestry_proto::records;
use tapestry_proto::tap::v1::Hello;
use tapestry_proto::tap::v2::tap_ingest_server::TapIngest;
use tapestry_proto::tap::v2::{Ack, Batch as WireBatch};
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status, Streaming};

use crate::event::{Batch, Direction, Iface, Packet};
use crate::metrics::Registry;
use crate::topology::{IngestTable, PolicyTable};

/// The longest record handed on (libpcap's largest snapshot length).
const MAX_RECORD: usize = tapestry_proto::policy::MAX_SNAPLEN as usize;

/// Sources (interfaces) one stream may name.
const MAX_SOURCES: usize = 4096;

/// How long a pod a certified tap names may stay unknown to the
/// aggregator's own watch (just created) before its claim is refused.
const UNKNOWN_POD_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Where pods run, from the aggregator's own watch of the cluster: what a
/// certified tap says about its pods is checked against it.
pub trait PodPlacement: Send + Sync {
    /// The node the pod `namespace/name` is bound to; None while it is
    /// unknown (not seen yet, gone, or not scheduled).
    fn node_of(&self, namespace: &str, name: &str) -> Option<String>;
}

/// A pod identity a certified tap claimed that is not yet confirmed:
/// its packets carry only the interface until it is.
struct PendingPod {
    source: u32,
    namespace: String,
    name: String,
    since: std::time::Instant,
}

pub struct IngestService {
    pub policies: Arc<IngestTable>,
    pub registry: Arc<Registry>,
    /// Cancelled when the aggregator stops: streams end after their last
    /// acknowledgement.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Where pods run (cluster mode): a certified tap's pods are checked.
    pub pods: Option<Arc<dyn PodPlacement>>,
    /// Streams must come with a tap's client certificate, which names the
    /// only node the tap may speak for.
    pub require_certificates: bool,
}

/// What a stream's latest Hello told us, resolved against one policy
/// table; resolved again whenever the table is replaced.
struct StreamState {
    tap_id: String,
    sources: HashMap<u32, Arc<Iface>>,
    /// The Hello's policy names.
    tap_policies: Vec<String>,
    table: Arc<PolicyTable>,
    /// Tap policy bit i → aggregator policy bits.
    bit_map: Vec<u64>,
    /// Aggregator policies that take all traffic.
    catch_all: u64,
    empty: Arc<str>,
    /// Pod identities waiting for the aggregator's watch to confirm them.
    pending: Vec<PendingPod>,
}

impl StreamState {
    /// `certified`: the node the tap's certificate names, which is then
    /// the tap's identity whatever the Hello says; with `pods`, each pod it
    /// names must be bound to that node.
    fn from_hello(
        h: &Hello,
        certified: Option<&str>,
        pods: Option<&dyn PodPlacement>,
        tap: &crate::metrics::TapStats,
        table: Arc<PolicyTable>,
    ) -> Self {
        let tap_id = tap_id_of(h, certified);
        let mut pending = Vec::new();
        let sources = h
            .sources
            .iter()
            .take(MAX_SOURCES)
            .map(|s| {
                let claim = match (&s.pod, certified.zip(pods)) {
                    (Some(p), Some((node, pods))) => {
                        match pods.node_of(&p.namespace, &p.name) {
                            Some(n) if n == node => Some(p),
                            Some(other) => {
                                tap.foreign_pods.add(1);
                                tracing::warn!(tap = node, pod = %format!("{}/{}", p.namespace, p.name), bound_to = %other, "a tap claimed a pod of another node: its packets carry only the interface");
                                None
                            }
                            None => {
                                pending.push(PendingPod {
                                    source: s.id,
                                    namespace: p.namespace.clone(),
                                    name: p.name.clone(),
                                    since: std::time::Instant::now(),
                                });
                                None
                            }
                        }
                    }
                    (pod, _) => pod.as_ref(),
                };
                (s.id, source_iface(&tap_id, claim, &s.interface))
            })
            .collect();
        let mut st = StreamState {
            tap_id,
            sources,
            tap_policies: h.policy_names.iter().take(64).cloned().collect(),
            table: Arc::default(),
            bit_map: Vec::new(),
            catch_all: 0,
            empty: "".into(),
            pending,
        };
        st.resolve(table);
        st
    }

    /// Looks again at the pods the watch did not know yet: one now bound
    /// to the tap's node gets its name back; one bound elsewhere, or still
    /// unknown after [`UNKNOWN_POD_GRACE`], is refused for good.
    fn confirm_pending(&mut self, pods: &dyn PodPlacement, tap: &crate::metrics::TapStats) {
        let node = self.tap_id.clone();
        let mut confirmed = Vec::new();
        self.pending.retain(|p| {
            match pods.node_of(&p.namespace, &p.name) {
                Some(n) if n == node => {
                    confirmed.push((p.source, p.namespace.clone(), p.name.clone()));
                    false
                }
                Some(_) => {
                    tap.foreign_pods.add(1);
                    tracing::warn!(tap = %node, pod = %format!("{}/{}", p.namespace, p.name), "a tap claimed a pod of another node: its packets carry only the interface");
                    false
                }
                None if p.since.elapsed() >= UNKNOWN_POD_GRACE => {
                    tap.foreign_pods.add(1);
                    tracing::warn!(tap = %node, pod = %format!("{}/{}", p.namespace, p.name), "a tap claimed a pod the cluster does not have: its packets carry only the interface");
                    false
                }
                None => true,
            }
        });
        for (source, namespace, name) in confirmed {
            let Some(old) = self.sources.get(&source) else {
                continue;
            };
            let pod = tapestry_proto::tap::v1::PodIdentity {
                namespace,
                name,
                ..Default::default()
            };
            let iface = source_iface(&self.tap_id, Some(&pod), &old.interface.clone());
            self.sources.insert(source, iface);
        }
    }

    fn resolve(&mut self, table: Arc<PolicyTable>) {
        let policies = &table.policies;
        self.bit_map = self
            .tap_policies
            .iter()
            .map(|n| {
                policies
                    .iter()
                    .filter(|p| p.tap_policies.iter().any(|t| t == n))
                    .fold(0, |m, p| m | p.bit)
            })
            .collect();
        self.catch_all = policies
            .iter()
            .filter(|p| p.tap_policies.is_empty())
            .fold(0, |m, p| m | p.bit);
        self.table = table;
    }

    /// Loss a tap reports can be pinned on a policy only when its stream
    /// carries that one policy; otherwise it stays with the tap's counter.
    fn attribute_tap_drops(&self, n: u64) {
        if n == 0 || self.tap_policies.len() != 1 {
            return;
        }
        let bits = self.bit_map.first().copied().unwrap_or(0);
        for p in self.table.policies.iter().filter(|p| bits & p.bit != 0) {
            p.stats.tap_dropped.add(n);
        }
    }
    fn policies_for(&self, mask: u64) -> u64 {
        let mut out = self.catch_all;
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            out |= self.bit_map.get(i).copied().unwrap_or(0);
            m &= m - 1;
        }
        out
    }

    /// Read a batch's records and hand the packets some policy takes to
    /// those policies. Returns (packets, captured bytes) read; a batch that
    /// is malformed past some record is counted and its rest dropped.
    fn take_in(
        &mut self,
        format: u32,
        records: bytes::Bytes,
        count: u32,
        tap: &crate::metrics::TapStats,
    ) -> (u64, u64) {
        let reader = match records::read(format, records) {
            Ok(r) => r,
            Err(e) => {
                tap.malformed_batches.add(1);
                tracing::debug!(tap = %self.tap_id, "batch dropped: {e}");
                return (0, 0);
            }
        };
        let mut batch = Vec::with_capacity(count.min(1 << 16) as usize);
        let (mut n, mut bytes, mut any) = (0u64, 0u64, 0u64);
        for item in reader {
            let (r, data) = match item {
                Ok(x) => x,
                Err(e) => {
                    tap.malformed_batches.add(1);
                    tracing::debug!(tap = %self.tap_id, "rest of a batch dropped: {e}");
                    break;
                }
            };
            // No tool takes more than libpcap's largest snapshot (a pcap
            // reader refuses a longer record): cut here, once, for all.
            let data = if data.len() > MAX_RECORD {
                tap.truncated_records.add(1);
                data.slice(..MAX_RECORD)
            } else {
                data
            };
            n += 1;
            bytes += data.len() as u64;
            let policies = self.policies_for(r.policy_mask);
            if policies == 0 {
                continue;
            }
            any |= policies;
            batch.push(Packet {
                ts_ns: r.timestamp_ns,
                wire_len: r.wire_length,
                data,
                direction: Direction::from_proto(i32::from(r.direction)),
                iface: self.iface(r.source_id),
                policies,
                policy: self.empty.clone(),
            });
        }
        if !batch.is_empty() {
            let batch: Batch = Arc::new(batch);
            for pol in self.table.policies.iter() {
                if any & pol.bit != 0 {
                    pol.offer(batch.clone());
                }
            }
        }
        (n, bytes)
    }

    fn iface(&mut self, id: u32) -> Arc<Iface> {
        let tap_id = &self.tap_id;
        // Source ids are the tap's word: a stream gets a bounded table,
        // and ids past it share one entry.
        let id = if self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&id) {
            u32::MAX
        } else {
            id
        };
        self.sources
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Iface {
                    tap_id: tap_id.clone(),
                    name: if id == u32::MAX {
                        "sources-past-limit".to_string()
                    } else {
                        format!("source-{id}")
                    },
                    is_pod: false,
                    interface: String::new(),
                })
            })
            .clone()
    }
}

/// Who a stream speaks for: the certificate's node, else the Hello's word.
fn tap_id_of(h: &Hello, certified: Option<&str>) -> String {
    match certified {
        Some(node) => node.to_string(),
        None if h.tap_id.is_empty() => h.node.clone(),
        None => h.tap_id.clone(),
    }
}

/// How packets of one source are labelled: the pod (`namespace/pod`)
/// when its identity stands, else the interface.
fn source_iface(
    tap_id: &str,
    pod: Option<&tapestry_proto::tap::v1::PodIdentity>,
    interface: &str,
) -> Arc<Iface> {
    let (name, is_pod) = match pod {
        Some(p) => (format!("{}/{}", p.namespace, p.name), true),
        None => (interface.to_string(), false),
    };
    Arc::new(Iface {
        tap_id: tap_id.to_string(),
        name,
        is_pod,
        interface: interface.to_string(),
    })
}

type Acks = Pin<Box<dyn futures::Stream<Item = Result<Ack, Status>> + Send>>;

#[tonic::async_trait]
impl TapIngest for IngestService {
    type StreamStream = Acks;

    async fn stream(&self, req: Request<Streaming<WireBatch>>) -> Result<Response<Acks>, Status> {
        let certified = if self.require_certificates {
            match certified_node(&req) {
                Ok(node) => Some(node),
                Err((reason, status)) => {
                    self.registry.refuse_ingest(reason);
                    tracing::warn!(peer = ?req.remote_addr(), "ingest stream refused: {}", status.message());
                    return Err(status);
                }
            }
        } else {
            None
        };
        let stream = req.into_inner();
        // Acknowledgements are cumulative: the tap gets the latest, and
        // one it has not read yet is replaced, never queued behind.
        let (through, latest) = watch::channel(None::<Ack>);
        let (failed, failure) = oneshot::channel::<Status>();
        let policies = self.policies.clone();
        let registry = self.registry.clone();
        let stopping = self.stopping.clone();
        let pods = self.pods.clone();
        tokio::spawn(async move {
            let r = ingest(
                stream,
                certified.as_deref(),
                pods.as_deref(),
                &through,
                &policies,
                &registry,
                &stopping,
            )
            .await;
            if let Err(status) = r {
                let _ = failed.send(status);
            }
        });
        let acks = WatchStream::new(latest).filter_map(|a| futures::future::ready(a.map(Ok)));
        let failure =
            futures::stream::once(failure).filter_map(|r| futures::future::ready(r.ok().map(Err)));
        Ok(Response::new(Box::pin(acks.chain(failure))))
    }
}

/// Streams one tap identity may hold open at once.
pub const MAX_STREAMS_PER_TAP: u64 = 4;

/// Take in one stream's batches until it ends.
async fn ingest(
    mut stream: Streaming<WireBatch>,
    certified: Option<&str>,
    pods: Option<&dyn PodPlacement>,
    acks: &watch::Sender<Option<Ack>>,
    policies: &IngestTable,
    registry: &Registry,
    stopping: &tokio_util::sync::CancellationToken,
) -> Result<(), Status> {
    let mut state: Option<StreamState> = None;
    let mut tap: Option<Arc<crate::metrics::TapStats>> = None;
    let mut packets_total = 0u64;
    let mut last = 0u64;
    let mut resumed_through = 0u64;
    let result = loop {
        let msg = tokio::select! {
            biased;
            _ = stopping.cancelled() => break Ok(()),
            m = stream.message() => m,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        };
        if let Some(h) = &msg.hello {
            if let Some(node) = certified.filter(|n| !h.node.is_empty() && h.node != *n) {
                registry.refuse_ingest("node-mismatch");
                tracing::warn!(certified = node, claimed = %h.node, "ingest stream refused: the Hello claims another node");
                break Err(Status::permission_denied(format!(
                    "hello.node: this tap's certificate names node {node:?}, not {:?}",
                    h.node
                )));
            }
            let tap_id = tap_id_of(h, certified);
            if let Some(st) = state.as_ref().filter(|st| st.tap_id != tap_id) {
                break Err(Status::invalid_argument(format!(
                    "hello.tap_id: a stream speaks for one tap; this one began as {:?}, not {tap_id:?}",
                    st.tap_id
                )));
            }
            let t = registry.tap(&tap_id);
            if state.is_none() {
                // A tap has one stream (two briefly while it reconnects);
                // more is a broken or hostile client holding resources.
                if t.connected.fetch_add(1, Relaxed) >= MAX_STREAMS_PER_TAP {
                    t.connected.fetch_sub(1, Relaxed);
                    registry.refuse_ingest("too-many-streams");
                    tracing::warn!(tap = %tap_id, "ingest stream refused: {MAX_STREAMS_PER_TAP} streams of this tap are open");
                    break Err(Status::resource_exhausted(format!(
                        "tap {tap_id:?} already has {MAX_STREAMS_PER_TAP} open streams"
                    )));
                }
                t.streams.add(1);
                // Where this tap stands: what this aggregator took in
                // from it before, or what the tap says it had
                // acknowledged (a new aggregator). Batches between that
                // and this one never arrived.
                let known = t.last_sequence.load(Relaxed).max(msg.resumed_after);
                let lost = msg.sequence.saturating_sub(known + 1);
                t.sequence_gaps.add(lost);
                last = msg.sequence.saturating_sub(1).max(known);
                resumed_through = known;
                tracing::info!(tap = %tap_id, sources = h.sources.len(), resumed_after = known, lost_batches = lost, "tap connected");
                acks.send_replace(Some(Ack {
                    through_sequence: known,
                    resumed_through,
                }));
            }
            state = Some(StreamState::from_hello(
                h,
                certified,
                pods,
                &t,
                policies.current(),
            ));
            tap = Some(t);
        }
        let (Some(st), Some(t)) = (state.as_mut(), tap.as_ref()) else {
            break Err(Status::failed_precondition(
                "hello: the first batch of a stream must carry a Hello",
            ));
        };
        if msg.sequence > last + 1 {
            t.sequence_gaps.add(msg.sequence - last - 1);
        }
        last = last.max(msg.sequence);
        let table = policies.current();
        if !Arc::ptr_eq(&table, &st.table) {
            st.resolve(table);
        }
        if let (false, Some(pods)) = (st.pending.is_empty(), pods) {
            st.confirm_pending(pods, t);
        }
        t.batches.add(1);
        t.tap_dropped.add(msg.dropped_since_last);
        st.attribute_tap_drops(msg.dropped_since_last);
        if msg.record_format != records::FORMAT_V1 {
            t.malformed_batches.add(1);
            break Err(Status::failed_precondition(format!(
                "record format {} is not supported: this aggregator reads format {} (tapestry.tap.v2); upgrade the tap-agent or the aggregator so both speak one version",
                msg.record_format,
                records::FORMAT_V1
            )));
        }
        let (n, bytes) = st.take_in(msg.record_format, msg.records, msg.record_count, t);
        packets_total += n;
        t.packets.add(n);
        t.bytes.add(bytes);
        t.last_sequence.store(last, Relaxed);
        acks.send_replace(Some(Ack {
            through_sequence: last,
            resumed_through,
        }));
    };
    if let Some(t) = &tap {
        t.connected.fetch_sub(1, Relaxed);
    }
    if let Some(st) = &state {
        tracing::info!(tap = %st.tap_id, through_sequence = last, packets = packets_total, "tap stream ended");
    }
    result
}

/// The node named by the verified client certificate of `req`'s
/// connection, or why the stream is refused (a counter reason and the
/// answer).
fn certified_node<T>(req: &Request<T>) -> Result<String, (&'static str, Status)> {
    let certs = req.peer_certs().filter(|c| !c.is_empty()).ok_or((
        "no-client-certificate",
        Status::unauthenticated(
            "ingest needs a tap's client certificate (CN tapestry:tap:NODE, from the cluster CA)",
        ),
    ))?;
    let cn = tapestry_runtime::x509::subject(&certs[0])
        .map(|s| s.common_name)
        .unwrap_or_default();
    tapestry_proto::identity::tap_node(&cn)
        .map(str::to_string)
        .ok_or((
            "not-a-tap",
            Status::permission_denied(format!(
                "certificate CN {cn:?} is not a tap identity ({}NODE)",
                tapestry_proto::identity::TAP_USER_PREFIX
            )),
        ))
}

/// What a tap of the previous ingest version (`tapestry.tap.v1.TapIngest`,
/// one protobuf message per packet) is told, instead of an unknown-service
/// error: which version this aggregator speaks.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetiredIngest;

/// The refusal an old tap gets.
pub const RETIRED_INGEST: &str = "tapestry.tap.v1 ingest is not served: this aggregator takes tapestry.tap.v2.TapIngest/Stream (packed records); upgrade the tap-agent to the aggregator's version";

impl tonic::server::NamedService for RetiredIngest {
    const NAME: &'static str = "tapestry.tap.v1.TapIngest";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for RetiredIngest {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(Status::failed_precondition(RETIRED_INGEST).into_http()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tapestry_proto::tap::v1::{PodIdentity, Source};

    /// Pods and their nodes, as a test says.
    #[derive(Default)]
    struct Placement(Mutex<HashMap<(String, String), String>>);

    impl Placement {
        fn bind(&self, ns: &str, name: &str, node: &str) {
            self.0
                .lock()
                .unwrap()
                .insert((ns.into(), name.into()), node.into());
        }
    }

    impl PodPlacement for Placement {
        fn node_of(&self, namespace: &str, name: &str) -> Option<String> {
            self.0
                .lock()
                .unwrap()
                .get(&(namespace.to_string(), name.to_string()))
                .cloned()
        }
    }

    fn source(id: u32, pod: &str) -> Source {
        Source {
            id,
            interface: format!("veth{id}"),
            pod: Some(PodIdentity {
                namespace: "shop".into(),
                name: pod.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_certified_tap_speaks_only_for_its_own_nodes_pods() {
        let pods = Placement::default();
        pods.bind("shop", "mine", "node-a");
        pods.bind("shop", "theirs", "node-b");
        let hello = Hello {
            node: "node-a".into(),
            sources: vec![source(1, "mine"), source(2, "theirs"), source(3, "new")],
            ..Default::default()
        };
        let tap = crate::metrics::TapStats::default();
        let mut st =
            StreamState::from_hello(&hello, Some("node-a"), Some(&pods), &tap, Arc::default());
        let name = |st: &StreamState, id: u32| st.sources[&id].name.clone();
        assert_eq!(name(&st, 1), "shop/mine");
        assert_eq!(name(&st, 2), "veth2", "another node's pod is refused");
        assert_eq!(
            name(&st, 3),
            "veth3",
            "unconfirmed until the watch knows it"
        );
        assert_eq!(tap.foreign_pods.get(), 1);
        // The new pod shows up, bound to this node: its name comes back.
        pods.bind("shop", "new", "node-a");
        st.confirm_pending(&pods, &tap);
        assert_eq!(name(&st, 3), "shop/new");
        assert!(st.pending.is_empty());
        assert_eq!(tap.foreign_pods.get(), 1);
        // Without a certificate there is no node to hold the tap to.
        let st = StreamState::from_hello(&hello, None, Some(&pods), &tap, Arc::default());
        assert_eq!(name(&st, 2), "shop/theirs");
    }
}
