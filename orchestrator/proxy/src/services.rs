//! From Kubernetes objects to the proxy's model: a Service and its
//! EndpointSlices become one [`ServicePort`] per port, with the ready
//! endpoints serving that port.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::rules::{Endpoint, Protocol, ServicePort};

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (3 hours).
const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// The Service's ports as the proxy routes them; none for headless and
/// ExternalName Services, which the proxy leaves alone. `slices` are the
/// Service's EndpointSlices; `node` is this node's name.
pub fn service_ports(service: &Service, slices: &[&EndpointSlice], node: &str) -> Vec<ServicePort> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let cluster_ips: Vec<Ipv4Addr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .fold(Vec::new(), |mut ips, ip| {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
            ips
        });
    if cluster_ips.is_empty() {
        return Vec::new();
    }
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_SECONDS)
    });
    let meta = &service.metadata;
    spec.ports
        .iter()
        .flatten()
        .filter_map(|port| {
            let protocol = Protocol::parse(port.protocol.as_deref().unwrap_or("TCP"))?;
            let port_name = port.name.clone().unwrap_or_default();
            Some(ServicePort {
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: meta.name.clone().unwrap_or_default(),
                endpoints: endpoints(slices, &port_name, protocol, node),
                port_name,
                protocol,
                cluster_ips: cluster_ips.clone(),
                port: u16::try_from(port.port).ok()?,
                node_port: port
                    .node_port
                    .filter(|_| node_ports)
                    .and_then(|p| u16::try_from(p).ok()),
                affinity_seconds,
                internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            })
        })
        .collect()
}

/// The ready IPv4 endpoints serving the named port. An endpoint whose
/// `ready` condition is unset counts as ready, as the API defines it.
fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    node: &str,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == "IPv4") {
        let target = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && Protocol::parse(p.protocol.as_deref().unwrap_or("TCP")) == Some(protocol)
        });
        let Some(port) = target
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse().ok()) else {
                continue;
            };
            out.push(Endpoint {
                ip,
                port,
                local: ep.node_name.as_deref() == Some(node),
            });
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080},
                      {"name": "dns", "protocol": "UDP", "port": 5353}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn ports_endpoints_and_policies() {
        let svc = service(json!({
            "type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
            "sessionAffinity": "ClientIP", "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"},
                      {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"}],
        }));
        let s = slice(json!([
            {"addresses": ["10.244.1.2"], "conditions": {"ready": true}, "nodeName": "n1"},
            {"addresses": ["10.244.2.2"], "nodeName": "n2"},
            {"addresses": ["10.244.3.2"], "conditions": {"ready": false}, "nodeName": "n1"},
        ]));
        let ports = service_ports(&svc, &[&s], "n1");
        assert_eq!(ports.len(), 2);
        let http = &ports[0];
        assert_eq!(
            (http.port_name.as_str(), http.port, http.node_port),
            ("http", 80, Some(30080))
        );
        assert_eq!(http.cluster_ips, vec![Ipv4Addr::new(10, 96, 0, 20)]);
        assert_eq!(http.affinity_seconds, Some(DEFAULT_AFFINITY_SECONDS));
        assert!(http.external_local && !http.internal_local);
        assert_eq!(
            http.endpoints,
            vec![
                Endpoint {
                    ip: Ipv4Addr::new(10, 244, 1, 2),
                    port: 8080,
                    local: true
                },
                Endpoint {
                    ip: Ipv4Addr::new(10, 244, 2, 2),
                    port: 8080,
                    local: false
                },
            ]
        );
        assert_eq!(ports[1].protocol, Protocol::Udp);
        assert_eq!(ports[1].endpoints[0].port, 5353);
    }

    #[test]
    fn headless_and_external_name_services_are_left_alone() {
        let headless = service(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        assert!(service_ports(&headless, &[], "n1").is_empty());
        let external = service(json!({"type": "ExternalName", "externalName": "example.com"}));
        assert!(service_ports(&external, &[], "n1").is_empty());
    }

    #[test]
    fn a_cluster_ip_service_has_no_node_port() {
        let svc = service(json!({"clusterIP": "10.96.0.21",
            "ports": [{"port": 80, "nodePort": 30001}]}));
        let ports = service_ports(&svc, &[], "n1");
        assert_eq!(ports[0].node_port, None);
        assert!(ports[0].endpoints.is_empty());
    }
}
