//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use tapestry_aggregator::capture::CaptureFile;

/// (timestamp ns, wire length, bytes) of every packet in a pcap/pcapng file.
pub fn read_packets(path: &Path) -> Vec<(u64, u32, Vec<u8>)> {
    let f = CaptureFile::open(path).unwrap();
    let mut out = Vec::new();
    let s = f
        .for_each(|_, p| {
            out.push((p.ts_ns, p.wire_len, p.data.to_vec()));
            true
        })
        .unwrap();
    assert!(
        s.truncated.is_none(),
        "{}: {:?}",
        path.display(),
        s.truncated
    );
    out
}

/// Real tools are part of the test; a missing one is an error in CI and a
/// loud skip elsewhere... but these tests cannot run without it, so we fail.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is required for this test (Debian package: {})",
        debian_package(name)
    );
}

fn debian_package(tool: &str) -> &'static str {
    match tool {
        "tcpdump" => "tcpdump",
        "tshark" => "tshark",
        "editcap" | "capinfos" => "wireshark-common",
        _ => "?",
    }
}

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// One PCAP-over-IP sink `out` on loopback, taking all traffic.
pub const ONE_SINK: &str =
    "sinks:\n  - { name: out, type: pcap_over_ip, listen: \"127.0.0.1:0\" }\npolicies:\n  - { name: all, sinks: [out] }\n";

/// A current-thread runtime for a test's async client side.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A running `aggregator serve`, killed on drop.
pub struct Aggregator {
    pub child: Child,
    pub grpc: String,
    pub http: String,
    pub sinks: HashMap<String, String>,
}

impl Aggregator {
    pub fn start(config: &str, dir: &Path) -> Aggregator {
        Self::start_with(config, dir, &[])
    }

    /// With more `serve` flags.
    pub fn start_with(config: &str, dir: &Path, flags: &[&str]) -> Aggregator {
        let cfg = dir.join("aggregator.yaml");
        std::fs::write(&cfg, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_aggregator"))
            .args([
                "serve",
                "--grpc",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&cfg)
            .args(flags)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut grpc, mut http, mut sinks) = (String::new(), String::new(), HashMap::new());
        while grpc.is_empty()
            || http.is_empty()
            || sinks.len() < config.matches("pcap_over_ip").count()
        {
            let line = lines
                .next()
                .expect("aggregator exited before announcing its ports")
                .unwrap();
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["grpc", a] => grpc = a.to_string(),
                ["http", a] => http = a.to_string(),
                ["sink", n, a] => {
                    sinks.insert(n.to_string(), a.to_string());
                }
                _ => {}
            }
        }
        Aggregator {
            child,
            grpc,
            http,
            sinks,
        }
    }

    pub fn metrics(&self) -> String {
        http_get(&self.http, "/metrics")
    }

    /// The value of one metric line (`name{labels}`), 0 if absent.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(name_and_labels)
                    .and_then(|r| r.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub fn wait_metric(&self, name_and_labels: &str, want: f64, secs: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let v = self.metric(name_and_labels);
            if v >= want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name_and_labels} stayed at {v}, wanted {want}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    pub fn rss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 GET (the body of the response).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Writes `frames` as a pcap file and returns what tcpdump keeps of it for
/// `expr`.
pub fn tcpdump_expected(
    dir: &Path,
    frames: &[tapestry_aggregator::synth::Frame],
    expr: &str,
) -> Vec<(u64, u32, Vec<u8>)> {
    let mix = dir.join("mix.pcap");
    let f = std::fs::File::create(&mix).unwrap();
    tapestry_aggregator::synth::write_pcap(
        std::io::BufWriter::new(f),
        frames.iter().cloned(),
        262_144,
    )
    .unwrap();
    let out = dir.join("expected.pcap");
    let st = Command::new("tcpdump")
        .arg("-r")
        .arg(&mix)
        .arg("-w")
        .arg(&out)
        .arg(expr)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    read_packets(&out)
}

/// Sends frames from one synthetic tap and waits for the stream to close.
pub fn send(
    grpc: &str,
    tap: &str,
    frames: Vec<tapestry_aggregator::synth::Frame>,
    rate: Option<f64>,
) {
    let spec = tapestry_aggregator::synthtap::TapSpec {
        tap_id: tap.into(),
        pods: vec![
            ("web".into(), "frontend-0".into()),
            ("db".into(), "postgres-0".into()),
        ],
        policy_names: vec![],
        batch: 64,
        rate,
        stamp_now: false,
    };
    let frames = frames.into_iter().map(|f| (f, 0)).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(tapestry_aggregator::synthtap::run(
        tapestry_aggregator::synthtap::plaintext(grpc).unwrap(),
        spec,
        frames,
    ))
    .unwrap();
}

use tapestry_proto::records::{Record, RecordsBuilder, FORMAT_V1};
use tapestry_proto::tap::v2::{tap_ingest_client::TapIngestClient, Batch};

/// A 60-byte IPv4 frame ending in `i`.
pub fn frame(i: u8) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[12] = 0x08;
    f[59] = i;
    f
}

/// An ingest batch of the tap of `node` with `packets` frames (policy bit
/// 0, source 1), its Hello (one pod, policy "all") when `hello`.
pub fn tap_batch(node: &str, sequence: u64, packets: u8, hello: bool, resumed_after: u64) -> Batch {
    let mut records = RecordsBuilder::default();
    for i in 0..packets {
        let data = frame(i);
        records.push(
            &Record {
                timestamp_ns: 1_700_000_000_000_000_000,
                wire_length: data.len() as u32,
                source_id: 1,
                direction: 1,
                policy_mask: 1,
            },
            &data,
        );
    }
    let (records, record_count) = records.finish();
    let spec = tapestry_aggregator::synthtap::TapSpec {
        tap_id: node.into(),
        pods: vec![("web".into(), "frontend-0".into())],
        policy_names: vec!["all".into()],
        batch: 1,
        rate: None,
        stamp_now: false,
    };
    Batch {
        sequence,
        hello: hello.then(|| tapestry_aggregator::synthtap::hello(&spec)),
        record_format: FORMAT_V1,
        record_count,
        records,
        dropped_since_last: 0,
        resumed_after,
    }
}

/// What one ingest stream got: the acknowledgements (through, resumed
/// through; cumulative, so some may be skipped) and the status it ended
/// with if it failed.
pub struct Exchange {
    pub acks: Vec<(u64, u64)>,
    pub failure: Option<tonic::Status>,
}

/// Sends `batches` on one ingest stream to `endpoint` and reads the
/// acknowledgements until the aggregator ends it; a failed connection
/// (refused handshake) is the error.
pub async fn exchange(
    endpoint: tonic::transport::Endpoint,
    batches: Vec<Batch>,
) -> Result<Exchange, String> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = TapIngestClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(batches.len().max(1));
    for b in batches {
        tx.send(b).await.unwrap();
    }
    drop(tx);
    let mut out = Exchange {
        acks: Vec::new(),
        failure: None,
    };
    let mut acks = match client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => {
            out.failure = Some(status);
            return Ok(out);
        }
    };
    loop {
        match acks.message().await {
            Ok(Some(a)) => out.acks.push((a.through_sequence, a.resumed_through)),
            Ok(None) => return Ok(out),
            Err(status) => {
                out.failure = Some(status);
                return Ok(out);
            }
        }
    }
}
