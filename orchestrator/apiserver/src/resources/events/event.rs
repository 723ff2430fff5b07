//! events.k8s.io/v1 Events, stored once with core/v1 Events so both APIs
//! see every event.

use std::sync::Arc;

use k8s_openapi::api::events::v1::Event;
use serde_json::{json, Map, Value};

use crate::error::Cause;
use crate::registry::{names, selectable, Behaviour, ResourceDef};
use crate::tables::{self, col, s, TableDef};
use crate::validation::NameRule;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["ev"]),
        name_rule: NameRule::PathSegment,
        storage: "events".into(),
        behaviour: Arc::new(EventsV1),
        table: Arc::new(TableDef {
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
        }),
        field_selectors: selectable(&[
            ("regarding.kind", "/regarding/kind"),
            ("regarding.namespace", "/regarding/namespace"),
            ("regarding.name", "/regarding/name"),
            ("regarding.uid", "/regarding/uid"),
            ("reason", "/reason"),
            ("reportingController", "/reportingController"),
            ("type", "/type"),
        ]),
        ..ResourceDef::of::<Event>()
    }
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
