//! Streams batches to the aggregator (`tapestry.tap.v1.TapIngest/Stream`):
//! one long-lived client stream, a Hello at its start and whenever the
//! sources change, reconnects with exponential backoff. While disconnected
//! the bounded queue fills and the reader counts what it drops.
//!
//! The aggregator is one of a list of URLs (one fixed `--aggregator`, or
//! the ready endpoints of `--aggregator-service`): attempts go round the
//! list, and a stream whose endpoint leaves the list moves to another.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use tapestry_proto::tap::v1::{tap_ingest_client::TapIngestClient, Hello, PacketBatch};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::{
    metrics::{BitTally, Metrics},
    ring::Batch,
    status::StatusBoard,
    DropCounter,
};

pub struct Shipper {
    /// Aggregator URLs to choose from.
    pub aggregators: watch::Receiver<Vec<String>>,
    pub board: Arc<StatusBoard>,
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
    /// The aggregator's endpoint is no longer in the list.
    Moved,
}

const BOARD_PART: &str = "aggregator";

impl Shipper {
    /// Runs until the queue is closed and drained (or `drain_timeout` after
    /// `stop`, when the aggregator is away).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        let mut stopping = false;
        // A fixed list's sender is gone from the start; its value holds.
        let mut list_open = self.aggregators.has_changed().is_ok();
        let mut turn = 0usize;
        loop {
            let Some(url) = self
                .next_aggregator(&mut turn, &mut list_open, &mut stop, &mut stopping)
                .await
            else {
                return self.drop_queued();
            };
            let endpoint = match crate::agent::endpoint(&url) {
                Ok(e) => Some(e),
                Err(e) => {
                    self.problem(format!("{e:#}"));
                    None
                }
            };
            if let Some(endpoint) = endpoint {
                self.metrics.connect_attempts.fetch_add(1, Relaxed);
                let conn = tokio::select! {
                    c = endpoint.connect() => c,
                    _ = stop.changed(), if !stopping => { stopping = true; continue; }
                };
                match conn {
                    Ok(channel) => {
                        backoff = BACKOFF_MIN;
                        info!(aggregator = url, "connected");
                        self.board.set_problems(BOARD_PART, vec![]);
                        self.metrics.connected.store(true, Relaxed);
                        let end = self
                            .stream(TapIngestClient::new(channel), &url, &mut list_open)
                            .await;
                        self.metrics.connected.store(false, Relaxed);
                        match end {
                            StreamEnd::Done => return,
                            StreamEnd::Moved => continue,
                            StreamEnd::Failed => {
                                self.metrics.stream_errors.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Err(e) => {
                        self.metrics.connect_failures.fetch_add(1, Relaxed);
                        let msg = format!("cannot connect to the aggregator at {url}: {e}");
                        if self.metrics.connect_failures.load(Relaxed) % 20 == 1 {
                            warn!("{msg}");
                        }
                        self.problem(msg);
                    }
                }
            }
            if stopping || *stop.borrow() {
                return self.drop_queued();
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => { stopping = true; }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn problem(&self, msg: String) {
        self.board.set_problems(BOARD_PART, vec![msg]);
    }

    /// The next URL to try, waiting while the list is empty; `None` once
    /// stopping with nowhere to send.
    async fn next_aggregator(
        &mut self,
        turn: &mut usize,
        list_open: &mut bool,
        stop: &mut watch::Receiver<bool>,
        stopping: &mut bool,
    ) -> Option<String> {
        loop {
            let list = self.aggregators.borrow_and_update().clone();
            if !list.is_empty() {
                *turn = turn.wrapping_add(1);
                return Some(list[*turn % list.len()].clone());
            }
            if *stopping || *stop.borrow() {
                return None;
            }
            if self.board.set_problems(
                BOARD_PART,
                vec!["no ready aggregator endpoint to send to".into()],
            ) {
                warn!("no ready aggregator endpoint: waiting (packets are dropped and counted)");
            }
            tokio::select! {
                r = self.aggregators.changed(), if *list_open => *list_open = r.is_ok(),
                _ = stop.changed() => *stopping = true,
            }
        }
    }

    /// Nobody to flush to: what is left counts as dropped.
    fn drop_queued(&mut self) {
        self.queue.close();
        while let Ok(b) = self.queue.try_recv() {
            self.metrics.queue_batches.fetch_sub(1, Relaxed);
            self.metrics.policy.add_dropped(&BitTally::of(&b.packets));
            self.metrics
                .queue_dropped_packets
                .fetch_add(b.packets.len() as u64, Relaxed);
        }
    }

    async fn stream(
        &mut self,
        mut client: TapIngestClient<tonic::transport::Channel>,
        url: &str,
        list_open: &mut bool,
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
                r = self.aggregators.changed(), if *list_open => {
                    *list_open = r.is_ok();
                    if r.is_ok() && !self.aggregators.borrow_and_update().iter().any(|u| u == url) {
                        info!(aggregator = url, "the aggregator endpoint is gone: moving to another");
                        return StreamEnd::Moved;
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
            let tally = BitTally::of(&batch.packets);
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
            let sent = tokio::select! {
                r = tx.send(msg) => r.is_ok(),
                _ = &mut call => false,
            };
            if !sent {
                self.metrics.policy.add_dropped(&tally);
                self.metrics.queue_dropped_packets.fetch_add(n, Relaxed);
                return StreamEnd::Failed;
            }
            self.metrics.policy.add_sent(&tally);
            self.metrics.sent_batches.fetch_add(1, Relaxed);
            self.metrics.sent_packets.fetch_add(n, Relaxed);
            self.metrics
                .sent_bytes
                .fetch_add(batch.bytes as u64, Relaxed);
        }
    }
}
