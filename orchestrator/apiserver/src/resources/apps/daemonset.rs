//! apps/v1 DaemonSets.

use std::sync::Arc;

use serde_json::{json, Value};

use super::workload::{Workload, WorkloadBehaviour};
use crate::registry::{names, Generation, ResourceDef};
use crate::rest::status::StatusRest;
use crate::tables::{
    age, col, container_names_and_images, i, name, selector_string, wide, TableDef, AGE, NAME,
};
use k8s_openapi::api::apps::v1::DaemonSet;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["ds"]),
        categories: names(&["all"]),
        subresources: vec![StatusRest::def()],
        generation: Generation::Spec,
        behaviour: Arc::new(WorkloadBehaviour(Workload::DaemonSet)),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Desired", "The total number of nodes that should be running the daemon pod."),
                col("Current", "The number of nodes running at least one daemon pod and are supposed to."),
                col("Ready", "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready."),
                col("Up-to-date", "The total number of nodes that are running updated daemon pod"),
                col("Available", "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available."),
                col("Node Selector", "NodeSelector is a selector which must be true for the pod to fit on a node."),
                AGE,
                wide("Containers", "Names of each container in the template."),
                wide("Images", "Images referenced by each container in the template."),
                wide("Selector", "A label query over pods that are managed by the daemon set."),
            ],
            cells: |o, now| {
                let (names, images) = container_names_and_images(o.pointer("/spec/template/spec"));
                let node_selector = o
                    .pointer("/spec/template/spec/nodeSelector")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "<none>".into());
                vec![
                    name(o),
                    json!(i(o, "/status/desiredNumberScheduled")),
                    json!(i(o, "/status/currentNumberScheduled")),
                    json!(i(o, "/status/numberReady")),
                    json!(i(o, "/status/updatedNumberScheduled")),
                    json!(i(o, "/status/numberAvailable")),
                    json!(node_selector),
                    age(o, now),
                    json!(names),
                    json!(images),
                    json!(selector_string(o.pointer("/spec/selector"))),
                ]
            },
        }),
        ..ResourceDef::of::<DaemonSet>()
    }
}
