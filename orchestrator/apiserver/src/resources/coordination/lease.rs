//! coordination.k8s.io/v1 Leases (leader election, node heartbeats).

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use serde_json::json;

use crate::registry::{names, ResourceDef};
use crate::tables::{age, col, name, s, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["lease"]),
        table: Arc::new(TableDef {
            columns: vec![NAME, col("Holder", "The holder of the lease."), AGE],
            cells: |o, now| vec![name(o), json!(s(o, "/spec/holderIdentity")), age(o, now)],
        }),
        ..ResourceDef::of::<Lease>()
    }
}
