//! TLS on the gRPC port (and, with `--http-tls`, the HTTP port). Taps prove who they are with a client certificate
//! from the cluster CA (`tapestry:tap:NODE`); tools may connect without one
//! and present a bearer token instead, so the handshake verifies a client
//! certificate when one is offered and the services decide what they
//! require. The server's own certificate is read again when its files
//! change, so it can be rotated without a restart.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, Context as _};
use rustls::{
    pki_types::CertificateDer,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore, ServerConfig,
};
use tapestry_runtime::identity::LiveIdentity;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::Registry;

/// The files behind the gRPC port's TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The aggregator's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA whose client certificates are accepted (PEM).
    pub client_ca: PathBuf,
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// How often the certificate files are checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// Handshakes under way at once; connections past this wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = RootCertStore::empty();
    for c in read_certs(&files.client_ca)? {
        roots
            .add(c)
            .with_context(|| format!("--client-ca {}", files.client_ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| anyhow!("--client-ca {}: {e}", files.client_ca.display()))?;
    let resolver = ReloadingCert::new(files.clone())?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The HTTP port's TLS: the gRPC port's, speaking HTTP/1.1 as well (curl,
/// browsers, Prometheus).
pub fn http_config(grpc: &ServerConfig) -> Arc<ServerConfig> {
    let mut config = grpc.clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Which port a TLS listener serves: where its refusals are counted.
#[derive(Clone, Copy, Debug)]
pub enum Port {
    Grpc,
    Http,
}

impl Port {
    fn refuse(self, registry: &Registry, reason: &'static str) {
        match self {
            Port::Grpc => registry.refuse_ingest(reason),
            Port::Http => registry.refuse_http(reason),
        }
    }
}

/// TLS connections accepted on `listener`, each handshake on its own task
/// and bounded in time; failed handshakes (no TLS, a certificate from
/// another CA, too slow) are counted and logged, never served.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    port: Port,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(?port, "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, registry) = (acceptor.clone(), tx.clone(), registry.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        port.refuse(&registry, "tls-handshake");
                        tracing::warn!(%peer, ?port, "connection refused: TLS handshake failed: {e}");
                    }
                    Err(_) => {
                        port.refuse(&registry, "tls-handshake-timeout");
                        tracing::warn!(%peer, ?port, "connection refused: no TLS handshake within {HANDSHAKE_WITHIN:?}");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// TLS connections as an axum listener (the HTTP port with `--http-tls`).
pub struct TlsListener {
    incoming: ReceiverStream<io::Result<TlsStream<TcpStream>>>,
    local: std::net::SocketAddr,
}

impl TlsListener {
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        registry: Arc<Registry>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(TlsListener {
            incoming: incoming(listener, config, registry, Port::Http),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(tls)) => {
                    if let Ok(peer) = tls.get_ref().0.peer_addr() {
                        return (tls, peer);
                    }
                }
                Some(Err(_)) => {}
                // The accepting task is gone (the runtime is stopping).
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

fn read_pem(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn load(files: &TlsFiles) -> anyhow::Result<LiveIdentity> {
    LiveIdentity::from_pem(&read_pem(&files.cert)?, &read_pem(&files.key)?)
        .map_err(|e| anyhow!("{} and {}: {e}", files.cert.display(), files.key.display()))
}

fn modified(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

/// The server certificate, read again when its files change.
#[derive(Debug)]
struct ReloadingCert {
    files: TlsFiles,
    identity: LiveIdentity,
    /// When the files were last looked at, and their times then.
    checked: Mutex<(Instant, Option<(SystemTime, SystemTime)>)>,
}

impl ReloadingCert {
    fn new(files: TlsFiles) -> anyhow::Result<ReloadingCert> {
        Ok(ReloadingCert {
            identity: load(&files)?,
            checked: Mutex::new((Instant::now(), modified(&files))),
            files,
        })
    }

    /// Take up changed files (at most every [`RELOAD_CHECK`]). A pair that
    /// does not load (half written, key not the certificate's) leaves the
    /// old one in use until the next check.
    fn refresh(&self) {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if checked.0.elapsed() < RELOAD_CHECK {
            return;
        }
        checked.0 = Instant::now();
        let now = modified(&self.files);
        if now.is_none() || now == checked.1 {
            return;
        }
        let replaced = read_pem(&self.files.cert)
            .and_then(|cert| Ok((cert, read_pem(&self.files.key)?)))
            .and_then(|(cert, key)| {
                self.identity
                    .replace(&cert, &key)
                    .map_err(anyhow::Error::msg)
            });
        match replaced {
            Ok(()) => {
                checked.1 = now;
                tracing::info!(cert = %self.files.cert.display(), "gRPC certificate reloaded");
            }
            Err(e) => tracing::warn!("gRPC certificate not reloaded: {e:#}"),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        self.identity.resolve(hello)
    }
}
