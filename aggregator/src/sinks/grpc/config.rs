use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tapestry_proto::tool::v1::{ToolBatch, ToolPacket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{now_ns, Batch};
use crate::metrics::SinkStats;
use crate::sinks::{
    default_client_queue, default_max_clients, default_queue, default_snaplen, snap, Hub,
    SecretRef, SinkContext, Started, Token, ToolAccess,
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
    /// A file holding the bearer token subscribers must present (gRPC
    /// metadata `authorization: Bearer TOKEN`); without a token, only
    /// loopback clients are served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
    /// The token itself, from a Secret (cluster mode); never read from
    /// or written to a configuration file.
    #[serde(skip)]
    pub token: Option<Token>,
    /// Where the token is read from at start (cluster mode).
    #[serde(skip)]
    pub token_secret: Option<SecretRef>,
}

impl GrpcConfig {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    pub async fn build(
        &self,
        cx: &SinkContext,
        mut rx: mpsc::Receiver<Batch>,
        stats: Arc<SinkStats>,
        stop: CancellationToken,
    ) -> anyhow::Result<Started> {
        let token = ToolAccess::start(
            self.token.as_ref(),
            self.token_file.as_deref(),
            self.token_secret.as_ref(),
            cx,
            &stop,
        )
        .await?;
        let hub = Arc::new(Hub::new(stats.clone(), self.client_queue, self.max_clients));
        cx.grpc_hubs.insert(
            self.name.clone(),
            super::service::GrpcTool {
                hub: hub.clone(),
                token,
            },
        );
        let snaplen = self.snaplen;
        let run = tokio::spawn(async move {
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
        Ok(Started {
            drains: vec![run],
            ..Started::default()
        })
    }
}
