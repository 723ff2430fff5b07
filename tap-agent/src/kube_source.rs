//! Cluster mode's target source. Informers keep caches of the
//! pods bound to this node and — when policies come from the cluster — of
//! the `TapPolicy` objects, the namespaces (their labels) and this node
//! (its labels). After every change, and every 2 s (an interface may appear
//! after its pod's IP), the desired state is recomputed from the caches
//! alone: [`selection::select`] picks pods, [`host_veth::resolve`] finds
//! each pod's host-side veth from the kernel's facts, and the complete
//! [`Desired`] is published for the reconciler.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
    Api, Client, Config, Resource,
};
use tapestry_proto::{crd::TapPolicy, tap::v1::PodIdentity};
use tapestry_runtime::{lock, Informer};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    host_veth::{self, NodeFacts, Resolution, HOST_VETH_ANNOTATION},
    selection::{self, Labels, PodView, Policy},
    status::StatusBoard,
    targets::{Desired, Target, TargetSet},
};

/// A client from a kubeconfig file (any Kubernetes API server).
pub async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("--kubeconfig {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("--kubeconfig {}", kubeconfig.display()))?;
    Client::try_from(config).context("building the Kubernetes client")
}

/// A client from the environment: the pod's service account when running
/// in a cluster, else `KUBECONFIG` or `~/.kube/config`.
pub async fn inferred_client() -> Result<Client> {
    let config = Config::infer()
        .await
        .context("--in-cluster: no in-cluster or default Kubernetes configuration")?;
    Client::try_from(config).context("building the Kubernetes client")
}

pub fn pod_view(p: &Pod) -> PodView {
    let m = &p.metadata;
    let status = p.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|i| i.parse::<IpAddr>().ok()),
        );
    }
    let spec = p.spec.as_ref();
    PodView {
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminating: m.deletion_timestamp.is_some()
            || matches!(phase, Some("Succeeded") | Some("Failed")),
    }
}

/// Where the policies come from.
pub enum PolicySource {
    /// `TapPolicy` objects (with the namespaces and node they select by).
    Cluster,
    /// A `--policy-file`, fixed for the run.
    File(Vec<Policy>),
}

pub struct ClusterSource {
    pub client: Client,
    pub node: String,
    pub policies: PolicySource,
    pub out: watch::Sender<Desired>,
    pub board: Arc<StatusBoard>,
}

/// The watched kinds, named as the errors name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Watched {
    Pods,
    TapPolicies,
    Namespaces,
    Node,
}

impl Watched {
    fn what(self) -> &'static str {
        match self {
            Watched::Pods => "watching this node's pods",
            Watched::TapPolicies => {
                "watching TapPolicy objects (is the tappolicies.tapestry.io CRD installed?)"
            }
            Watched::Namespaces => "watching namespaces",
            Watched::Node => "watching this node",
        }
    }
}

/// What the informers tell the recompute loop: something changed, and
/// which watches are failing (reported on the board as they change).
struct News {
    changed: Notify,
    failing: Mutex<BTreeMap<Watched, String>>,
    board: Arc<StatusBoard>,
}

impl News {
    fn watch<K>(
        self: &Arc<Self>,
        kind: Watched,
        api: Api<K>,
        cfg: watcher::Config,
        shutdown: &CancellationToken,
    ) -> Arc<Informer<K>>
    where
        K: Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        let informer = Informer::new(api, cfg);
        let news = self.clone();
        informer.on_change(move |_, _| news.changed.notify_one());
        let news = self.clone();
        informer.on_watch_error(move |e| {
            let problems: Vec<String> = {
                let mut failing = lock(&news.failing);
                match e {
                    Some(e) => failing.insert(kind, format!("{}: {e}", kind.what())),
                    None => failing.remove(&kind),
                };
                failing.values().cloned().collect()
            };
            if news.board.set_problems("watch", problems.clone()) {
                for p in problems {
                    warn!("{p} (retrying)");
                }
            }
        });
        informer.start(shutdown.clone());
        informer
    }
}

/// The caches everything is computed from.
struct Caches {
    pods: Arc<Informer<Pod>>,
    policies: Option<Arc<Informer<TapPolicy>>>,
    namespaces: Option<Arc<Informer<Namespace>>>,
    node: Option<Arc<Informer<Node>>>,
}

impl Caches {
    /// Once every watch has listed.
    async fn ready(&self) {
        self.pods.ready().await;
        if let (Some(p), Some(n), Some(o)) = (&self.policies, &self.namespaces, &self.node) {
            tokio::join!(p.ready(), n.ready(), o.ready());
        }
    }
}

const RESYNC: Duration = Duration::from_secs(2);

impl ClusterSource {
    /// Runs for good, following the cluster. Nothing is published before
    /// each watch has listed once, so a restart does not detach everything
    /// for a moment.
    pub async fn run(self) {
        let shutdown = CancellationToken::new();
        let _stop_watches = shutdown.clone().drop_guard();
        let news = Arc::new(News {
            changed: Notify::new(),
            failing: Mutex::default(),
            board: self.board.clone(),
        });
        let node_field = format!("spec.nodeName={}", self.node);
        let pods = news.watch(
            Watched::Pods,
            Api::all(self.client.clone()),
            watcher::Config::default().fields(&node_field),
            &shutdown,
        );
        let caches = match self.policies {
            PolicySource::File(_) => Caches {
                pods,
                policies: None,
                namespaces: None,
                node: None,
            },
            PolicySource::Cluster => Caches {
                pods,
                policies: Some(news.watch(
                    Watched::TapPolicies,
                    Api::all(self.client.clone()),
                    watcher::Config::default(),
                    &shutdown,
                )),
                namespaces: Some(news.watch(
                    Watched::Namespaces,
                    Api::all(self.client.clone()),
                    watcher::Config::default(),
                    &shutdown,
                )),
                node: Some(news.watch(
                    Watched::Node,
                    Api::all(self.client.clone()),
                    watcher::Config::default().fields(&format!("metadata.name={}", self.node)),
                    &shutdown,
                )),
            },
        };
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let listed = caches.ready();
        tokio::pin!(listed);
        let mut ready = false;
        loop {
            // A burst of changes leaves one wakeup: one recompute for all.
            tokio::select! {
                _ = news.changed.notified() => {}
                _ = resync.tick() => {}
                _ = &mut listed, if !ready => ready = true,
            }
            if ready {
                self.recompute(&caches).await;
            }
        }
    }

    async fn recompute(&self, caches: &Caches) {
        let (policies, mut problems) = match &self.policies {
            PolicySource::File(p) => (p.clone(), vec![]),
            PolicySource::Cluster => cluster_policies(caches.policies.as_ref()),
        };
        let namespaces: BTreeMap<String, Labels> = caches
            .namespaces
            .iter()
            .flat_map(|s| s.store.state())
            .filter_map(|n| {
                Some((
                    n.metadata.name.clone()?,
                    n.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect();
        let node_labels: Labels = caches
            .node
            .as_ref()
            .and_then(|s| s.get(None, &self.node))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        let pods: Vec<PodView> = caches
            .pods
            .store
            .state()
            .iter()
            .map(|p| pod_view(p))
            .collect();
        let selected = selection::select(&policies, &pods, &namespaces, &self.node, &node_labels);

        let facts = if selected.is_empty() {
            NodeFacts::default()
        } else {
            match tokio::task::spawn_blocking(host_veth::gather).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    self.report_facts_error(format!("reading the node's veths: {e:#}"));
                    return;
                }
                Err(e) => {
                    self.report_facts_error(format!("reading the node's veths: {e}"));
                    return;
                }
            }
        };
        self.board.set_problems("netlink", vec![]);

        let mut targets = TargetSet::new();
        for s in selected {
            let pod = &s.pod;
            let who = format!("{}/{}", pod.namespace, pod.name);
            let hint = pod
                .annotations
                .get(HOST_VETH_ANNOTATION)
                .map(String::as_str);
            let interface = match host_veth::resolve(&pod.ips, hint, &facts) {
                Resolution::Interface(i) => i,
                Resolution::Waiting => continue,
                Resolution::Refused(reason) => {
                    problems.push(format!("pod {who} not tapped: {reason}"));
                    continue;
                }
            };
            if let Some(other) = targets.get(&interface).and_then(|t| t.pod.as_ref()) {
                problems.push(format!(
                    "pod {who} not tapped: its veth {interface} was also found for pod {}/{}",
                    other.namespace, other.name
                ));
                continue;
            }
            targets.insert(
                interface.clone(),
                Target {
                    interface,
                    pod: Some(PodIdentity {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        uid: pod.uid.clone(),
                        labels: pod.labels.clone().into_iter().collect(),
                        node: pod.node.clone(),
                    }),
                    policies: s.policies,
                },
            );
        }
        if self.board.set_problems("selection", problems.clone()) {
            for p in &problems {
                warn!("{p}");
            }
        }

        // Only policies tapping something here take a place in the kernel.
        let in_use: BTreeSet<&String> = targets.values().flat_map(|t| &t.policies).collect();
        let desired = Desired {
            policies: policies
                .iter()
                .filter(|p| in_use.contains(&p.kernel.name))
                .map(|p| p.kernel.clone())
                .collect(),
            targets,
        };
        self.out.send_if_modified(|cur| {
            if *cur != desired {
                info!(
                    interfaces = ?desired.targets.keys().collect::<Vec<_>>(),
                    policies = ?desired.policies.iter().map(|p| &p.name).collect::<Vec<_>>(),
                    "desired taps changed"
                );
                *cur = desired;
                true
            } else {
                false
            }
        });
    }

    /// Without facts nothing can be decided: the last desired state stays.
    fn report_facts_error(&self, msg: String) {
        if self.board.set_problems("netlink", vec![msg.clone()]) {
            warn!("{msg}");
        }
    }
}

/// The active policies among the TapPolicy objects, sorted by name, and
/// the problems of those that cannot be applied.
fn cluster_policies(informer: Option<&Arc<Informer<TapPolicy>>>) -> (Vec<Policy>, Vec<String>) {
    let mut objects: Vec<Arc<TapPolicy>> = informer.map(|i| i.store.state()).unwrap_or_default();
    objects.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    for o in objects {
        match Policy::from_resource(&o) {
            Ok(Some(p)) => policies.push(p),
            Ok(None) => {}
            Err(e) => problems.push(format!(
                "TapPolicy {}: {e}",
                o.metadata.name.as_deref().unwrap_or("")
            )),
        }
    }
    (policies, problems)
}
