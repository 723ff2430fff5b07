//! `aggregator serve` end to end, with a synthetic tap on the real ingest
//! protocol and real tools (tshark, curl) on the sinks.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tapestry_aggregator::parse::Layers;
use tapestry_aggregator::synth;

const FILTER: &str = "tcp port 80 or udp port 53 or (vlan and icmp)";

#[test]
fn tshark_http_and_files_get_exactly_the_filtered_packets() {
    require_tool("tshark");
    require_tool("tcpdump");
    require_tool("curl");
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let agg = Aggregator::start(
        &format!(
            r#"
sinks:
  - {{ name: wireshark, type: pcap_over_ip, listen: "127.0.0.1:0" }}
  - {{ name: stream, type: http }}
  - {{ name: archive, type: pcapng_file, directory: "{}", rotate_bytes: 100000, max_files: 0 }}
policies:
  - name: web
    filter: "{FILTER}"
    sinks: [wireshark, stream, archive]
"#,
            files.display()
        ),
        dir.path(),
    );
    let frames = synth::frames(11, 10_000);
    let expected = tcpdump_expected(dir.path(), &frames, FILTER);
    assert!(expected.len() > 300, "the mix should exercise the filter");

    let ts_out = dir.path().join("tshark.pcapng");
    let mut tshark = Command::new("tshark")
        .arg("-i")
        .arg(format!("TCP@{}", agg.sinks["wireshark"]))
        .arg("-c")
        .arg(expected.len().to_string())
        .arg("-w")
        .arg(&ts_out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http_out = dir.path().join("http.pcap");
    let mut curl = Command::new("curl")
        .args(["-sN", "--max-time", "60", "-o"])
        .arg(&http_out)
        .arg(format!("http://{}/v1/tools/stream/pcap", agg.http))
        .spawn()
        .unwrap();
    agg.wait_metric(
        "tapestry_aggregator_sink_clients{sink=\"wireshark\",type=\"pcap_over_ip\"}",
        1.0,
        30,
    );
    agg.wait_metric(
        "tapestry_aggregator_sink_clients{sink=\"stream\",type=\"http\"}",
        1.0,
        30,
    );

    send(&agg.grpc, "node-a", frames, None);

    let st = wait_timeout(&mut tshark, 60);
    assert!(st, "tshark did not receive {} packets", expected.len());
    agg.wait_metric(
        "tapestry_aggregator_sink_packets_total{sink=\"stream\",type=\"http\"}",
        expected.len() as f64,
        30,
    );
    agg.wait_metric(
        "tapestry_aggregator_sink_packets_total{sink=\"archive\",type=\"pcapng_file\"}",
        expected.len() as f64,
        30,
    );
    // Let curl and the file sink flush, then stop curl.
    std::thread::sleep(Duration::from_millis(1_500));
    let _ = curl.kill();
    let _ = curl.wait();

    assert_eq!(read_packets(&ts_out), expected, "tshark (PCAP-over-IP)");
    assert_eq!(read_packets(&http_out), expected, "HTTP stream");

    // Files: rotated, each a valid pcapng tshark opens, pods as interfaces,
    // and together exactly the expected packets.
    let mut paths: Vec<_> = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    assert!(paths.len() >= 3, "expected rotation by size, got {paths:?}");
    let mut all = Vec::new();
    let mut names = HashSet::new();
    for p in &paths {
        all.extend(read_packets(p));
        let o = Command::new("tshark")
            .arg("-r")
            .arg(p)
            .args([
                "-T",
                "fields",
                "-e",
                "frame.interface_name",
                "-e",
                "frame.packet_flags_direction",
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            let mut f = l.split('\t');
            names.insert(f.next().unwrap_or("").to_string());
            let dir = f.next().unwrap_or("");
            assert!(
                dir == "1" || dir == "2" || dir == "0x00000001" || dir == "0x00000002",
                "direction flag {dir:?}"
            );
        }
    }
    assert_eq!(all, expected, "pcapng files");
    let want: HashSet<String> = ["web/frontend-0", "db/postgres-0"].map(String::from).into();
    assert_eq!(names, want);
}

fn wait_timeout(c: &mut std::process::Child, secs: u64) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if let Some(st) = c.try_wait().unwrap() {
            return st.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    false
}

/// Symmetric flow key of a frame, or None for non-IP.
fn flow(data: &[u8]) -> Option<u64> {
    let l = Layers::parse(data);
    l.l3.map(|_| l.symmetric_flow_hash())
}

#[test]
fn tool_group_keeps_flows_whole_and_splits_evenly() {
    let socks: Vec<_> = (0..3)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(1_500)))
                .unwrap();
            // Room for the whole run, so a reader thread descheduled on a
            // busy machine does not lose datagrams (UDP drops on overflow).
            let room: libc::c_int = 16 << 20;
            for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
                // SAFETY: setsockopt on a socket we own, with an int value.
                let rc = unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&s),
                        libc::SOL_SOCKET,
                        opt,
                        (&room as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc == 0 {
                    break;
                }
            }
            s
        })
        .collect();
    let sinks: String = socks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "  - {{ name: ids-{i}, type: vxlan, remote: \"{}\", vni: {} }}\n",
                s.local_addr().unwrap(),
                100 + i
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        &format!("sinks:\n{sinks}policies:\n  - name: all\n    filter: ip or ip6\n    groups: [{{ name: ids, members: [ids-0, ids-1, ids-2] }}]\n"),
        dir.path(),
    );
    let frames = synth::frames(5, 3_000);
    // What the policy's filter keeps, by libpcap's semantics (untagged IP).
    let prog = tapestry_aggregator::bpf::Program::compile("ip or ip6", 1, 65535).unwrap();
    let ip_count = frames
        .iter()
        .filter(|f| prog.matches(&f.data, f.data.len() as u32))
        .count();
    // Readers run while the tap sends, and the tap is paced, so loopback
    // socket buffers never overflow.
    let readers: Vec<_> = socks
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 65_536];
                while let Ok(n) = s.recv(&mut buf) {
                    got.push(buf[..n].to_vec());
                }
                got
            })
        })
        .collect();
    send(&agg.grpc, "node-a", frames.clone(), Some(5_000.0));

    let mut owner: HashMap<u64, usize> = HashMap::new();
    let mut per_member = [0usize; 3];
    // Identical frames can occur (e.g. empty UDP over IPv6): count copies.
    let mut sent: HashMap<Vec<u8>, usize> = HashMap::new();
    for f in &frames {
        *sent.entry(f.data.clone()).or_default() += 1;
    }
    for (i, r) in readers.into_iter().enumerate() {
        for pkt in r.join().unwrap() {
            assert_eq!(
                &pkt[..8],
                &[0x08, 0, 0, 0, 0, 0, 100 + i as u8, 0],
                "VXLAN header"
            );
            let inner = &pkt[8..];
            let left = sent
                .get_mut(inner)
                .expect("member got a frame that was not sent");
            assert!(
                *left > 0,
                "member {i} got a frame more often than it was sent"
            );
            *left -= 1;
            let f = flow(inner).expect("only IP was selected");
            let prev = *owner.entry(f).or_insert(i);
            assert_eq!(prev, i, "a flow was split across members");
            per_member[i] += 1;
        }
    }
    let m = agg.metrics();
    assert_eq!(
        per_member.iter().sum::<usize>(),
        ip_count,
        "{per_member:?}\n{m}"
    );
    for n in per_member {
        assert!(
            n as f64 > ip_count as f64 * 0.2,
            "uneven split {per_member:?}"
        );
    }
}

#[test]
fn pcap_over_ip_clients_are_bounded_and_reaped_at_once() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        r#"
sinks:
  - { name: few, type: pcap_over_ip, listen: "127.0.0.1:0", max_clients: 2 }
  - { name: many, type: pcap_over_ip, listen: "127.0.0.1:0" }
policies:
  - name: all
    sinks: [few, many]
"#,
        dir.path(),
    );
    let addr = &agg.sinks["few"];
    let clients = |sink: &str| {
        agg.metric(&format!(
            "tapestry_aggregator_sink_clients{{sink=\"{sink}\",type=\"pcap_over_ip\"}}"
        ))
    };
    let header = |c: &mut std::net::TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 24];
        c.read_exact(&mut buf).map(|_| buf)
    };
    let settled = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Two clients are served; a third is closed at once, and counted.
    let mut first = std::net::TcpStream::connect(addr).unwrap();
    let mut second = std::net::TcpStream::connect(addr).unwrap();
    assert_eq!(&header(&mut first).unwrap()[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
    header(&mut second).unwrap();
    let mut third = std::net::TcpStream::connect(addr).unwrap();
    assert!(header(&mut third).is_err(), "a third client was served");
    agg.wait_metric(
        "tapestry_aggregator_sink_refused_total{sink=\"few\",type=\"pcap_over_ip\",reason=\"too_many_clients\"}",
        1.0,
        10,
    );
    // Clients that leave while no packet flows are forgotten at once: the
    // places free up, and connect/close loops leave no descriptor behind.
    drop((first, second, third));
    settled("the two clients stayed", &|| clients("few") == 0.0);
    let mut again = std::net::TcpStream::connect(addr).unwrap();
    header(&mut again).unwrap();
    drop(again);
    settled("the client stayed", &|| clients("few") == 0.0);
    let baseline = agg.open_fds();
    for _ in 0..1000 {
        let mut c = std::net::TcpStream::connect(&agg.sinks["many"]).unwrap();
        header(&mut c).unwrap();
    }
    settled("descriptors or clients stayed after 1,000 loops", &|| {
        clients("many") == 0.0 && agg.open_fds() <= baseline
    });
}

#[test]
fn stalled_client_loses_only_its_own_packets() {
    require_tool("tshark");
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        r#"
sinks:
  - { name: stalled, type: pcap_over_ip, listen: "127.0.0.1:0", client_queue: 8 }
  - { name: healthy, type: pcap_over_ip, listen: "127.0.0.1:0", client_queue: 100000 }
policies:
  - name: all
    sinks: [stalled, healthy]
"#,
        dir.path(),
    );
    // A client that connects and never reads.
    let _stalled = std::net::TcpStream::connect(&agg.sinks["stalled"]).unwrap();
    // A reader that keeps up: count bytes as they come.
    let healthy = std::net::TcpStream::connect(&agg.sinks["healthy"]).unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut healthy = healthy;
        healthy
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut data = Vec::new();
        while let Ok(n) = healthy.read(&mut buf) {
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        data
    });
    agg.wait_metric(
        "tapestry_aggregator_sink_clients{sink=\"stalled\",type=\"pcap_over_ip\"}",
        1.0,
        30,
    );
    agg.wait_metric(
        "tapestry_aggregator_sink_clients{sink=\"healthy\",type=\"pcap_over_ip\"}",
        1.0,
        30,
    );
    let frames = synth::frames(3, 100_000);
    let total = frames.len();
    let rss_before = agg.rss_kb();
    send(&agg.grpc, "node-a", frames[..total / 2].to_vec(), None);
    let rss_mid = agg.rss_kb();
    send(&agg.grpc, "node-b", frames[total / 2..].to_vec(), None);
    agg.wait_metric(
        "tapestry_aggregator_sink_packets_total{sink=\"healthy\",type=\"pcap_over_ip\"}",
        total as f64,
        60,
    );
    let rss_after = agg.rss_kb();
    let data = reader.join().unwrap();
    let path = dir.path().join("healthy.pcap");
    std::fs::write(&path, &data).unwrap();
    assert_eq!(
        read_packets(&path).len(),
        total,
        "the healthy client lost packets"
    );
    assert_eq!(
        agg.metric(
            "tapestry_aggregator_sink_client_dropped_total{sink=\"healthy\",type=\"pcap_over_ip\"}"
        ),
        0.0
    );
    assert_eq!(
        agg.metric(
            "tapestry_aggregator_sink_dropped_total{sink=\"healthy\",type=\"pcap_over_ip\"}"
        ),
        0.0
    );
    assert!(
        agg.metric(
            "tapestry_aggregator_sink_client_dropped_total{sink=\"stalled\",type=\"pcap_over_ip\"}"
        ) > 0.0
    );
    assert_eq!(
        agg.metric("tapestry_aggregator_policy_dropped_total{policy=\"all\"}"),
        0.0
    );
    // Memory: the second half must not grow RSS like the first could
    // (allocator warm-up); the stalled client's backlog is bounded.
    eprintln!("RSS kB: before {rss_before}, middle {rss_mid}, after {rss_after}");
    assert!(
        rss_after < rss_mid + 64 * 1024,
        "RSS grew from {rss_mid} kB to {rss_after} kB"
    );
}

#[test]
fn grpc_subscriber_receives_policy_packets() {
    require_tool("tcpdump");
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        "sinks:\n  - { name: sub, type: grpc }\npolicies:\n  - { name: dns, filter: 'udp port 53', slice: { bytes: 60 }, sinks: [sub] }\n",
        dir.path(),
    );
    let frames = synth::frames(9, 4_000);
    let expected = tcpdump_expected(dir.path(), &frames, "udp port 53");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(async {
        use tapestry_proto::tool::v1::tool_subscribe_client::ToolSubscribeClient;
        use tapestry_proto::tool::v1::SubscribeRequest;
        let mut c = ToolSubscribeClient::connect(format!("http://{}", agg.grpc))
            .await
            .unwrap();
        let err = c
            .subscribe(SubscribeRequest {
                sink: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let mut stream = c
            .subscribe(SubscribeRequest { sink: "sub".into() })
            .await
            .unwrap()
            .into_inner();
        let grpc = agg.grpc.clone();
        let sender = tokio::task::spawn_blocking(move || send(&grpc, "node-a", frames, None));
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let b = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            for p in b.packets {
                assert_eq!(p.policy, "dns");
                assert!(p.interface == "web/frontend-0" || p.interface == "db/postgres-0");
                got.push((p.timestamp_ns, p.wire_length, p.data));
            }
        }
        sender.await.unwrap();
        got
    });
    let want: Vec<_> = expected
        .into_iter()
        .map(|(t, w, d)| (t, w, d[..d.len().min(60)].to_vec()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn bad_config_and_bad_filter_fail_with_field_names() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "sinks:\n  - { name: a, type: http }\npolicies:\n  - { name: p, filter: 'tcp portt 80', sinks: [a] }\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("policies[0].filter: ") && err.contains("syntax error"),
        "{err}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args([
            "serve",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--pcap-over-ip",
            "127.0.0.1:0",
            "--filter",
            "port 99999",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--filter: ") && err.contains("99999"), "{err}");
}

#[test]
fn files_rotate_by_size_and_keep_at_most_max_files() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let agg = Aggregator::start(
        &format!(
            "sinks:\n  - {{ name: f, type: pcapng_file, directory: \"{}\", prefix: web, rotate_bytes: 50000, max_files: 2 }}\npolicies:\n  - {{ name: all, sinks: [f] }}\n",
            files.display()
        ),
        dir.path(),
    );
    assert_eq!(http_get(&agg.http, "/healthz"), "ok\n");
    let frames = synth::frames(17, 5_000);
    send(&agg.grpc, "node-a", frames, None);
    agg.wait_metric(
        "tapestry_aggregator_sink_packets_total{sink=\"f\",type=\"pcapng_file\"}",
        5_000.0,
        30,
    );
    // The once-a-second tick flushes the open file.
    std::thread::sleep(Duration::from_millis(1_500));
    let mut paths: Vec<_> = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    assert!(paths.len() <= 2, "retention: {paths:?}");
    for p in &paths {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.starts_with("web-") && name.ends_with(".pcapng"),
            "{name}"
        );
    }
    // The newest file holds the last packet sent.
    let last = read_packets(paths.last().unwrap());
    let sent_last = synth::frames(17, 5_000).pop().unwrap();
    assert_eq!(last.last().map(|p| p.2.clone()), Some(sent_last.data));
    assert_eq!(
        agg.metric("tapestry_aggregator_sink_dropped_total{sink=\"f\",type=\"pcapng_file\"}"),
        0.0
    );
}

#[test]
fn files_rotate_by_age_even_when_traffic_stops() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let agg = Aggregator::start(
        &format!(
            "sinks:\n  - {{ name: f, type: pcapng_file, directory: \"{}\", prefix: age, rotate_seconds: 1 }}\npolicies:\n  - {{ name: all, sinks: [f] }}\n",
            files.display()
        ),
        dir.path(),
    );
    let list = || {
        let mut paths: Vec<_> = std::fs::read_dir(&files)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        paths
    };
    let first = synth::frames(5, 300);
    send(&agg.grpc, "node-a", first.clone(), None);
    agg.wait_metric(
        "tapestry_aggregator_sink_packets_total{sink=\"f\",type=\"pcapng_file\"}",
        300.0,
        30,
    );
    // No traffic for longer than the rotation age: the file is closed by
    // the sink's clock, not by the next packet.
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(list().len(), 1);
    let second = synth::frames(6, 200);
    send(&agg.grpc, "node-a", second.clone(), None);
    agg.wait_metric(
        "tapestry_aggregator_sink_packets_total{sink=\"f\",type=\"pcapng_file\"}",
        500.0,
        30,
    );
    std::thread::sleep(Duration::from_millis(1_500));
    let paths = list();
    assert_eq!(paths.len(), 2, "{paths:?}");
    let data = |path: &std::path::Path| -> Vec<Vec<u8>> {
        read_packets(path).into_iter().map(|p| p.2).collect()
    };
    let sent = |frames: &[synth::Frame]| -> Vec<Vec<u8>> {
        frames.iter().map(|f| f.data.clone()).collect()
    };
    assert_eq!(data(&paths[0]), sent(&first));
    assert_eq!(data(&paths[1]), sent(&second));
    for p in &paths {
        let o = std::process::Command::new("capinfos")
            .args(["-c", "-M"])
            .arg(p)
            .output()
            .expect("capinfos (wireshark-common) is installed");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

/// Files in `dir`, sorted by name.
fn files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

fn capinfos_reads(path: &std::path::Path) {
    let o = Command::new("capinfos")
        .args(["-c", "-M"])
        .arg(path)
        .output()
        .expect("capinfos (wireshark-common) is installed");
    assert!(
        o.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// SIGTERM right after the last batch is acknowledged: the aggregator
/// delivers what it took in before it exits, and the file it was writing
/// is complete and readable.
#[test]
fn sigterm_writes_out_every_packet_taken_in() {
    require_tool("capinfos");
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let mut agg = Aggregator::start(
        &format!(
            "sinks:\n  - {{ name: f, type: pcapng_file, directory: \"{}\", prefix: term }}\npolicies:\n  - {{ name: all, sinks: [f] }}\n",
            files.display()
        ),
        dir.path(),
    );
    let frames = synth::frames(23, 60_000);
    let sent: Vec<Vec<u8>> = frames.iter().map(|f| f.data.clone()).collect();
    // Every batch acknowledged, most of it still queued or staged.
    send(&agg.grpc, "node-a", frames, None);
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(agg.child.id() as i32, libc::SIGTERM) };
    assert!(
        wait_timeout(&mut agg.child, 20),
        "still running 20 s after SIGTERM"
    );
    let paths = files_in(&files);
    assert_eq!(paths.len(), 1, "{paths:?}");
    capinfos_reads(&paths[0]);
    let written: Vec<Vec<u8>> = read_packets(&paths[0]).into_iter().map(|p| p.2).collect();
    assert_eq!(written.len(), sent.len());
    assert!(written == sent, "the file differs from what was sent");
}

/// Retention counts the files an earlier run left: with `max_files: 2`,
/// only the newest earlier file stays beside the one being written; files
/// that are not this sink's are left alone.
#[test]
fn retention_counts_files_of_earlier_runs() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    for secs in 100..105 {
        std::fs::write(files.join(format!("keep-{secs}-000000.pcapng")), b"old").unwrap();
    }
    std::fs::write(files.join("notes.txt"), b"not a capture").unwrap();
    std::fs::write(files.join("other-100-000000.pcapng"), b"another prefix").unwrap();
    let agg = Aggregator::start(
        &format!(
            "sinks:\n  - {{ name: f, type: pcapng_file, directory: \"{}\", prefix: keep, max_files: 2 }}\npolicies:\n  - {{ name: all, sinks: [f] }}\n",
            files.display()
        ),
        dir.path(),
    );
    send(&agg.grpc, "node-a", synth::frames(3, 100), None);
    agg.wait_metric(
        "tapestry_aggregator_sink_packets_total{sink=\"f\",type=\"pcapng_file\"}",
        100.0,
        30,
    );
    let names: Vec<String> = files_in(&files)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(names[0], "keep-104-000000.pcapng", "{names:?}");
    assert!(
        names[1].starts_with("keep-") && names[1] != names[0],
        "{names:?}"
    );
    assert_eq!(&names[2..], ["notes.txt", "other-100-000000.pcapng"]);
}

/// A file sink on a disk that fills up: what it cannot write is counted
/// as not written (never as delivered), what it wrote stays readable, and
/// the other sinks get every packet. Needs root for the tmpfs; fails
/// loudly in CI without it.
#[test]
fn a_full_disk_is_counted_and_other_sinks_keep_serving() {
    use std::io::Read;
    require_tool("capinfos");
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the full-disk test needs root (a tmpfs) in CI"
        );
        eprintln!("skipping: needs root to mount a small tmpfs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());

    let agg = Aggregator::start(
        &format!(
            r#"
sinks:
  - {{ name: disk, type: pcapng_file, directory: "{}", rotate_bytes: 100000 }}
  - {{ name: live, type: pcap_over_ip, listen: "127.0.0.1:0" }}
policies:
  - name: all
    sinks: [disk, live]
"#,
            small.display()
        ),
        dir.path(),
    );
    let mut reader = std::net::TcpStream::connect(&agg.sinks["live"]).unwrap();
    agg.wait_metric(
        "tapestry_aggregator_sink_clients{sink=\"live\",type=\"pcap_over_ip\"}",
        1.0,
        30,
    );
    let frames = synth::frames(29, 20_000);
    let total = frames.len() as f64;
    let sent_bytes: usize = frames.iter().map(|f| f.data.len()).sum();
    assert!(
        sent_bytes > 1 << 20,
        "enough to fill the disk: {sent_bytes}"
    );
    let read = std::thread::spawn(move || {
        let mut all = Vec::new();
        reader
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let want = 24 + sent_bytes + 16 * 20_000;
        let mut buf = vec![0u8; 1 << 16];
        while all.len() < want {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
        all.len() == want
    });
    send(&agg.grpc, "node-a", frames, None);
    assert!(
        read.join().unwrap(),
        "the PCAP-over-IP client got every packet"
    );
    let disk = |m: &str| agg.metric(&format!("{m}{{sink=\"disk\",type=\"pcapng_file\"}}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while disk("tapestry_aggregator_sink_packets_total")
        + disk("tapestry_aggregator_sink_write_failed_total")
        < total
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let written = disk("tapestry_aggregator_sink_packets_total");
    let failed = disk("tapestry_aggregator_sink_write_failed_total");
    assert_eq!(
        written + failed,
        total,
        "written {written} + failed {failed}"
    );
    assert!(
        failed > 0.0 && written > 0.0,
        "written {written}, failed {failed}"
    );
    assert!(disk("tapestry_aggregator_sink_errors_total") > 0.0);
    assert_eq!(
        agg.metric("tapestry_aggregator_sink_packets_total{sink=\"live\",type=\"pcap_over_ip\"}"),
        total
    );
    // What is on the disk is what was counted as written, in readable files.
    let on_disk: usize = files_in(&small)
        .iter()
        .map(|p| {
            capinfos_reads(p);
            read_packets(p).len()
        })
        .sum();
    assert_eq!(on_disk as f64, written);
    assert_eq!(http_get(&agg.http, "/healthz"), "ok\n");
}

/// 1,000 connect/close loops on the HTTP stream and on gRPC
/// subscriptions: clients are let go at once, and the aggregator's
/// descriptors and memory come back to where they were.
#[test]
fn http_and_grpc_clients_leave_nothing_behind() {
    use std::io::{Read, Write};
    use tapestry_proto::tool::v1::{tool_subscribe_client::ToolSubscribeClient, SubscribeRequest};
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        "sinks:\n  - { name: stream, type: http }\n  - { name: sub, type: grpc }\npolicies:\n  - { name: all, sinks: [stream, sub] }\n",
        dir.path(),
    );
    let clients = |sink: &str, ty: &str| {
        agg.metric(&format!(
            "tapestry_aggregator_sink_clients{{sink=\"{sink}\",type=\"{ty}\"}}"
        ))
    };
    let settled = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let http_stream = || {
        let mut c = std::net::TcpStream::connect(&agg.http).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /v1/tools/stream/pcap HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        // The response head and the start of the stream.
        let mut buf = [0u8; 64];
        assert!(c.read(&mut buf).unwrap() > 0);
        c
    };
    let grpc = format!("http://{}", agg.grpc);
    let subscribe = || {
        // A runtime per client: dropping it closes the connection, as a
        // tool process that exits does.
        let rt = runtime();
        rt.block_on(async {
            let mut client = ToolSubscribeClient::connect(grpc.clone()).await.unwrap();
            let stream = client
                .subscribe(SubscribeRequest { sink: "sub".into() })
                .await
                .unwrap();
            drop(stream);
        })
    };
    // Warm up (first-use allocations), then take the baseline.
    drop(http_stream());
    subscribe();
    settled("warm-up HTTP client stayed", &|| {
        clients("stream", "http") == 0.0
    });
    settled("warm-up gRPC client stayed", &|| {
        clients("sub", "grpc") == 0.0
    });
    let (fds, rss) = (agg.open_fds(), agg.rss_kb());
    for _ in 0..1000 {
        drop(http_stream());
        subscribe();
    }
    settled("clients or descriptors stayed after 1,000 loops", &|| {
        clients("stream", "http") == 0.0 && clients("sub", "grpc") == 0.0 && agg.open_fds() <= fds
    });
    let grown = agg.rss_kb().saturating_sub(rss);
    assert!(grown < 8 * 1024, "RSS grew by {grown} kB over 1,000 loops");
}

/// A client that sends its request one byte a second cannot hold a
/// connection: it is closed once the header-read bound (30 s) is up.
#[test]
fn a_slow_header_client_is_disconnected() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(
        "sinks:\n  - { name: stream, type: http }\npolicies:\n  - { name: all, sinks: [stream] }\n",
        dir.path(),
    );
    let mut c = std::net::TcpStream::connect(&agg.http).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let started = std::time::Instant::now();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    let mut closed = None;
    for &byte in request {
        if started.elapsed() > Duration::from_secs(45) {
            break;
        }
        if c.write_all(&[byte]).is_err() {
            closed = Some(started.elapsed());
            break;
        }
        // An answer (408) may come before the close.
        let mut buf = [0u8; 256];
        match c.read(&mut buf) {
            Ok(0) => {
                closed = Some(started.elapsed());
                break;
            }
            Err(e)
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                closed = Some(started.elapsed());
                break;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(990));
    }
    let closed = closed.expect("the slow client was never disconnected");
    assert!(
        closed >= Duration::from_secs(29) && closed < Duration::from_secs(40),
        "closed after {closed:?}"
    );
}
