//! The tap's heartbeat: a `coordination.k8s.io/v1` Lease `tap-<node>`
//! renewed every period (one merge patch; created on the first 404), held
//! by the tap id, valid for [`PERIODS_PER_LEASE`] periods, and carrying the
//! tap's [`TapStatus`] as JSON in its `tapestry.io/tap-status` annotation
//! (the contract lives in `tapestry_proto::heartbeat`). The fleet manager
//! reads it to show each node's tap as connected, pending or gone.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use k8s_openapi::{
    api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::{json, Value};
use tracing::{info, warn};

use tapestry_proto::heartbeat::{lease_name, TapStatus, PERIODS_PER_LEASE, STATUS_ANNOTATION};

use crate::status::StatusBoard;

pub struct Heartbeat {
    pub client: Client,
    /// Where the Lease lives.
    pub namespace: String,
    pub node: String,
    pub tap_id: String,
    pub period: Duration,
}

/// The Lease's spec and status annotation at `now`: what every renewal
/// writes (as a merge patch) and what a first renewal creates.
pub fn lease_fields(holder: &str, period: Duration, status: &TapStatus, now: Timestamp) -> Value {
    let status = serde_json::to_string(status).unwrap_or_default();
    json!({
        "metadata": {"annotations": {STATUS_ANNOTATION: status}},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": u64::from(PERIODS_PER_LEASE) * period.as_secs().max(1),
            "renewTime": MicroTime(now),
        }
    })
}

impl Heartbeat {
    /// Renews the Lease every period until the task is dropped; failures
    /// are reported on `board` (and logged when they change) and retried
    /// at the next period.
    pub async fn run(self, status: impl Fn() -> TapStatus, board: Arc<StatusBoard>) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = lease_name(&self.node);
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed_once = false;
        loop {
            tick.tick().await;
            let problems = match self.renew(&api, &name, &status()).await {
                Ok(()) => {
                    if !renewed_once {
                        info!(
                            lease = name,
                            namespace = self.namespace,
                            "heartbeat lease renewed"
                        );
                        renewed_once = true;
                    }
                    vec![]
                }
                Err(e) => vec![format!("heartbeat lease {}/{name}: {e:#}", self.namespace)],
            };
            if board.set_problems("heartbeat", problems.clone()) {
                for p in problems {
                    warn!("{p}");
                }
            }
        }
    }

    async fn renew(&self, api: &Api<Lease>, name: &str, status: &TapStatus) -> Result<()> {
        let now = Timestamp::now();
        let fields = lease_fields(&self.tap_id, self.period, status, now);
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&fields))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let mut lease: Lease =
                    serde_json::from_value(fields).context("building the Lease")?;
                lease.metadata.name = Some(name.to_string());
                lease.metadata.namespace = Some(self.namespace.clone());
                if let Some(spec) = lease.spec.as_mut() {
                    spec.acquire_time = Some(MicroTime(now));
                }
                api.create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
                    .context("creating it")
            }
            Err(e) => Err(e).context("renewing it"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_holds_the_tap_and_its_status() {
        let status = TapStatus {
            version: "1".into(),
            connected: true,
            ..Default::default()
        };
        let now: Timestamp = "2026-01-02T03:04:05.123456Z".parse().unwrap();
        let v = lease_fields("tap-1", Duration::from_secs(2), &status, now);
        assert_eq!(v["spec"]["holderIdentity"], "tap-1");
        assert_eq!(v["spec"]["leaseDurationSeconds"], 6);
        assert_eq!(v["spec"]["renewTime"], "2026-01-02T03:04:05.123456Z");
        let text = v["metadata"]["annotations"][STATUS_ANNOTATION]
            .as_str()
            .unwrap();
        let back: TapStatus = serde_json::from_str(text).unwrap();
        assert_eq!(back, status);
        let lease: Lease = serde_json::from_value(v).unwrap();
        assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(6));
    }
}
