//! A synthetic tap: streams generated traffic to an aggregator over the
//! real ingest protocol, for tests and the benchmark.

use std::time::{Duration, Instant};

use tapestry_proto::records::{Record, RecordsBuilder, FORMAT_V1};
use tapestry_proto::tap::v1::{Hello, PodIdentity, Source};
use tapestry_proto::tap::v2::tap_ingest_client::TapIngestClient;
use tapestry_proto::tap::v2::Batch;

use crate::synth::Frame;

pub struct TapSpec {
    pub tap_id: String,
    /// (namespace, pod) per source; packets cycle through them.
    pub pods: Vec<(String, String)>,
    pub policy_names: Vec<String>,
    /// Packets per batch.
    pub batch: usize,
    /// Packets per second; `None` sends as fast as the stream allows.
    pub rate: Option<f64>,
    /// Stamp packets with the send time instead of the frame's time (for
    /// latency measurements).
    pub stamp_now: bool,
}

pub fn hello(spec: &TapSpec) -> Hello {
    Hello {
        tap_id: spec.tap_id.clone(),
        node: spec.tap_id.clone(),
        sources: spec
            .pods
            .iter()
            .enumerate()
            .map(|(i, (ns, pod))| Source {
                id: i as u32 + 1,
                interface: format!("veth{i}"),
                ifindex: 100 + i as u32,
                pod: Some(PodIdentity {
                    namespace: ns.clone(),
                    name: pod.clone(),
                    uid: format!("uid-{i}"),
                    labels: Default::default(),
                    node: spec.tap_id.clone(),
                }),
            })
            .collect(),
        policy_names: spec.policy_names.clone(),
    }
}

/// The plaintext endpoint of an aggregator's gRPC address.
pub fn plaintext(grpc: &str) -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(tonic::transport::Endpoint::from_shared(format!(
        "http://{grpc}"
    ))?)
}

/// What a synthetic tap sent, and how far the aggregator acknowledged it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub batches: u64,
    pub packets: u64,
    /// The last sequence acknowledged (batches are numbered from 1).
    pub acknowledged_through: u64,
}

/// Sends `frames` (each with its policy mask) and waits until the
/// aggregator has acknowledged them and ended the stream.
pub async fn run(
    endpoint: tonic::transport::Endpoint,
    spec: TapSpec,
    frames: Vec<(Frame, u64)>,
) -> anyhow::Result<Summary> {
    let mut client =
        TapIngestClient::new(endpoint.connect().await?).max_encoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(4);
    let hello = hello(&spec);
    let sources = spec.pods.len().max(1) as u32;
    let producer = tokio::spawn(async move {
        let start = Instant::now();
        let mut sent = 0u64;
        let mut batches = 0u64;
        for (seq, chunk) in frames.chunks(spec.batch.max(1)).enumerate() {
            if let Some(rate) = spec.rate {
                let due = start + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let now = crate::event::now_ns();
            let bytes: usize = chunk.iter().map(|(f, _)| f.data.len()).sum();
            let mut records = RecordsBuilder::with_capacity(bytes + 40 * chunk.len());
            for (i, (f, mask)) in chunk.iter().enumerate() {
                let record = Record {
                    timestamp_ns: if spec.stamp_now { now } else { f.ts_ns },
                    source_id: (sent as u32 + i as u32) % sources + 1,
                    direction: 1 + ((sent as u8 + i as u8) & 1),
                    wire_length: f.data.len() as u32,
                    policy_mask: *mask,
                };
                records.push(&record, &f.data);
            }
            sent += chunk.len() as u64;
            let (records, record_count) = records.finish();
            let b = Batch {
                sequence: seq as u64 + 1,
                hello: (seq == 0).then(|| hello.clone()),
                record_format: FORMAT_V1,
                record_count,
                records,
                dropped_since_last: 0,
                resumed_after: 0,
            };
            if tx.send(b).await.is_err() {
                break;
            }
            batches += 1;
        }
        (batches, sent)
    });
    let mut acks = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut acknowledged_through = 0;
    while let Some(ack) = acks.message().await? {
        acknowledged_through = acknowledged_through.max(ack.through_sequence);
    }
    let (batches, packets) = producer.await?;
    Ok(Summary {
        batches,
        packets,
        acknowledged_through,
    })
}
