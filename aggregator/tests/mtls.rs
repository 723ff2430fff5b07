//! Ingest over mutual TLS: only a tap with a certificate from the cluster
//! CA gets a stream, and only for the node its certificate names; every
//! refusal is counted by reason.

mod common;

use std::path::{Path, PathBuf};

use common::{exchange, runtime, tap_batch, Aggregator, ONE_SINK};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

/// (certificate PEM, key PEM) for `cn` in `orgs`, signed by `ca`.
fn issue(ca: &Ca, cn: &str, orgs: &[&str], server: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let sans = if server {
        vec!["127.0.0.1".to_string()]
    } else {
        Vec::new()
    };
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    for o in orgs {
        params.distinguished_name.push(DnType::OrganizationName, *o);
    }
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `serve` flags for TLS with this server certificate and `ca` as the
/// client CA, the files written in `dir`.
fn server_flags(dir: &Path, ca: &Ca, cert: &str, key: &str) -> Vec<String> {
    vec![
        "--tls-cert".to_string(),
        write(dir, "server.pem", cert).display().to_string(),
        "--tls-key".to_string(),
        write(dir, "server-key.pem", key).display().to_string(),
        "--client-ca".to_string(),
        write(dir, "ca.pem", &ca.pem).display().to_string(),
    ]
}

/// Connects as `identity` (none: TLS without a client certificate) and
/// sends two batches claiming `node`; the acknowledged sequence or the
/// error, as text.
async fn send(
    grpc: &str,
    ca_pem: &str,
    identity: Option<&(String, String)>,
    node: &str,
) -> Result<u64, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let batches = vec![
        tap_batch(node, 1, 1, true, 0),
        tap_batch(node, 2, 1, false, 0),
    ];
    let out = exchange(endpoint, batches).await?;
    match out.failure {
        Some(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        None => Ok(out.acks.last().map_or(0, |a| a.0)),
    }
}

#[test]
fn only_a_tap_certified_for_its_node_streams() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = ca("cluster-ca");
    let other = ca("other-ca");
    let (server_cert, server_key) = issue(&cluster, "aggregator", &[], true);
    let node_a = issue(&cluster, "tapestry:tap:node-a", &["tapestry:taps"], false);
    let node_b = issue(&cluster, "tapestry:tap:node-b", &["tapestry:taps"], false);
    let alice = issue(&cluster, "alice", &["devs"], false);
    let forged = issue(&other, "tapestry:tap:node-a", &["tapestry:taps"], false);
    let flags = server_flags(d, &cluster, &server_cert, &server_key);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agg = Aggregator::start_with(ONE_SINK, d, &flags);
    let rt = runtime();
    let refused = |reason: &str| {
        agg.metric(&format!(
            "tapestry_aggregator_ingest_refused_total{{reason=\"{reason}\"}}"
        ))
    };

    // The tap of node-a, speaking for node-a: taken in.
    let ok = rt.block_on(send(&agg.grpc, &cluster.pem, Some(&node_a), "node-a"));
    assert_eq!(ok, Ok(2));
    assert_eq!(
        agg.metric("tapestry_aggregator_tap_packets_total{tap=\"node-a\"}"),
        2.0
    );

    // TLS without a client certificate: no stream.
    let err = rt
        .block_on(send(&agg.grpc, &cluster.pem, None, "node-a"))
        .unwrap_err();
    assert!(err.starts_with("Unauthenticated"), "{err}");
    assert_eq!(refused("no-client-certificate"), 1.0);

    // node-b's certificate claiming node-a: refused, nothing taken in.
    let err = rt
        .block_on(send(&agg.grpc, &cluster.pem, Some(&node_b), "node-a"))
        .unwrap_err();
    assert!(
        err.starts_with("PermissionDenied") && err.contains("node-b"),
        "{err}"
    );
    assert_eq!(refused("node-mismatch"), 1.0);

    // A certificate from the cluster CA that is not a tap's.
    let err = rt
        .block_on(send(&agg.grpc, &cluster.pem, Some(&alice), "node-a"))
        .unwrap_err();
    assert!(err.contains("not a tap identity"), "{err}");
    assert_eq!(refused("not-a-tap"), 1.0);

    // A tap certificate from another CA: the handshake fails.
    let err = rt.block_on(send(&agg.grpc, &cluster.pem, Some(&forged), "node-a"));
    assert!(err.is_err(), "{err:?}");
    agg.wait_metric(
        "tapestry_aggregator_ingest_refused_total{reason=\"tls-handshake\"}",
        1.0,
        5,
    );

    // Plaintext to the TLS port: refused at the handshake too.
    let plain = rt.block_on(exchange(
        tapestry_aggregator::synthtap::plaintext(&agg.grpc).unwrap(),
        vec![tap_batch("node-a", 1, 1, true, 0)],
    ));
    assert!(
        plain.map_or(true, |e| e.failure.is_some()),
        "plaintext was served"
    );
    agg.wait_metric(
        "tapestry_aggregator_ingest_refused_total{reason=\"tls-handshake\"}",
        2.0,
        5,
    );
    assert_eq!(
        agg.metric("tapestry_aggregator_tap_packets_total{tap=\"node-a\"}"),
        2.0,
        "nothing but node-a's own stream was taken in"
    );
}

#[test]
fn plaintext_ingest_off_loopback_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("aggregator.yaml");
    std::fs::write(&cfg, ONE_SINK).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args([
            "serve",
            "--grpc",
            "0.0.0.0:0",
            "--http",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing plaintext ingest") && err.contains("--insecure"),
        "{err}"
    );
}

/// `curl` over TLS with the CA: (HTTP status, body).
fn curl(url: &str, ca: &Path, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "--max-time", "2", "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(url).output().expect("curl is installed");
    let mut body = out.stdout;
    let split = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&body[split + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(split);
    (code, body)
}

/// Tools read their streams only with their own bearer token, over TLS:
/// the HTTP stream and the gRPC subscription answer 401/UNAUTHENTICATED
/// without it or with another, and count each refusal; with it, packets
/// flow. Plaintext to the TLS HTTP port is refused at the handshake.
#[test]
fn tools_need_their_token_over_tls() {
    use tapestry_proto::tool::v1::{tool_subscribe_client::ToolSubscribeClient, SubscribeRequest};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = ca("cluster-ca");
    let (server_cert, server_key) = issue(&cluster, "aggregator", &[], true);
    let stream_token = write(d, "stream.token", "s3cret-stream-token\n");
    let sub_token = write(d, "sub.token", "s3cret-sub-token");
    let mut flags = server_flags(d, &cluster, &server_cert, &server_key);
    flags.push("--http-tls".to_string());
    let ca_file = d.join("ca.pem");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agg = Aggregator::start_with(
        &format!(
            r#"
sinks:
  - {{ name: stream, type: http, token_file: "{}" }}
  - {{ name: sub, type: grpc, token_file: "{}" }}
policies:
  - name: all
    sinks: [stream, sub]
"#,
            stream_token.display(),
            sub_token.display()
        ),
        d,
        &flags,
    );
    let url = |path: &str| format!("https://{}{path}", agg.http);
    let pcap = url("/v1/tools/stream/pcap");
    let (code, body) = curl(&pcap, &ca_file, None);
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("bearer token"));
    assert_eq!(curl(&pcap, &ca_file, Some("s3cret-sub-token")).0, 401);
    // The right token: the stream opens with the pcap header (curl's
    // time limit ends it).
    let (_, body) = curl(&pcap, &ca_file, Some("s3cret-stream-token"));
    assert!(
        body.starts_with(&[0xd4, 0xc3, 0xb2, 0xa1]) || body.starts_with(&[0x4d, 0x3c, 0xb2, 0xa1]),
        "{body:?}"
    );

    let rt = runtime();
    rt.block_on(async {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cluster.pem));
        let channel = Endpoint::from_shared(format!("https://{}", agg.grpc))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ToolSubscribeClient::new(channel);
        let ask = |token: Option<&str>| {
            let mut req = tonic::Request::new(SubscribeRequest { sink: "sub".into() });
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            req
        };
        let status = client.subscribe(ask(None)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        let status = client
            .subscribe(ask(Some("s3cret-stream-token")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(client
            .subscribe(ask(Some("s3cret-sub-token")))
            .await
            .is_ok());
    });

    // Plaintext HTTP to the TLS port: refused at the handshake.
    let plain = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{}/healthz", agg.http))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");

    let (code, metrics) = curl(&url("/metrics"), &ca_file, None);
    assert_eq!(code, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    let value = |line: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line} not in metrics"))
    };
    assert_eq!(
        value("tapestry_aggregator_sink_refused_total{sink=\"stream\",type=\"http\",reason=\"unauthenticated\"}"),
        2.0
    );
    assert_eq!(
        value("tapestry_aggregator_sink_refused_total{sink=\"sub\",type=\"grpc\",reason=\"unauthenticated\"}"),
        2.0
    );
    assert!(value("tapestry_aggregator_http_refused_total{reason=\"tls-handshake\"}") >= 1.0);
}

/// PCAP-over-IP offered over TLS: a client trusting the CA reads the pcap
/// stream through the handshake; one speaking plaintext gets nothing and
/// is counted.
#[test]
fn pcap_over_ip_over_tls() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = ca("cluster-ca");
    let (server_cert, server_key) = issue(&cluster, "aggregator", &[], true);
    let flags = server_flags(d, &cluster, &server_cert, &server_key);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agg = Aggregator::start_with(
        "sinks:\n  - { name: sealed, type: pcap_over_ip, listen: \"127.0.0.1:0\", tls: true }\npolicies:\n  - { name: all, sinks: [sealed] }\n",
        d,
        &flags,
    );
    let addr = agg.sinks["sealed"].clone();
    let rt = runtime();
    let header = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut cluster.pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut header = [0u8; 24];
        tls.read_exact(&mut header).await.unwrap();
        header
    });
    assert_eq!(&header[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
    // Plaintext: the handshake fails, no pcap bytes come back.
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let got = plain.read(&mut buf).unwrap_or(0);
    assert!(
        got < 4 || buf[..4] != [0xd4, 0xc3, 0xb2, 0xa1],
        "plaintext got the pcap stream"
    );
    agg.wait_metric(
        "tapestry_aggregator_sink_refused_total{sink=\"sealed\",type=\"pcap_over_ip\",reason=\"tls_handshake\"}",
        1.0,
        10,
    );
}
