//! Node credentials and the pods' streaming subresources.
//!
//! `pods/log`, `pods/exec` and `pods/attach` are served by the kubelet of
//! the pod's node: the API server looks the node's address up, connects to
//! its HTTPS API with a client certificate from the cluster CA (as
//! kube-apiserver does) and relays the response — for exec and attach,
//! the upgraded (WebSocket) connection in both directions.
//!
//! The kubelet's serving certificate must come from the cluster CA, cover
//! the address dialled and name the pod's node (as kube-apiserver with
//! `--kubelet-certificate-authority`, plus the node's name); the kubelet in
//! turn only accepts the API server's kubelet-client certificate.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;

use crate::error::{ApiError, Target};
use crate::pki::Pki;
use crate::rest::Api;

pub use crate::authz::bootstrap::NODES as NODES_GROUP;
pub use tapestry_runtime::KUBELET_CLIENT_CN;

/// Make sure the API server has its kubelet client certificate, and that
/// no shared node token from tokens.csv (which older versions wrote, one
/// for every node) still authenticates: nodes join with bootstrap tokens
/// ([`crate::bootstraptokens`]) and speak with certificates of their own.
pub fn ensure_node_credentials(data_dir: &Path, pki: &Pki) -> Result<()> {
    let tokens = data_dir.join("tokens.csv");
    let text =
        fs::read_to_string(&tokens).with_context(|| format!("reading {}", tokens.display()))?;
    let shared_node_token = |l: &str| l.contains(NODES_GROUP) && !l.trim_start().starts_with('#');
    if text.lines().any(shared_node_token) {
        let kept: String = text
            .lines()
            .filter(|l| !shared_node_token(l))
            .map(|l| format!("{l}\n"))
            .collect();
        crate::pki::write_private(&tokens, &kept)?;
        tracing::info!(
            "removed the shared node token from tokens.csv: nodes join with bootstrap tokens now"
        );
    }
    let crt = pki.dir.join("apiserver-kubelet-client.crt");
    let key = pki.dir.join("apiserver-kubelet-client.key");
    if !crt.exists() || !key.exists() {
        let (c, k) = pki.issue(KUBELET_CLIENT_CN, &["system:masters"], &[], false)?;
        for (path, contents) in [(&key, k), (&crt, c)] {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(contents.as_bytes())?;
        }
    }
    Ok(())
}

/// Checks a kubelet's serving certificate: signed by the cluster CA, for
/// the address dialled, and naming the node the request is for
/// (`system:node:NAME`), so a node that rewrote another node's address
/// cannot take that node's traffic.
#[derive(Debug)]
struct KubeletServerCert {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    node: String,
}

impl ServerCertVerifier for KubeletServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let subject =
            tapestry_runtime::x509::subject(end_entity.as_ref()).map_err(rustls::Error::General)?;
        let want = tapestry_runtime::csr::node_user(&self.node);
        if subject.common_name != want {
            return Err(rustls::Error::General(format!(
                "the kubelet's certificate is for {:?}, not {want:?}",
                subject.common_name
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// TLS client for kubelet connections: presents the API server's
/// kubelet-client certificate and verifies each kubelet as the node it
/// must be ([`KubeletServerCert`]). Cheap to clone (shared parts).
#[derive(Clone)]
pub struct KubeletClient {
    provider: Arc<rustls::crypto::CryptoProvider>,
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    identity: Arc<rustls::sign::CertifiedKey>,
}

#[derive(Debug)]
struct FixedIdentity(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedIdentity {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl KubeletClient {
    pub fn new(pki: &Pki) -> Result<KubeletClient> {
        let crt = fs::read_to_string(pki.dir.join("apiserver-kubelet-client.crt"))?;
        let key = fs::read_to_string(pki.dir.join("apiserver-kubelet-client.key"))?;
        let certs = rustls_pemfile::certs(&mut crt.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key =
            rustls_pemfile::private_key(&mut key.as_bytes())?.context("no kubelet client key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let identity = Arc::new(rustls::sign::CertifiedKey::from_der(certs, key, &provider)?);
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pki.ca_cert_pem.as_bytes()) {
            roots.add(c.context("parsing the cluster CA")?)?;
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .context("kubelet certificate verifier")?;
        Ok(KubeletClient {
            provider,
            webpki,
            identity,
        })
    }

    /// A connector that accepts only `node`'s kubelet.
    pub(crate) fn connector(
        &self,
        node: &str,
    ) -> Result<tokio_rustls::TlsConnector, rustls::Error> {
        let verifier = KubeletServerCert {
            webpki: self.webpki.clone(),
            node: node.to_string(),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(FixedIdentity(self.identity.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// A TLS connection to the kubelet of `node` (its Node object), the
    /// dial bounded to 10 s. Returns it with the `host:port` dialled.
    pub(crate) async fn dial(
        &self,
        node: &str,
        node_obj: &Value,
    ) -> Result<
        (
            tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
            String,
        ),
        String,
    > {
        let addresses = node_obj
            .pointer("/status/addresses")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let ip = addresses
            .iter()
            .find(|a| a["type"] == "InternalIP")
            .or_else(|| addresses.first())
            .and_then(|a| a["address"].as_str())
            .ok_or_else(|| format!("node {node} reports no address"))?
            .to_string();
        let port = node_obj
            .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
            .and_then(Value::as_u64)
            .unwrap_or(10250);
        let host = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&host),
        )
        .await
        .map_err(|_| format!("dialing {host}: timeout"))?
        .map_err(|e| format!("dialing {host}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::try_from(ip).map_err(|e| e.to_string())?;
        let tls = self
            .connector(node)
            .map_err(|e| e.to_string())?
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS to {host}: {e}"))?;
        Ok((tls, host))
    }
}

/// `/api/v1/namespaces/NS/pods/NAME/{log,exec,attach}` → (ns, name, sub).
pub fn streaming_target(path: &str) -> Option<(String, String, String)> {
    // Every request passes here; most are not pods' streams.
    let path = path.trim_end_matches('/');
    if !["/log", "/exec", "/attach"]
        .iter()
        .any(|s| path.ends_with(s))
    {
        return None;
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, sub @ ("log" | "exec" | "attach")] => {
            Some((ns.to_string(), name.to_string(), sub.to_string()))
        }
        _ => None,
    }
}

fn pod_target(name: &str, sub: &str) -> Target {
    Target {
        group: String::new(),
        resource: format!("pods/{sub}"),
        kind: "Pod".into(),
        name: name.to_string(),
    }
}

async fn get_json(
    api: &Api,
    plural: &str,
    ns: Option<&str>,
    name: &str,
    target: &Target,
) -> Result<Value, ApiError> {
    let def = api
        .registry
        .get("", "v1", plural)
        .ok_or_else(|| ApiError::Internal(format!("{plural} not registered")))?;
    let kv = api
        .store
        .get(&def.key(ns, name))
        .await
        .map_err(|e| ApiError::from_store(e, target))?
        .ok_or_else(|| ApiError::NotFound(target.clone()))?;
    serde_json::from_slice(&kv.value).map_err(ApiError::internal)
}

/// Proxy one streaming request to the pod's kubelet.
pub async fn proxy(api: &Api, client: &KubeletClient, mut req: http::Request<Body>) -> Response {
    match proxy_inner(api, client, &mut req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn proxy_inner(
    api: &Api,
    client: &KubeletClient,
    req: &mut http::Request<Body>,
) -> Result<Response, ApiError> {
    let (ns, name, sub) = streaming_target(req.uri().path())
        .ok_or_else(|| ApiError::BadRequest("not a streaming path".into()))?;
    let target = pod_target(&name, &sub);
    let pod = get_json(
        api,
        "pods",
        Some(&ns),
        &name,
        &Target {
            resource: "pods".into(),
            ..target.clone()
        },
    )
    .await?;
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let mut query: Vec<(String, String)> = Vec::new();
    let mut container = String::new();
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "container" {
            container = v.to_string();
        } else {
            query.push((k.to_string(), v.to_string()));
        }
    }
    if container.is_empty() {
        let names: Vec<&str> = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        let default = pod
            .pointer("/metadata/annotations/kubectl.kubernetes.io~1default-container")
            .and_then(Value::as_str);
        container = match (default, names.as_slice()) {
            (Some(d), _) => d.to_string(),
            (None, [one]) => one.to_string(),
            (None, _) => {
                return Err(ApiError::BadRequest(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    names.join(" ")
                )))
            }
        };
    }
    let node_obj = get_json(
        api,
        "nodes",
        None,
        node,
        &Target {
            group: String::new(),
            resource: "nodes".into(),
            kind: "Node".into(),
            name: node.into(),
        },
    )
    .await?;
    let kpath = match sub.as_str() {
        "log" => "containerLogs",
        other => other,
    };
    let qs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let uri = format!("/{kpath}/{ns}/{name}/{container}?{}", qs.join("&"));
    let dial_err =
        |e: &dyn std::fmt::Display| ApiError::Internal(format!("error dialing backend: {e}"));
    let (tls, host) = client
        .dial(node, &node_obj)
        .await
        .map_err(|e| dial_err(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| dial_err(&e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut out = http::Request::builder()
        .method(req.method().clone())
        .uri(&uri);
    for h in [
        http::header::CONNECTION,
        http::header::UPGRADE,
        http::header::SEC_WEBSOCKET_KEY,
        http::header::SEC_WEBSOCKET_VERSION,
        http::header::SEC_WEBSOCKET_PROTOCOL,
    ] {
        for v in req.headers().get_all(&h) {
            out = out.header(&h, v);
        }
    }
    out = out.header(
        http::header::HOST,
        HeaderValue::from_str(&host).map_err(ApiError::internal)?,
    );
    let out = out
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(ApiError::internal)?;
    let mut resp = sender.send_request(out).await.map_err(|e| dial_err(&e))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let client_upgrade = hyper::upgrade::on(&mut *req);
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(b)) = (client_upgrade.await, backend_upgrade.await) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(b)).await;
        });
        let mut r = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (k, v) in resp.headers() {
            r = r.header(k, v);
        }
        return r.body(Body::empty()).map_err(ApiError::internal);
    }
    let (parts, body) = resp.into_parts();
    let mut r = Response::builder().status(parts.status);
    for (k, v) in &parts.headers {
        if k != http::header::CONNECTION && k != http::header::TRANSFER_ENCODING {
            r = r.header(k, v);
        }
    }
    r.body(Body::new(body)).map_err(ApiError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_paths() {
        assert_eq!(
            streaming_target("/api/v1/namespaces/default/pods/web/log"),
            Some(("default".into(), "web".into(), "log".into()))
        );
        assert!(streaming_target("/api/v1/namespaces/default/pods/web/exec").is_some());
        assert!(streaming_target("/api/v1/namespaces/default/pods/web/status").is_none());
        assert!(streaming_target("/api/v1/namespaces/default/pods/web").is_none());
    }

    #[test]
    fn node_credentials_drop_the_shared_node_token() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        let pki = Pki::load_or_create(&dir.path().join("pki"), &names).unwrap();
        let tokens_csv = dir.path().join("tokens.csv");
        let (_, admin) = crate::pki::Tokens::load_or_create(&tokens_csv).unwrap();
        let mut text = fs::read_to_string(&tokens_csv).unwrap();
        text.push_str(&format!(
            "shared,system:node:*,system:node,\"{NODES_GROUP}\"\n"
        ));
        fs::write(&tokens_csv, text).unwrap();
        ensure_node_credentials(dir.path(), &pki).unwrap();
        ensure_node_credentials(dir.path(), &pki).unwrap();
        let tokens = crate::pki::Tokens::load(&tokens_csv).unwrap();
        assert!(tokens.authenticate("shared").is_none());
        assert!(tokens.authenticate(&admin).is_some());
        assert!(KubeletClient::new(&pki).is_ok());
    }
}
