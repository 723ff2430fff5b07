//! core/v1 ConfigMaps, and the data-key rules Secrets share.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{json, Value};

use crate::error::Cause;
use crate::registry::{names, Behaviour, ResourceDef};
use crate::tables::{age, col, len, name, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["cm"]),
        behaviour: Arc::new(ConfigMapBehaviour),
        table: Arc::new(TableDef {
            columns: vec![NAME, col("Data", "Number of keys."), AGE],
            cells: |o, now| {
                vec![
                    name(o),
                    json!(len(o, "/data") + len(o, "/binaryData")),
                    age(o, now),
                ]
            },
        }),
        ..ResourceDef::of::<ConfigMap>()
    }
}

struct ConfigMapBehaviour;

impl Behaviour for ConfigMapBehaviour {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        validate_data_keys(obj, &["data", "binaryData"])
    }
}

pub(super) fn validate_data_keys(o: &Value, fields: &[&str]) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for field in fields {
        let Some(map) = o.get(*field).and_then(Value::as_object) else {
            continue;
        };
        for (k, v) in map {
            total += v.as_str().map_or(0, str::len);
            let valid = !k.is_empty()
                && k.len() <= 253
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                causes.push(Cause::invalid(
                    field.to_string(),
                    &json!(k),
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                ));
            }
            if !seen.insert(k.clone()) {
                causes.push(Cause::duplicate(format!("{field}[{k}]"), &json!(k)));
            }
        }
    }
    if total > 1024 * 1024 {
        causes.push(Cause {
            reason: "FieldValueTooLong",
            message: "Too long: must have at most 1048576 bytes".into(),
            field: String::new(),
        });
    }
    causes
}
