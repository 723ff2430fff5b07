//! core/v1 Secrets: `stringData` folded into `data`, immutable type.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use serde_json::{json, Value};

use super::configmap::validate_data_keys;
use crate::error::Cause;
use crate::registry::{selectable, Behaviour, ResourceDef};
use crate::tables::{age, col, len, name, s, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        behaviour: Arc::new(SecretBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Type", "The type of the secret."),
                col("Data", "Number of keys."),
                AGE,
            ],
            cells: |o, now| {
                vec![
                    name(o),
                    json!(s(o, "/type")),
                    json!(len(o, "/data")),
                    age(o, now),
                ]
            },
        }),
        field_selectors: selectable(&[("type", "/type")]),
        ..ResourceDef::of::<Secret>()
    }
}

struct SecretBehaviour;

impl Behaviour for SecretBehaviour {
    fn default(&self, obj: &mut Value) {
        if obj.get("type").is_none_or(Value::is_null) {
            obj["type"] = json!("Opaque");
        }
        // stringData is write-only: it lands base64-encoded in data.
        if let Some(Value::Object(strings)) =
            obj.as_object_mut().and_then(|m| m.remove("stringData"))
        {
            use base64::Engine;
            if !obj.get("data").is_some_and(Value::is_object) {
                obj["data"] = json!({});
            }
            for (k, v) in strings {
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""));
                obj["data"][k] = json!(encoded);
            }
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        validate_data_keys(obj, &["data", "stringData"])
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        if new.get("type") != old.get("type") {
            causes.push(Cause::invalid(
                "type",
                new.get("type").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        if old.get("immutable").and_then(Value::as_bool) == Some(true)
            && new.get("data") != old.get("data")
        {
            causes.push(Cause::forbidden(
                "data",
                "field is immutable when `immutable` is set",
            ));
        }
        causes
    }
}
