//! Persistent volumes on this node: a pod's `persistentVolumeClaim`
//! volumes resolved to their bound volume's directory (`local` or
//! `hostPath`; a local-path volume's directory is made on first use), the
//! root of local-path volumes published on the Node, and the directories
//! of deleted local-path volumes removed (see [`tapestry_runtime::storage`]
//! for the whole life of such a volume).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use tapestry_runtime::storage::{
    local_path_dir, local_path_root, LOCAL_PATH_CLEANUP, LOCAL_PATH_NODE_LABEL,
    LOCAL_PATH_PROVISIONER, LOCAL_PATH_ROOT, PROVISIONED_BY,
};
use tapestry_runtime::{ignore_not_found, run_worker, Informer, Queue, Requeue};
use tokio_util::sync::CancellationToken;

use crate::{Config, Kubelet};

/// A volume that cannot be mounted yet (its claim is not bound): the pod
/// waits in ContainerCreating and tries again.
#[derive(Debug)]
pub struct NotReady(pub String);

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotReady {}

/// The root of this node's local-path volumes.
pub fn root(config: &Config) -> PathBuf {
    local_path_root(&config.data_dir)
}

/// Publish where this node's local-path volumes live, on its Node.
pub async fn publish_root(client: &kube::Client, config: &Config) -> Result<()> {
    let root = root(config);
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let nodes: Api<Node> = Api::all(client.clone());
    let root = root.to_string_lossy().into_owned();
    let patch = json!({"metadata": {"annotations": {LOCAL_PATH_ROOT: root}}});
    nodes
        .patch(
            &config.node_name,
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .context("publishing the local-path volume root on the Node")?;
    Ok(())
}

/// The host directory of claim `claim` of a pod in `ns`.
pub async fn claim_dir(kubelet: &Kubelet, ns: &str, claim: &str, field: &str) -> Result<PathBuf> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(kubelet.client.clone(), ns);
    let Some(c) = claims.get_opt(claim).await? else {
        return Err(NotReady(format!(
            "persistentvolumeclaim \"{claim}\" not found ({field})"
        ))
        .into());
    };
    let volume = c
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty());
    let phase = c.status.as_ref().and_then(|s| s.phase.as_deref());
    let Some(volume) = volume.filter(|_| phase == Some("Bound")) else {
        return Err(NotReady(format!(
            "persistentvolumeclaim \"{claim}\" is not bound yet ({field})"
        ))
        .into());
    };
    let volumes: Api<PersistentVolume> = Api::all(kubelet.client.clone());
    let Some(pv) = volumes.get_opt(&volume).await? else {
        return Err(NotReady(format!(
            "persistentvolume \"{volume}\" of claim \"{claim}\" not found ({field})"
        ))
        .into());
    };
    volume_dir(
        &pv,
        &root(&kubelet.config),
        &kubelet.config.node_name,
        field,
    )
}

/// The directory volume `pv` mounts from on this node (node `node`, whose
/// local-path volumes live under `root`); a local-path volume's directory
/// is created.
pub fn volume_dir(pv: &PersistentVolume, root: &Path, node: &str, field: &str) -> Result<PathBuf> {
    let name = pv.name_any();
    let spec = pv.spec.as_ref().context("volume without spec")?;
    let local_path =
        pv.annotations().get(PROVISIONED_BY).map(String::as_str) == Some(LOCAL_PATH_PROVISIONER);
    if local_path {
        if pv.labels().get(LOCAL_PATH_NODE_LABEL).map(String::as_str) != Some(node) {
            anyhow::bail!("{field}: local-path volume {name:?} lives on another node");
        }
        let dir = local_path_dir(root, &name)
            .with_context(|| format!("{field}: unusable volume name {name:?}"))?;
        let stated = spec.local.as_ref().map(|l| Path::new(&l.path));
        if stated != Some(dir.as_path()) {
            anyhow::bail!(
                "{field}: local-path volume {name:?} names {stated:?}, not this node's {}",
                dir.display()
            );
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Any container user may write, as with emptyDir.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
        return Ok(dir);
    }
    if let Some(local) = &spec.local {
        let p = PathBuf::from(&local.path);
        if !p.exists() {
            anyhow::bail!(
                "{field}: local volume {name:?}: {} does not exist",
                local.path
            );
        }
        return Ok(p);
    }
    if let Some(hp) = &spec.host_path {
        let p = PathBuf::from(&hp.path);
        match hp.type_.as_deref().unwrap_or("") {
            "DirectoryOrCreate" => fs::create_dir_all(&p)?,
            "Directory" if !p.is_dir() => {
                anyhow::bail!("{field}: volume {name:?}: {} is not a directory", hp.path)
            }
            "File" if !p.is_file() => {
                anyhow::bail!("{field}: volume {name:?}: {} is not a file", hp.path)
            }
            _ => {}
        }
        return Ok(p);
    }
    anyhow::bail!(
        "{field}: volume {name:?} has an unsupported type (local and hostPath volumes are supported)"
    )
}

/// Remove the directories of this node's deleted local-path volumes, then
/// their cleanup finalizer, until `shutdown`.
pub fn start_cleanup(kubelet: Arc<Kubelet>, shutdown: CancellationToken) {
    let node = kubelet.config.node_name.clone();
    let config = watcher::Config::default().labels(&format!("{LOCAL_PATH_NODE_LABEL}={node}"));
    let volumes: Arc<Informer<PersistentVolume>> =
        Informer::new(Api::all(kubelet.client.clone()), config);
    let queue = Queue::new(10_000);
    let q = queue.clone();
    volumes.on_change(move |pv, deleted| {
        if !deleted && pv.metadata.deletion_timestamp.is_some() {
            q.add(pv.name_any());
        }
    });
    volumes.start(shutdown.clone());
    let v = volumes.clone();
    tokio::spawn(async move {
        run_worker(
            "local-path-cleanup",
            queue,
            shutdown,
            Duration::from_secs(60),
            move || {
                v.store
                    .state()
                    .iter()
                    .filter(|pv| pv.metadata.deletion_timestamp.is_some())
                    .map(|pv| pv.name_any())
                    .collect()
            },
            move |name| {
                let kubelet = kubelet.clone();
                let volumes = volumes.clone();
                async move { clean(&kubelet, &volumes, &name).await }
            },
        )
        .await
    });
}

async fn clean(
    kubelet: &Kubelet,
    volumes: &Informer<PersistentVolume>,
    name: &str,
) -> Result<Requeue> {
    let Some(pv) = volumes.get(None, name) else {
        return Ok(Requeue::Done);
    };
    let ours = pv.annotations().get(PROVISIONED_BY).map(String::as_str)
        == Some(LOCAL_PATH_PROVISIONER)
        && pv.labels().get(LOCAL_PATH_NODE_LABEL) == Some(&kubelet.config.node_name);
    let held = pv
        .metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == LOCAL_PATH_CLEANUP);
    if !ours || !held || pv.metadata.deletion_timestamp.is_none() {
        return Ok(Requeue::Done);
    }
    // The directory is found from this node's own root, never from the
    // path the object states.
    if let Some(dir) = local_path_dir(&root(&kubelet.config), name) {
        match fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(volume = name, dir = %dir.display(), "removed local-path volume")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(volume = name, "removing {}: {e}", dir.display());
                return Ok(Requeue::After(Duration::from_secs(10)));
            }
        }
    }
    let keep: Vec<&String> = pv
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != LOCAL_PATH_CLEANUP)
        .collect();
    let patch = json!({"metadata": {"resourceVersion": pv.resource_version(), "finalizers": keep}});
    let api: Api<PersistentVolume> = Api::all(kubelet.client.clone());
    ignore_not_found(
        api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await,
    )?;
    Ok(Requeue::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(v: serde_json::Value) -> PersistentVolume {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_local_path_volume_is_made_under_this_nodes_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("volumes");
        let path = root.join("pvc-1");
        let ok = pv(json!({"metadata": {"name": "pvc-1",
                "annotations": {PROVISIONED_BY: LOCAL_PATH_PROVISIONER},
                "labels": {LOCAL_PATH_NODE_LABEL: "n1"}},
            "spec": {"local": {"path": path.to_string_lossy()}}}));
        assert_eq!(volume_dir(&ok, &root, "n1", "v").unwrap(), path);
        assert!(path.is_dir());
        assert!(volume_dir(&ok, &root, "n2", "v").is_err(), "another node's");
        let mut elsewhere = ok.clone();
        elsewhere
            .spec
            .as_mut()
            .unwrap()
            .local
            .as_mut()
            .unwrap()
            .path = "/etc".into();
        assert!(volume_dir(&elsewhere, &root, "n1", "v").is_err());
    }

    #[test]
    fn static_volumes_mount_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        let hp = pv(json!({"metadata": {"name": "a"},
            "spec": {"hostPath": {"path": p.to_string_lossy(), "type": "DirectoryOrCreate"}}}));
        assert_eq!(volume_dir(&hp, dir.path(), "n1", "v").unwrap(), p);
        let missing = pv(json!({"metadata": {"name": "b"},
            "spec": {"local": {"path": dir.path().join("nope").to_string_lossy()}}}));
        assert!(volume_dir(&missing, dir.path(), "n1", "v").is_err());
        let nfs = pv(json!({"metadata": {"name": "c"},
            "spec": {"nfs": {"server": "s", "path": "/x"}}}));
        let err = volume_dir(&nfs, dir.path(), "n1", "v").unwrap_err();
        assert!(format!("{err:#}").contains("unsupported type"), "{err:#}");
    }
}
