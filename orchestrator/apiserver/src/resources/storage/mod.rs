//! storage.k8s.io/v1 resources.

pub mod storageclass;

use crate::registry::ResourceDef;

/// storage.k8s.io/v1 in discovery order.
pub fn resources() -> Vec<ResourceDef> {
    vec![storageclass::definition()]
}
