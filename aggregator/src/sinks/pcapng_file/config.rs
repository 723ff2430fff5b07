use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Batch;
use crate::metrics::SinkStats;
use crate::sinks::{default_queue, default_snaplen, Started};

fn default_prefix() -> String {
    "capture".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PcapngFileConfig {
    pub name: String,
    pub directory: PathBuf,
    /// File names are `{prefix}-{unix seconds}-{sequence}.pcapng`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Start a new file once this many bytes are written (0 = never).
    #[serde(default)]
    pub rotate_bytes: u64,
    /// Start a new file after this many seconds (0 = never).
    #[serde(default)]
    pub rotate_seconds: u64,
    /// Keep at most this many files, deleting the oldest (0 = keep all).
    #[serde(default)]
    pub max_files: usize,
    #[serde(default = "default_queue")]
    pub queue: usize,
    #[serde(default = "default_snaplen")]
    pub snaplen: u32,
}

impl PcapngFileConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.directory.as_os_str().is_empty() {
            return Err("directory: must not be empty".into());
        }
        if self.prefix.contains('/') {
            return Err("prefix: must not contain '/'".into());
        }
        Ok(())
    }

    pub fn build(
        &self,
        rx: mpsc::Receiver<Batch>,
        tx: mpsc::Sender<Batch>,
        stats: Arc<SinkStats>,
        stop: CancellationToken,
    ) -> anyhow::Result<Started> {
        std::fs::create_dir_all(&self.directory).map_err(|e| {
            anyhow::anyhow!(
                "sink {:?}: directory {}: {e}",
                self.name,
                self.directory.display()
            )
        })?;
        let cfg = self.clone();
        // An empty batch once a second is the writer's clock (flush, age
        // rotation) without a timer inside its thread. It holds only a weak
        // sender so the sink still ends when every policy lets go of it.
        let tick = tx.downgrade();
        drop(tx);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => {}
                }
                let Some(tx) = tick.upgrade() else { break };
                let _ = tx.try_send(Arc::new(Vec::new()));
            }
        });
        // Disk writes block; they get a thread of their own (from the
        // blocking pool) so they never hold up the async workers that serve
        // ingest and other sinks. It ends, closing its file, when the last
        // sender is gone.
        let writer = tokio::task::spawn_blocking(move || super::sink::run(cfg, rx, stats));
        Ok(Started {
            drains: vec![writer],
            ..Started::default()
        })
    }
}
