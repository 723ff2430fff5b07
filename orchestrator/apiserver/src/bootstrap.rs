//! Objects every cluster starts with (namespaces, the API server's and
//! DNS Services, the default `local-path` StorageClass). Every server
//! sharing a store ensures them at start, so what another server created
//! counts as done.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::error::ApiError;
use crate::rest::Api;

/// How often, and how far apart, a refused create is tried again (see
/// [`ensure_one`]).
const RETRIES: usize = 20;
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// The namespaces Kubernetes clients expect, the `kubernetes` Service
/// through which pods reach the API servers (its endpoints are kept by
/// [`crate::endpoint_leases`]), and the `kube-dns` Service pods send their
/// DNS queries to: without a selector, each node agent publishes its own
/// DNS server as an endpoint of it, and the Local traffic policy keeps a
/// pod's queries on its node.
pub async fn ensure(api: &Api, service_ip: Ipv4Addr, dns_ip: Ipv4Addr, port: u16) -> Result<()> {
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        ensure_one(api, "", "v1", "namespaces", None, obj).await?;
    }
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"type": "ClusterIP", "clusterIP": service_ip.to_string(),
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]},
    });
    ensure_one(api, "", "v1", "services", Some("default"), service).await?;
    let dns = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system",
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "KubeDNS"}},
        "spec": {"type": "ClusterIP", "clusterIP": dns_ip.to_string(),
                 "internalTrafficPolicy": "Local",
                 "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                           {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]},
    });
    // A cluster whose tenth address a user's Service took still serves.
    if let Err(e) = ensure_one(api, "", "v1", "services", Some("kube-system"), dns).await {
        tracing::warn!("no kube-dns Service, so pods cannot resolve names through {dns_ip}: {e:#}");
    }
    ensure_one(
        api,
        "storage.k8s.io",
        "v1",
        "storageclasses",
        None,
        local_path_class(),
    )
    .await?;
    for (name, value, description) in crate::resources::scheduling::priorityclass::SYSTEM_CLASSES {
        let class =
            crate::resources::scheduling::priorityclass::system_class(name, value, description);
        ensure_one(
            api,
            "scheduling.k8s.io",
            "v1",
            "priorityclasses",
            None,
            class,
        )
        .await?;
    }
    Ok(())
}

/// The default StorageClass: volumes in a directory of the node that runs
/// their first pod, provisioned by the controller manager (see
/// [`tapestry_runtime::storage`]). A class deleted by its user comes back
/// at the next start, as Kubernetes' addon manager brings back its own.
fn local_path_class() -> serde_json::Value {
    use tapestry_runtime::storage::{LOCAL_PATH_CLASS, LOCAL_PATH_PROVISIONER};
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": LOCAL_PATH_CLASS, "annotations": {
            crate::resources::storage::storageclass::DEFAULT_CLASS_ANNOTATION: "true"}},
        "provisioner": LOCAL_PATH_PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    })
}

/// Create `obj` unless it exists. Servers starting together race for the
/// same objects: the loser of a Service's race can find the ClusterIP
/// claimed a moment before the winner stores the Service, and is refused
/// as invalid; it tries again until the winner's object is there (then
/// AlreadyExists) or the claim is released.
async fn ensure_one(
    api: &Api,
    group: &str,
    version: &str,
    plural: &str,
    namespace: Option<&str>,
    obj: serde_json::Value,
) -> Result<()> {
    let mut attempt = 0;
    loop {
        match api
            .create_internal(group, version, plural, namespace, obj.clone())
            .await
        {
            Ok(()) | Err(ApiError::AlreadyExists(_)) => return Ok(()),
            Err(ApiError::Invalid { .. }) if attempt < RETRIES => {
                attempt += 1;
                tokio::time::sleep(RETRY_DELAY).await;
            }
            Err(e) => return Err(anyhow::anyhow!("creating {plural}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Servers bootstrapping one store at the same moment all succeed, and
    /// one `kubernetes` Service holds the first ClusterIP.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn servers_bootstrapping_together_all_succeed() {
        let server = crate::testing::start().await;
        let service = "/api/v1/namespaces/default/services/kubernetes";
        for round in 0..5 {
            server.send("DELETE", service, &Value::Null).await;
            let racers: Vec<_> = (0..6)
                .map(|_| {
                    let api = server.engine.clone();
                    tokio::spawn(async move {
                        let (first, dns) =
                            ("10.96.0.1".parse().unwrap(), "10.96.0.10".parse().unwrap());
                        super::ensure(&api, first, dns, 6443).await
                    })
                })
                .collect();
            for racer in racers {
                if let Err(e) = racer.await.unwrap() {
                    panic!("round {round}: {e:#}");
                }
            }
            let stored = server.send("GET", service, &Value::Null).await;
            assert_eq!(
                stored["spec"]["clusterIPs"],
                serde_json::json!(["10.96.0.1"])
            );
        }
    }
}
