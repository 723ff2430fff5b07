//! Resources of the smaller API groups: coordination.k8s.io/v1 Leases,
//! discovery.k8s.io/v1 EndpointSlices and events.k8s.io/v1 Events.

use std::sync::Arc;

use k8s_openapi::api::{
    coordination::v1 as coordv1, discovery::v1 as discv1, events::v1 as eventsv1,
};
use serde_json::{json, Map, Value};

use super::Basic;
use crate::error::Cause;
use crate::registry::{typed_codec, Behaviour, ResourceDef};
use crate::tables::{self, age, col, i, name, or_none, s, TableDef, AGE, NAME};
use crate::validation::NameRule;

pub fn resources() -> Vec<ResourceDef> {
    vec![
        ResourceDef {
            group: "coordination.k8s.io",
            version: "v1",
            kind: "Lease",
            plural: "leases",
            singular: "lease",
            short_names: &["lease"],
            categories: &[],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[],
            definition: "io.k8s.api.coordination.v1.Lease",
            storage: "leases",
            tracks_generation: false,
            codec: typed_codec::<coordv1::Lease>,
            behaviour: Basic::plain(),
            hook: None,
            table: TableDef {
                columns: vec![NAME, col("Holder", "The holder of the lease."), AGE],
                cells: |o, now| vec![name(o), json!(s(o, "/spec/holderIdentity")), age(o, now)],
            },
            field_selectors: &[],
        },
        ResourceDef {
            group: "discovery.k8s.io",
            version: "v1",
            kind: "EndpointSlice",
            plural: "endpointslices",
            singular: "endpointslice",
            short_names: &[],
            categories: &[],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[],
            definition: "io.k8s.api.discovery.v1.EndpointSlice",
            storage: "endpointslices",
            tracks_generation: true,
            codec: typed_codec::<discv1::EndpointSlice>,
            behaviour: Arc::new(Basic {
                keep_status_on_create: true,
                validate: validate_endpoint_slice,
            }),
            hook: None,
            table: TableDef {
                columns: vec![
                    NAME,
                    col("AddressType", "The IP protocol for this slice."),
                    col("Ports", "The ports of this slice."),
                    col("Endpoints", "The endpoints of this slice."),
                    AGE,
                ],
                cells: endpoint_slice_cells,
            },
            field_selectors: &[("addressType", "/addressType")],
        },
        ResourceDef {
            group: "events.k8s.io",
            version: "v1",
            kind: "Event",
            plural: "events",
            singular: "event",
            short_names: &["ev"],
            categories: &[],
            namespaced: true,
            name_rule: NameRule::PathSegment,
            subresources: &[],
            definition: "io.k8s.api.events.v1.Event",
            // Stored once with core/v1 Events so both APIs see every event.
            storage: "events",
            tracks_generation: false,
            codec: typed_codec::<eventsv1::Event>,
            behaviour: Arc::new(EventsV1),
            hook: None,
            table: TableDef {
                columns: vec![
                    col("Last Seen", "Time of the last occurrence."),
                    col("Type", "Type of this event (Normal, Warning)."),
                    col("Reason", "Why the action was taken."),
                    col("Object", "The object this event is about."),
                    col(
                        "Message",
                        "A human-readable description of the status of this operation.",
                    ),
                ],
                cells: |o, now| {
                    let last = [
                        "/series/lastObservedTime",
                        "/deprecatedLastTimestamp",
                        "/eventTime",
                        "/metadata/creationTimestamp",
                    ]
                    .iter()
                    .map(|p| s(o, p))
                    .find(|t| !t.is_empty())
                    .unwrap_or("");
                    vec![
                        json!(tables::since(last, now)),
                        json!(s(o, "/type")),
                        json!(s(o, "/reason")),
                        json!(format!(
                            "{}/{}",
                            s(o, "/regarding/kind").to_lowercase(),
                            s(o, "/regarding/name")
                        )),
                        json!(s(o, "/note")),
                    ]
                },
            },
            field_selectors: &[
                ("regarding.kind", "/regarding/kind"),
                ("regarding.namespace", "/regarding/namespace"),
                ("regarding.name", "/regarding/name"),
                ("regarding.uid", "/regarding/uid"),
                ("reason", "/reason"),
                ("reportingController", "/reportingController"),
                ("type", "/type"),
            ],
        },
    ]
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

/// events.k8s.io/v1 Events, converted to and from the core/v1 storage form.
struct EventsV1;

/// (events.k8s.io/v1 field, core/v1 field) pairs that carry the same data.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
];

fn rename(mut obj: Value, from_new: bool, api_version: &str) -> Value {
    if let Some(m) = obj.as_object_mut() {
        let mut moved = Map::new();
        for (new_name, core_name) in EVENT_FIELDS {
            let (from, to) = if from_new {
                (new_name, core_name)
            } else {
                (core_name, new_name)
            };
            if let Some(v) = m.remove(*from) {
                moved.insert(to.to_string(), v);
            }
        }
        m.extend(moved);
        m.insert("apiVersion".into(), json!(api_version));
    }
    obj
}

impl Behaviour for EventsV1 {
    fn validate(&self, o: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        if s(o, "/eventTime").is_empty() {
            causes.push(Cause::required("eventTime"));
        }
        if s(o, "/reportingController").is_empty() {
            causes.push(Cause::required("reportingController"));
        }
        causes
    }

    fn to_storage(&self, obj: Value) -> Value {
        rename(obj, true, "v1")
    }

    fn to_served(&self, obj: Value) -> Value {
        rename(obj, false, "events.k8s.io/v1")
    }

    fn serves_stored_form(&self) -> bool {
        false
    }
}
