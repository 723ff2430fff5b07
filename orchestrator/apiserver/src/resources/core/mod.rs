//! core/v1 resources.

pub mod configmap;
pub mod endpoints;
pub mod event;
pub mod limitrange;
pub mod namespace;
pub mod node;
pub mod persistentvolume;
pub mod persistentvolumeclaim;
pub mod pod;
pub mod replicationcontroller;
pub mod resourcequota;
pub mod secret;
pub mod service;
pub mod serviceaccount;

use std::sync::Arc;

use crate::registry::{ResourceDef, WriteHook};

/// core/v1 in discovery order; `service_allocator` hands out ClusterIPs
/// and NodePorts.
pub fn resources(
    service_allocator: Arc<dyn WriteHook>,
    store: Arc<dyn tapestry_store::Store>,
) -> Vec<ResourceDef> {
    vec![
        namespace::definition(),
        node::definition(),
        pod::definition(store.clone()),
        replicationcontroller::definition(),
        service::definition(service_allocator),
        endpoints::definition(),
        configmap::definition(),
        secret::definition(),
        serviceaccount::definition(),
        event::definition(),
        persistentvolume::definition(),
        persistentvolumeclaim::definition(store),
        limitrange::definition(),
        resourcequota::definition(),
    ]
}
