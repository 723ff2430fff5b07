//! `--aggregator-service NAMESPACE/NAME:PORT`: the aggregator's addresses
//! from its Service's EndpointSlices (no kube-proxy needed: the agent
//! connects to an endpoint directly). The slices are watched, and every
//! change publishes the ready endpoints' URLs for the shipper, which moves
//! when its endpoint leaves the list.

use std::{fmt, str::FromStr, sync::Arc};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{runtime::watcher, Api, Client};
use tapestry_runtime::Informer;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::StatusBoard;

/// A Service port as its EndpointSlices list it: by name or by number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Name(String),
    Number(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub port: PortRef,
}

impl FromStr for ServiceRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = "expected NAMESPACE/NAME:PORT, e.g. tapestry-system/aggregator:grpc";
        let (namespace, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` has no namespace: {shape}"))?;
        let (name, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` has no port: {shape}"))?;
        for (what, v) in [("namespace", namespace), ("name", name), ("port", port)] {
            if v.is_empty() {
                return Err(format!("`{s}`: the {what} is empty: {shape}"));
            }
        }
        let port = match port.parse::<u16>() {
            Ok(0) => return Err(format!("`{s}`: port 0 is not a port")),
            Ok(n) => PortRef::Number(n),
            Err(_) if port.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
                PortRef::Name(port.to_string())
            }
            Err(_) => {
                return Err(format!(
                    "`{s}`: port `{port}` is neither a number nor a port name"
                ))
            }
        };
        Ok(ServiceRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port,
        })
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortRef::Name(n) => write!(f, "{}/{}:{n}", self.namespace, self.name),
            PortRef::Number(n) => write!(f, "{}/{}:{n}", self.namespace, self.name),
        }
    }
}

/// The URLs of the ready endpoints of `slices` on `port` (a slice port with
/// that name, or that number), sorted and without duplicates. An endpoint
/// whose readiness is unknown counts as ready, as the API says.
pub fn ready_urls<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: &PortRef,
    scheme: &str,
) -> Vec<String> {
    let mut urls = Vec::new();
    for slice in slices {
        let number = slice.ports.iter().flatten().find_map(|p| {
            let matches = match port {
                PortRef::Name(n) => p.name.as_deref() == Some(n.as_str()),
                PortRef::Number(n) => p.port == Some(i32::from(*n)),
            };
            matches.then_some(p.port).flatten()
        });
        let Some(number) = number.filter(|n| (1..=65535).contains(n)) else {
            continue;
        };
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for addr in &ep.addresses {
                let host = match addr.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
                    Ok(v4) => v4.to_string(),
                    // addressType FQDN
                    Err(_) if slice.address_type == "FQDN" => addr.clone(),
                    Err(_) => continue,
                };
                urls.push(format!("{scheme}://{host}:{number}"));
            }
        }
    }
    urls.sort();
    urls.dedup();
    urls
}

/// Follows the Service's EndpointSlices for good, publishing the ready
/// URLs on every change once they have been listed.
pub async fn watch_endpoints(
    client: Client,
    service: ServiceRef,
    out: watch::Sender<Vec<String>>,
    board: Arc<StatusBoard>,
    scheme: &'static str,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &service.namespace);
    let cfg =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={}", service.name));
    let slices = Informer::new(api, cfg);
    let changed = Arc::new(Notify::new());
    let c = changed.clone();
    slices.on_change(move |_, _| c.notify_one());
    let what = format!("watching the EndpointSlices of {service}");
    slices.on_watch_error(move |e| match e {
        Some(e) => {
            let msg = format!("{what}: {e}");
            if board.set_problems("aggregator-service", vec![msg.clone()]) {
                warn!("{msg}");
            }
        }
        None => {
            board.set_problems("aggregator-service", vec![]);
        }
    });
    let shutdown = CancellationToken::new();
    let _stop_watch = shutdown.clone().drop_guard();
    slices.start(shutdown);
    slices.ready().await;
    loop {
        let urls = ready_urls(
            slices.store.state().iter().map(|s| s.as_ref()),
            &service.port,
            scheme,
        );
        out.send_if_modified(|cur| {
            if *cur != urls {
                info!(service = %service, endpoints = ?urls, "aggregator endpoints changed");
                *cur = urls;
                true
            } else {
                false
            }
        });
        changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parses_service_references() {
        assert_eq!(
            "tapestry-system/aggregator:grpc".parse::<ServiceRef>(),
            Ok(ServiceRef {
                namespace: "tapestry-system".into(),
                name: "aggregator".into(),
                port: PortRef::Name("grpc".into())
            })
        );
        assert_eq!(
            "ns/agg:50051".parse::<ServiceRef>().unwrap().port,
            PortRef::Number(50051)
        );
        for (bad, needle) in [
            ("agg:50051", "no namespace"),
            ("ns/agg", "no port"),
            ("ns/:1", "name is empty"),
            ("ns/agg:", "port is empty"),
            ("ns/agg:0", "port 0"),
            ("ns/agg:a b", "neither a number"),
        ] {
            let e = bad.parse::<ServiceRef>().unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn ready_endpoints_on_the_named_port() {
        let slices = [
            slice(json!({
                "metadata": {"name": "agg-1"}, "addressType": "IPv4",
                "ports": [{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 50051}],
                "endpoints": [
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                    // Unknown readiness counts as ready.
                    {"addresses": ["10.0.0.1"]},
                ]
            })),
            slice(json!({
                "metadata": {"name": "agg-2"}, "addressType": "IPv6",
                "ports": [{"name": "grpc", "port": 50052}],
                "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": true}}]
            })),
            slice(json!({
                "metadata": {"name": "other-port"}, "addressType": "IPv4",
                "ports": [{"name": "http", "port": 80}],
                "endpoints": [{"addresses": ["10.0.0.9"]}]
            })),
        ];
        assert_eq!(
            ready_urls(&slices, &PortRef::Name("grpc".into()), "http"),
            [
                "http://10.0.0.1:50051",
                "http://10.0.0.2:50051",
                "http://[fd00::5]:50052"
            ]
        );
        assert_eq!(
            ready_urls(&slices, &PortRef::Number(80), "http"),
            ["http://10.0.0.9:80"]
        );
        assert_eq!(
            ready_urls(&slices, &PortRef::Name("none".into()), "http"),
            Vec::<String>::new()
        );
    }
}
