//! Tapestry's node agent (kubelet).
//!
//! It registers the Node and heartbeats through a Lease ([`node`]), keeps an
//! OCI image store ([`images`]), gives each pod a network namespace wired by
//! the CNI plugins ([`cni`]), runs containers with runc through a detached
//! per-container shim ([`runtime`], [`shim`]), drives each pod with a worker
//! (restart policy, probes, status, graceful termination: [`pods`]), and
//! serves logs and exec over an authenticated HTTPS API ([`server`]).

pub mod cni;
pub mod images;
mod localpath;
pub mod logs;
pub mod node;
pub mod pods;
mod probe;
pub mod runtime;
pub mod server;
pub mod shim;
pub mod stats;
mod sys;
mod tokens;
mod volumes;
mod ws;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::watcher;
use kube::Api;
use tapestry_runtime::{key_of, lock, run_worker, split_key, Informer, Queue, Requeue};
use tokio_util::sync::CancellationToken;

use crate::cni::Cni;
use crate::images::ImageStore;
use crate::pods::Worker;
use crate::runtime::Runtime;

pub const KUBELET_VERSION: &str = "v1.33.0-tapestry";
/// Far more than a node's pods: the queue never drops one.
const QUEUE_CAPACITY: usize = 100_000;
/// Every pod is looked at again this often (a worker that stopped for a
/// pod still bound here is started again).
const RESYNC: Duration = Duration::from_secs(60);

/// How a node agent runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    /// The node's state: `kubelet/` (pods, runtime state) and `images/`.
    pub data_dir: PathBuf,
    /// Claimed when the Node is created; None waits for node IPAM's.
    pub pod_cidr: Option<String>,
    /// The address the API server reaches the kubelet API on.
    pub node_ip: IpAddr,
    pub port: u16,
    pub runtime: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// Name of the Linux bridge pods attach to.
    pub bridge: String,
    /// CA that signs the API server's client certificate.
    pub client_ca_pem: String,
    /// Serving certificate and key, which may be rotated while serving; a
    /// self-signed pair when absent.
    pub serving: Option<std::sync::Arc<tapestry_runtime::identity::LiveIdentity>>,
    /// The per-container monitor: a program and its leading arguments
    /// (`tapestry-shim`, or `tapestry container-shim`).
    pub shim: Vec<std::ffi::OsString>,
    pub max_pods: u32,
    /// Most new pods set up at once. Starting every pod of a burst together
    /// makes them all finish late; a few at a time in arrival order gives
    /// the same throughput with each pod running as soon as its turn is done.
    pub parallel_pod_starts: usize,
    /// Stop every pod when the agent stops (`tapestry up`); a plain node
    /// agent leaves them running to be adopted on restart.
    pub stop_pods_on_exit: bool,
    /// Run the Service proxy (ClusterIPs and NodePorts through nftables).
    pub service_proxy: bool,
    /// Every pod's addresses (the cluster CIDR), for the proxy.
    pub cluster_cidr: Option<String>,
    /// The cluster DNS Service's address, written into pods' resolv.conf;
    /// None: pods use the node's resolvers.
    pub cluster_dns: Option<IpAddr>,
    /// The cluster's DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// The node's resolver configuration: what `dnsPolicy: Default` pods
    /// get, and where the node's DNS server relays names outside the
    /// cluster.
    pub resolv_conf: PathBuf,
    /// Serve cluster DNS on this node's pod gateway address.
    pub dns_server: bool,
}

/// What the HTTPS API needs to find a pod's containers.
#[derive(Clone, Debug)]
pub struct PodEntry {
    pub uid: String,
    pub containers: Vec<String>,
    pub init_containers: Vec<String>,
}

pub struct Kubelet {
    pub config: Arc<Config>,
    pub client: kube::Client,
    pub images: ImageStore,
    pub runtime: Runtime,
    pub cni: Cni,
    pub pods_dir: PathBuf,
    /// namespace/name → pod, for the HTTPS API.
    pub index: Mutex<HashMap<String, PodEntry>>,
    /// Turns for setting up new pods (fair: granted in request order).
    pub pod_starts: tokio::sync::Semaphore,
    /// What `/metrics` on the kubelet API serves.
    pub metrics: prometheus_client::registry::Registry,
    /// The node's watch of Services, when its proxy or DNS server runs one.
    pub services: OnceLock<Arc<Informer<Service>>>,
    /// Without that watch: the `default/kubernetes` Service as last read,
    /// and when.
    pub api_service: Mutex<Option<(Instant, Option<Arc<Service>>)>>,
    /// Events about pods (volumes that cannot be mounted yet).
    pub recorder: tapestry_runtime::events::Recorder,
}

/// A running node agent.
pub struct Running {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Register the node and start serving pods; returns once the kubelet
/// API listens. Everything stops when `shutdown` fires.
pub async fn start(
    config: Config,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<Running> {
    let root = config.data_dir.join("kubelet");
    let pods_dir = root.join("pods");
    std::fs::create_dir_all(&pods_dir)
        .with_context(|| format!("creating {}", pods_dir.display()))?;
    // Pods' Secrets and service account tokens live below: only root
    // reaches them on the host (containers see their own through mounts).
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("restricting {}", root.display()))?;
    let pod_cidr = node::register(&client, &config).await?;
    tracing::info!(node = %config.node_name, %pod_cidr, "node registered");
    localpath::publish_root(&client, &config).await?;
    let images = ImageStore::open(&config.data_dir.join("images"))?;
    let runtime = Runtime::new(
        config.runtime.clone(),
        root.join("runc"),
        config.shim.clone(),
    )?;
    let cni = Cni {
        bin_dir: config.cni_bin_dir.clone(),
        state_dir: root.join("cni"),
        pod_cidr: pod_cidr.clone(),
        bridge: config.bridge.clone(),
    };
    let config = Arc::new(config);
    let proxy_stats: Arc<tapestry_proxy::sync::ProxyStats> = Arc::default();
    let dns_stats: Arc<tapestry_proxy::dns::DnsStats> = Arc::default();
    let mut metrics = prometheus_client::registry::Registry::default();
    proxy_stats.register(&mut metrics);
    dns_stats.register(&mut metrics);
    let kubelet = Arc::new(Kubelet {
        config: config.clone(),
        client: client.clone(),
        images,
        runtime,
        cni,
        pods_dir,
        index: Mutex::new(HashMap::new()),
        pod_starts: tokio::sync::Semaphore::new(config.parallel_pod_starts.max(1)),
        metrics,
        services: OnceLock::new(),
        api_service: Mutex::new(None),
        recorder: tapestry_runtime::events::Recorder::new(client.clone(), "kubelet"),
    });
    localpath::start_cleanup(kubelet.clone(), shutdown.clone());
    let (addr, server_task) = server::start(kubelet.clone(), shutdown.clone()).await?;
    node::patch_status(
        &client,
        &config,
        true,
        &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
    .await?;
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    let watches = tapestry_proxy::Watches::new(client.clone());
    let proxy = config
        .service_proxy
        .then(|| start_proxy(&watches, &config, &pod_cidr, proxy_stats, shutdown.clone()))
        .flatten();
    let dns = match config.dns_server {
        true => {
            start_dns(
                &watches,
                &client,
                &config,
                &pod_cidr,
                dns_stats,
                shutdown.clone(),
            )
            .await
        }
        false => None,
    };
    if proxy.is_some() || dns.is_some() {
        watches.start(shutdown.clone());
        // Containers' KUBERNETES_SERVICE_* come from it too.
        let _ = kubelet.services.set(watches.services.clone());
    }
    let task = tokio::spawn(async move {
        sync_pods(kubelet.clone(), shutdown.clone()).await;
        if let Some(dns) = dns {
            let _ = dns.await;
            if kubelet.config.stop_pods_on_exit {
                let node = &kubelet.config.node_name;
                if let Err(e) = tapestry_proxy::dns::withdraw_endpoint(&kubelet.client, node).await
                {
                    tracing::warn!("{e:#}");
                }
            }
        }
        if let Some(proxy) = proxy {
            let _ = proxy.await;
            // A node going away takes its table along; one that restarts
            // keeps it, and established connections with it.
            if kubelet.config.stop_pods_on_exit {
                let deleted = tapestry_proxy::nft::Nft::open().and_then(|mut n| n.delete_tables());
                if let Err(e) = deleted {
                    tracing::warn!("removing the service proxy's tables: {e:#}");
                }
            }
        }
        if kubelet.config.stop_pods_on_exit {
            pods::remove_parent_cgroups();
        }
        let _ = heartbeat.await;
        let _ = server_task.await;
        let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let _ = node::patch_status(&kubelet.client, &kubelet.config, false, &since).await;
    });
    Ok(Running { addr, task })
}

/// The Service proxy in this node's network, unless nftables is missing
/// (then Services do not route on this node, and the log says why).
fn start_proxy(
    watches: &tapestry_proxy::Watches,
    config: &Config,
    pod_cidr: &str,
    stats: Arc<tapestry_proxy::sync::ProxyStats>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let nft = match tapestry_proxy::nft::Nft::open() {
        Ok(nft) => nft,
        Err(e) => {
            tracing::error!("service proxy off: {e:#}; install nftables");
            return None;
        }
    };
    let cidr = tapestry_proxy::sync::parse_cidr;
    let node = tapestry_proxy::rules::NodeConfig {
        cluster_cidr: config.cluster_cidr.as_deref().and_then(cidr),
        pod_cidr: cidr(pod_cidr),
        // The proxy spreads Services over as many as suit their number.
        service_tables: 1,
    };
    let proxy = tapestry_proxy::sync::ProxyConfig::new(config.node_name.clone(), node);
    Some(tapestry_proxy::sync::start(
        watches, proxy, nft, stats, shutdown,
    ))
}

/// Cluster DNS on the pods' gateway (the first address of the pod CIDR,
/// which the bridge takes), published as this node's `kube-dns` endpoint.
/// A node that cannot serve it (port 53 taken) runs on without, and the
/// log says why.
async fn start_dns(
    watches: &tapestry_proxy::Watches,
    client: &kube::Client,
    config: &Config,
    pod_cidr: &str,
    stats: Arc<tapestry_proxy::dns::DnsStats>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let Some((network, _)) = tapestry_proxy::sync::parse_cidr(pod_cidr) else {
        tracing::error!("cluster DNS off: pod CIDR {pod_cidr:?} is not IPv4");
        return None;
    };
    let gateway = IpAddr::V4(std::net::Ipv4Addr::from(u32::from(network) + 1));
    let resolv = std::fs::read_to_string(&config.resolv_conf).unwrap_or_else(|e| {
        tracing::warn!(
            "reading {}: {e}; names outside the cluster will fail",
            config.resolv_conf.display()
        );
        String::new()
    });
    let upstreams = tapestry_proxy::dns::nameservers(&resolv)
        .into_iter()
        .filter(|ip| *ip != gateway)
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .collect();
    let dns = tapestry_proxy::dns::DnsConfig {
        domain: config.cluster_domain.clone(),
        listen: std::net::SocketAddr::new(gateway, 53),
        upstreams,
        udp_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let task = match tapestry_proxy::dns::start(watches, dns, stats, shutdown) {
        Ok(task) => task,
        Err(e) => {
            tracing::error!("cluster DNS off: {e:#}");
            return None;
        }
    };
    if let Err(e) = tapestry_proxy::dns::publish_endpoint(client, &config.node_name, gateway).await
    {
        tracing::error!("cluster DNS unreachable through its Service: {e:#}");
    }
    Some(task)
}

/// Follow the pods bound to this node and keep one worker per pod.
async fn sync_pods(kubelet: Arc<Kubelet>, shutdown: CancellationToken) {
    let pods = Informer::new(
        Api::<Pod>::all(kubelet.client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={}", kubelet.config.node_name)),
    );
    let queue = Queue::new(QUEUE_CAPACITY);
    let q = queue.clone();
    pods.on_change(move |p, _| q.add(key_of(p)));
    pods.start(shutdown.clone());
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = pods.ready() => {}
    }
    // Before any worker starts, so none can be mistaken for an orphan.
    let listed: HashSet<String> = pods
        .store
        .state()
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    pods::clean_orphans(&kubelet, &listed).await;

    // Pod uid → its key and worker. A pod's worker may still be stopping
    // while a new pod of the same name starts.
    let workers: Mutex<HashMap<String, (String, Worker)>> = Mutex::default();
    let p = pods.clone();
    run_worker(
        "kubelet-pods",
        queue,
        shutdown.clone(),
        RESYNC,
        move || p.store.state().iter().map(|p| key_of(p.as_ref())).collect(),
        |key| {
            let (ns, name) = split_key(&key);
            let pod = pods.get(ns, name);
            let mut workers = lock(&workers);
            workers.retain(|_, (_, w)| !w.finished());
            let uid = pod.as_ref().and_then(|p| p.metadata.uid.clone());
            for (other, (k, w)) in workers.iter() {
                if *k == key && Some(other) != uid.as_ref() {
                    w.gone();
                }
            }
            if let (Some(pod), Some(uid)) = (pod, uid) {
                match workers.get(&uid) {
                    Some((_, w)) => w.update(pod),
                    None => {
                        let w = Worker::spawn(kubelet.clone(), pod, shutdown.clone());
                        workers.insert(uid, (key, w));
                    }
                }
            }
            std::future::ready(Ok(Requeue::Done))
        },
    )
    .await;
    // Workers see the shutdown token too; wait for them to finish.
    let workers = std::mem::take(&mut *lock(&workers));
    for (_, (_, w)) in workers {
        w.join().await;
    }
}
