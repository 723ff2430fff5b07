//! Streams batches to the aggregator (`tapestry.tap.v1.TapIngest/Stream`):
//! one long-lived client stream, a Hello at its start and whenever the
//! sources change, reconnects with exponential backoff. While disconnected
//! the bounded queue fills and the reader counts what it drops.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use tapestry_proto::tap::v1::{tap_ingest_client::TapIngestClient, Hello, PacketBatch};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{info, warn};

use crate::{metrics::Metrics, ring::Batch, DropCounter};

pub struct Shipper {
    pub endpoint: Endpoint,
    pub queue: mpsc::Receiver<Batch>,
    pub hello: watch::Receiver<Hello>,
    pub metrics: Arc<Metrics>,
    pub drops: Arc<DropCounter>,
    /// How long to keep flushing after the reader stopped.
    pub drain_timeout: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

enum StreamEnd {
    /// The queue closed: the agent is stopping and everything was sent.
    Done,
    /// The stream or connection failed.
    Failed,
}

impl Shipper {
    /// Runs until the queue is closed and drained (or `drain_timeout` after
    /// `stop`, when the aggregator is away).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        let mut stopping = false;
        loop {
            self.metrics.connect_attempts.fetch_add(1, Relaxed);
            let conn = tokio::select! {
                c = self.endpoint.connect() => c,
                _ = stop.changed(), if !stopping => { stopping = true; continue; }
            };
            match conn {
                Ok(channel) => {
                    backoff = BACKOFF_MIN;
                    info!(aggregator = %self.endpoint.uri(), "connected");
                    self.metrics.connected.store(true, Relaxed);
                    let end = self.stream(TapIngestClient::new(channel)).await;
                    self.metrics.connected.store(false, Relaxed);
                    if let StreamEnd::Done = end {
                        return;
                    }
                    self.metrics.stream_errors.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    self.metrics.connect_failures.fetch_add(1, Relaxed);
                    if self.metrics.connect_failures.load(Relaxed) % 20 == 1 {
                        warn!(aggregator = %self.endpoint.uri(), "cannot connect: {e}");
                    }
                }
            }
            if stopping || *stop.borrow() {
                // Nobody to flush to: count what is left as dropped.
                self.queue.close();
                while let Ok(b) = self.queue.try_recv() {
                    self.metrics.queue_batches.fetch_sub(1, Relaxed);
                    self.metrics
                        .queue_dropped_packets
                        .fetch_add(b.packets.len() as u64, Relaxed);
                }
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => { stopping = true; }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn stream(
        &mut self,
        mut client: TapIngestClient<tonic::transport::Channel>,
    ) -> StreamEnd {
        let (tx, rx) = mpsc::channel::<PacketBatch>(4);
        let mut call = tokio::spawn(async move { client.stream(ReceiverStream::new(rx)).await });
        let mut sequence = 0u64;
        let hello = self.hello.borrow_and_update().clone();
        let first = PacketBatch {
            hello: Some(hello),
            sequence,
            packets: vec![],
            dropped_since_last: self.drops.take(),
        };
        if tx.send(first).await.is_err() {
            return StreamEnd::Failed;
        }
        let mut hello_open = true;
        loop {
            let batch = tokio::select! {
                b = self.queue.recv() => b,
                // Sources changed: tell the aggregator now, not with the next packet.
                r = self.hello.changed(), if hello_open => {
                    if r.is_err() {
                        hello_open = false;
                        continue;
                    }
                    sequence += 1;
                    let msg = PacketBatch {
                        hello: Some(self.hello.borrow_and_update().clone()),
                        sequence,
                        packets: vec![],
                        dropped_since_last: self.drops.take(),
                    };
                    tokio::select! {
                        r = tx.send(msg) => if r.is_err() { return StreamEnd::Failed; },
                        _ = &mut call => return StreamEnd::Failed,
                    }
                    continue;
                }
                res = &mut call => {
                    match res {
                        Ok(Ok(summary)) => warn!(?summary, "aggregator ended the stream"),
                        Ok(Err(status)) => warn!("stream failed: {status}"),
                        Err(e) => warn!("stream task failed: {e}"),
                    }
                    return StreamEnd::Failed;
                }
            };
            let Some(batch) = batch else {
                // Queue closed and drained: end the stream cleanly.
                drop(tx);
                return match tokio::time::timeout(self.drain_timeout, call).await {
                    Ok(Ok(Ok(summary))) => {
                        let s = summary.into_inner();
                        info!(batches = s.batches, packets = s.packets, "stream closed");
                        StreamEnd::Done
                    }
                    _ => StreamEnd::Done,
                };
            };
            self.metrics.queue_batches.fetch_sub(1, Relaxed);
            sequence += 1;
            let n = batch.packets.len() as u64;
            let hello = if self.hello.has_changed().unwrap_or(false) {
                Some(self.hello.borrow_and_update().clone())
            } else {
                None
            };
            let msg = PacketBatch {
                hello,
                sequence,
                packets: batch.packets,
                dropped_since_last: self.drops.take(),
            };
            tokio::select! {
                r = tx.send(msg) => if r.is_err() {
                    self.metrics.queue_dropped_packets.fetch_add(n, Relaxed);
                    return StreamEnd::Failed;
                },
                _ = &mut call => {
                    self.metrics.queue_dropped_packets.fetch_add(n, Relaxed);
                    return StreamEnd::Failed;
                }
            }
            self.metrics.sent_batches.fetch_add(1, Relaxed);
            self.metrics.sent_packets.fetch_add(n, Relaxed);
            self.metrics
                .sent_bytes
                .fetch_add(batch.bytes as u64, Relaxed);
        }
    }
}
