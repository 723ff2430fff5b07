//! A tap's heartbeat: a coordination.k8s.io Lease per node, renewed every
//! few seconds by its tap-agent, whose annotation carries what the tap is
//! doing. The fleet manager reads it to show each node's tap as Connected,
//! Pending or Disconnected, and to total each policy's packets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Namespace of the taps' Leases (and of the tap and aggregator workloads).
pub const NAMESPACE: &str = "tapestry-system";
/// The annotation holding a [`TapStatus`] as JSON.
pub const STATUS_ANNOTATION: &str = "tapestry.io/tap-status";

/// The Lease name of the tap on `node`.
pub fn lease_name(node: &str) -> String {
    format!("tap-{node}")
}

/// The node a heartbeat Lease is named for.
pub fn lease_node(lease: &str) -> Option<&str> {
    lease.strip_prefix("tap-")
}

/// What a tap reports with each heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TapStatus {
    /// The tap-agent's version.
    #[serde(default)]
    pub version: String,
    /// Pods tapped now.
    #[serde(default)]
    pub pods_tapped: u64,
    /// Host interfaces tapped now.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Per policy (TapPolicy name).
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyCounters>,
    /// Packets lost on this node in all (kernel ring, tap queues, while the
    /// aggregator was away).
    #[serde(default)]
    pub dropped: u64,
    /// Whether the tap's stream to the aggregator is up.
    #[serde(default)]
    pub connected: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
}

/// One policy's counters on one node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCounters {
    /// Pods it selects on this node.
    #[serde(default)]
    pub pods: u64,
    /// Packets the tap saw on those pods' interfaces.
    #[serde(default)]
    pub seen: u64,
    /// Packets it matched and mirrored.
    #[serde(default)]
    pub captured: u64,
    /// Packets of it lost on this node.
    #[serde(default)]
    pub dropped: u64,
}

/// A tap's Lease lasts this many heartbeat periods
/// (`leaseDurationSeconds` = period × this), so a reader learns the period
/// from the Lease itself.
pub const PERIODS_PER_LEASE: u32 = 3;

/// A node's tap as the fleet sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum TapState {
    /// Heartbeats arrive (none missed, or one).
    Connected,
    /// Two heartbeats missed, or no tap has reported from the node yet.
    Pending,
    /// Three or more missed: the tap is gone or cut off.
    Disconnected,
}

/// The state of a tap whose last heartbeat is `age` old, on a Lease of
/// `lease_duration` ([`PERIODS_PER_LEASE`] heartbeat periods).
pub fn tap_state(age: std::time::Duration, lease_duration: std::time::Duration) -> TapState {
    let period = lease_duration / PERIODS_PER_LEASE;
    if period.is_zero() || age >= period * 3 {
        TapState::Disconnected
    } else if age >= period * 2 {
        TapState::Pending
    } else {
        TapState::Connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn missed_heartbeats_turn_a_tap_pending_then_disconnected() {
        let lease = Duration::from_secs(6); // 2 s heartbeats
        let s = Duration::from_millis;
        assert_eq!(tap_state(s(0), lease), TapState::Connected);
        assert_eq!(tap_state(s(3999), lease), TapState::Connected);
        assert_eq!(tap_state(s(4000), lease), TapState::Pending);
        assert_eq!(tap_state(s(5999), lease), TapState::Pending);
        assert_eq!(tap_state(s(6000), lease), TapState::Disconnected);
        assert_eq!(tap_state(s(0), Duration::ZERO), TapState::Disconnected);
    }
}
