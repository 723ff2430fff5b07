//! What the fleet manager knows of the cluster: one informer per kind it
//! reads (Nodes, Pods, Namespaces, the taps' heartbeat Leases, policies and
//! tools), shared by the REST API and the controllers, so reads never go
//! to the API server and a node list is answered from memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use tapestry_proto::crd::{TapPolicy, TapTool};
use tapestry_proto::heartbeat::{self, TapState, TapStatus};
use tapestry_runtime::Informer;
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
}

impl Fleet {
    /// Start every informer; they run until `shutdown`.
    pub fn start(client: Client, shutdown: CancellationToken) -> Arc<Fleet> {
        let all = watcher::Config::default();
        let fleet = Arc::new(Fleet {
            nodes: Informer::new(Api::all(client.clone()), all.clone()),
            // Only pods that are placed can be tapped.
            pods: Informer::new(
                Api::all(client.clone()),
                watcher::Config::default().fields("spec.nodeName!="),
            ),
            namespaces: Informer::new(Api::all(client.clone()), all.clone()),
            leases: Informer::new(
                Api::namespaced(client.clone(), heartbeat::NAMESPACE),
                all.clone(),
            ),
            policies: Informer::new(Api::all(client.clone()), all.clone()),
            tools: Informer::new(Api::all(client), all),
            changed: tokio::sync::Notify::new(),
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
    pub fn taps(&self, now: Timestamp) -> Vec<NodeTap> {
        let mut out: Vec<NodeTap> = self
            .nodes
            .store
            .state()
            .iter()
            .map(|node| self.tap_of(node, now))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn tap(&self, name: &str, now: Timestamp) -> Option<NodeTap> {
        self.nodes.get(None, name).map(|n| self.tap_of(&n, now))
    }

    fn tap_of(&self, node: &Node, now: Timestamp) -> NodeTap {
        let name = node.name_any();
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let lease = self
            .leases
            .get(Some(heartbeat::NAMESPACE), &heartbeat::lease_name(&name));
        let Some(lease) = lease else {
            return NodeTap {
                name,
                ready,
                tap: TapState::Pending,
                last_heartbeat: None,
                status: None,
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let renewed = spec.renew_time.map(|t| t.0);
        let lease_duration =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
        let age = renewed
            .map(|t| now.duration_since(t).try_into().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::MAX);
        let status = lease
            .annotations()
            .get(heartbeat::STATUS_ANNOTATION)
            .and_then(|s| serde_json::from_str::<TapStatus>(s).ok());
        NodeTap {
            name,
            ready,
            tap: heartbeat::tap_state(age, lease_duration),
            last_heartbeat: renewed.map(|t| t.to_string()),
            status,
        }
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
