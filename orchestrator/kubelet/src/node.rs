//! The Node object: registration, status (capacity, addresses, conditions)
//! and the heartbeat Lease in `kube-node-lease`.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::Config;

pub const LEASE_SECONDS: i32 = 40;
const HEARTBEAT: Duration = Duration::from_secs(10);

fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The status this node reports; `ready` and `since` drive the Ready
/// condition's transition time.
pub fn status(config: &Config, ready: bool, since: &str) -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = mem_total_bytes();
    let capacity = json!({"cpu": cpus.to_string(), "memory": format!("{}Ki", mem / 1024),
                          "pods": config.max_pods.to_string(), "ephemeral-storage": "0"});
    let hb = now();
    let cond = |t: &str, status: &str, reason: &str, message: &str| {
        json!({"type": t, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": hb, "lastTransitionTime": since})
    };
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": [
            {"type": "InternalIP", "address": config.node_ip.to_string()},
            {"type": "Hostname", "address": config.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": config.port}},
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            if ready {
                cond("Ready", "True", "KubeletReady", "kubelet is posting ready status")
            } else {
                cond("Ready", "False", "KubeletNotReady", "kubelet is stopping")
            },
        ],
        "nodeInfo": {
            "machineID": std::fs::read_to_string("/etc/machine-id").unwrap_or_default().trim(),
            "systemUUID": "", "bootID": std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim(),
            "kernelVersion": kernel_version(), "osImage": "Linux",
            "containerRuntimeVersion": "runc://tapestry", "kubeletVersion": crate::KUBELET_VERSION,
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
        },
    })
}

/// How long a node without a pod range of its own waits for node IPAM.
const POD_CIDR_WAIT: Duration = Duration::from_secs(30);

/// Create the Node if absent; returns its podCIDR: the Node's own if it has
/// one, else the configured range claimed at registration, else the one
/// the controller manager's node IPAM assigns (waited for).
pub async fn register(client: &kube::Client, config: &Config) -> Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let existing = nodes.get_opt(&config.node_name).await?;
    let node = match existing {
        Some(n) => n,
        None => {
            let mut spec = json!({});
            if let Some(cidr) = &config.pod_cidr {
                spec["podCIDR"] = json!(cidr);
                spec["podCIDRs"] = json!([cidr]);
            }
            let body: Node = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": config.node_name, "labels": {
                    "kubernetes.io/hostname": config.node_name,
                    "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
                "spec": spec,
            }))?;
            match nodes.create(&PostParams::default(), &body).await {
                Ok(n) => n,
                Err(kube::Error::Api(e)) if e.code == 409 => nodes.get(&config.node_name).await?,
                Err(e) => return Err(e).context("registering the Node"),
            }
        }
    };
    let pod_cidr = |n: &Node| n.spec.as_ref().and_then(|s| s.pod_cidr.clone());
    if let Some(cidr) = pod_cidr(&node).or_else(|| config.pod_cidr.clone()) {
        return Ok(cidr);
    }
    let assigned =
        kube::runtime::wait::await_condition(nodes, &config.node_name, move |n: Option<&Node>| {
            n.and_then(pod_cidr).is_some()
        });
    match tokio::time::timeout(POD_CIDR_WAIT, assigned).await {
        Ok(Ok(Some(n))) => pod_cidr(&n).context("the Node lost its spec.podCIDR"),
        Ok(Ok(None)) => anyhow::bail!("the Node {} was deleted", config.node_name),
        Ok(Err(e)) => Err(e).context("waiting for the Node's spec.podCIDR"),
        Err(_) => anyhow::bail!(
            "the Node {} got no spec.podCIDR within {POD_CIDR_WAIT:?}: the control plane \
             runs no node IPAM (controller manager); give the node a range with --pod-cidr",
            config.node_name
        ),
    }
}

pub async fn patch_status(
    client: &kube::Client,
    config: &Config,
    ready: bool,
    since: &str,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(
            &config.node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status(config, ready, since)})),
        )
        .await?;
    Ok(())
}

async fn renew_lease(client: &kube::Client, config: &Config) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let spec = json!({"holderIdentity": config.node_name, "leaseDurationSeconds": LEASE_SECONDS,
                      "renewTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)});
    match leases.get_opt(&config.node_name).await? {
        Some(_) => {
            leases
                .patch(
                    &config.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": spec})),
                )
                .await?;
        }
        None => {
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": config.node_name, "namespace": "kube-node-lease"},
                "spec": spec,
            }))?;
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Heartbeat until shutdown: the Lease and the node status every 10 s.
pub async fn heartbeat(
    client: kube::Client,
    config: std::sync::Arc<Config>,
    shutdown: CancellationToken,
) {
    let since = now();
    loop {
        if let Err(e) = renew_lease(&client, &config).await {
            tracing::warn!(error = %e, "renewing the node lease failed");
        }
        if let Err(e) = patch_status(&client, &config, true, &since).await {
            tracing::warn!(error = %e, "updating node status failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}
