//! Clients that come and go leave nothing behind in the API server: after
//! 1,000 connections opened and closed (some mid-handshake, some after a
//! request), its descriptors and memory are back where they were.

mod common;

use std::time::{Duration, Instant};

use common::Server;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn connect_close_loops_leave_nothing_behind() {
    let server = Server::start();
    let pid = server.pid();
    let addr = server.url().trim_start_matches("https://").to_string();
    let token = server.admin_token();
    let request = |path: &str| {
        let out = server.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!("{}{path}", server.url()),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Warm up (first-use allocations, pooled store connections).
    for _ in 0..20 {
        assert_eq!(request("/api/v1/namespaces"), "200");
        drop(std::net::TcpStream::connect(&addr).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    let (fds, rss) = (open_fds(pid), rss_kb(pid));
    for i in 0..1000 {
        if i % 10 == 0 {
            // A whole TLS connection and request.
            assert_eq!(request("/api/v1/namespaces"), "200");
        } else {
            // Gone before the handshake.
            drop(std::net::TcpStream::connect(&addr).unwrap());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while open_fds(pid) > fds {
        assert!(
            Instant::now() < deadline,
            "{} descriptors open after 1,000 connections, {fds} before",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let grown = rss_kb(pid).saturating_sub(rss);
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} kB over 1,000 connections"
    );
}
