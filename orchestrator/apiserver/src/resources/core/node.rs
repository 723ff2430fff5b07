//! core/v1 Nodes.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};

use crate::registry::{names, selectable, ResourceDef};
use crate::rest::status::StatusRest;
use crate::tables::{age, col, name, or_none, s, wide, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["no"]),
        subresources: vec![StatusRest::def()],
        storage: "minions".into(),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Status", "The status of the node"),
                col("Roles", "The roles of the node"),
                AGE,
                col("Version", "Kubelet Version reported by the node."),
                wide("Internal-IP", "List of internal IPs in the node."),
                wide("External-IP", "List of external IPs in the node."),
                wide(
                    "OS-Image",
                    "OS image reported by the node from /etc/os-release.",
                ),
                wide("Kernel-Version", "Kernel version reported by the node."),
                wide(
                    "Container-Runtime",
                    "Container runtime version reported by the node.",
                ),
            ],
            cells: node_cells,
        }),
        field_selectors: selectable(&[("spec.unschedulable", "/spec/unschedulable")]),
        ..ResourceDef::of::<Node>()
    }
}

fn node_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let conditions = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = conditions
        .iter()
        .find(|c| s(c, "/type") == "Ready")
        .map(|c| match s(c, "/status") {
            "True" => "Ready",
            _ => "NotReady",
        })
        .unwrap_or("Unknown");
    let mut status = ready.to_string();
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = tables_labels(o)
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("node-role.kubernetes.io/")
                .map(str::to_string)
                .or_else(|| (k == "kubernetes.io/role").then_some(v))
        })
        .filter(|r| !r.is_empty())
        .collect();
    roles.sort();
    let addresses = o
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let address = |t: &str| {
        addresses
            .iter()
            .find(|a| s(a, "/type") == t)
            .map(|a| s(a, "/address").to_string())
            .unwrap_or_default()
    };
    vec![
        name(o),
        json!(status),
        json!(if roles.is_empty() {
            "<none>".to_string()
        } else {
            roles.join(",")
        }),
        age(o, now),
        json!(s(o, "/status/nodeInfo/kubeletVersion")),
        or_none(&address("InternalIP")),
        or_none(&address("ExternalIP")),
        json!(s(o, "/status/nodeInfo/osImage")),
        json!(s(o, "/status/nodeInfo/kernelVersion")),
        json!(s(o, "/status/nodeInfo/containerRuntimeVersion")),
    ]
}

fn tables_labels(o: &Value) -> Vec<(String, String)> {
    crate::selectors::labels_of(o).into_iter().collect()
}
