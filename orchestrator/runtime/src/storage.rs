//! The persistent-storage contract between the API server, the binding
//! controller, the scheduler and the kubelet: annotation and finalizer
//! names, the built-in local-path provisioner, and where its volumes live
//! on a node. One copy, read by every side.
//!
//! Local-path volumes: the kubelet publishes the directory its local-path
//! volumes live under on its Node ([`LOCAL_PATH_ROOT`], `DATA_DIR/volumes`);
//! the scheduler writes the node it chose on a WaitForFirstConsumer claim
//! ([`SELECTED_NODE`]); the binding controller then creates a `local`
//! PersistentVolume at `ROOT/PV_NAME` with a node affinity to that node
//! and binds it; the kubelet creates the directory when a pod mounts it.
//! When such a volume is reclaimed with policy Delete, the controller
//! deletes the PersistentVolume; its [`LOCAL_PATH_CLEANUP`] finalizer
//! holds it until the kubelet of its node has removed the directory
//! (found from the kubelet's own root and the volume's name, never from
//! the path the object states), and the kubelet then removes the
//! finalizer, which lets the volume go.

use std::path::{Path, PathBuf};

/// The StorageClass every cluster starts with, as its default class.
pub const LOCAL_PATH_CLASS: &str = "local-path";
/// Its provisioner, served by the binding controller.
pub const LOCAL_PATH_PROVISIONER: &str = "tapestry.io/local-path";
/// On a Node: the directory its local-path volumes live under.
pub const LOCAL_PATH_ROOT: &str = "tapestry.io/local-path-root";
/// On a local-path PersistentVolume: the node it lives on (its kubelet
/// watches the volumes carrying its name).
pub const LOCAL_PATH_NODE_LABEL: &str = "tapestry.io/local-path-node";
/// On a local-path PersistentVolume until its node removed its directory.
pub const LOCAL_PATH_CLEANUP: &str = "tapestry.io/local-path-cleanup";

/// On a claim: the node the scheduler chose for its first consumer.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// On a claim: the provisioner asked to make its volume.
pub const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// On a claim and its volume once the controller completed the binding.
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// On a claim and its volume when the controller (not a user) bound them.
pub const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// On a provisioned volume: which provisioner made it.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Claims keep this finalizer while pods use them.
pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
/// Volumes keep this finalizer while they are bound.
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";
/// The node label local volumes' node affinity names.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// The root of a node's local-path volumes under its data directory.
pub fn local_path_root(data_dir: &Path) -> PathBuf {
    data_dir.join("volumes")
}

/// The directory of local-path volume `pv` under `root`, or None for a
/// name that could leave it (a PersistentVolume name is a DNS subdomain,
/// so a valid one never does).
pub fn local_path_dir(root: &Path, pv: &str) -> Option<PathBuf> {
    let plain = !pv.is_empty()
        && pv != "."
        && pv != ".."
        && pv
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
    plain.then(|| root.join(pv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_directories_stay_under_the_root() {
        let root = Path::new("/data/volumes");
        assert_eq!(
            local_path_dir(root, "pvc-1234"),
            Some(PathBuf::from("/data/volumes/pvc-1234"))
        );
        for bad in ["", "..", "../etc", "a/b", "."] {
            assert_eq!(local_path_dir(root, bad), None, "{bad}");
        }
    }
}
