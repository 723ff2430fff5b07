//! core/v1 Endpoints.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Endpoints;
use serde_json::Value;

use crate::registry::{names, ResourceDef};
use crate::tables::{age, col, i, name, or_none, s, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["ep"]),
        storage: "services/endpoints".into(),
        table: Arc::new(TableDef {
            columns: vec![NAME, col("Endpoints", "Endpoints of the service."), AGE],
            cells: endpoints_cells,
        }),
        ..ResourceDef::of::<Endpoints>()
    }
}

fn endpoints_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let mut eps = Vec::new();
    for subset in o
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ports: Vec<i64> = subset
            .get("ports")
            .and_then(Value::as_array)
            .map(|p| p.iter().map(|p| i(p, "/port")).collect())
            .unwrap_or_default();
        for a in subset
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ip = s(a, "/ip");
            if ports.is_empty() {
                eps.push(ip.to_string());
            }
            for p in &ports {
                eps.push(format!("{ip}:{p}"));
            }
        }
    }
    let shown = if eps.len() > 3 {
        format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
    } else {
        eps.join(",")
    };
    vec![name(o), or_none(&shown), age(o, now)]
}
