use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Batch;
use crate::metrics::SinkStats;
use crate::sinks::{
    default_client_queue, default_max_clients, default_queue, default_snaplen, Hub, SecretRef,
    SinkContext, Started, Token, ToolAccess,
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
    /// A file holding the bearer token clients must present; without a
    /// token, only loopback clients are served.
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

impl HttpConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.name.contains('/') {
            return Err("name: must not contain '/' (it is a URL path segment)".into());
        }
        Ok(())
    }

    pub async fn build(
        &self,
        cx: &SinkContext,
        rx: mpsc::Receiver<Batch>,
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
        cx.http_hubs.insert(
            self.name.clone(),
            HttpStream {
                hub: hub.clone(),
                snaplen: self.snaplen,
                token,
            },
        );
        // Same wire format as PCAP-over-IP, so the same encoder.
        let run = tokio::spawn(crate::sinks::pcap_over_ip::sink::run(
            rx,
            hub,
            stats,
            self.snaplen,
            stop,
        ));
        Ok(Started {
            drains: vec![run],
            ..Started::default()
        })
    }
}

/// A running HTTP stream sink, looked up by the HTTP handler.
#[derive(Clone)]
pub struct HttpStream {
    pub hub: Arc<Hub<bytes::Bytes>>,
    pub snaplen: u32,
    pub token: ToolAccess,
}
