use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::event::Batch;
use crate::metrics::SinkStats;
use crate::sinks::{
    check_addr, default_client_queue, default_queue, default_snaplen, Hub, SinkContext,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PcapOverIpConfig {
    pub name: String,
    /// Address to listen on, e.g. `0.0.0.0:57012`.
    pub listen: String,
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Encoded batches buffered per client before that client loses data.
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
    #[serde(default = "default_snaplen")]
    pub snaplen: u32,
}

impl PcapOverIpConfig {
    pub fn validate(&self) -> Result<(), String> {
        check_addr("listen", &self.listen)
    }

    pub async fn build(
        &self,
        cx: &SinkContext,
        rx: mpsc::Receiver<Batch>,
        stats: Arc<SinkStats>,
    ) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(&self.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("sink {:?}: listening on {}: {e}", self.name, self.listen)
            })?;
        let addr = listener.local_addr()?;
        cx.listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.name.clone(), addr));
        let hub = Arc::new(Hub::new(stats.clone(), self.client_queue));
        tokio::spawn(super::sink::accept(
            listener,
            hub.clone(),
            self.snaplen,
            self.name.clone(),
        ));
        tokio::spawn(super::sink::run(rx, hub, stats));
        Ok(())
    }
}
