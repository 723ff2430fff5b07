//! gRPC ingest (`tapestry.tap.v1.TapIngest`): one long-lived stream per tap.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tapestry_proto::tap::v1::tap_ingest_server::TapIngest;
use tapestry_proto::tap::v1::{Hello, IngestSummary, PacketBatch};
use tonic::{Request, Response, Status, Streaming};

use crate::event::{Batch, Direction, Iface, Packet};
use crate::metrics::Registry;
use crate::topology::{IngestTable, PolicyTable};

pub struct IngestService {
    pub policies: Arc<IngestTable>,
    pub registry: Arc<Registry>,
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
}

impl StreamState {
    fn from_hello(h: &Hello, table: Arc<PolicyTable>) -> Self {
        let tap_id = if h.tap_id.is_empty() {
            h.node.clone()
        } else {
            h.tap_id.clone()
        };
        let sources = h
            .sources
            .iter()
            .map(|s| {
                let (name, is_pod) = match &s.pod {
                    Some(p) => (format!("{}/{}", p.namespace, p.name), true),
                    None => (s.interface.clone(), false),
                };
                (
                    s.id,
                    Arc::new(Iface {
                        tap_id: tap_id.clone(),
                        name,
                        is_pod,
                        interface: s.interface.clone(),
                    }),
                )
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
        };
        st.resolve(table);
        st
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

    fn iface(&mut self, id: u32) -> Arc<Iface> {
        let tap_id = &self.tap_id;
        self.sources
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Iface {
                    tap_id: tap_id.clone(),
                    name: format!("source-{id}"),
                    is_pod: false,
                    interface: String::new(),
                })
            })
            .clone()
    }
}

#[tonic::async_trait]
impl TapIngest for IngestService {
    async fn stream(
        &self,
        req: Request<Streaming<PacketBatch>>,
    ) -> Result<Response<IngestSummary>, Status> {
        let mut stream = req.into_inner();
        let mut state: Option<StreamState> = None;
        let mut summary = IngestSummary::default();
        let mut tap = None;
        while let Some(msg) = stream.message().await? {
            if let Some(h) = &msg.hello {
                let st = StreamState::from_hello(h, self.policies.current());
                let t = self.registry.tap(&st.tap_id);
                if state.is_none() {
                    t.streams.add(1);
                    tracing::info!(tap = %st.tap_id, sources = h.sources.len(), "tap connected");
                }
                tap = Some(t);
                state = Some(st);
            }
            let (Some(st), Some(t)) = (state.as_mut(), tap.as_ref()) else {
                return Err(Status::failed_precondition(
                    "hello: the first batch of a stream must carry a Hello",
                ));
            };
            let table = self.policies.current();
            if !Arc::ptr_eq(&table, &st.table) {
                st.resolve(table);
            }
            t.batches.add(1);
            t.tap_dropped.add(msg.dropped_since_last);
            st.attribute_tap_drops(msg.dropped_since_last);
            summary.batches += 1;
            let n = msg.packets.len();
            summary.packets += n as u64;
            let mut any = 0u64;
            let mut bytes = 0u64;
            let mut batch = Vec::with_capacity(n);
            for p in msg.packets {
                let policies = st.policies_for(p.policy_mask);
                bytes += p.data.len() as u64;
                if policies == 0 {
                    continue;
                }
                any |= policies;
                batch.push(Packet {
                    ts_ns: p.timestamp_ns,
                    wire_len: p.wire_length.max(p.data.len() as u32),
                    data: Bytes::from(p.data),
                    direction: Direction::from_proto(p.direction),
                    iface: st.iface(p.source_id),
                    policies,
                    policy: st.empty.clone(),
                });
            }
            t.packets.add(n as u64);
            t.bytes.add(bytes);
            if batch.is_empty() {
                continue;
            }
            let batch: Batch = Arc::new(batch);
            for pol in st.table.policies.iter() {
                if any & pol.bit != 0 {
                    pol.offer(batch.clone());
                }
            }
        }
        if let Some(st) = state {
            tracing::info!(tap = %st.tap_id, batches = summary.batches, packets = summary.packets, "tap stream ended");
        }
        Ok(Response::new(summary))
    }
}
