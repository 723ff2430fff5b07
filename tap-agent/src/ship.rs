//! Streams batches to the aggregator (`tapestry.tap.v2.TapIngest/Stream`):
//! one long-lived stream, a Hello at its start and whenever the sources
//! change, reconnects with exponential backoff. While disconnected the
//! bounded queue fills and the reader counts what it drops.
//!
//! Every batch carries a sequence number that runs on across streams, and
//! the aggregator acknowledges what it took in. A batch counts as sent
//! once acknowledged; batches in flight when a stream breaks are in doubt
//! until the next stream's first acknowledgement says how far the
//! aggregator got: the rest were lost in flight, counted here as the
//! aggregator counts them (a gap in the sequence).
//!
//! The aggregator is one of a list of URLs (one fixed `--aggregator`, or
//! the ready endpoints of `--aggregator-service`): attempts go round the
//! list, and a stream whose endpoint leaves the list moves to another.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt as _;
use tapestry_proto::records::{grpc_message, FORMAT_V1};
use tapestry_proto::tap::v1::Hello;
use tapestry_proto::tap::v2::{Ack, Batch as WireBatch};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec as _, Streaming};
use tonic::codegen::Service as _;
use tonic::transport::Channel;
use tonic::Status;
use tracing::{info, warn};

use crate::{
    metrics::{BitTally, Metrics},
    ring::Batch,
    status::StatusBoard,
    DropCounter,
};

/// A batch sent and not yet acknowledged.
struct InFlight {
    sequence: u64,
    packets: u64,
    bytes: u64,
    tally: BitTally,
}

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
    /// TLS to the aggregator with this client identity.
    tls: Option<crate::agent::ClientTls>,
    /// The sequence number of the next batch (from 1).
    next_sequence: u64,
    /// The last sequence an aggregator acknowledged (0: none).
    acknowledged: u64,
    /// Sent, not yet acknowledged: in doubt after a broken stream.
    in_flight: VecDeque<InFlight>,
}

/// Unacknowledged batches a stream may have out at once: past this the
/// shipper waits for acknowledgements (the queue behind it fills and the
/// reader counts what it cannot queue).
const MAX_IN_FLIGHT: usize = 64;

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
    pub fn new(
        aggregators: watch::Receiver<Vec<String>>,
        board: Arc<StatusBoard>,
        queue: mpsc::Receiver<Batch>,
        hello: watch::Receiver<Hello>,
        metrics: Arc<Metrics>,
        drops: Arc<DropCounter>,
        drain_timeout: Duration,
    ) -> Self {
        Shipper {
            aggregators,
            board,
            queue,
            hello,
            metrics,
            drops,
            drain_timeout,
            tls: None,
            next_sequence: 1,
            acknowledged: 0,
            in_flight: VecDeque::new(),
        }
    }

    /// Connect over TLS with this client identity.
    pub fn with_tls(mut self, tls: Option<crate::agent::ClientTls>) -> Self {
        self.tls = tls;
        self
    }

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
            let endpoint = match crate::agent::endpoint(&url, self.tls.as_ref()) {
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
                        let end = self.stream(channel, &url, &mut list_open).await;
                        self.metrics.connected.store(false, Relaxed);
                        match end {
                            StreamEnd::Done => return self.lose_in_flight(),
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

    /// Nobody to flush to: what is left counts as dropped, and what was in
    /// flight on a broken stream as lost.
    fn drop_queued(&mut self) {
        self.lose_in_flight();
        self.queue.close();
        while let Ok(b) = self.queue.try_recv() {
            self.metrics.queue_batches.fetch_sub(1, Relaxed);
            self.metrics.policy.add_dropped(&b.tally);
            self.metrics
                .queue_dropped_packets
                .fetch_add(b.packets(), Relaxed);
        }
    }

    /// Batches in flight up to `through` were taken in.
    fn acknowledge(&mut self, through: u64) {
        self.acknowledged = self.acknowledged.max(through);
        while self
            .in_flight
            .front()
            .is_some_and(|b| b.sequence <= through)
        {
            let Some(b) = self.in_flight.pop_front() else {
                break;
            };
            self.metrics.policy.add_sent(&b.tally);
            self.metrics.sent_batches.fetch_add(1, Relaxed);
            self.metrics.sent_packets.fetch_add(b.packets, Relaxed);
            self.metrics.sent_bytes.fetch_add(b.bytes, Relaxed);
        }
        self.metrics
            .in_flight_batches
            .store(self.in_flight.len() as u64, Relaxed);
    }

    /// The batches still in doubt never arrived.
    fn lose_in_flight(&mut self) {
        self.lose_before(u64::MAX);
    }

    /// The batches in flight before `sequence` never arrived.
    fn lose_before(&mut self, sequence: u64) {
        while self
            .in_flight
            .front()
            .is_some_and(|b| b.sequence < sequence)
        {
            let Some(b) = self.in_flight.pop_front() else {
                break;
            };
            self.metrics.policy.add_dropped(&b.tally);
            self.metrics.lost_in_flight_batches.fetch_add(1, Relaxed);
            self.metrics
                .lost_in_flight_packets
                .fetch_add(b.packets, Relaxed);
        }
        self.metrics
            .in_flight_batches
            .store(self.in_flight.len() as u64, Relaxed);
    }

    /// The next batch on the wire.
    fn wire_batch(&mut self, hello: Option<Hello>, batch: Option<Batch>) -> WireBatch {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let (records, record_count) = match batch {
            Some(b) => {
                let packets = b.packets();
                let bytes = b.records.captured_bytes() as u64;
                self.in_flight.push_back(InFlight {
                    sequence,
                    packets,
                    bytes,
                    tally: b.tally,
                });
                b.records.finish()
            }
            None => {
                self.in_flight.push_back(InFlight {
                    sequence,
                    packets: 0,
                    bytes: 0,
                    tally: BitTally::default(),
                });
                Default::default()
            }
        };
        self.metrics
            .in_flight_batches
            .store(self.in_flight.len() as u64, Relaxed);
        WireBatch {
            sequence,
            hello,
            record_format: FORMAT_V1,
            record_count,
            records,
            dropped_since_last: self.drops.take(),
            resumed_after: 0,
        }
    }

    async fn stream(&mut self, channel: Channel, url: &str, list_open: &mut bool) -> StreamEnd {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let tx = MessageSender(tx);
        // The first batch says where this tap resumes; the aggregator's
        // first acknowledgement settles the batches in doubt.
        let hello = self.hello.borrow_and_update().clone();
        let mut first = self.wire_batch(Some(hello), None);
        first.resumed_after = self.acknowledged;
        let first_sequence = first.sequence;
        if tx.send(first).await.is_err() {
            return StreamEnd::Failed;
        }
        let mut acks = match open_stream(channel, rx).await {
            Ok(r) => {
                // Connected means a stream is open, not just a connection.
                self.metrics.connected.store(true, Relaxed);
                r
            }
            Err(status) => {
                warn!("stream refused: {status}");
                return StreamEnd::Failed;
            }
        };
        let mut settled = false;
        let mut hello_open = true;
        let mut draining = false;
        loop {
            let can_send = !draining && self.in_flight.len() < MAX_IN_FLIGHT;
            tokio::select! {
                ack = acks.message() => {
                    match ack {
                        Ok(Some(Ack { through_sequence, resumed_through })) => {
                            if !settled {
                                // Of the batches in doubt, the aggregator
                                // had those up to `resumed_through`; the
                                // rest before this stream were lost.
                                settled = true;
                                self.acknowledge(resumed_through);
                                self.lose_before(first_sequence);
                            }
                            self.acknowledge(through_sequence);
                            if draining && self.in_flight.is_empty() {
                                return StreamEnd::Done;
                            }
                        }
                        Ok(None) => {
                            if draining {
                                return StreamEnd::Done;
                            }
                            warn!(aggregator = url, "aggregator ended the stream");
                            return StreamEnd::Failed;
                        }
                        Err(status) => {
                            warn!(aggregator = url, "stream failed: {status}");
                            return StreamEnd::Failed;
                        }
                    }
                }
                // Sources changed: tell the aggregator now, not with the next packet.
                r = self.hello.changed(), if hello_open && can_send => {
                    if r.is_err() {
                        hello_open = false;
                        continue;
                    }
                    let hello = self.hello.borrow_and_update().clone();
                    let msg = self.wire_batch(Some(hello), None);
                    if tx.send(msg).await.is_err() {
                        return StreamEnd::Failed;
                    }
                }
                r = self.aggregators.changed(), if *list_open && !draining => {
                    *list_open = r.is_ok();
                    if r.is_ok() && !self.aggregators.borrow_and_update().iter().any(|u| u == url) {
                        info!(aggregator = url, "the aggregator endpoint is gone: moving to another");
                        return StreamEnd::Moved;
                    }
                }
                batch = self.queue.recv(), if can_send => {
                    let Some(batch) = batch else {
                        // Queue closed and drained: wait for the last
                        // acknowledgements, then end the stream.
                        draining = true;
                        if self.in_flight.is_empty() {
                            return StreamEnd::Done;
                        }
                        continue;
                    };
                    self.metrics.queue_batches.fetch_sub(1, Relaxed);
                    let hello = if self.hello.has_changed().unwrap_or(false) {
                        Some(self.hello.borrow_and_update().clone())
                    } else {
                        None
                    };
                    let msg = self.wire_batch(hello, Some(batch));
                    if tx.send(msg).await.is_err() {
                        return StreamEnd::Failed;
                    }
                }
                _ = tokio::time::sleep(self.drain_timeout), if draining => {
                    warn!(aggregator = url, in_flight = self.in_flight.len(), "no acknowledgement for the last batches");
                    return StreamEnd::Done;
                }
            }
        }
    }
}

/// The request side of an ingest stream: each batch goes out as its gRPC
/// message's two pieces (see [`grpc_message`]), the records block as it
/// was built.
struct MessageSender(mpsc::Sender<Bytes>);

impl MessageSender {
    async fn send(&self, batch: WireBatch) -> Result<(), ()> {
        for piece in grpc_message(batch) {
            if !piece.is_empty() {
                self.0.send(piece).await.map_err(|_| ())?;
            }
        }
        Ok(())
    }
}

/// Opens `tapestry.tap.v2.TapIngest/Stream` with a request body made of
/// ready message pieces, so no encoder copies the records; the
/// acknowledgements are decoded as the generated client would.
async fn open_stream(
    mut channel: Channel,
    pieces: mpsc::Receiver<Bytes>,
) -> Result<Streaming<Ack>, Status> {
    let body = http_body_util::StreamBody::new(
        ReceiverStream::new(pieces)
            .map(|b| Ok::<_, std::convert::Infallible>(http_body::Frame::data(b))),
    );
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(INGEST_STREAM_PATH)
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::new(body))
        .map_err(|e| Status::internal(format!("building the ingest request: {e}")))?;
    futures::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    // A refusal may come as headers only.
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    let http_status = response.status();
    let decoder = tonic_prost::ProstCodec::<WireBatch, Ack>::default().decoder();
    Ok(Streaming::new_response(
        decoder,
        response.into_body(),
        http_status,
        None,
        None,
    ))
}

/// The generated client's path for the ingest stream.
const INGEST_STREAM_PATH: &str = "/tapestry.tap.v2.TapIngest/Stream";
