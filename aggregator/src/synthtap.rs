//! A synthetic tap: streams generated traffic to an aggregator over the
//! real ingest protocol, for tests and the benchmark.

use std::time::{Duration, Instant};

use tapestry_proto::tap::v1::tap_ingest_client::TapIngestClient;
use tapestry_proto::tap::v1::{Hello, IngestSummary, Packet, PacketBatch, PodIdentity, Source};

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

/// Sends `frames` (each with its policy mask) and waits for the summary.
pub async fn run(
    endpoint: String,
    spec: TapSpec,
    frames: Vec<(Frame, u64)>,
) -> anyhow::Result<IngestSummary> {
    let mut client = TapIngestClient::connect(endpoint)
        .await?
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel::<PacketBatch>(4);
    let hello = hello(&spec);
    let sources = spec.pods.len().max(1) as u32;
    let producer = tokio::spawn(async move {
        let start = Instant::now();
        let mut sent = 0u64;
        for (seq, chunk) in frames.chunks(spec.batch.max(1)).enumerate() {
            if let Some(rate) = spec.rate {
                let due = start + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let now = crate::event::now_ns();
            let packets = chunk
                .iter()
                .enumerate()
                .map(|(i, (f, mask))| Packet {
                    timestamp_ns: if spec.stamp_now { now } else { f.ts_ns },
                    source_id: (sent as u32 + i as u32) % sources + 1,
                    direction: 1 + ((sent as i32 + i as i32) & 1),
                    wire_length: f.data.len() as u32,
                    data: f.data.clone(),
                    policy_mask: *mask,
                })
                .collect();
            sent += chunk.len() as u64;
            let b = PacketBatch {
                hello: (seq == 0).then(|| hello.clone()),
                sequence: seq as u64,
                packets,
                dropped_since_last: 0,
            };
            if tx.send(b).await.is_err() {
                break;
            }
        }
    });
    let resp = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    producer.await?;
    Ok(resp.into_inner())
}
