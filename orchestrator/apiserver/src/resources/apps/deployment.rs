//! apps/v1 Deployments.

use std::sync::Arc;

use serde_json::json;

use super::workload::{Workload, WorkloadBehaviour};
use crate::registry::{names, Generation, ResourceDef};
use crate::rest::scale::ScaleRest;
use crate::rest::status::StatusRest;
use crate::tables::{
    age, col, container_names_and_images, i, name, selector_string, wide, TableDef, AGE, NAME,
};
use k8s_openapi::api::apps::v1::Deployment;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["deploy"]),
        categories: names(&["all"]),
        subresources: vec![StatusRest::def(), ScaleRest::workload()],
        generation: Generation::Spec,
        behaviour: Arc::new(WorkloadBehaviour(Workload::Deployment)),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Ready", "Number of the pod with ready state"),
                col("Up-to-date", "Total number of non-terminated pods targeted by this deployment that have the desired template spec."),
                col("Available", "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."),
                AGE,
                wide("Containers", "Names of each container in the template."),
                wide("Images", "Images referenced by each container in the template."),
                wide("Selector", "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment."),
            ],
            cells: |o, now| {
                let (names, images) = container_names_and_images(o.pointer("/spec/template/spec"));
                vec![
                    name(o),
                    json!(format!("{}/{}", i(o, "/status/readyReplicas"), i(o, "/spec/replicas"))),
                    json!(i(o, "/status/updatedReplicas")),
                    json!(i(o, "/status/availableReplicas")),
                    age(o, now),
                    json!(names),
                    json!(images),
                    json!(selector_string(o.pointer("/spec/selector"))),
                ]
            },
        }),
        ..ResourceDef::of::<Deployment>()
    }
}
