use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Batch;
use crate::metrics::SinkStats;
use crate::sinks::{check_addr, default_queue, default_snaplen, Started};

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
    /// Bytes of each frame sent at most.
    #[serde(default = "default_snaplen")]
    pub snaplen: u32,
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
        stop: CancellationToken,
    ) -> anyhow::Result<Started> {
        let remote: std::net::SocketAddr = self.remote.parse()?;
        let bind = if remote.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = tokio::net::UdpSocket::bind(bind)
            .await
            .map_err(|e| anyhow::anyhow!("sink {:?}: binding {bind}: {e}", self.name))?;
        sock.connect(remote)
            .await
            .map_err(|e| anyhow::anyhow!("sink {:?}: remote {remote}: {e}", self.name))?;
        let run = tokio::spawn(super::sink::run(
            rx,
            sock,
            self.vni,
            self.snaplen,
            stats,
            stop,
        ));
        Ok(Started {
            drains: vec![run],
            ..Started::default()
        })
    }
}
