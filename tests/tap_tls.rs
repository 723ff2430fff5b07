//! A tap streaming to the aggregator over mutual TLS, as an operator runs
//! them outside a cluster: certificates from one CA, the real tap-agent on
//! a veth, the real aggregator, tshark reading PCAP-over-IP. A tap without
//! a certificate, or with one for another node, gets nothing in.

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
}

const IP_A: &str = "10.78.0.1";
const IP_B: &str = "10.78.0.2";

fn sh(cmd: &str) {
    let ok = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(ok.success(), "{cmd}");
}

impl Pair {
    fn new() -> Pair {
        let id = std::process::id();
        let p = Pair {
            a: format!("tlstap{id}a"),
            b: format!("tlstap{id}b"),
        };
        for ns in [&p.a, &p.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
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

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
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

    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "tap-ca");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let ca_file = d.join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ca_file = ca_file.display().to_string();
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
    wait_for("the aggregator to serve", Duration::from_secs(20), || {
        Command::new("ip")
            .args(["netns", "exec", &pair.a, "curl", "-sf"])
            .arg(format!("http://127.0.0.1:{http}/healthz"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            .then_some(())
    });
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
