//! `aggregator replay` must keep exactly the packets `tcpdump -r IN -w OUT
//! EXPR` keeps, byte for byte, on the same input.

mod common;

use std::path::Path;
use std::process::Command;

use common::{read_packets, require_tool};

const EXPRESSIONS: &[&str] = &[
    "",
    "host 10.1.2.3",
    "src host 10.0.1.5 or dst host 10.2.0.7",
    "net 10.1.0.0/16",
    "dst net 10.2.3.0/24",
    "port 80",
    "src port 443",
    "tcp dst port 22",
    "portrange 1000-9000",
    "tcp portrange 5000-6400",
    "tcp",
    "udp",
    "icmp",
    "ip6",
    "icmp6",
    "arp",
    "proto 17",
    "ip proto 6",
    "ip6 proto 58",
    "tcp[tcpflags] & tcp-syn != 0",
    "tcp[tcpflags] & (tcp-syn|tcp-fin) != 0",
    "tcp[tcpflags] == tcp-ack",
    "tcp[tcpflags] & tcp-rst != 0 and not port 443",
    "vlan",
    "vlan 2",
    "vlan and tcp port 80",
    "udp and not vlan",
    "ip6 and tcp port 443",
    "net fd00::/64",
    "host fd00:0:0:1::5",
    "(tcp port 80 or udp port 53) and not host 10.0.0.1",
    "ip[6:2] & 0x1fff != 0",
    "greater 600",
    "less 100",
    "ether host 02:00:00:00:00:05",
    "not (tcp or udp)",
];

fn mix(dir: &Path, snaplen: u32) -> std::path::PathBuf {
    let path = dir.join(format!("mix-{snaplen}.pcap"));
    let f = std::fs::File::create(&path).unwrap();
    tapestry_aggregator::synth::write_pcap(
        std::io::BufWriter::new(f),
        tapestry_aggregator::synth::frames(7, 20_000),
        snaplen,
    )
    .unwrap();
    path
}

fn check(input: &Path, dir: &Path, expr: &str) {
    let expected = dir.join("expected.pcap");
    let ours = dir.join("ours.pcapng");
    let st = Command::new("tcpdump")
        .args(["-r"])
        .arg(input)
        .arg("-w")
        .arg(&expected)
        .arg(expr)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "tcpdump {expr:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let st = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["replay", "--filter", expr, "--input"])
        .arg(input)
        .arg("--output")
        .arg(&ours)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "aggregator {expr:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let want = read_packets(&expected);
    let got = read_packets(&ours);
    assert!(
        !want.is_empty() || expr == "icmp",
        "expression {expr:?} selects nothing; the mix should exercise it"
    );
    assert_eq!(got.len(), want.len(), "packet count for {expr:?}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "packet {i} for {expr:?}");
    }
}

#[test]
fn same_packets_as_tcpdump() {
    require_tool("tcpdump");
    let dir = tempfile::tempdir().unwrap();
    let input = mix(dir.path(), 65535);
    for expr in EXPRESSIONS {
        check(&input, dir.path(), expr);
    }
}

#[test]
fn same_packets_as_tcpdump_on_truncated_captures() {
    // A 60-byte snap length cuts headers short: loads past the captured
    // bytes must reject exactly as libpcap's interpreter does.
    require_tool("tcpdump");
    let dir = tempfile::tempdir().unwrap();
    let input = mix(dir.path(), 60);
    for expr in EXPRESSIONS {
        check(&input, dir.path(), expr);
    }
}

#[test]
fn pcapng_input_is_accepted() {
    require_tool("tcpdump");
    require_tool("editcap");
    let dir = tempfile::tempdir().unwrap();
    let input = mix(dir.path(), 65535);
    let ng = dir.path().join("mix.pcapng");
    let st = Command::new("editcap")
        .args(["-F", "pcapng"])
        .arg(&input)
        .arg(&ng)
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.path().join("out.pcapng");
    let st = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["replay", "--filter", "tcp port 80", "-i"])
        .arg(&ng)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let expected = dir.path().join("expected.pcap");
    let st = Command::new("tcpdump")
        .arg("-r")
        .arg(&input)
        .arg("-w")
        .arg(&expected)
        .arg("tcp port 80")
        .output()
        .unwrap();
    assert!(st.status.success());
    assert_eq!(read_packets(&out), read_packets(&expected));
}

#[test]
fn invalid_filter_reports_libpcap_message_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let input = mix(dir.path(), 65535);
    let out = dir.path().join("out.pcapng");
    let o = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["replay", "--filter", "tcp portt 80", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("syntax error"), "{err}");
    assert!(
        !out.exists(),
        "nothing may be written for an invalid filter"
    );
}

#[test]
fn slicing_matches_editcap() {
    require_tool("editcap");
    let dir = tempfile::tempdir().unwrap();
    let input = mix(dir.path(), 65535);
    let expected = dir.path().join("expected.pcap");
    let st = Command::new("editcap")
        .args(["-s", "96"])
        .arg(&input)
        .arg(&expected)
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.path().join("out.pcapng");
    let st = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["replay", "--slice", "96", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(read_packets(&out), read_packets(&expected));
}

#[test]
fn output_opens_in_tshark() {
    require_tool("tshark");
    let dir = tempfile::tempdir().unwrap();
    let input = mix(dir.path(), 65535);
    let out = dir.path().join("out.pcapng");
    let st = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["replay", "--filter", "udp port 53", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let o = Command::new("tshark")
        .arg("-r")
        .arg(&out)
        .args(["-T", "fields", "-e", "udp.port"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<_> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), read_packets(&out).len());
    // Non-first fragments carry no UDP header; every other line names 53.
    assert!(
        lines
            .iter()
            .filter(|l| !l.is_empty())
            .all(|l| l.split(',').any(|p| p == "53")),
        "{lines:?}"
    );
}

/// A copy of `f` as seen one routed hop later: other MACs, TTL - 1 (so a
/// new IPv4 checksum), and a TCP checksum filled in by offload.
fn hop_copy(f: &tapestry_aggregator::synth::Frame) -> tapestry_aggregator::synth::Frame {
    let mut d = f.data.clone();
    d[..12].copy_from_slice(&[0x02, 9, 9, 9, 9, 9, 0x02, 8, 8, 8, 8, 8]);
    d[22] -= 1;
    d[24] = 0;
    d[25] = 0;
    let c = tapestry_aggregator::synth::ipv4_checksum(&d[14..34]);
    d[24..26].copy_from_slice(&c.to_be_bytes());
    d[50] ^= 0x5a;
    tapestry_aggregator::synth::Frame {
        ts_ns: f.ts_ns + 400_000,
        data: d,
    }
}

/// Untagged IPv4 TCP frames of the mix (random sequence numbers make each
/// one unique).
fn tcp4_frames(n: usize) -> Vec<tapestry_aggregator::synth::Frame> {
    let prog =
        tapestry_aggregator::bpf::Program::compile("ip and tcp and ip[6:2] & 0x1fff = 0", 1, 65535)
            .unwrap();
    tapestry_aggregator::synth::frames(21, n)
        .into_iter()
        .filter(|f| prog.matches(&f.data, f.data.len() as u32))
        .collect()
}

fn write_frames(path: &Path, frames: &[tapestry_aggregator::synth::Frame]) {
    let f = std::fs::File::create(path).unwrap();
    tapestry_aggregator::synth::write_pcap(
        std::io::BufWriter::new(f),
        frames.iter().cloned(),
        65535,
    )
    .unwrap();
}

#[test]
fn dedup_removes_exactly_the_second_copies() {
    let dir = tempfile::tempdir().unwrap();
    let originals = tcp4_frames(6_000);
    let mut input = Vec::new();
    for (i, f) in originals.iter().enumerate() {
        input.push(f.clone());
        // Every third packet was seen at both ends of its path.
        if i % 3 == 0 {
            input.push(hop_copy(f));
        }
    }
    let inp = dir.path().join("dups.pcap");
    write_frames(&inp, &input);
    let out = dir.path().join("out.pcapng");
    let o = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["replay", "--dedup", "-i"])
        .arg(&inp)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_packets(&out);
    let want: Vec<_> = originals
        .iter()
        .map(|f| (f.ts_ns, f.data.len() as u32, f.data.clone()))
        .collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    // Outside the window the copy is a new packet.
    let o = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["replay", "--dedup", "--dedup-window-us", "100", "-i"])
        .arg(&inp)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(read_packets(&out).len(), input.len());
}

#[test]
fn slice_and_mask_produce_expected_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let frames = tcp4_frames(3_000);
    let inp = dir.path().join("tcp.pcap");
    write_frames(&inp, &frames);
    let out = dir.path().join("out.pcapng");
    let o = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args([
            "replay",
            "--slice-payload",
            "10",
            "--mask-payload",
            "4",
            "-i",
        ])
        .arg(&inp)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_packets(&out);
    assert_eq!(got.len(), frames.len());
    for (f, (ts, wire, data)) in frames.iter().zip(got) {
        // Ethernet 14 + IPv4 20 + TCP 20 = 54 bytes of headers.
        let keep = f.data.len().min(54 + 10);
        let mut want = f.data[..keep].to_vec();
        if keep > 58 {
            want[58..].fill(0);
        }
        assert_eq!((ts, wire, data), (f.ts_ns, f.data.len() as u32, want));
    }
}
