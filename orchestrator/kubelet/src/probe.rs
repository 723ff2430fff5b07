//! Liveness, readiness and startup probes: exec (through the runtime),
//! httpGet and tcpSocket (to the pod's IP).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Kubelet;

#[derive(Default, Debug)]
pub struct ProbeState {
    last_run: Option<Instant>,
    successes: i32,
    failures: i32,
    /// Current verdict (readiness: ready).
    pub ok: bool,
    pub succeeded_once: bool,
}

/// Run the probe if due; returns true when it just crossed its failure
/// threshold (the container is to be restarted, for liveness/startup).
pub async fn step(
    kubelet: &Kubelet,
    state: &mut ProbeState,
    p: &Probe,
    id: &str,
    ip: &str,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
) -> bool {
    let initial = Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64);
    if let Some(s) = started_at {
        if (chrono::Utc::now() - s).to_std().unwrap_or_default() < initial {
            return false;
        }
    }
    let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
    if state.last_run.is_some_and(|t| t.elapsed() < period) {
        return false;
    }
    state.last_run = Some(Instant::now());
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    let success = tokio::time::timeout(timeout, run(kubelet, p, id, ip))
        .await
        .unwrap_or(false);
    if success {
        state.successes += 1;
        state.failures = 0;
        if state.successes >= p.success_threshold.unwrap_or(1).max(1) {
            state.ok = true;
            state.succeeded_once = true;
        }
        false
    } else {
        state.failures += 1;
        state.successes = 0;
        if state.failures >= p.failure_threshold.unwrap_or(3).max(1) {
            state.ok = false;
            state.failures = 0;
            return true;
        }
        false
    }
}

fn port(p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(s) => s.parse().ok(),
    }
}

async fn run(kubelet: &Kubelet, p: &Probe, id: &str, ip: &str) -> bool {
    if let Some(e) = &p.exec {
        let args = e.command.clone().unwrap_or_default();
        let out = kubelet
            .runtime
            .exec_command(id, &args, false)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await;
        return out.is_ok_and(|o| o.status.success());
    }
    if let Some(t) = &p.tcp_socket {
        let host = t.host.clone().unwrap_or_else(|| ip.to_string());
        let Some(port) = port(&t.port) else {
            return false;
        };
        return TcpStream::connect((host.as_str(), port)).await.is_ok();
    }
    if let Some(h) = &p.http_get {
        let host = h.host.clone().unwrap_or_else(|| ip.to_string());
        let Some(port) = port(&h.port) else {
            return false;
        };
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let Ok(tcp) = TcpStream::connect((host.as_str(), port)).await else {
            return false;
        };
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\n\r\n"
        );
        if h.scheme.as_deref() == Some("HTTPS") {
            let Ok(tls) = https_probe_connect(tcp, &host).await else {
                return false;
            };
            return http_status_ok(tls, &req).await;
        }
        return http_status_ok(tcp, &req).await;
    }
    false
}

/// Sends `req` and whether the answer's status is 2xx or 3xx.
async fn http_status_ok<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &str) -> bool {
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let Ok(n) = s.read(&mut buf).await else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..400).contains(&c))
}

/// TLS for an HTTPS probe. As Kubernetes' kubelet does, the server's
/// certificate is not verified: a probe asks whether the container
/// answers, and trusts nothing it says beyond the status code.
async fn https_probe_connect(
    tcp: TcpStream,
    host: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Unverified(provider)))
        .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Accepts any server certificate (HTTPS probes only); signatures are
/// still checked, so the handshake itself is sound.
#[derive(Debug)]
struct Unverified(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS server with a self-signed certificate answering one request
    /// with 200; its address.
    async fn https_server() -> std::net::SocketAddr {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert = rcgen::generate_simple_self_signed(vec!["example.invalid".into()]).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let mut buf = [0u8; 512];
                        let _ = tls.read(&mut buf).await;
                        let _ = tls.write_all(b"HTTP/1.0 200 OK\r\n\r\nok").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn https_probes_speak_tls_without_verifying() {
        let addr = https_server().await;
        let req = "GET /healthz HTTP/1.0\r\n\r\n";
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = https_probe_connect(tcp, "127.0.0.1").await.unwrap();
        assert!(http_status_ok(tls, req).await);
        // Plain HTTP to a TLS port is no answer.
        let tcp = TcpStream::connect(addr).await.unwrap();
        assert!(!http_status_ok(tcp, req).await);
    }
}
