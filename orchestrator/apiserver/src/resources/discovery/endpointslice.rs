//! discovery.k8s.io/v1 EndpointSlices.

use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

use crate::error::Cause;
use crate::registry::{selectable, Behaviour, Generation, ResourceDef};
use crate::tables::{age, col, i, name, or_none, s, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        generation: Generation::Spec,
        behaviour: Arc::new(EndpointSliceBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("AddressType", "The IP protocol for this slice."),
                col("Ports", "The ports of this slice."),
                col("Endpoints", "The endpoints of this slice."),
                AGE,
            ],
            cells: endpoint_slice_cells,
        }),
        field_selectors: selectable(&[("addressType", "/addressType")]),
        ..ResourceDef::of::<EndpointSlice>()
    }
}

struct EndpointSliceBehaviour;

impl Behaviour for EndpointSliceBehaviour {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        validate_endpoint_slice(obj)
    }
}

fn validate_endpoint_slice(o: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let kinds = ["IPv4", "IPv6", "FQDN"];
    let kind = s(o, "/addressType");
    if kind.is_empty() {
        causes.push(Cause::required("addressType"));
    } else if !kinds.contains(&kind) {
        causes.push(Cause::unsupported("addressType", &json!(kind), &kinds));
    }
    for (idx, ep) in o
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let addrs = ep.get("addresses").and_then(Value::as_array);
        if addrs.is_none_or(Vec::is_empty) {
            causes.push(Cause::required(format!("endpoints[{idx}].addresses")));
        }
    }
    causes
}

fn endpoint_slice_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let ports: Vec<String> = o
        .get("ports")
        .and_then(Value::as_array)
        .map(|ps| ps.iter().map(|p| i(p, "/port").to_string()).collect())
        .unwrap_or_default();
    let addrs: Vec<String> = o
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.pointer("/addresses/0").and_then(Value::as_str))
        .map(str::to_string)
        .collect();
    let shown = if addrs.len() > 3 {
        format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
    } else {
        addrs.join(",")
    };
    vec![
        name(o),
        json!(s(o, "/addressType")),
        or_none(&ports.join(",")),
        or_none(&shown),
        age(o, now),
    ]
}
