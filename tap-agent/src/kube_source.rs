//! Cluster mode's target source: a kube-rs reflector over the pods bound
//! to this node; after every change it publishes the complete set of
//! host-side veths the policies select (see [`crate::pods::targets_for`]).

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector,
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, Config,
};
use tapestry_proto::policy::TapPolicy;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    pods::{targets_for, PodView},
    targets::TargetSet,
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

pub fn pod_view(p: &Pod) -> PodView {
    let m = &p.metadata;
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    PodView {
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        node: p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
        terminating: m.deletion_timestamp.is_some()
            || matches!(phase, Some("Succeeded") | Some("Failed")),
    }
}

/// Watches the pods of `node` until the stream ends, publishing targets.
/// Nothing is published before the first complete list, so a restart does
/// not detach everything for a moment.
pub async fn watch_pods(
    client: Client,
    node: String,
    policies: Arc<Vec<TapPolicy>>,
    out: watch::Sender<TargetSet>,
) -> Result<()> {
    let api: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, cfg)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut ready = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::InitDone) => ready = true,
            Ok(_) => {}
            Err(e) => {
                warn!("pod watch: {e}");
                continue;
            }
        }
        if !ready {
            continue;
        }
        let pods: Vec<PodView> = store.state().iter().map(|p| pod_view(p)).collect();
        let targets = targets_for(&pods, &policies, &node);
        out.send_if_modified(|cur| {
            if *cur != targets {
                info!(interfaces = ?targets.keys().collect::<Vec<_>>(), "pods to tap changed");
                *cur = targets;
                true
            } else {
                false
            }
        });
    }
    anyhow::bail!("the pod watch ended")
}
