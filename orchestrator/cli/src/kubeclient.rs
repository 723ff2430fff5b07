//! API clients of node agents and hollow nodes, which speak HTTP/2 as
//! client-go (and so a kubelet) does.

use std::path::Path;

use anyhow::{Context, Result};
use kube::client::ConfigExt;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// An HTTP/2 client (see [`http2`]) from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    http2(config)
}

/// A kube-rs client that speaks HTTP/2: concurrent requests share one TLS
/// connection as streams instead of each taking a pooled HTTP/1.1
/// connection of its own, so many small requests go out in few TLS records
/// and system calls.
pub fn http2(config: kube::Config) -> Result<Client> {
    // The connector offers h2 by ALPN itself.
    let tls = config
        .rustls_client_config()
        .context("TLS settings of the kubeconfig")?;
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector(tcp);
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
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
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace))
}
