//! API clients of node agents and hollow nodes, which speak HTTP/2 as
//! client-go (and so a kubelet) does.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
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
    if let Some(proxy) = &config.proxy_url {
        bail!("API server proxies are not supported here (kubeconfig has proxy-url {proxy})");
    }
    // The connector offers h2 by ALPN itself.
    let tls = config
        .rustls_client_config()
        .context("TLS settings of the kubeconfig")?;
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
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_only(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(15))
        .http2_keep_alive_while_idle(true)
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

#[cfg(test)]
mod tests {
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
