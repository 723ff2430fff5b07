use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Batch;
use crate::metrics::SinkStats;
use crate::sinks::{
    default_client_queue, default_max_clients, default_queue, default_snaplen, Hub, SinkContext,
    Started,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Also the path segment: `/v1/tools/{name}/pcap`.
    pub name: String,
    #[serde(default = "default_queue")]
    pub queue: usize,
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
    /// Clients served at once; more are refused.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    #[serde(default = "default_snaplen")]
    pub snaplen: u32,
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.name.contains('/') {
            return Err("name: must not contain '/' (it is a URL path segment)".into());
        }
        Ok(())
    }

    pub fn build(
        &self,
        cx: &SinkContext,
        rx: mpsc::Receiver<Batch>,
        stats: Arc<SinkStats>,
        stop: CancellationToken,
    ) -> Started {
        let hub = Arc::new(Hub::new(stats.clone(), self.client_queue, self.max_clients));
        cx.http_hubs.insert(
            self.name.clone(),
            HttpStream {
                hub: hub.clone(),
                snaplen: self.snaplen,
            },
        );
        // Same wire format as PCAP-over-IP, so the same encoder.
        tokio::spawn(crate::sinks::pcap_over_ip::sink::run(
            rx,
            hub,
            stats,
            self.snaplen,
            stop,
        ));
        Started::default()
    }
}

/// A running HTTP stream sink, looked up by the HTTP handler.
#[derive(Clone)]
pub struct HttpStream {
    pub hub: Arc<Hub<bytes::Bytes>>,
    pub snaplen: u32,
}
