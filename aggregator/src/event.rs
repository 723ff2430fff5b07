//! The packet as it travels from ingest through policies to sinks.

use std::sync::Arc;

use bytes::Bytes;

/// Direction as the tap saw it on the interface (TC hook view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Unknown,
    /// Received by the tapped interface.
    Ingress,
    /// Sent by the tapped interface.
    Egress,
}

impl Direction {
    pub fn from_proto(v: i32) -> Self {
        match v {
            1 => Direction::Ingress,
            2 => Direction::Egress,
            _ => Direction::Unknown,
        }
    }

    pub fn to_proto(self) -> i32 {
        match self {
            Direction::Unknown => 0,
            Direction::Ingress => 1,
            Direction::Egress => 2,
        }
    }
}

/// A tapped interface, shared by all packets seen on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Iface {
    pub tap_id: String,
    /// `namespace/pod` for pods, otherwise the interface name.
    pub name: String,
    /// Whether `name` is a pod; pod interfaces are host-side veths, whose
    /// ingress is the pod's outbound traffic.
    pub is_pod: bool,
    pub interface: String,
}

impl Iface {
    /// pcapng `epb_flags` direction bits from the pod's (or, for a plain
    /// interface, the interface's) point of view.
    pub fn epb_flags(&self, d: Direction) -> u32 {
        use crate::capture::{EPB_INBOUND, EPB_OUTBOUND};
        match (d, self.is_pod) {
            (Direction::Unknown, _) => 0,
            (Direction::Ingress, false) | (Direction::Egress, true) => EPB_INBOUND,
            (Direction::Egress, false) | (Direction::Ingress, true) => EPB_OUTBOUND,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Packet {
    pub ts_ns: u64,
    pub wire_len: u32,
    /// Ethernet frame (after slicing/masking once past a policy).
    pub data: Bytes,
    pub direction: Direction,
    pub iface: Arc<Iface>,
    /// Bit i set = aggregator policy i takes this packet.
    pub policies: u64,
    /// The policy that delivered it (set by the policy worker).
    pub policy: Arc<str>,
}

/// Batches move between stages whole: one channel operation per batch
/// keeps per-packet overhead low, and `Arc` lets several policies or sinks
/// share one batch without copying.
pub type Batch = Arc<Vec<Packet>>;

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
