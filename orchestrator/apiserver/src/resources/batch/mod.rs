//! batch/v1 resources.

pub mod job;

use crate::registry::ResourceDef;

pub fn resources() -> Vec<ResourceDef> {
    vec![job::definition()]
}
