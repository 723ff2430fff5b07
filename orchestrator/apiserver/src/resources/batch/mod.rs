//! batch/v1 resources.

pub mod cronjob;
pub mod job;

use crate::registry::ResourceDef;

pub fn resources() -> Vec<ResourceDef> {
    vec![job::definition(), cronjob::definition()]
}
