//! core/v1 Events (stored once with events.k8s.io/v1 Events).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Event;
use serde_json::json;

use crate::registry::{names, selectable, ResourceDef};
use crate::tables::{self, col, s, TableDef};
use crate::validation::NameRule;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["ev"]),
        name_rule: NameRule::PathSegment,
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
                    "/lastTimestamp",
                    "/eventTime",
                    "/series/lastObservedTime",
                    "/metadata/creationTimestamp",
                ]
                .iter()
                .map(|p| s(o, p))
                .find(|t| !t.is_empty())
                .unwrap_or("");
                let kind = s(o, "/involvedObject/kind").to_lowercase();
                vec![
                    json!(tables::since(last, now)),
                    json!(s(o, "/type")),
                    json!(s(o, "/reason")),
                    json!(format!("{kind}/{}", s(o, "/involvedObject/name"))),
                    json!(s(o, "/message")),
                ]
            },
        }),
        field_selectors: selectable(&[
            ("involvedObject.kind", "/involvedObject/kind"),
            ("involvedObject.namespace", "/involvedObject/namespace"),
            ("involvedObject.name", "/involvedObject/name"),
            ("involvedObject.uid", "/involvedObject/uid"),
            ("involvedObject.apiVersion", "/involvedObject/apiVersion"),
            (
                "involvedObject.resourceVersion",
                "/involvedObject/resourceVersion",
            ),
            ("involvedObject.fieldPath", "/involvedObject/fieldPath"),
            ("reason", "/reason"),
            ("reportingComponent", "/reportingComponent"),
            ("source", "/source/component"),
            ("type", "/type"),
        ]),
        ..ResourceDef::of::<Event>()
    }
}
