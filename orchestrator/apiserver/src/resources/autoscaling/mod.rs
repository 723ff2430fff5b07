//! autoscaling/v2 and autoscaling/v1: HorizontalPodAutoscalers, stored in
//! their v2 form and served in both versions.

pub mod horizontalpodautoscaler;

use crate::registry::ResourceDef;

pub fn resources() -> Vec<ResourceDef> {
    vec![
        horizontalpodautoscaler::definition_v2(),
        horizontalpodautoscaler::definition_v1(),
    ]
}
