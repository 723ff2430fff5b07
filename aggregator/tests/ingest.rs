//! The ingest stream as a tap speaks it: packed records read in place,
//! acknowledgements, and every batch that never arrived counted as a gap,
//! within a stream and across a tap's streams.

mod common;

use bytes::Bytes;
use common::{exchange, frame, runtime, tap_batch, Aggregator, ONE_SINK};
use tapestry_proto::records::{Record, RecordsBuilder};
use tapestry_proto::tap::v2::Batch;

/// A batch of the tap of node-a; the first of a stream carries the Hello.
fn batch(sequence: u64, packets: u8, first: bool, resumed_after: u64) -> Batch {
    tap_batch("node-a", sequence, packets, first, resumed_after)
}

fn plaintext(grpc: &str) -> tonic::transport::Endpoint {
    tapestry_aggregator::synthtap::plaintext(grpc).unwrap()
}

/// Sends `batches` on one stream; returns the acknowledgements received
/// (cumulative: some may be skipped) until the aggregator ended it, as
/// (through, resumed through).
async fn stream(grpc: &str, batches: Vec<Batch>) -> Vec<(u64, u64)> {
    let out = exchange(plaintext(grpc), batches).await.unwrap();
    assert!(out.failure.is_none(), "{:?}", out.failure);
    out.acks
}

/// Sends `batches` and returns the status the stream ended with.
async fn refusal(grpc: &str, batches: Vec<Batch>) -> Option<tonic::Status> {
    exchange(plaintext(grpc), batches).await.unwrap().failure
}

#[test]
fn batches_are_acknowledged_and_missing_ones_counted_across_streams() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(ONE_SINK, dir.path());
    let rt = runtime();
    // One stream: batch 3 never arrives.
    let acks = rt.block_on(stream(
        &agg.grpc,
        vec![
            batch(1, 3, true, 0),
            batch(2, 2, false, 0),
            batch(4, 1, false, 0),
        ],
    ));
    assert_eq!(
        acks.last(),
        Some(&(4, 0)),
        "a new tap starts from nothing: {acks:?}"
    );
    let tap = "{tap=\"node-a\"}";
    let metric = |name: &str| agg.metric(&format!("tapestry_aggregator_tap_{name}{tap}"));
    assert_eq!(metric("packets_total"), 6.0);
    assert_eq!(metric("sequence_gap_batches_total"), 1.0);
    // The tap reconnects having seen acknowledgements up to 2 only: the
    // aggregator knows it took in 4, says so first, and counts 5 and 6,
    // which never came, as lost.
    let acks = rt.block_on(stream(&agg.grpc, vec![batch(7, 2, true, 2)]));
    assert!(acks.iter().all(|a| a.1 == 4), "{acks:?}");
    assert_eq!(acks.last(), Some(&(7, 4)), "{acks:?}");
    assert_eq!(metric("sequence_gap_batches_total"), 3.0);
    assert_eq!(metric("packets_total"), 8.0);
    assert_eq!(metric("streams_total"), 2.0);
    assert_eq!(metric("connected"), 0.0);

    // Malformed records: what can be read is taken in, the rest counted;
    // the stream goes on.
    let mut broken = batch(8, 2, true, 7);
    broken.records = broken.records.slice(..broken.records.len() - 8);
    let mut junk = batch(9, 0, false, 0);
    junk.records = Bytes::from_static(&[0xff; 40]);
    let acks = rt.block_on(stream(
        &agg.grpc,
        vec![broken, junk, batch(10, 1, false, 0)],
    ));
    assert_eq!(acks.last(), Some(&(10, 7)), "{acks:?}");
    assert_eq!(metric("malformed_batches_total"), 2.0);
    assert_eq!(metric("packets_total"), 10.0, "one of two broken, then one");
    assert_eq!(metric("sequence_gap_batches_total"), 3.0);

    // No Hello first: refused with a reason, nothing counted.
    let refused = rt.block_on(refusal(&agg.grpc, vec![batch(1, 1, false, 0)]));
    let status = refused.expect("a stream without a Hello is refused");
    assert!(status.message().contains("Hello"), "{status:?}");
}

/// Taps of another version get a clear error, never garbage: records in a
/// format this aggregator does not read, and the previous protocol.
#[test]
fn other_versions_are_told_which_version_is_spoken() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(ONE_SINK, dir.path());
    let rt = runtime();
    let mut future = batch(1, 2, true, 0);
    future.record_format = 2;
    let status = rt
        .block_on(refusal(&agg.grpc, vec![future]))
        .expect("an unknown record format is refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("record format 2 is not supported")
            && status.message().contains("reads format 1"),
        "{status:?}"
    );
    assert_eq!(
        agg.metric("tapestry_aggregator_tap_packets_total{tap=\"node-a\"}"),
        0.0
    );
    // The previous protocol's service, as an old tap calls it.
    let status = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", agg.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/tapestry.tap.v1.TapIngest/Stream",
        );
        let codec = tonic_prost::ProstCodec::<Batch, Batch>::default();
        let request = tonic::Request::new(tokio_stream::iter(vec![batch(1, 1, true, 0)]));
        grpc.client_streaming(request, path, codec)
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("tapestry.tap.v1 ingest is not served"),
        "{status:?}"
    );
}

/// SIGTERM: the aggregator stops taking in, acknowledges what it took and
/// ends every tap's stream before it exits, so no batch is left in doubt.
#[test]
fn a_stopping_aggregator_ends_streams_with_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut agg = Aggregator::start(ONE_SINK, dir.path());
    let rt = runtime();
    let pid = agg.child.id() as i32;
    let (last, ended_after) = rt.block_on(async {
        let mut client = tapestry_proto::tap::v2::tap_ingest_client::TapIngestClient::connect(
            format!("http://{}", agg.grpc),
        )
        .await
        .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(batch(1, 2, true, 0)).await.unwrap();
        tx.send(batch(2, 2, false, 0)).await.unwrap();
        tx.send(batch(3, 2, false, 0)).await.unwrap();
        let mut acks = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut last = 0;
        while last < 3 {
            last = acks.message().await.unwrap().unwrap().through_sequence;
        }
        // SAFETY: signalling a child process this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let signalled = std::time::Instant::now();
        // The tap keeps its side open: the aggregator ends the stream.
        while let Ok(Some(a)) = acks.message().await {
            last = a.through_sequence;
        }
        drop(tx);
        (last, signalled.elapsed())
    });
    assert_eq!(last, 3);
    assert!(
        ended_after < std::time::Duration::from_secs(3),
        "the stream ended {ended_after:?} after SIGTERM"
    );
    let status = agg.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A record longer than any pcap reader takes is cut to libpcap's largest
/// snapshot at ingest (and counted), and a stream naming thousands of
/// sources gets a bounded table: the tool still reads a valid stream.
#[test]
fn oversized_records_are_cut_and_sources_bounded() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(ONE_SINK, dir.path());
    let mut tool = std::net::TcpStream::connect(&agg.sinks["out"]).unwrap();
    tool.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    agg.wait_metric(
        "tapestry_aggregator_sink_clients{sink=\"out\",type=\"pcap_over_ip\"}",
        1.0,
        10,
    );
    let mut records = RecordsBuilder::default();
    let mut huge = frame(1);
    huge.resize(300_000, 0xab);
    let record = |source_id: u32, len: usize| Record {
        timestamp_ns: 1_700_000_000_000_000_000,
        wire_length: len as u32,
        source_id,
        direction: 1,
        policy_mask: 1,
    };
    records.push(&record(1, huge.len()), &huge);
    for id in 0..10_000u32 {
        records.push(&record(id, 60), &frame(2));
    }
    let (records, record_count) = records.finish();
    let mut first = batch(1, 0, true, 0);
    first.records = records;
    first.record_count = record_count;
    let rt = runtime();
    let acks = rt.block_on(stream(&agg.grpc, vec![first]));
    assert_eq!(acks.last().map(|a| a.0), Some(1), "{acks:?}");
    let tap = "{tap=\"node-a\"}";
    assert_eq!(
        agg.metric(&format!(
            "tapestry_aggregator_tap_truncated_records_total{tap}"
        )),
        1.0
    );
    assert_eq!(
        agg.metric(&format!("tapestry_aggregator_tap_packets_total{tap}")),
        10_001.0
    );
    // The pcap stream: the global header, then the cut record.
    let mut header = [0u8; 24 + 16];
    tool.read_exact(&mut header).unwrap();
    let incl = u32::from_le_bytes(header[32..36].try_into().unwrap());
    let orig = u32::from_le_bytes(header[36..40].try_into().unwrap());
    assert_eq!(incl, tapestry_proto::policy::MAX_SNAPLEN);
    assert_eq!(orig, 300_000);
}

/// One tap identity holds at most a few streams open; the next one is
/// refused and counted, and a stream ending makes room again.
#[test]
fn streams_per_tap_are_capped() {
    use tapestry_aggregator::sources::grpc::MAX_STREAMS_PER_TAP;
    use tapestry_proto::tap::v2::tap_ingest_client::TapIngestClient;
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(ONE_SINK, dir.path());
    let rt = runtime();
    rt.block_on(async {
        // Streams held open: each has sent its Hello and been acknowledged.
        let mut open = Vec::new();
        for i in 0..MAX_STREAMS_PER_TAP {
            let mut client = TapIngestClient::new(plaintext(&agg.grpc).connect().await.unwrap());
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(batch(i + 1, 1, true, 0)).await.unwrap();
            let mut acks = client
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            acks.message().await.unwrap().unwrap();
            open.push((tx, acks));
        }
        let status = refusal(&agg.grpc, vec![batch(10, 1, true, 0)])
            .await
            .expect("one stream too many is refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            agg.metric("tapestry_aggregator_ingest_refused_total{reason=\"too-many-streams\"}"),
            1.0
        );
        // One ends: the next is taken.
        drop(open.pop());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while agg.metric("tapestry_aggregator_tap_connected{tap=\"node-a\"}")
            >= MAX_STREAMS_PER_TAP as f64
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the stream did not end"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(!stream(&agg.grpc, vec![batch(11, 1, true, 0)])
            .await
            .is_empty());
    });
}

/// A stream speaks for one tap: a later Hello naming another is refused,
/// and neither tap is left counted as connected.
#[test]
fn a_stream_cannot_change_its_tap() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(ONE_SINK, dir.path());
    let rt = runtime();
    let status = rt
        .block_on(refusal(
            &agg.grpc,
            vec![batch(1, 1, true, 0), tap_batch("node-b", 2, 1, true, 0)],
        ))
        .expect("the second Hello is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let connected = |tap: &str| {
        agg.metric(&format!(
            "tapestry_aggregator_tap_connected{{tap=\"{tap}\"}}"
        ))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while connected("node-a") != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "node-a still connected"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(connected("node-b"), 0.0);
}
