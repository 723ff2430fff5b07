//! tap-agent: loads Tapestry's TC eBPF tap, attaches it to the interfaces
//! it is told to (directly, or pods' host-side veths), reads the ring buffer
//! and streams packets to the aggregator.
//!
//! Pipeline: [`targets`] (what to tap) → [`bpf`] (attach, kernel pre-filter
//! compiled by [`filter`]) → [`ring`] (AsyncFd reader, batches) → bounded
//! queue → [`ship`] (gRPC stream). [`metrics`] serves the counters.
//!
//! In cluster mode [`kube_source`] is the target source: it selects pods
//! ([`selection`]) and finds their host-side veths ([`host_veth`]); the
//! aggregator may be found through a Service ([`aggregator_service`]); and
//! a Lease carries the tap's [`status`] ([`heartbeat`]).

pub mod abi;
pub mod agent;
pub mod aggregator_service;
pub mod bpf;
pub mod filter;
pub mod heartbeat;
pub mod host_veth;
pub mod kube_source;
pub mod metrics;
pub mod ring;
pub mod selection;
pub mod ship;
pub mod status;
pub mod targets;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Packets dropped since the last batch sent (reported to the aggregator
/// in `Batch.dropped_since_last`).
#[derive(Default)]
pub struct DropCounter(AtomicU64);

impl DropCounter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn take(&self) -> u64 {
        self.0.swap(0, Relaxed)
    }
}
