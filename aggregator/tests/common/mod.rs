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
    assert!(s.truncated.is_none(), "{}: {:?}", path.display(), s.truncated);
    out
}

/// Real tools are part of the test; a missing one is an error in CI and a
/// loud skip elsewhere... but these tests cannot run without it, so we fail.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "{name} is required for this test (Debian package: {})", debian_package(name));
}

fn debian_package(tool: &str) -> &'static str {
    match tool {
        "tcpdump" => "tcpdump",
        "tshark" => "tshark",
        "editcap" | "capinfos" => "wireshark-common",
        _ => "?",
    }
}
