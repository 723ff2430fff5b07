//! The served resources: core/v1, apps/v1, batch/v1, coordination.k8s.io/v1,
//! discovery.k8s.io/v1 and events.k8s.io/v1.

mod apps;
mod batch;
pub mod core;
pub(crate) mod groups;
pub mod podspec;

use std::sync::Arc;

use serde_json::Value;

use crate::registry::{Behaviour, ResourceDef, WriteHook};

pub use self::core::ServiceAllocator;

/// Behaviour for resources with nothing special: status (if any) is reset on
/// create unless `keep_status_on_create`.
pub struct Basic {
    pub keep_status_on_create: bool,
    pub validate: fn(&Value) -> Vec<crate::error::Cause>,
}

impl Basic {
    pub fn plain() -> Arc<dyn Behaviour> {
        Arc::new(Basic {
            keep_status_on_create: true,
            validate: |_| Vec::new(),
        })
    }
}

impl Behaviour for Basic {
    fn prepare_for_create(&self, obj: &mut Value) {
        if !self.keep_status_on_create {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
    }

    fn validate(&self, obj: &Value) -> Vec<crate::error::Cause> {
        (self.validate)(obj)
    }
}

/// Every resource the server serves. `service_hook` allocates ClusterIPs and
/// NodePorts for Services.
pub fn all(service_hook: Arc<dyn WriteHook>) -> Vec<ResourceDef> {
    let mut defs = core::resources(service_hook);
    defs.extend(apps::resources());
    defs.extend(batch::resources());
    defs.extend(groups::resources());
    defs
}
