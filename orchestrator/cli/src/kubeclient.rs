//! API clients of node agents and hollow nodes, which speak HTTP/2 as
//! client-go (and so a kubelet) does.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kube::client::retry::RetryPolicy;
use kube::client::ConfigExt;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// An HTTP/2 client (see [`http2`]) from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<Client> {
    http2(config_from(path).await?)
}

/// The client configuration a kubeconfig file describes.
pub async fn config_from(path: &Path) -> Result<kube::Config> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))
}

/// A kube-rs client that speaks HTTP/2: concurrent requests share one TLS
/// connection as streams instead of each taking a pooled HTTP/1.1
/// connection of its own, so many small requests go out in few TLS records
/// and system calls.
pub fn http2(config: kube::Config) -> Result<Client> {
    http2_with_identity(config, None)
}

/// [`http2`], presenting `identity` as the client certificate (replaced
/// while in use when the certificate is renewed).
pub fn http2_with_identity(
    config: kube::Config,
    identity: Option<std::sync::Arc<tapestry_runtime::identity::LiveIdentity>>,
) -> Result<Client> {
    let http = connection(&config, identity)?;
    client_over(&config, http, Vec::new())
}

/// Clients for many identities over one connection: each asks to act as
/// its user and groups (impersonation headers, as `kubectl --as`), which
/// the kubeconfig's own user must be allowed to do. Hollow nodes speak
/// each as its own node this way.
pub fn http2_impersonating(
    config: kube::Config,
) -> Result<impl Fn(&str, &[&str]) -> Result<Client>> {
    let http = connection(&config, None)?;
    Ok(move |user: &str, groups: &[&str]| {
        let mut headers = vec![(
            http::HeaderName::from_static("impersonate-user"),
            http::HeaderValue::from_str(user).context("impersonated user")?,
        )];
        for g in groups {
            headers.push((
                http::HeaderName::from_static("impersonate-group"),
                http::HeaderValue::from_str(g).context("impersonated group")?,
            ));
        }
        client_over(&config, http.clone(), headers)
    })
}

type Connection = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    kube::client::Body,
>;

/// The HTTP/2 connection (pool) to the kubeconfig's server.
fn connection(
    config: &kube::Config,
    identity: Option<std::sync::Arc<tapestry_runtime::identity::LiveIdentity>>,
) -> Result<Connection> {
    if let Some(proxy) = &config.proxy_url {
        bail!("API server proxies are not supported here (kubeconfig has proxy-url {proxy})");
    }
    // The connector offers h2 by ALPN itself.
    let mut tls = config
        .rustls_client_config()
        .context("TLS settings of the kubeconfig")?;
    if let Some(identity) = identity {
        tls.client_auth_cert_resolver = identity;
    }
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(config.connect_timeout);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http2()
        .wrap_connector(tcp);
    // One connection carries everything, so a dead one must be noticed:
    // ping it when it has been quiet, as client-go's HTTP/2 health check
    // does (30s, 15s to answer).
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(15))
            .http2_keep_alive_while_idle(true)
            .build(https),
    )
}

/// A client over `http`, with `headers` on every request.
fn client_over(
    config: &kube::Config,
    http: Connection,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
) -> Result<Client> {
    // The same layers as kube-rs's own client, retries of 429/503/504
    // included.
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(
            config
                .auth_layer()
                .context("credentials of the kubeconfig")?,
        )
        .layer(
            config
                .extra_headers_layer()
                .context("headers of the kubeconfig")?,
        )
        .map_request(move |mut req: http::Request<kube::client::Body>| {
            for (name, value) in &headers {
                req.headers_mut().append(name.clone(), value.clone());
            }
            req
        })
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace.clone()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use k8s_openapi::api::core::v1::Namespace;
    use kube::Api;

    /// Against a plain-HTTP server that answers the first request with 503:
    /// both requests arrive as HTTP/2 and the client retries the first.
    #[tokio::test]
    async fn requests_go_as_http2_and_unavailable_is_retried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let service = tower::service_fn(move |req: http::Request<_>| {
                let mut seen = record.lock().expect("lock");
                seen.push(req.version());
                let status = if seen.len() == 1 { 503 } else { 200 };
                let body = r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"x"}}"#;
                let response = http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(body.to_string());
                async move { response }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tcp),
                        hyper_util::service::TowerToHyperService::new(service),
                    )
                    .await;
        });
        let url = format!("http://{addr}").parse().expect("url");
        let client = super::http2(kube::Config::new(url)).expect("client");
        let ns = Api::<Namespace>::all(client).get("x").await.expect("get");
        assert_eq!(ns.metadata.name.as_deref(), Some("x"));
        assert_eq!(
            *seen.lock().expect("lock"),
            [http::Version::HTTP_2, http::Version::HTTP_2]
        );
    }

    #[test]
    fn a_proxy_in_the_kubeconfig_is_refused_by_name() {
        let mut config = kube::Config::new("https://127.0.0.1:6443".parse().expect("url"));
        config.proxy_url = Some("http://proxy.example:3128".parse().expect("url"));
        let Err(err) = super::http2(config) else {
            panic!("a proxy must be refused");
        };
        assert!(err.to_string().contains("proxy.example:3128"), "{err}");
    }
}
