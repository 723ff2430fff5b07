//! Objects every cluster starts with.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use serde_json::json;

use crate::error::ApiError;
use crate::rest::Api;

/// The namespaces Kubernetes clients expect, and the `kubernetes` Service
/// (with its Endpoints) through which pods reach the API server.
pub async fn ensure(api: &Api, service_ip: Ipv4Addr, serving: SocketAddr) -> Result<()> {
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        ensure_one(api, "", "v1", "namespaces", None, obj).await?;
    }
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"type": "ClusterIP", "clusterIP": service_ip.to_string(),
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": serving.port()}]},
    });
    ensure_one(api, "", "v1", "services", Some("default"), service).await?;
    let ip = if serving.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        serving.ip().to_string()
    };
    let endpoints = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "subsets": [{"addresses": [{"ip": ip}],
                     "ports": [{"name": "https", "port": serving.port(), "protocol": "TCP"}]}],
    });
    ensure_one(api, "", "v1", "endpoints", Some("default"), endpoints).await?;
    Ok(())
}

async fn ensure_one(
    api: &Api,
    group: &str,
    version: &str,
    plural: &str,
    namespace: Option<&str>,
    obj: serde_json::Value,
) -> Result<()> {
    match api
        .create_internal(group, version, plural, namespace, obj)
        .await
    {
        Ok(()) | Err(ApiError::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("creating {plural}: {e}")),
    }
}
