use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::event::Batch;
use crate::metrics::SinkStats;
use crate::sinks::{check_addr, default_queue};

fn default_vni() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VxlanConfig {
    pub name: String,
    /// Receiver, e.g. `192.0.2.10:4789`.
    pub remote: String,
    /// VXLAN network identifier (24 bits).
    #[serde(default = "default_vni")]
    pub vni: u32,
    #[serde(default = "default_queue")]
    pub queue: usize,
}

impl VxlanConfig {
    pub fn validate(&self) -> Result<(), String> {
        check_addr("remote", &self.remote)?;
        if self.vni > 0x00ff_ffff {
            return Err(format!("vni: {} does not fit in 24 bits", self.vni));
        }
        Ok(())
    }

    pub async fn build(
        &self,
        rx: mpsc::Receiver<Batch>,
        stats: Arc<SinkStats>,
    ) -> anyhow::Result<()> {
        let remote: std::net::SocketAddr = self.remote.parse()?;
        let bind = if remote.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = tokio::net::UdpSocket::bind(bind).await?;
        sock.connect(remote).await?;
        tokio::spawn(super::sink::run(rx, sock, self.vni, stats));
        Ok(())
    }
}
