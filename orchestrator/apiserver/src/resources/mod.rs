//! The served resources, one module per resource (`<group>/<kind>.rs`):
//! each owns its definition, strategy, table columns, hooks and
//! subresource handlers. Custom resources are defined at run time from
//! their CRDs ([`apiextensions::custom`]).

pub mod apiextensions;
pub mod apps;
pub mod autoscaling;
pub mod batch;
pub mod certificates;
pub mod coordination;
pub mod core;
pub mod discovery;
pub mod events;
pub mod networking;
pub mod podspec;
pub mod policy;
pub mod rbac;
pub mod scheduling;
pub mod storage;

use std::sync::Arc;

use crate::registry::{ResourceDef, WriteHook};

pub use self::core::service::allocator::{Ipv4Range, ServiceAllocator};

/// Every built-in resource, in discovery order. `service_allocator` hands
/// out ClusterIPs and NodePorts for Services; pods' admission reads
/// service accounts from `store`.
pub fn builtin(
    service_allocator: Arc<dyn WriteHook>,
    store: Arc<dyn tapestry_store::Store>,
) -> Vec<ResourceDef> {
    let mut defs = core::resources(service_allocator, store.clone());
    defs.extend(apps::resources());
    defs.extend(autoscaling::resources());
    defs.extend(batch::resources());
    defs.push(coordination::lease::definition());
    defs.push(discovery::endpointslice::definition());
    defs.push(events::event::definition());
    defs.push(apiextensions::customresourcedefinition::definition());
    defs.extend(rbac::resources());
    defs.push(certificates::definition());
    defs.extend(storage::resources());
    defs.push(policy::poddisruptionbudget::definition());
    defs.extend(networking::resources(store.clone()));
    defs.push(scheduling::priorityclass::definition(store));
    defs
}
