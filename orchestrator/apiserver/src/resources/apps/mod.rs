//! apps/v1 workloads: Deployments, ReplicaSets, DaemonSets, StatefulSets,
//! and the ControllerRevisions that record their templates.

pub mod controllerrevision;
pub mod daemonset;
pub mod deployment;
pub mod replicaset;
pub mod statefulset;
pub(crate) mod workload;

use crate::registry::ResourceDef;

pub fn resources() -> Vec<ResourceDef> {
    vec![
        deployment::definition(),
        replicaset::definition(),
        daemonset::definition(),
        statefulset::definition(),
        controllerrevision::definition(),
    ]
}
