//! Hollow nodes, kubemark-style: many fake nodes in one process. Each
//! registers a Node, renews its Lease, reports capacity and a Ready
//! condition, marks the pods bound to it Running with an IP from its
//! podCIDR, and finishes deletions the way a kubelet does after stopping a
//! pod. There are no containers. One pod watch and one node watch serve
//! every node of the process.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tapestry_runtime::{self as runtime, key_of, lock, split_key, Informer, Queue, Requeue};
use tokio_util::sync::CancellationToken;

/// The label every hollow node carries.
pub const HOLLOW_LABEL: &str = "tapestry.io/hollow";

#[derive(Clone, Debug)]
pub struct Config {
    pub count: usize,
    /// Node names are `{prefix}-{index}`.
    pub prefix: String,
    /// Lease renewal interval (the kubelet's is 10s).
    pub heartbeat: Duration,
    /// How often the Ready condition's heartbeat is reported.
    pub status_interval: Duration,
    pub cpu: String,
    pub memory: String,
    pub pods: u32,
}

/// Writes to the API server in flight at once.
const PARALLEL: usize = 32;
/// Pods a process tracks waiting to start, at most.
const QUEUE_CAPACITY: usize = 200_000;

#[derive(Default)]
struct NodeState {
    cidr: Option<(u32, u32)>,
    /// Pod key → address, and the addresses in use.
    ips: HashMap<String, Ipv4Addr>,
    used: HashSet<u32>,
    next: u32,
}

impl NodeState {
    /// The pod's address on this node, allocating one if needed.
    fn ip_for(&mut self, key: &str, existing: Option<&str>) -> Option<Ipv4Addr> {
        if let Some(ip) = self.ips.get(key) {
            return Some(*ip);
        }
        let (base, size) = self.cidr?;
        if let Some(ip) = existing.and_then(|e| e.parse::<Ipv4Addr>().ok()) {
            self.used.insert(u32::from(ip));
            self.ips.insert(key.to_string(), ip);
            return Some(ip);
        }
        // .0 is the network, .1 the node's gateway, the last the broadcast.
        for k in 0..size.saturating_sub(3) {
            let off = 2 + (self.next + k) % (size - 3);
            let ip = base + off;
            if self.used.insert(ip) {
                self.next = off - 1;
                let ip = Ipv4Addr::from(ip);
                self.ips.insert(key.to_string(), ip);
                return Some(ip);
            }
        }
        None
    }

    fn release(&mut self, key: &str) {
        if let Some(ip) = self.ips.remove(key) {
            self.used.remove(&u32::from(ip));
        }
    }
}

struct Hollow {
    /// The process's own client: the watches shared by every node.
    client: Client,
    /// Each node's client, speaking as that node (`system:node:NAME`).
    node_clients: HashMap<String, Client>,
    config: Config,
    states: Mutex<HashMap<String, NodeState>>,
    pods: Arc<Informer<HollowPod>>,
}

impl Hollow {
    fn client_of(&self, node: &str) -> Client {
        self.node_clients.get(node).unwrap_or(&self.client).clone()
    }
}

fn parse_cidr(s: &str) -> Option<(u32, u32)> {
    let (ip, len) = s.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    if !(8..=30).contains(&len) {
        return None;
    }
    Some((u32::from(ip), 1 << (32 - len)))
}

pub fn node_names(config: &Config) -> Vec<String> {
    (0..config.count)
        .map(|i| format!("{}-{i}", config.prefix))
        .collect()
}

/// A pod as far as a hollow node reads it: identity, node, container names
/// and images, phase and address. Decoding only these, instead of a whole
/// `Pod` trimmed afterwards, skips the managed fields and the rest of spec
/// and status of every pod listed or watched (the managed fields alone were
/// half of this process's decoding), and thousands of cached pods cost a
/// fraction of their full objects.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(from = "WirePod")]
struct HollowPod(Pod);

impl std::ops::Deref for HollowPod {
    type Target = Pod;
    fn deref(&self) -> &Pod {
        &self.0
    }
}

impl kube::Resource for HollowPod {
    type DynamicType = ();
    type Scope = <Pod as kube::Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

// Absent and null read as k8s-openapi reads them: the default.
#[derive(serde::Deserialize)]
struct WirePod {
    metadata: Option<WireMeta>,
    spec: Option<WireSpec>,
    status: Option<WireStatus>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    deletion_timestamp: Option<Time>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSpec {
    node_name: Option<String>,
    containers: Option<Vec<WireContainer>>,
}

#[derive(serde::Deserialize)]
struct WireContainer {
    name: Option<String>,
    image: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
}

impl From<WirePod> for HollowPod {
    fn from(wire: WirePod) -> Self {
        let m = wire.metadata.unwrap_or_default();
        HollowPod(Pod {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                deletion_timestamp: m.deletion_timestamp,
                ..ObjectMeta::default()
            },
            spec: wire.spec.map(|s| PodSpec {
                node_name: s.node_name,
                containers: s
                    .containers
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| Container {
                        name: c.name.unwrap_or_default(),
                        image: c.image,
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            }),
            status: wire.status.map(|s| PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                ..PodStatus::default()
            }),
        })
    }
}

/// Run the hollow nodes until `shutdown`. `client` watches pods and nodes
/// for all of them; `node_client(name)` gives the client each node writes
/// its Node, Lease and pods' status with, as itself.
pub async fn run(
    client: Client,
    node_client: impl Fn(&str) -> anyhow::Result<Client>,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let names = node_names(&config);
    let node_clients = names
        .iter()
        .map(|n| Ok((n.clone(), node_client(n)?)))
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    let pods = Informer::new(
        Api::<HollowPod>::all(client.clone()),
        watcher::Config::default().fields("spec.nodeName!="),
    );
    let hollow = Arc::new(Hollow {
        client: client.clone(),
        node_clients,
        states: Mutex::new(
            names
                .iter()
                .map(|n| (n.clone(), NodeState::default()))
                .collect(),
        ),
        pods,
        config: config.clone(),
    });

    // Register every node (in parallel), then start heartbeats.
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(names.iter().enumerate())
        .map(|(i, n)| register(&hollow, n, i))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        return Err(e);
    }
    tracing::info!(count = names.len(), prefix = %config.prefix, "hollow nodes registered");

    let queue = Queue::new(QUEUE_CAPACITY);
    let q = queue.clone();
    let h = hollow.clone();
    hollow.pods.on_change(move |p, deleted| {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let key = key_of(p);
        let mut states = lock(&h.states);
        let Some(st) = states.get_mut(&node) else {
            return;
        };
        if deleted {
            st.release(&key);
        } else {
            q.add(key);
        }
    });
    // Nodes: learn the podCIDR the IPAM controller assigns.
    let nodes = Informer::new(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().labels(&format!("{HOLLOW_LABEL}={}", config.prefix)),
    );
    let h = hollow.clone();
    let q = queue.clone();
    nodes.on_change(move |n, deleted| {
        if deleted {
            return;
        }
        let cidr = n
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(parse_cidr);
        let name = n.name_any();
        let newly = {
            let mut states = lock(&h.states);
            match states.get_mut(&name) {
                Some(st) if st.cidr.is_none() && cidr.is_some() => {
                    st.cidr = cidr;
                    true
                }
                _ => false,
            }
        };
        if newly {
            // Pods that waited for an address can start now.
            for p in h.pods.store.state() {
                if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str()) {
                    q.add(key_of(p.as_ref()));
                }
            }
        }
    });
    nodes.start(shutdown.clone());
    hollow.pods.start(shutdown.clone());

    for (i, name) in names.iter().enumerate() {
        tokio::spawn(heartbeat(hollow.clone(), name.clone(), i, shutdown.clone()));
    }

    let h = hollow.clone();
    let h2 = hollow.clone();
    runtime::run_workers(
        "hollow-pods",
        PARALLEL,
        queue,
        shutdown.clone(),
        Duration::from_secs(60),
        move || {
            h2.pods
                .store
                .state()
                .iter()
                .map(|p| key_of(p.as_ref()))
                .collect()
        },
        move |key| sync_pod(h.clone(), key),
    )
    .await;
    Ok(())
}

fn capacity(c: &Config) -> BTreeMap<String, String> {
    [
        ("cpu".to_string(), c.cpu.clone()),
        ("memory".to_string(), c.memory.clone()),
        ("pods".to_string(), c.pods.to_string()),
        ("ephemeral-storage".to_string(), "100Gi".to_string()),
    ]
    .into()
}

fn node_status(c: &Config, index: usize) -> serde_json::Value {
    let now = Timestamp::now().to_string();
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + index as u32 + 1);
    let cond = |t: &str, status: &str, reason: &str, message: &str| {
        json!({"type": t, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({
        "capacity": capacity(c),
        "allocatable": capacity(c),
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": ip.to_string()},
            {"type": "Hostname", "address": format!("{}-{index}", c.prefix)},
        ],
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "hollow",
            "osImage": "Tapestry hollow node", "containerRuntimeVersion": "hollow://0.1",
            "kubeletVersion": "v1.33.0", "kubeProxyVersion": "v1.33.0",
            "operatingSystem": "linux", "architecture": "amd64",
        },
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
    })
}

async fn register(h: &Hollow, name: &str, index: usize) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(h.client_of(name));
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64", HOLLOW_LABEL: h.config.prefix,
        }},
        "spec": {},
    }))?;
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(e) if runtime::is_status(&e, 409) => {}
        Err(e) => return Err(anyhow::anyhow!("registering node {name}: {e}")),
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": node_status(&h.config, index)})),
    )
    .await
    .map_err(|e| anyhow::anyhow!("reporting status of node {name}: {e}"))?;
    renew_lease(h, name).await?;
    Ok(())
}

async fn renew_lease(h: &Hollow, name: &str) -> anyhow::Result<()> {
    let client = h.client_of(name);
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let now = Timestamp::now().to_string();
    let patch = json!({"spec": {"holderIdentity": name, "renewTime": now,
        "leaseDurationSeconds": (h.config.heartbeat.as_secs() * 4).max(1)}});
    // Sent as text, as pod status is: the renewed Lease is never read.
    let request = kube::core::Request::new(api.resource_url()).patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )?;
    match client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(e) if runtime::not_found(&e) => {
            let nodes: Api<Node> = Api::all(client.clone());
            let uid = nodes.get(name).await?.uid().unwrap_or_default();
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "kube-node-lease",
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]},
                "spec": patch["spec"],
            }))?;
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(e) if runtime::is_status(&e, 409) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Renew the node's Lease every heartbeat and report its Ready condition
/// every status interval; staggered so a thousand nodes do not write at the
/// same instant.
async fn heartbeat(h: Arc<Hollow>, name: String, index: usize, shutdown: CancellationToken) {
    let count = h.config.count.max(1) as u32;
    let offset = h.config.heartbeat * (index as u32 % count) / count;
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(offset) => {}
    }
    let mut lease_tick = tokio::time::interval(h.config.heartbeat);
    let mut status_tick = tokio::time::interval(h.config.status_interval);
    status_tick.tick().await;
    let nodes: Api<Node> = Api::all(h.client_of(&name));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = lease_tick.tick() => {
                if let Err(e) = renew_lease(&h, &name).await {
                    tracing::debug!(node = %name, "renewing lease: {e}");
                }
            }
            _ = status_tick.tick() => {
                let status = node_status(&h.config, index);
                if let Err(e) = nodes.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await {
                    tracing::debug!(node = %name, "reporting status: {e}");
                    if runtime::not_found(&e) {
                        // Deleted by someone: register again, as a kubelet does.
                        let _ = register(&h, &name, index).await;
                    }
                }
            }
        }
    }
}

/// Bring one pod to where a kubelet would: running with an address, or
/// gone once it is being deleted.
async fn sync_pod(h: Arc<Hollow>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let Some(pod) = h.pods.get(Some(ns), name) else {
        return Ok(Requeue::Done);
    };
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    if !lock(&h.states).contains_key(&node) {
        return Ok(Requeue::Done);
    }
    let client = h.client_of(&node);
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    if pod.metadata.deletion_timestamp.is_some() {
        // "Containers stopped": finish the deletion.
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        runtime::ignore_not_found(api.delete(name, &dp).await)?;
        return Ok(Requeue::Done);
    }
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.as_deref().unwrap_or("Pending");
    if phase != "Pending" {
        // Running (or finished) already: remember its address.
        let mut states = lock(&h.states);
        if let Some(st) = states.get_mut(&node) {
            if st.cidr.is_some() {
                st.ip_for(&key, status.pod_ip.as_deref());
            }
        }
        return Ok(Requeue::Done);
    }
    let (ip, host_ip) = {
        let mut states = lock(&h.states);
        let Some(st) = states.get_mut(&node) else {
            return Ok(Requeue::Done);
        };
        if st.cidr.is_none() {
            // Waiting for the IPAM controller; the node watch requeues.
            return Ok(Requeue::Done);
        }
        let index: usize = node
            .rsplit('-')
            .next()
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        let host = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + index as u32 + 1);
        match st.ip_for(&key, None) {
            Some(ip) => (ip, host),
            None => anyhow::bail!("node {node}: pod CIDR exhausted"),
        }
    };
    let now = Timestamp::now().to_string();
    let containers: Vec<serde_json::Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({"name": c.name, "image": c.image, "imageID": format!("hollow://{}", c.image.clone().unwrap_or_default()),
                   "containerID": format!("hollow://{}/{}", pod.uid().unwrap_or_default(), c.name),
                   "ready": true, "started": true, "restartCount": 0,
                   "state": {"running": {"startedAt": now}}})
        })
        .collect();
    let cond = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    // Pinned to the version read: a pod someone else moved on meanwhile (to
    // Succeeded, say) must not be sent back to Running from a stale copy.
    // The conflict's newer version arrives through the watch.
    let patch = json!({"metadata": {"resourceVersion": pod.resource_version()}, "status": {
        "phase": "Running", "hostIP": host_ip.to_string(), "hostIPs": [{"ip": host_ip.to_string()}],
        "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}], "startTime": now,
        "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("Ready"), cond("ContainersReady"), cond("PodScheduled")],
        "containerStatuses": containers,
    }});
    // Sent as text: the hollow node never reads the updated pod, and
    // decoding it (managed fields included) was a quarter of its CPU.
    let request = kube::core::Request::new(api.resource_url()).patch_subresource(
        "status",
        name,
        &PatchParams::default(),
        &Patch::Merge(patch),
    )?;
    match client.request_text(request).await {
        Ok(_) => Ok(Requeue::Done),
        Err(e) if runtime::is_status(&e, 409) => Ok(Requeue::Done),
        Err(e) if runtime::not_found(&e) => {
            if let Some(st) = lock(&h.states).get_mut(&node) {
                st.release(&key);
            }
            Ok(Requeue::Done)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_decoded_as_far_as_a_hollow_node_reads_them() {
        let full = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "resourceVersion": "42",
                         "deletionTimestamp": "2026-01-01T00:00:00Z", "labels": {"a": "b"},
                         "managedFields": [{"manager": "m", "operation": "Update",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"nodeName": "hollow-3", "restartPolicy": "Always",
                     "containers": [{"name": "c", "image": "busybox", "args": ["sleep"],
                                     "resources": {"requests": {"cpu": "10m"}}}]},
            "status": {"phase": "Running", "podIP": "10.244.3.2", "hostIP": "10.128.0.4",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        });
        let pod: HollowPod = serde_json::from_value(full).unwrap();
        assert_eq!(key_of(&pod), "ns/p");
        assert_eq!(pod.uid().as_deref(), Some("u-1"));
        assert_eq!(pod.resource_version().as_deref(), Some("42"));
        assert!(pod.metadata.deletion_timestamp.is_some());
        assert!(pod.metadata.managed_fields.is_none() && pod.metadata.labels.is_none());
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("hollow-3"));
        assert_eq!(spec.restart_policy, None);
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(spec.containers[0].name, "c");
        assert_eq!(spec.containers[0].image.as_deref(), Some("busybox"));
        assert!(spec.containers[0].args.is_none() && spec.containers[0].resources.is_none());
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.3.2"));
        assert!(status.host_ip.is_none() && status.conditions.is_none());
        // A pod just created: no spec node, no status; nulls read as absent.
        let bare: HollowPod = serde_json::from_value(json!({"metadata": {"name": "q"}})).unwrap();
        assert!(bare.spec.is_none() && bare.status.is_none());
        let nulls: HollowPod = serde_json::from_value(
            json!({"metadata": null, "spec": {"containers": [{"name": null}, {"image": "i"}]}}),
        )
        .unwrap();
        assert_eq!(nulls.spec.as_ref().unwrap().containers.len(), 2);
        let empty: HollowPod =
            serde_json::from_value(json!({"spec": {"containers": null}})).unwrap();
        assert!(empty.spec.as_ref().unwrap().containers.is_empty());
    }

    /// The watch and list bodies kube-runtime decodes, and the requests it
    /// builds, are those of pods.
    #[test]
    fn hollow_pods_are_watched_and_listed_as_pods() {
        use kube::core::{ObjectList, WatchEvent};
        use kube::Resource;
        assert_eq!(
            HollowPod::url_path(&(), Some("ns")),
            Pod::url_path(&(), Some("ns"))
        );
        assert_eq!(HollowPod::api_version(&()), Pod::api_version(&()));
        assert_eq!(HollowPod::kind(&()), Pod::kind(&()));
        let added = r#"{"type":"ADDED","object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":"p","namespace":"ns","resourceVersion":"7","managedFields":[{"manager":"m"}]},"spec":{"nodeName":"n","containers":[{"name":"c"}]}}}"#;
        match serde_json::from_str::<WatchEvent<HollowPod>>(added).unwrap() {
            WatchEvent::Added(p) => {
                assert_eq!(key_of(&p), "ns/p");
                assert_eq!(p.resource_version().as_deref(), Some("7"));
            }
            other => panic!("not an ADDED event: {other:?}"),
        }
        let bookmark = r#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"9"}}}"#;
        assert!(matches!(
            serde_json::from_str::<WatchEvent<HollowPod>>(bookmark).unwrap(),
            WatchEvent::Bookmark(_)
        ));
        let list = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"9"},"items":[{"metadata":{"name":"a","namespace":"ns"}},{"metadata":{"name":"b","namespace":"ns"}}]}"#;
        let list: ObjectList<HollowPod> = serde_json::from_str(list).unwrap();
        assert_eq!(list.items.len(), 2);
        assert_eq!(list.metadata.resource_version.as_deref(), Some("9"));
    }

    #[test]
    fn addresses_come_from_the_pod_cidr() {
        let mut st = NodeState {
            cidr: parse_cidr("10.244.3.0/24"),
            ..Default::default()
        };
        let a = st.ip_for("ns/a", None).unwrap();
        let b = st.ip_for("ns/b", None).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(b, Ipv4Addr::new(10, 244, 3, 3));
        assert_eq!(st.ip_for("ns/a", None), Some(a));
        st.release("ns/a");
        assert!(!st.used.contains(&u32::from(a)));
        // .2 to .254 are usable: 253 addresses, one (b) still taken.
        for i in 0..252 {
            st.ip_for(&format!("ns/p{i}"), None);
        }
        assert_eq!(st.ip_for("ns/full", None), None);
    }
}
