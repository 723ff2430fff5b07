//! apps/v1 ReplicaSets.

use std::sync::Arc;

use serde_json::json;

use super::workload::{Workload, WorkloadBehaviour};
use crate::registry::{names, selectable, Generation, ResourceDef};
use crate::rest::scale::ScaleRest;
use crate::rest::status::StatusRest;
use crate::tables::{
    age, col, container_names_and_images, i, name, selector_string, wide, TableDef, AGE, NAME,
};
use k8s_openapi::api::apps::v1::ReplicaSet;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["rs"]),
        categories: names(&["all"]),
        subresources: vec![StatusRest::def(), ScaleRest::workload()],
        generation: Generation::Spec,
        behaviour: Arc::new(WorkloadBehaviour(Workload::ReplicaSet)),
        table: Arc::new(table("The number of ready replicas for this replica set.")),
        field_selectors: selectable(&[("status.replicas", "/status/replicas")]),
        ..ResourceDef::of::<ReplicaSet>()
    }
}

/// ReplicaSets' columns, which ReplicationControllers share; `ready`
/// describes the Ready column.
pub(crate) fn table(ready: &'static str) -> TableDef {
    TableDef {
        columns: vec![
            NAME,
            col("Desired", "Number of desired pods."),
            col("Current", "Number of actual replicas."),
            col("Ready", ready),
            AGE,
            wide("Containers", "Names of each container in the template."),
            wide(
                "Images",
                "Images referenced by each container in the template.",
            ),
            wide(
                "Selector",
                "Label query over pods that should match the replica count.",
            ),
        ],
        cells: |o, now| {
            let (names, images) = container_names_and_images(o.pointer("/spec/template/spec"));
            vec![
                name(o),
                json!(i(o, "/spec/replicas")),
                json!(i(o, "/status/replicas")),
                json!(i(o, "/status/readyReplicas")),
                age(o, now),
                json!(names),
                json!(images),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        },
    }
}
