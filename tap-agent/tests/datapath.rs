//! The tap data path on a real kernel: two network namespaces joined by a
//! veth pair, tap-agent attached to one end, a TapIngest server in the test
//! receiving its stream, tcpdump on the same interface as the reference.
//!
//! Needs root (CI runs as root); without it these tests fail when `CI` is
//! set and are skipped otherwise.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use tapestry_proto::tap::v1::Direction;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn packets(server: &Server) -> Vec<Packet> {
    server
        .sink
        .0
        .lock()
        .unwrap()
        .batches
        .iter()
        .flat_map(|b| b.packets.iter().cloned())
        .collect()
}

/// IPv4 fields of an Ethernet frame: (src, dst, proto, sport, dport, payload offset).
type Ipv4Fields = ([u8; 4], [u8; 4], u8, u16, u16, usize);

fn ipv4(d: &[u8]) -> Option<Ipv4Fields> {
    if d.len() < 34 || d[12..14] != [0x08, 0x00] {
        return None;
    }
    let ihl = ((d[14] & 0x0f) as usize) * 4;
    let proto = d[23];
    let l4 = 14 + ihl;
    let (sp, dp) = if d.len() >= l4 + 4 {
        (
            u16::from_be_bytes([d[l4], d[l4 + 1]]),
            u16::from_be_bytes([d[l4 + 2], d[l4 + 3]]),
        )
    } else {
        (0, 0)
    };
    let payload = match proto {
        17 => l4 + 8,
        6 if d.len() > l4 + 12 => l4 + ((d[l4 + 12] >> 4) as usize) * 4,
        _ => l4,
    };
    Some((
        d[26..30].try_into().unwrap(),
        d[30..34].try_into().unwrap(),
        proto,
        sp,
        dp,
        payload,
    ))
}

/// Waits until the server holds everything the kernel captured.
fn wait_delivered(agent: &Agent, server: &Server) {
    agent.wait_for(
        "the stream to deliver every captured packet",
        Duration::from_secs(60),
        || server.sink.packet_count() as u64 >= agent.kernel("captured"),
    );
}

fn multiset(items: impl Iterator<Item = (Vec<u8>, u32)>) -> BTreeMap<(Vec<u8>, u32), u32> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

fn tcp_mb() -> usize {
    std::env::var("TAP_TEST_TCP_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

#[test]
fn every_packet_once_per_direction_and_identical_to_tcpdump() {
    if !require_root("every_packet_once_per_direction_and_identical_to_tcpdump") {
        return;
    }
    let _g = serial();
    with_reference_retries(
        "every_packet_once_per_direction_and_identical_to_tcpdump",
        every_packet_once_per_direction_and_identical_to_tcpdump_attempt,
    );
}

fn every_packet_once_per_direction_and_identical_to_tcpdump_attempt() -> bool {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--iface",
            &pair.tap_if,
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
            "--ring-size",
            "268435456",
        ],
    );
    wait_until("the agent's stream", Duration::from_secs(10), || {
        server.sink.0.lock().unwrap().streams >= 1
    });
    let pcap = dir.path().join("ref.pcap");
    let tcpdump = Tcpdump::start(&pair.a, &pair.tap_if, &pcap, &[]);

    const N: u32 = 10_000;
    let echoed = udp_echo(&pair, 7000, N, 200, 32);
    let mb = tcp_mb();
    tcp_transfer(&pair, 5001, mb << 20);
    std::thread::sleep(Duration::from_millis(300));
    let Some(reference) = tcpdump.stop() else {
        return false;
    };
    wait_delivered(&agent, &server);

    assert_eq!(agent.kernel("ringbuf_full"), 0, "ring overflowed");
    assert_eq!(agent.kernel("load_error"), 0);
    assert_eq!(agent.kernel("truncated"), 0);
    assert_eq!(agent.metric("tapestry_tap_queue_dropped_packets_total"), 0);
    let seen = agent.kernel("seen");
    assert!(agent.terminate(), "agent did not exit cleanly");
    let got = packets(&server);
    server.stop();
    assert_eq!(tapestry_attachments(&pair.a), Vec::<String>::new());

    // Exactly what tcpdump saw, byte for byte (tcpdump has no direction).
    assert_eq!(
        got.len(),
        reference.len(),
        "tap and tcpdump counts differ (kernel saw {seen})"
    );
    let ours = multiset(got.iter().map(|p| (p.data.clone(), p.wire_length)));
    let theirs = multiset(reference.iter().map(|p| (p.data.clone(), p.orig_len)));
    assert!(ours == theirs, "tap capture differs from tcpdump's");
    for p in &got {
        assert_eq!(
            p.data.len() as u32,
            p.wire_length,
            "full capture must not truncate"
        );
    }
    let gso = got.iter().filter(|p| p.wire_length > 1514).count();
    let max = got.iter().map(|p| p.wire_length).max().unwrap_or(0);
    eprintln!(
        "captured {} packets ({} larger than one MTU, largest {max} bytes), identical to tcpdump",
        got.len(),
        gso
    );
    assert!(gso > 0, "the TCP transfer should produce GSO super-packets");

    // Direction: on the tapped veth in `a`, ingress is traffic from b.
    let (ip_a, ip_b) = (pair.ip_a.octets(), pair.ip_b.octets());
    let mut udp_in = vec![0u32; N as usize];
    let mut udp_out = vec![0u32; N as usize];
    let mut tcp_payload = 0usize;
    for p in &got {
        let (src, dst, proto, sp, dp, off) = ipv4(&p.data).expect("only IPv4 on the test link");
        let dir = Direction::try_from(p.direction).unwrap();
        match dir {
            Direction::Ingress => assert_eq!((src, dst), (ip_b, ip_a)),
            Direction::Egress => assert_eq!((src, dst), (ip_a, ip_b)),
            _ => panic!("no direction"),
        }
        if proto == 17 {
            let seq = u32::from_be_bytes(p.data[off..off + 4].try_into().unwrap()) as usize;
            if dir == Direction::Ingress {
                assert_eq!(dp, 7000);
                udp_in[seq] += 1;
            } else {
                assert_eq!(sp, 7000);
                udp_out[seq] += 1;
            }
        } else if proto == 6 && dir == Direction::Ingress {
            tcp_payload += p.data.len() - off;
        }
    }
    assert_eq!(echoed, N, "the echo server should have seen every datagram");
    assert!(
        udp_in.iter().all(|&c| c == 1),
        "every datagram exactly once on ingress"
    );
    assert!(
        udp_out.iter().all(|&c| c == 1),
        "every echo exactly once on egress"
    );
    assert!(
        tcp_payload >= mb << 20,
        "TCP payload {tcp_payload} < {} MiB",
        mb
    );
    true
}

#[test]
fn hello_names_sources_and_sequences_increase() {
    if !require_root("hello_names_sources_and_sequences_increase") {
        return;
    }
    let _g = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--iface",
            &pair.tap_if,
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
            "--tap-id",
            "tap-x",
            "--node",
            "node-y",
        ],
    );
    udp_echo(&pair, 7000, 2000, 100, 32);
    wait_delivered(&agent, &server);
    assert!(agent.terminate());
    let rec = server.sink.0.lock().unwrap();
    let first = &rec.batches[0];
    let hello = first.hello.as_ref().expect("first batch carries the Hello");
    assert_eq!(hello.tap_id, "tap-x");
    assert_eq!(hello.node, "node-y");
    assert_eq!(hello.policy_names, vec!["cli".to_string()]);
    assert_eq!(hello.sources.len(), 1);
    assert_eq!(hello.sources[0].interface, pair.tap_if);
    let id = hello.sources[0].id;
    for (i, b) in rec.batches.iter().enumerate() {
        assert_eq!(b.sequence, i as u64 + 1);
        for p in &b.packets {
            assert_eq!(p.source_id, id);
            assert_eq!(p.policy_mask, 1);
            assert!(
                p.timestamp_ns > 1_600_000_000_000_000_000,
                "wall-clock timestamp"
            );
        }
    }
}

#[test]
fn tcp_port_80_prefilter_keeps_only_matching_traffic() {
    if !require_root("tcp_port_80_prefilter_keeps_only_matching_traffic") {
        return;
    }
    let _g = serial();
    with_reference_retries(
        "tcp_port_80_prefilter_keeps_only_matching_traffic",
        tcp_port_80_prefilter_keeps_only_matching_traffic_attempt,
    );
}

fn tcp_port_80_prefilter_keeps_only_matching_traffic_attempt() -> bool {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--iface",
            &pair.tap_if,
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
            "--rule",
            "proto=tcp,port=80",
        ],
    );
    let pcap = dir.path().join("all.pcap");
    let tcpdump = Tcpdump::start(&pair.a, &pair.tap_if, &pcap, &[]);
    tcp_transfer(&pair, 80, 8 << 20);
    udp_echo(&pair, 7000, 2000, 300, 32);
    tcp_transfer(&pair, 81, 4 << 20);
    std::thread::sleep(Duration::from_millis(300));
    let Some(all) = tcpdump.stop() else {
        return false;
    };
    wait_delivered(&agent, &server);
    let (seen, matched, captured) = (
        agent.kernel("seen"),
        agent.kernel("matched"),
        agent.kernel("captured"),
    );
    assert!(agent.terminate());
    let got = packets(&server);

    let port80 = |d: &[u8]| matches!(ipv4(d), Some((_, _, 6, sp, dp, _)) if sp == 80 || dp == 80);
    let expected: Vec<&PcapPacket> = all.iter().filter(|p| port80(&p.data)).collect();
    let other = all.len() - expected.len();
    assert!(
        other >= 4000,
        "non-matching traffic was generated ({other})"
    );
    // Kernel counters: everything seen, only port 80 matched and captured.
    assert!(
        seen >= all.len() as u64,
        "seen {seen} < packets on the link {}",
        all.len()
    );
    assert_eq!(matched, expected.len() as u64);
    assert_eq!(captured, matched);
    assert!(seen - matched >= other as u64);
    // The matching traffic is complete and identical.
    assert!(got.iter().all(|p| port80(&p.data)));
    let ours = multiset(got.iter().map(|p| (p.data.clone(), p.wire_length)));
    let theirs = multiset(expected.iter().map(|p| (p.data.clone(), p.orig_len)));
    assert!(ours == theirs, "port-80 capture differs from tcpdump's");
    true
}

#[test]
fn snaplen_96_truncates_but_keeps_wire_length() {
    if !require_root("snaplen_96_truncates_but_keeps_wire_length") {
        return;
    }
    let _g = serial();
    with_reference_retries(
        "snaplen_96_truncates_but_keeps_wire_length",
        snaplen_96_truncates_but_keeps_wire_length_attempt,
    );
}

fn snaplen_96_truncates_but_keeps_wire_length_attempt() -> bool {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--iface",
            &pair.tap_if,
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
            "--snaplen",
            "96",
        ],
    );
    let pcap = dir.path().join("full.pcap");
    let tcpdump = Tcpdump::start(&pair.a, &pair.tap_if, &pcap, &[]);
    udp_echo(&pair, 7000, 1000, 1000, 32);
    tcp_transfer(&pair, 5001, 4 << 20);
    std::thread::sleep(Duration::from_millis(300));
    let Some(full) = tcpdump.stop() else {
        return false;
    };
    wait_delivered(&agent, &server);
    assert!(agent.terminate());
    let got = packets(&server);
    assert_eq!(got.len(), full.len());
    let ours = multiset(got.iter().map(|p| (p.data.clone(), p.wire_length)));
    let theirs = multiset(
        full.iter()
            .map(|p| (p.data[..p.data.len().min(96)].to_vec(), p.orig_len)),
    );
    assert!(
        ours == theirs,
        "snaplen-96 capture is not tcpdump's packets cut at 96"
    );
    for p in &got {
        assert_eq!(p.data.len() as u32, p.wire_length.min(96));
    }
    assert!(got.iter().filter(|p| p.wire_length > 1000).count() >= 2000);
    true
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn aggregator_away_counts_drops_then_reconnects() {
    if !require_root("aggregator_away_counts_drops_then_reconnects") {
        return;
    }
    let _g = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--iface",
            &pair.tap_if,
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
            "--queue-batches",
            "4",
            "--batch-packets",
            "64",
        ],
    );
    // ip netns exec replaces itself with the agent: same pid.
    let pid = agent.child.id();
    udp_echo(&pair, 7000, 5000, 1000, 32);
    tcp_transfer(&pair, 5001, 32 << 20);
    agent.wait_for("queue drops to be counted", Duration::from_secs(10), || {
        agent.metric("tapestry_tap_queue_dropped_packets_total") > 0
    });
    assert!(agent.metric("tapestry_tap_connect_failures_total") >= 1);
    assert_eq!(agent.metric("tapestry_tap_connected"), 0);
    let rss = rss_kib(pid);
    assert!(
        rss < 200 * 1024,
        "agent RSS {rss} KiB while the aggregator is away"
    );

    // The aggregator comes back: the agent reconnects and streams again.
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    agent.wait_for("reconnect", Duration::from_secs(15), || {
        agent.metric("tapestry_tap_connected") == 1
    });
    // What queued while it was away goes first; fresh packets sent before
    // that backlog is out would meet a full queue.
    agent.wait_for("the backlog to be shipped", Duration::from_secs(10), || {
        agent.metric("tapestry_tap_queue_batches") == 0
            && agent.metric("tapestry_tap_in_flight_batches") == 0
    });
    // A small queue (4 batches of 64) still drops under a burst; what matters
    // is that fresh packets flow again.
    let echoed = udp_echo(&pair, 7001, 500, 100, 4);
    assert!(echoed > 0, "the echo after the reconnect got no answer");
    agent.wait_for("new packets after reconnect", Duration::from_secs(10), || {
        let fresh = server
            .sink
            .0
            .lock()
            .unwrap()
            .batches
            .iter()
            .flat_map(|b| b.packets.iter())
            .filter(|p| matches!(ipv4(&p.data), Some((_, _, 17, sp, dp, _)) if sp == 7001 || dp == 7001))
            .count();
        fresh >= 200
    });
    let reported: u64 = server
        .sink
        .0
        .lock()
        .unwrap()
        .batches
        .iter()
        .map(|b| b.dropped_since_last)
        .sum();
    assert!(reported > 0, "drops are reported to the aggregator");
    // Every packet the kernel captured is accounted for: acknowledged by
    // the aggregator, dropped at the queue, or lost in flight.
    agent.wait_for("everything settled", Duration::from_secs(10), || {
        agent.metric("tapestry_tap_in_flight_batches") == 0
            && agent.metric("tapestry_tap_queue_batches") == 0
    });
    let captured = agent.kernel("captured");
    let sent = agent.metric("tapestry_tap_sent_packets_total");
    let dropped = agent.metric("tapestry_tap_queue_dropped_packets_total");
    let lost = agent.metric("tapestry_tap_lost_in_flight_packets_total");
    assert_eq!(
        captured,
        sent + dropped + lost,
        "captured {captured} = sent {sent} + dropped {dropped} + lost in flight {lost}"
    );
    assert_eq!(
        server.sink.packet_count() as u64,
        sent,
        "what the aggregator acknowledged is what it got"
    );
    assert!(agent.terminate());
    server.stop();
}

#[test]
fn no_programs_left_after_sigkill_restart_and_stop() {
    if !require_root("no_programs_left_after_sigkill_restart_and_stop") {
        return;
    }
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let args = |mode: &'static str| {
        vec![
            "--iface".to_string(),
            pair.tap_if.clone(),
            "--aggregator".to_string(),
            format!("http://127.0.0.1:{GRPC_PORT}"),
            "--attach-mode".to_string(),
            mode.to_string(),
        ]
    };
    for mode in ["clsact", "tcx"] {
        let a: Vec<String> = args(mode);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let agent = Agent::start(&pair.a, dir.path(), &a);
        assert_eq!(
            tapestry_attachments(&pair.a).len(),
            2,
            "{mode}: ingress + egress"
        );
        agent.kill();
        let left = tapestry_attachments(&pair.a);
        if mode == "tcx" {
            assert!(left.is_empty(), "TCX links die with the process: {left:?}");
        }
        let agent = Agent::start(&pair.a, dir.path(), &a);
        let now = tapestry_attachments(&pair.a);
        assert_eq!(
            now.len(),
            2,
            "{mode}: attached exactly once after restart: {now:?}"
        );
        if mode == "clsact" && !left.is_empty() {
            assert!(agent.log_text().contains("stale"), "{}", agent.log_text());
        }
        assert!(agent.terminate());
        assert_eq!(
            tapestry_attachments(&pair.a),
            Vec::<String>::new(),
            "{mode}"
        );
        wait_until("programs to be unloaded", Duration::from_secs(5), || {
            tapestry_programs().is_empty()
        });
    }
}

#[test]
fn cidr_and_direction_rules_run_in_the_kernel() {
    if !require_root("cidr_and_direction_rules_run_in_the_kernel") {
        return;
    }
    let _g = serial();
    with_reference_retries(
        "cidr_and_direction_rules_run_in_the_kernel",
        cidr_and_direction_rules_run_in_the_kernel_attempt,
    );
}

fn cidr_and_direction_rules_run_in_the_kernel_attempt() -> bool {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let udp_from_b = format!("proto=udp,cidr={}/32,dir=ingress", pair.ip_b);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--iface",
            &pair.tap_if,
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
            "--rule",
            &udp_from_b,
            "--rule",
            "proto=tcp,cidr=10.0.0.0/8,dir=egress",
            "--rule",
            "cidr=10.250.0.0/16",
        ],
    );
    let pcap = dir.path().join("all.pcap");
    let tcpdump = Tcpdump::start(&pair.a, &pair.tap_if, &pcap, &[]);
    udp_echo(&pair, 7000, 1000, 200, 32);
    tcp_transfer(&pair, 5001, 4 << 20);
    std::thread::sleep(Duration::from_millis(300));
    let Some(all) = tcpdump.stop() else {
        return false;
    };
    wait_delivered(&agent, &server);
    assert!(agent.terminate());
    let got = packets(&server);
    let ip_a = pair.ip_a.octets();
    let wanted = |d: &[u8], egress: bool| match ipv4(d) {
        Some((_, _, 17, _, _, _)) => !egress,
        Some((src, _, 6, _, _, _)) => egress && src == ip_a,
        _ => false,
    };
    for p in &got {
        let egress = p.direction == Direction::Egress as i32;
        assert!(
            wanted(&p.data, egress),
            "unwanted packet captured (egress={egress})"
        );
    }
    let udp_in = got
        .iter()
        .filter(|p| matches!(ipv4(&p.data), Some((_, _, 17, ..))))
        .count();
    assert_eq!(udp_in, 1000, "every datagram from b, none of the echoes");
    // Egress TCP from a = the ACKs tcpdump saw leaving a.
    let expected: Vec<&PcapPacket> = all
        .iter()
        .filter(|p| matches!(ipv4(&p.data), Some((src, _, 6, ..)) if src == ip_a))
        .collect();
    let ours = multiset(
        got.iter()
            .filter(|p| p.direction == Direction::Egress as i32)
            .map(|p| (p.data.clone(), p.wire_length)),
    );
    let theirs = multiset(expected.iter().map(|p| (p.data.clone(), p.orig_len)));
    assert!(!theirs.is_empty());
    assert!(ours == theirs, "egress TCP differs from tcpdump's");
    true
}

/// Sends raw Ethernet frames from `b` onto the link (AF_PACKET).
fn send_raw_frames(pair: &Pair, frames: Vec<Vec<u8>>) {
    let ifname = pair.peer_if.clone();
    in_netns(&pair.b, move || {
        let c = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: plain socket calls with valid arguments.
        unsafe {
            let ifindex = libc::if_nametoindex(c.as_ptr());
            assert!(ifindex > 0);
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            for f in &frames {
                let n = libc::sendto(
                    fd,
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                    &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    f.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

#[test]
fn malformed_frames_are_counted_not_fatal() {
    if !require_root("malformed_frames_are_counted_not_fatal") {
        return;
    }
    let _g = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--iface",
            &pair.tap_if,
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
            "--rule",
            "proto=udp,port=7000,cidr=10.0.0.0/8",
            "--rule",
            "proto=tcp,cidr=fd00::/8",
        ],
    );
    let eth = |ty: [u8; 2]| {
        let mut f = vec![0x02, 0, 0, 0, 0x0a, 0x01, 0x02, 0, 0, 0, 0x0b, 0x02];
        f.extend_from_slice(&ty);
        f
    };
    let mut frames = Vec::new();
    // IPv4 cut short inside its header.
    let mut f = eth([0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 0]);
    frames.push(f);
    // IPv4 with an impossible header length (ihl 2) and one longer than the frame (ihl 15).
    for ihl in [0x42u8, 0x4f] {
        let mut f = eth([0x08, 0x00]);
        f.extend_from_slice(&[
            ihl, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 1, 1, 1, 10, 1, 1, 2,
        ]);
        frames.push(f);
    }
    // IPv6 whose extension headers chain on past the end of the frame.
    let mut f = eth([0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 16, 0, 64]);
    f.extend_from_slice(&[0xfd; 32]);
    f.extend_from_slice(&[0, 255, 0, 0, 0, 0, 0, 0]);
    frames.push(f);
    // Stacked VLAN tags around a truncated IPv4 header.
    let mut f = eth([0x81, 0x00]);
    f.extend_from_slice(&[0, 1, 0x88, 0xa8, 0, 2, 0x08, 0x00, 0x45]);
    frames.push(f);
    // Garbage with an unknown ethertype, and a bare Ethernet header.
    let mut f = eth([0x12, 0x34]);
    f.extend((0..1400u32).map(|i| (i * 131 % 256) as u8));
    frames.push(f);
    frames.push(eth([0x08, 0x00]));
    let n = frames.len() as u64;
    for _ in 0..100 {
        send_raw_frames(&pair, frames.clone());
    }
    agent.wait_for("the frames to be seen", Duration::from_secs(10), || {
        agent.kernel("seen") >= 100 * n
    });
    assert_eq!(
        agent.kernel("matched"),
        0,
        "no malformed frame matches a rule"
    );
    // The tap still works.
    udp_echo(&pair, 7000, 200, 100, 16);
    wait_delivered(&agent, &server);
    assert_eq!(server.sink.packet_count(), 400);
    assert!(agent.terminate());
}

#[test]
fn several_policies_mark_packets_with_their_bits() {
    if !require_root("several_policies_mark_packets_with_their_bits") {
        return;
    }
    let _g = serial();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let server = Server::start(&rt, &pair.a, GRPC_PORT);
    let file = dir.path().join("policies.json");
    std::fs::write(
        &file,
        r#"[{"name": "udp-in", "rules": [{"protocol": "udp", "direction": "ingress"}], "snaplen": 64},
            {"name": "web", "rules": [{"protocol": "tcp", "ports": ["80"]}]},
            {"name": "from-b", "rules": [{"cidrs": ["10.77.0.0/16"], "direction": "ingress"}], "snaplen": 128}]"#,
    )
    .unwrap();
    let agent = Agent::start(
        &pair.a,
        dir.path(),
        &[
            "--iface",
            &pair.tap_if,
            "--aggregator",
            &format!("http://127.0.0.1:{GRPC_PORT}"),
            "--policy-file",
            file.to_str().unwrap(),
        ],
    );
    udp_echo(&pair, 7000, 300, 100, 16);
    tcp_transfer(&pair, 80, 1 << 20);
    wait_delivered(&agent, &server);
    assert!(agent.terminate());
    let rec = server.sink.0.lock().unwrap();
    let hello = rec.batches[0].hello.as_ref().unwrap();
    assert_eq!(hello.policy_names, ["udp-in", "web", "from-b"]);
    let mut by_mask = BTreeMap::new();
    for p in rec.batches.iter().flat_map(|b| b.packets.iter()) {
        let (_, _, proto, ..) = ipv4(&p.data).unwrap();
        let ingress = p.direction == Direction::Ingress as i32;
        let expected = match (proto, ingress) {
            (17, true) => 0b101,
            (17, false) => unreachable!("UDP egress matches no policy"),
            (6, true) => 0b110,
            (6, false) => 0b010,
            _ => panic!("unexpected protocol {proto}"),
        };
        assert_eq!(p.policy_mask, expected, "proto {proto} ingress {ingress}");
        *by_mask.entry(p.policy_mask).or_insert(0) += 1;
        // One snaplen per interface: the largest its policies ask for (web: whole packets).
        assert_eq!(p.data.len() as u32, p.wire_length);
    }
    assert_eq!(by_mask[&0b101], 300);
    assert!(by_mask[&0b110] > 0 && by_mask[&0b010] > 0);
}
