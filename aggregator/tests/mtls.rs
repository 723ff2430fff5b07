//! Ingest over mutual TLS: only a tap with a certificate from the cluster
//! CA gets a stream, and only for the node its certificate names; every
//! refusal is counted by reason.

mod common;

use std::path::{Path, PathBuf};

use common::{exchange, tap_batch, Aggregator};
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
    let flags = [
        "--tls-cert".to_string(),
        write(d, "server.pem", &server_cert).display().to_string(),
        "--tls-key".to_string(),
        write(d, "server-key.pem", &server_key)
            .display()
            .to_string(),
        "--client-ca".to_string(),
        write(d, "ca.pem", &cluster.pem).display().to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agg = Aggregator::start_with(
        r#"
sinks:
  - { name: out, type: pcap_over_ip, listen: "127.0.0.1:0" }
policies:
  - name: all
    sinks: [out]
"#,
        d,
        &flags,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
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
    std::fs::write(
        &cfg,
        "sinks:\n  - { name: out, type: pcap_over_ip, listen: \"127.0.0.1:0\" }\npolicies:\n  - name: all\n    sinks: [out]\n",
    )
    .unwrap();
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
