//! Taps streaming to the aggregator over mutual TLS, as an operator runs
//! them outside a cluster: certificates from one CA, the real tap-agent on
//! a veth, the real aggregator, tshark reading PCAP-over-IP. A tap without
//! a certificate, or with one for another node, gets nothing in; eight taps
//! account for every packet across an aggregator killed and restarted.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tapestry_e2e::{free_port, program_path, require, wait_for, Capture};

/// Two network namespaces joined by a veth pair, removed on drop.
struct Pair {
    a: String,
    b: String,
    _namespaces: Namespaces,
}

/// Network namespaces (loopback up), removed on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    /// Makes `names` afresh (one left by an earlier run is replaced).
    fn create(names: Vec<String>) -> Namespaces {
        for ns in &names {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        Namespaces(names)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

const IP_A: &str = "10.78.0.1";
const IP_B: &str = "10.78.0.2";

fn sh(cmd: &str) {
    let ok = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(ok.success(), "{cmd}");
}

impl Pair {
    fn new() -> Pair {
        // Tests run in parallel, each with namespaces of its own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id();
        let (a, b) = (format!("tlstap{id}-{n}a"), format!("tlstap{id}-{n}b"));
        let p = Pair {
            _namespaces: Namespaces::create(vec![a.clone(), b.clone()]),
            a,
            b,
        };
        sh(&format!(
            "ip -n {a} link add tls0 type veth peer name tls1 netns {b} && \
             ip -n {a} addr add {IP_A}/24 dev tls0 && ip -n {b} addr add {IP_B}/24 dev tls1 && \
             ip -n {a} link set tls0 up && ip -n {b} link set tls1 up",
            a = p.a,
            b = p.b
        ));
        p
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA for the test: its issuer, and its certificate written in `dir`.
fn test_ca(dir: &Path) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "tap-ca");
    let pem = ca.self_signed(&key).unwrap().pem();
    let file = dir.join("ca.pem");
    std::fs::write(&file, pem).unwrap();
    (Issuer::new(ca, key), file.display().to_string())
}

fn issue(issuer: &Issuer<'_, KeyPair>, cn: &str, server: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let sans = if server {
        vec![IP_A.to_string()]
    } else {
        vec![]
    };
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    if !server {
        params
            .distinguished_name
            .push(DnType::OrganizationName, "tapestry:taps");
    }
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_pair(dir: &Path, name: &str, (cert, key): &(String, String)) -> (String, String) {
    let c = dir.join(format!("{name}.pem"));
    let k = dir.join(format!("{name}-key.pem"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c.display().to_string(), k.display().to_string())
}

fn metric(ns: &str, http: u16, name: &str) -> f64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s"])
        .arg(format!("http://127.0.0.1:{http}/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Waits until the aggregator in `ns` answers `/healthz` on `http`.
fn wait_serving(ns: &str, http: u16) {
    wait_for("the aggregator to serve", Duration::from_secs(20), || {
        Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-sf"])
            .arg(format!("http://127.0.0.1:{http}/healthz"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            .then_some(())
    });
}

/// A tap-agent in `ns` on its veth (one agent per namespace: an agent
/// clears tapestry programs it finds in its own namespace at start).
fn tap(ns: &str, iface: &str, dir: &Path, name: &str, metrics: u16, args: &[&str]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Proc(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program_path("tap-agent").unwrap())
            .args(["run", "--iface", iface, "--metrics-addr"])
            .arg(format!("127.0.0.1:{metrics}"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_certified_tap_reaches_tshark_and_others_are_refused() {
    if !require(
        "a_certified_tap_reaches_tshark_and_others_are_refused",
        &["tshark", "curl", "busybox"],
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let pair = Pair::new();

    let (issuer, ca_file) = test_ca(d);
    let (server_cert, server_key) =
        write_pair(d, "aggregator", &issue(&issuer, "aggregator", true));
    let (a_cert, a_key) = write_pair(d, "node-a", &issue(&issuer, "tapestry:tap:node-a", false));
    let (b_cert, b_key) = write_pair(d, "node-b", &issue(&issuer, "tapestry:tap:node-b", false));

    let (grpc, http, pcap) = (free_port(), free_port(), free_port());
    let agg_log = std::fs::File::create(d.join("aggregator.log")).unwrap();
    let _aggregator = Proc(
        Command::new("ip")
            .args(["netns", "exec", &pair.a])
            .arg(program_path("aggregator").unwrap())
            .args(["serve", "--grpc", &format!("{IP_A}:{grpc}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args([
                "--pcap-over-ip",
                &format!("127.0.0.1:{pcap}"),
                "--filter",
                "icmp",
            ])
            .args(["--tls-cert", &server_cert, "--tls-key", &server_key])
            .args(["--client-ca", &ca_file])
            .stdout(Stdio::null())
            .stderr(agg_log)
            .spawn()
            .unwrap(),
    );
    wait_serving(&pair.a, http);
    let tool = Capture::tshark_in(Some(&pair.a), &format!("127.0.0.1:{pcap}"), d, "tool");
    wait_for("tshark to connect", Duration::from_secs(30), || {
        (metric(
            &pair.a,
            http,
            "tapestry_aggregator_sink_clients{sink=\"pcap-over-ip\",type=\"pcap_over_ip\"}",
        ) >= 1.0)
            .then_some(())
    });

    let url = format!("https://{IP_A}:{grpc}");
    let tls = |cert: &'static str| -> Vec<String> {
        let (c, k) = if cert == "a" {
            (&a_cert, &a_key)
        } else {
            (&b_cert, &b_key)
        };
        [
            "--aggregator",
            &url,
            "--node",
            "node-a",
            "--tls-cert",
            c,
            "--tls-key",
            k,
            "--tls-ca",
            &ca_file,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let args = tls("a");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _tap = tap(&pair.a, "tls0", d, "tap-a", free_port(), &args);
    // node-b's certificate claiming node-a, and a tap with no certificate.
    let args = tls("b");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _impostor = tap(&pair.b, "tls1", d, "tap-b", free_port(), &args);
    // The second agent in that namespace starts once the first is refused
    // (it clears the first one's programs, which does not matter there).
    wait_for(
        "the impostor to be refused",
        Duration::from_secs(20),
        || {
            (metric(
                &pair.a,
                http,
                "tapestry_aggregator_ingest_refused_total{reason=\"node-mismatch\"}",
            ) >= 1.0)
                .then_some(())
        },
    );
    let _plain = tap(
        &pair.b,
        "tls1",
        d,
        "tap-plain",
        free_port(),
        &[
            "--aggregator",
            &format!("http://{IP_A}:{grpc}"),
            "--node",
            "node-a",
        ],
    );
    wait_for("node-a's tap to connect", Duration::from_secs(20), || {
        (metric(
            &pair.a,
            http,
            "tapestry_aggregator_tap_connected{tap=\"node-a\"}",
        ) >= 1.0)
            .then_some(())
    });

    sh(&format!(
        "ip netns exec {} busybox ping -q -c 20 -i 0.05 {IP_A} >/dev/null",
        pair.b
    ));
    let seen = wait_for(
        "20 echo requests at tshark",
        Duration::from_secs(20),
        || {
            let n = tool.packets().len();
            (n >= 40).then_some(n)
        },
    );
    let refused = |reason: &str| {
        metric(
            &pair.a,
            http,
            &format!("tapestry_aggregator_ingest_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    wait_for(
        "both impostors to be refused",
        Duration::from_secs(20),
        || (refused("node-mismatch") >= 1.0 && refused("tls-handshake") >= 1.0).then_some(()),
    );
    let tool = tool.stop();
    // One tap's echo requests and replies: the impostors added nothing.
    assert_eq!(
        tool.len(),
        40,
        "tshark got {} packets (first wait saw {seen})",
        tool.len()
    );
    assert_eq!(
        metric(
            &pair.a,
            http,
            "tapestry_aggregator_tap_streams_total{tap=\"node-a\"}"
        ),
        1.0,
        "only node-a's own tap opened a stream"
    );
}

const TAPS: usize = 8;

/// The aggregator is killed (SIGKILL) and started again while 8 taps
/// stream: afterwards every tap accounts for every packet its kernel
/// program captured (acknowledged, dropped at its queue, or lost in
/// flight), and the new aggregator counted exactly the batches each tap
/// counts as lost in flight.
#[test]
fn eight_taps_account_for_every_packet_across_an_aggregator_restart() {
    if !require(
        "eight_taps_account_for_every_packet_across_an_aggregator_restart",
        &["curl", "busybox"],
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    let id = std::process::id();
    // The aggregator's namespace with a bridge; per tap, its node's
    // namespace (uplink to the bridge, and the tapped veth) and a peer
    // namespace sending traffic over that veth.
    let hub = format!("tr{id}h");
    let node = |i: usize| format!("tr{id}n{i}");
    let peer = |i: usize| format!("tr{id}p{i}");
    let mut names = vec![hub.clone()];
    names.extend((0..TAPS).flat_map(|i| [node(i), peer(i)]));
    let _namespaces = Namespaces::create(names);
    sh(&format!(
        "ip -n {hub} link add br0 type bridge && ip -n {hub} addr add {IP_A}/24 dev br0 && ip -n {hub} link set br0 up"
    ));
    for i in 0..TAPS {
        let (n, p) = (node(i), peer(i));
        sh(&format!(
            "ip -n {hub} link add up{i} type veth peer name u0 netns {n} && \
             ip -n {hub} link set up{i} master br0 up && \
             ip -n {n} addr add 10.78.0.{host}/24 dev u0 && ip -n {n} link set u0 up && \
             ip -n {n} link add tap0 type veth peer name tap1 netns {p} && \
             ip -n {n} addr add 10.80.{i}.1/24 dev tap0 && ip -n {n} link set tap0 up && \
             ip -n {p} addr add 10.80.{i}.2/24 dev tap1 && ip -n {p} link set tap1 up",
            host = 10 + i
        ));
    }

    let (issuer, ca_file) = test_ca(d);
    let (server_cert, server_key) =
        write_pair(d, "aggregator", &issue(&issuer, "aggregator", true));

    let (grpc, http, pcap) = (free_port(), free_port(), free_port());
    let aggregator = |run: &str| {
        let log = std::fs::File::create(d.join(format!("aggregator-{run}.log"))).unwrap();
        let p = Proc(
            Command::new("ip")
                .args(["netns", "exec", &hub])
                .arg(program_path("aggregator").unwrap())
                .args(["serve", "--grpc", &format!("{IP_A}:{grpc}")])
                .args(["--http", &format!("127.0.0.1:{http}")])
                .args(["--pcap-over-ip", &format!("127.0.0.1:{pcap}")])
                .args(["--tls-cert", &server_cert, "--tls-key", &server_key])
                .args(["--client-ca", &ca_file])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        wait_serving(&hub, http);
        p
    };
    let mut first = aggregator("first");

    const TAP_METRICS: u16 = 9464;
    let _taps: Vec<Proc> = (0..TAPS)
        .map(|i| {
            let name = format!("node-{i}");
            let (cert, key) = write_pair(
                d,
                &name,
                &issue(&issuer, &format!("tapestry:tap:{name}"), false),
            );
            tap(
                &node(i),
                "tap0",
                d,
                &name,
                TAP_METRICS,
                &[
                    "--aggregator",
                    &format!("https://{IP_A}:{grpc}"),
                    "--node",
                    &name,
                    "--tls-cert",
                    &cert,
                    "--tls-key",
                    &key,
                    "--tls-ca",
                    &ca_file,
                ],
            )
        })
        .collect();
    let connected = |i: usize| {
        metric(
            &hub,
            http,
            &format!("tapestry_aggregator_tap_connected{{tap=\"node-{i}\"}}"),
        ) >= 1.0
    };
    wait_for("every tap to connect", Duration::from_secs(30), || {
        (0..TAPS).all(connected).then_some(())
    });

    // Traffic on every tapped veth while the aggregator goes away and
    // comes back: echo requests and replies, 200 a second per tap.
    let pings: Vec<Proc> = (0..TAPS)
        .map(|i| {
            Proc(
                Command::new("ip")
                    .args(["netns", "exec", &peer(i), "busybox", "ping", "-q"])
                    .args(["-c", "600", "-i", "0.01", &format!("10.80.{i}.1")])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let _second = aggregator("second");
    for mut p in pings {
        assert!(p.0.wait().unwrap().success(), "ping failed");
    }
    wait_for("every tap to reconnect", Duration::from_secs(30), || {
        (0..TAPS).all(connected).then_some(())
    });
    let tap_metric = |i: usize, name: &str| metric(&node(i), TAP_METRICS, name);
    wait_for("every tap to settle", Duration::from_secs(30), || {
        (0..TAPS)
            .all(|i| {
                tap_metric(i, "tapestry_tap_queue_batches") == 0.0
                    && tap_metric(i, "tapestry_tap_in_flight_batches") == 0.0
            })
            .then_some(())
    });
    let mut total_lost = 0.0;
    for i in 0..TAPS {
        let captured = tap_metric(i, "tapestry_tap_kernel_packets_total{counter=\"captured\"}");
        let sent = tap_metric(i, "tapestry_tap_sent_packets_total");
        let dropped = tap_metric(i, "tapestry_tap_queue_dropped_packets_total");
        let lost = tap_metric(i, "tapestry_tap_lost_in_flight_packets_total");
        let lost_batches = tap_metric(i, "tapestry_tap_lost_in_flight_batches_total");
        assert!(captured >= 1200.0, "node-{i} captured {captured}");
        assert_eq!(
            captured,
            sent + dropped + lost,
            "node-{i}: captured {captured} = sent {sent} + dropped {dropped} + lost in flight {lost}"
        );
        let gaps = metric(
            &hub,
            http,
            &format!("tapestry_aggregator_tap_sequence_gap_batches_total{{tap=\"node-{i}\"}}"),
        );
        assert_eq!(
            gaps, lost_batches,
            "node-{i}: the aggregator's gap count and the tap's lost batches"
        );
        total_lost += lost;
    }
    eprintln!("{TAPS} taps across an aggregator restart: {total_lost} packets lost in flight, all counted");
}

/// PCAP-over-IP has no authentication: a client from a network not in the
/// allow list is closed before any packet (and counted), while one from
/// an allowed network or loopback reads the stream.
#[test]
fn pcap_over_ip_serves_only_allowed_networks() {
    if !require("pcap_over_ip_serves_only_allowed_networks", &["curl"]) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let pair = Pair::new();
    let (http, pcap) = (free_port(), free_port());
    let log = std::fs::File::create(work.path().join("aggregator.log")).unwrap();
    let _aggregator = Proc(
        Command::new("ip")
            .args(["netns", "exec", &pair.a])
            .arg(program_path("aggregator").unwrap())
            .args(["serve", "--grpc", "127.0.0.1:0"])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args(["--pcap-over-ip", &format!("0.0.0.0:{pcap}")])
            // Another host of that network, not the peer namespace.
            .args(["--pcap-over-ip-allow", "10.78.0.99/32"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_serving(&pair.a, http);
    // From the peer namespace: closed without a byte.
    let from_peer = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.b,
            "curl",
            "-s",
            "--max-time",
            "3",
            "-o",
            "-",
        ])
        .arg(format!("telnet://{IP_A}:{pcap}"))
        .output()
        .unwrap();
    assert!(
        from_peer.stdout.is_empty(),
        "a client outside the allow list got {} bytes",
        from_peer.stdout.len()
    );
    assert_eq!(
        metric(
            &pair.a,
            http,
            "tapestry_aggregator_sink_refused_total{sink=\"pcap-over-ip\",type=\"pcap_over_ip\",reason=\"not_allowed\"}"
        ),
        1.0
    );
    // Loopback, inside the aggregator's namespace: the pcap header.
    let local = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.a,
            "curl",
            "-s",
            "--max-time",
            "2",
            "-o",
            "-",
        ])
        .arg(format!("telnet://127.0.0.1:{pcap}"))
        .output()
        .unwrap();
    assert!(
        local.stdout.starts_with(&[0xd4, 0xc3, 0xb2, 0xa1]),
        "{:?}",
        local.stdout
    );
}
