use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tapestry_proto::tool::v1::{ToolBatch, ToolPacket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{now_ns, Batch};
use crate::metrics::SinkStats;
use crate::sinks::{
    default_client_queue, default_max_clients, default_queue, default_snaplen, snap, Hub,
    SinkContext, Started,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// What subscribers ask for in `SubscribeRequest.sink`.
    pub name: String,
    #[serde(default = "default_queue")]
    pub queue: usize,
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
    /// Clients served at once; more are refused.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Bytes of each packet subscribers receive at most.
    #[serde(default = "default_snaplen")]
    pub snaplen: u32,
}

impl GrpcConfig {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    pub fn build(
        &self,
        cx: &SinkContext,
        mut rx: mpsc::Receiver<Batch>,
        stats: Arc<SinkStats>,
        stop: CancellationToken,
    ) -> Started {
        let hub = Arc::new(Hub::new(stats.clone(), self.client_queue, self.max_clients));
        cx.grpc_hubs.insert(self.name.clone(), hub.clone());
        let snaplen = self.snaplen;
        tokio::spawn(async move {
            loop {
                let Some(batch) = crate::sinks::next_batch(&mut rx, &stop).await else {
                    return;
                };
                let msg = Arc::new(ToolBatch {
                    packets: batch
                        .iter()
                        .map(|p| ToolPacket {
                            timestamp_ns: p.ts_ns,
                            wire_length: p.wire_len,
                            data: snap(&p.data, snaplen).to_vec(),
                            direction: p.direction.to_proto(),
                            interface: p.iface.name.clone(),
                            tap_id: p.iface.tap_id.clone(),
                            policy: p.policy.to_string(),
                        })
                        .collect(),
                    dropped_since_last: 0,
                });
                if hub.broadcast(&msg, batch.len() as u64) > 0 {
                    stats.packets.add(batch.len() as u64);
                    stats
                        .bytes
                        .add(batch.iter().map(|p| p.data.len() as u64).sum());
                    stats.record_latency(now_ns(), batch.iter().map(|p| p.ts_ns));
                }
            }
        });
        Started::default()
    }
}
