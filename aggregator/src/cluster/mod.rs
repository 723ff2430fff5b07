//! Cluster mode: tools and policies come from TapTool and TapPolicy
//! objects (`tapestry.io/v1alpha1`), watched through the Kubernetes API,
//! and run on the live topology as they change; what the aggregator sees
//! goes back into their status.
//!
//! ```text
//! watch TapPolicy ─┐                      ┌─► Topology (per-tool sinks, per-policy workers)
//! watch TapTool  ──┴─► Change ─► Reconciler ─► status snapshot ─► status writer ─► patch status (apply)
//! ```
//!
//! - [`mapping`]: CRD fields → the aggregator's configuration types;
//! - [`reconciler`]: which policies run, stops, the owned status fields;
//! - [`status`]: bounded, change-only server-side-apply status writes.

pub mod mapping;
pub mod reconciler;
pub mod status;

use std::fmt::Debug;
use std::path::Path;

use anyhow::Context as _;
use futures::StreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tapestry_proto::crd::{TapPolicy, TapTool};

pub use reconciler::{Change, ClusterHandle, Endpoints, Reconciler};

/// A client from a kubeconfig file, or (`None`) from the environment:
/// in a pod its service account, else `$KUBECONFIG` or `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    // kube's TLS needs a process-wide crypto provider; ring is ours.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("--in-cluster: no Kubernetes configuration found")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Feeds every TapPolicy and TapTool change to `handle` until a watch
/// ends for good; transient errors are retried with backoff.
pub async fn watch(client: Client, handle: ClusterHandle) -> anyhow::Result<()> {
    let policies = forward(
        Api::<TapPolicy>::all(client.clone()),
        handle.clone(),
        |p| Change::Policy(Box::new(p)),
        Change::PolicyDeleted,
        Change::Policies,
    );
    let tools = forward(
        Api::<TapTool>::all(client),
        handle,
        |t| Change::Tool(Box::new(t)),
        Change::ToolDeleted,
        Change::Tools,
    );
    tokio::try_join!(policies, tools)?;
    Ok(())
}

async fn forward<K>(
    api: Api<K>,
    handle: ClusterHandle,
    applied: fn(K) -> Change,
    deleted: fn(String) -> Change,
    listed: fn(Vec<K>) -> Change,
) -> anyhow::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let kind = K::kind(&());
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // Objects of a (re)list, applied together once it is complete so
    // objects missing from it can be recognised as deleted.
    let mut listing: Vec<K> = Vec::new();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(o)) => listing.push(o),
            Ok(Event::InitDone) => handle.apply(listed(std::mem::take(&mut listing))).await?,
            Ok(Event::Apply(o)) => handle.apply(applied(o)).await?,
            Ok(Event::Delete(o)) => handle.apply(deleted(o.name_any())).await?,
            Err(e) => tracing::warn!("{kind} watch: {e}"),
        }
    }
    anyhow::bail!("the {kind} watch ended")
}

/// Every pod's node, from a watch of the pods (names and nodes only):
/// what the aggregator checks certified taps' pod identities against.
pub struct PodNodes(
    std::sync::Arc<tapestry_runtime::informer::Informer<k8s_openapi::api::core::v1::Pod>>,
);

impl PodNodes {
    /// Starts the watch and waits for its first list.
    pub async fn start(client: Client, shutdown: tokio_util::sync::CancellationToken) -> PodNodes {
        use k8s_openapi::api::core::v1::Pod;
        let informer = tapestry_runtime::informer::Informer::trimmed(
            Api::<Pod>::all(client),
            watcher::Config::default(),
            trim_to_node,
        );
        informer.start(shutdown);
        if tokio::time::timeout(std::time::Duration::from_secs(30), informer.ready())
            .await
            .is_err()
        {
            // Taps' pod identities stay unconfirmed (and are refused)
            // until the list arrives.
            tracing::error!(
                "the pod watch has not listed pods within 30 s; is listing pods allowed?"
            );
        }
        PodNodes(informer)
    }
}

impl crate::sources::grpc::PodPlacement for PodNodes {
    fn node_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.0
            .get(Some(namespace), name)?
            .spec
            .as_ref()?
            .node_name
            .clone()
    }
}

/// A pod as [`PodNodes`] keeps it: its name and its node.
fn trim_to_node(pod: &mut k8s_openapi::api::core::v1::Pod) {
    tapestry_runtime::informer::trim_metadata(pod);
    pod.metadata.labels = None;
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
    pod.status = None;
    pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        ..Default::default()
    });
}
