//! apps/v1 workloads: Deployments, ReplicaSets, DaemonSets.

pub mod daemonset;
pub mod deployment;
pub mod replicaset;
mod workload;

use crate::registry::ResourceDef;

pub fn resources() -> Vec<ResourceDef> {
    vec![
        deployment::definition(),
        replicaset::definition(),
        daemonset::definition(),
    ]
}
