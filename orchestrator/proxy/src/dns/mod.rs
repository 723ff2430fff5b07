//! Cluster DNS on every node: the node agent serves the cluster zone on its
//! pod bridge's address (the pods' gateway), from the same watches as the
//! proxy, and publishes that address as its node's endpoint of the
//! `kube-dns` Service (internal traffic policy Local, so every pod asks the
//! server on its own node through the Service's ClusterIP).

pub mod server;
pub mod stats;
pub mod zone;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Watches;
use server::DnsServer;
pub use stats::DnsStats;
use zone::Zone;

/// The Service pods send their queries to.
pub const SERVICE_NAMESPACE: &str = "kube-system";
pub const SERVICE_NAME: &str = "kube-dns";
/// How long answers live in caches, as in CoreDNS's standard configuration.
pub const TTL: u32 = 30;

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The cluster domain, e.g. `cluster.local`.
    pub domain: String,
    pub listen: SocketAddr,
    /// Where names outside the cluster zone are asked.
    pub upstreams: Vec<SocketAddr>,
    /// UDP sockets sharing the port, each served by a task of its own.
    pub udp_workers: usize,
}

/// Bind the server's sockets, register with `watches`, and answer once
/// they have listed everything. Binding errors (the port taken) surface
/// here, before anything runs.
pub fn start(
    watches: &Watches,
    config: DnsConfig,
    stats: Arc<DnsStats>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let zone = Zone::new(&config.domain, TTL).map_err(anyhow::Error::msg)?;
    let udp = (0..config.udp_workers.max(1))
        .map(|_| server::udp_socket(config.listen).map(Arc::new))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("binding DNS on udp {}", config.listen))?;
    let tcp = server::tcp_listener(config.listen)
        .with_context(|| format!("binding DNS on tcp {}", config.listen))?;
    let changes = watches.changes();
    let watches = watches.clone();
    let zone = Arc::new(RwLock::new(zone));
    let server = Arc::new(DnsServer::new(
        zone.clone(),
        config.upstreams.clone(),
        stats.clone(),
    ));
    Ok(tokio::spawn(async move {
        if !watches.ready(&shutdown).await {
            return;
        }
        // Everything at once before the first answer (queries wait in the
        // sockets meanwhile), then only what changes.
        let all: Vec<_> = watches
            .all_services()
            .into_iter()
            .map(|(key, service, slices)| {
                let slices: Vec<&EndpointSlice> = slices.iter().map(Arc::as_ref).collect();
                let records = read(&zone).service_records(&service, &slices);
                (key, records)
            })
            .collect();
        {
            let mut zone = write(&zone);
            for (key, records) in all {
                zone.set_service(&key, records);
            }
            stats.services.set(zone.services() as i64);
        }
        for socket in udp {
            tokio::spawn(server::serve_udp(socket, server.clone(), shutdown.clone()));
        }
        tokio::spawn(server::serve_tcp(tcp, server.clone(), shutdown.clone()));
        tracing::info!(listen = %config.listen, domain = %config.domain, "cluster DNS serving");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.changed() => {}
            }
            for key in changes.take() {
                let records = match watches.service(&key) {
                    (Some(service), slices) => {
                        let slices: Vec<&EndpointSlice> = slices.iter().map(Arc::as_ref).collect();
                        read(&zone).service_records(&service, &slices)
                    }
                    (None, _) => Vec::new(),
                };
                let mut zone = write(&zone);
                zone.set_service(&key, records);
                stats.services.set(zone.services() as i64);
            }
            server.zone_changed();
        }
    }))
}

fn read(zone: &RwLock<Zone>) -> std::sync::RwLockReadGuard<'_, Zone> {
    zone.read().unwrap_or_else(|e| e.into_inner())
}

fn write(zone: &RwLock<Zone>) -> std::sync::RwLockWriteGuard<'_, Zone> {
    zone.write().unwrap_or_else(|e| e.into_inner())
}

/// The `nameserver` addresses of a resolv.conf.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// The name of a node's EndpointSlice of `kube-dns`.
fn slice_name(node: &str) -> String {
    format!("{SERVICE_NAME}-{node}")
}

/// Publish this node's DNS server as its endpoint of the `kube-dns`
/// Service (created or replaced).
pub async fn publish_endpoint(client: &Client, node: &str, address: IpAddr) -> Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), SERVICE_NAMESPACE);
    let name = slice_name(node);
    let mut slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "namespace": SERVICE_NAMESPACE,
            "labels": {
                crate::services::SERVICE_NAME_LABEL: SERVICE_NAME,
                "endpointslice.kubernetes.io/managed-by": "tapestry-node",
            },
        },
        "addressType": if address.is_ipv4() { "IPv4" } else { "IPv6" },
        "endpoints": [{
            "addresses": [address.to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": node,
        }],
        "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ],
    }))?;
    let published: Result<(), kube::Error> = match api.create(&PostParams::default(), &slice).await
    {
        Ok(_) => Ok(()),
        Err(e) if tapestry_runtime::is_status(&e, 409) => {
            let existing = api.get(&name).await?;
            slice.metadata.resource_version = existing.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &slice).await?;
            Ok(())
        }
        Err(e) => Err(e),
    };
    published.with_context(|| format!("publishing {SERVICE_NAMESPACE}/{name}"))
}

/// Withdraw this node's endpoint (the node is going away).
pub async fn withdraw_endpoint(client: &Client, node: &str) -> Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), SERVICE_NAMESPACE);
    tapestry_runtime::ignore_not_found(
        api.delete(&slice_name(node), &DeleteParams::default())
            .await,
    )
    .with_context(|| format!("deleting {SERVICE_NAMESPACE}/{}", slice_name(node)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn nameservers_of_a_resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver  fd00::53 \nnameserver bogus\noptions ndots:1\n";
        assert_eq!(
            super::nameservers(text),
            [
                "10.0.0.2".parse::<std::net::IpAddr>().unwrap(),
                "fd00::53".parse().unwrap()
            ]
        );
    }
}
