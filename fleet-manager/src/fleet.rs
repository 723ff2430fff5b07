//! What the fleet manager knows of the cluster: one informer per kind it
//! reads (Nodes, Pods, Namespaces, the taps' heartbeat Leases, policies and
//! tools), shared by the REST API and the controllers, so reads never go
//! to the API server and a node list is answered from memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, NodeStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use tapestry_proto::crd::{TapPolicy, TapTool};
use tapestry_proto::heartbeat::{self, TapState, TapStatus};
use tapestry_runtime::{lock, trim_metadata, Informer};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

pub type Labels = BTreeMap<String, String>;

pub struct Fleet {
    pub nodes: Arc<Informer<Node>>,
    pub pods: Arc<Informer<Pod>>,
    pub namespaces: Arc<Informer<Namespace>>,
    /// The taps' heartbeat Leases (in [`heartbeat::NAMESPACE`]).
    pub leases: Arc<Informer<Lease>>,
    pub policies: Arc<Informer<TapPolicy>>,
    pub tools: Arc<Informer<TapTool>>,
    /// Woken when a policy or tool changes.
    pub changed: tokio::sync::Notify,
    /// Every node's tap as last rendered (see [`Fleet::refresh_taps`]).
    tap_view: Mutex<TapView>,
}

impl Fleet {
    /// Start every informer; they run until `shutdown`.
    pub fn start(client: Client, shutdown: CancellationToken) -> Arc<Fleet> {
        let all = watcher::Config::default();
        let fleet = Arc::new(Fleet {
            nodes: Informer::trimmed(Api::all(client.clone()), all.clone(), trim_node),
            // Only pods that are placed can be tapped.
            pods: Informer::trimmed(
                Api::all(client.clone()),
                watcher::Config::default().fields("spec.nodeName!="),
                trim_pod,
            ),
            namespaces: Informer::trimmed(Api::all(client.clone()), all.clone(), trim_metadata),
            leases: Informer::trimmed(
                Api::namespaced(client.clone(), heartbeat::NAMESPACE),
                all.clone(),
                trim_metadata,
            ),
            policies: Informer::trimmed(Api::all(client.clone()), all.clone(), trim_metadata),
            tools: Informer::trimmed(Api::all(client), all, trim_metadata),
            changed: tokio::sync::Notify::new(),
            tap_view: Mutex::new(TapView::default()),
        });
        // Weak: the informers' handlers must not keep the fleet alive.
        let weak = Arc::downgrade(&fleet);
        let wake = Arc::new(move || {
            if let Some(f) = weak.upgrade() {
                f.changed.notify_one();
            }
        });
        let w = wake.clone();
        fleet.policies.on_change(move |_, _| w());
        fleet.tools.on_change(move |_, _| wake());
        // A node's entry in the node view is rendered again when its Node
        // or its tap's Lease changes.
        let weak = Arc::downgrade(&fleet);
        fleet.nodes.on_change(move |node, _| {
            if let Some(f) = weak.upgrade() {
                f.touch(node.name_any());
            }
        });
        let weak = Arc::downgrade(&fleet);
        fleet.leases.on_change(move |lease, _| {
            let node = lease
                .metadata
                .name
                .as_deref()
                .and_then(heartbeat::lease_node);
            if let (Some(f), Some(node)) = (weak.upgrade(), node) {
                f.touch(node.to_string());
            }
        });
        fleet.nodes.start(shutdown.clone());
        fleet.pods.start(shutdown.clone());
        fleet.namespaces.start(shutdown.clone());
        fleet.leases.start(shutdown.clone());
        fleet.policies.start(shutdown.clone());
        fleet.tools.start(shutdown);
        fleet
    }

    /// Whether every informer has listed once.
    pub async fn ready(&self) {
        self.nodes.ready().await;
        self.pods.ready().await;
        self.namespaces.ready().await;
        self.leases.ready().await;
        self.policies.ready().await;
        self.tools.ready().await;
    }

    /// Every node's tap, by node name, as of `now`.
    pub fn taps(&self, now: Timestamp) -> BTreeMap<String, Arc<RenderedTap>> {
        self.refresh_taps(now).entries.clone()
    }

    pub fn tap(&self, name: &str, now: Timestamp) -> Option<NodeTap> {
        let view = self.refresh_taps(now);
        view.entries.get(name).map(|r| r.tap.clone())
    }

    fn touch(&self, node: String) {
        lock(&self.tap_view).dirty.insert(node);
    }

    /// The node view brought up to `now`. A node's entry is computed and
    /// serialised again only when its Node or Lease changed (the informers
    /// mark it) or its tap state aged into another, so listing thousands
    /// of nodes costs neither thousands of JSON parses nor a pass over
    /// the informers.
    pub fn refresh_taps(&self, now: Timestamp) -> MutexGuard<'_, TapView> {
        let mut view = lock(&self.tap_view);
        let mut stale: Vec<String> = std::mem::take(&mut view.dirty).into_iter().collect();
        stale.extend(
            view.entries
                .iter()
                .filter(|(_, r)| r.state_at(now) != r.tap.tap)
                .map(|(name, _)| name.clone()),
        );
        for name in stale {
            match self.nodes.get(None, &name) {
                None => {
                    view.entries.remove(&name);
                }
                Some(node) => {
                    let lease = self
                        .leases
                        .get(Some(heartbeat::NAMESPACE), &heartbeat::lease_name(&name));
                    let rendered = RenderedTap::of(&node, lease.as_deref(), now);
                    view.entries.insert(name, Arc::new(rendered));
                }
            }
        }
        view
    }

    /// Labels of every namespace, by name.
    pub fn namespace_labels(&self) -> BTreeMap<String, Labels> {
        self.namespaces
            .store
            .state()
            .iter()
            .map(|ns| (ns.name_any(), ns.labels().clone()))
            .collect()
    }
}

// The informers keep only what the fleet reads: with thousands of nodes
// and pods, managed fields, images and container statuses would be most
// of the fleet manager's memory.

/// A node's name, labels and Ready condition.
fn trim_node(node: &mut Node) {
    trim_metadata(node);
    node.spec = None;
    let ready = node
        .status
        .take()
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ == "Ready")
        .collect();
    node.status = Some(NodeStatus {
        conditions: Some(ready),
        ..Default::default()
    });
}

/// What [`tappable`] and the policies' selectors read: labels, node,
/// host network, phase.
fn trim_pod(pod: &mut Pod) {
    trim_metadata(pod);
    let spec = pod.spec.take().unwrap_or_default();
    pod.spec = Some(PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        ..Default::default()
    });
    let phase = pod.status.take().and_then(|s| s.phase);
    pod.status = Some(PodStatus {
        phase,
        ..Default::default()
    });
}

/// Every node's rendered tap, by name, and the names to render again.
#[derive(Default)]
pub struct TapView {
    pub entries: BTreeMap<String, Arc<RenderedTap>>,
    dirty: std::collections::HashSet<String>,
}

/// A node's tap with its JSON, as the node view keeps it.
pub struct RenderedTap {
    /// The Lease's renewal and duration; `None` without a Lease.
    timing: Option<(Option<Timestamp>, Duration)>,
    pub tap: NodeTap,
    /// `tap` serialised, ready to be written into a list.
    pub json: bytes::Bytes,
}

impl RenderedTap {
    fn of(node: &Node, lease: Option<&Lease>, now: Timestamp) -> RenderedTap {
        let timing = lease.map(lease_timing);
        let tap = tap_of(node, lease, timing, now);
        RenderedTap {
            timing,
            json: serde_json::to_vec(&tap).unwrap_or_default().into(),
            tap,
        }
    }

    /// The tap's state at `now`.
    fn state_at(&self, now: Timestamp) -> TapState {
        state_of(self.timing, now)
    }
}

/// When a Lease was renewed and for how long it holds.
fn lease_timing(lease: &Lease) -> (Option<Timestamp>, Duration) {
    let spec = lease.spec.as_ref();
    let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(0)
        .max(0) as u64;
    (renewed, Duration::from_secs(duration))
}

/// Pending before the first heartbeat (no Lease); then by the Lease's age.
fn state_of(timing: Option<(Option<Timestamp>, Duration)>, now: Timestamp) -> TapState {
    let Some((renewed, lease_duration)) = timing else {
        return TapState::Pending;
    };
    let age = renewed
        .map(|t| now.duration_since(t).try_into().unwrap_or(Duration::ZERO))
        .unwrap_or(Duration::MAX);
    heartbeat::tap_state(age, lease_duration)
}

fn tap_of(
    node: &Node,
    lease: Option<&Lease>,
    timing: Option<(Option<Timestamp>, Duration)>,
    now: Timestamp,
) -> NodeTap {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let status = lease
        .and_then(|l| l.annotations().get(heartbeat::STATUS_ANNOTATION))
        .and_then(|s| serde_json::from_str::<TapStatus>(s).ok());
    NodeTap {
        name: node.name_any(),
        ready,
        tap: state_of(timing, now),
        last_heartbeat: timing
            .and_then(|(renewed, _)| renewed)
            .map(|t| t.to_string()),
        status,
    }
}

/// A node's tap, as `/v1/nodes` shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTap {
    /// The node's name.
    pub name: String,
    /// Whether the node is Ready.
    pub ready: bool,
    /// Connected while heartbeats arrive; Pending after two missed (or
    /// before the first); Disconnected after three.
    pub tap: TapState,
    /// When the tap last reported (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// What the tap reported last: pods and interfaces tapped, packets per
    /// policy, drops, its link to the aggregator, its last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<TapStatus>,
}

/// Whether a pod can be tapped at all: placed, running, not being deleted,
/// with a network of its own.
pub fn tappable(pod: &Pod) -> bool {
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Running");
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    running && !host_network && pod.metadata.deletion_timestamp.is_none()
}
