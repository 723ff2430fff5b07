//! core/v1 ServiceAccounts.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ServiceAccount;
use serde_json::json;

use crate::registry::{names, ResourceDef};
use crate::tables::{age, col, len, name, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["sa"]),
        table: Arc::new(TableDef {
            columns: vec![NAME, col("Secrets", "Number of secrets."), AGE],
            cells: |o, now| vec![name(o), json!(len(o, "/secrets")), age(o, now)],
        }),
        ..ResourceDef::of::<ServiceAccount>()
    }
}
