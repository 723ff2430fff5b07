//! The fleet manager's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route's pattern (`/v1/policies/{name}`), not the path.
    pub route: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Histogram,
    pub writes: Counter,
    pub refused: Counter,
    /// Workload objects put back after they were edited or deleted.
    pub restored: Counter,
    pub status_writes: Counter,
    pub status_errors: Counter,
    /// Nodes by tap state.
    pub taps: Family<StateLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fleet_manager");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "REST requests by method, route and status code",
            requests.clone(),
        );
        // 0.25 ms to ~8 s.
        let latency = Histogram::new(exponential_buckets(0.00025, 2.0, 16));
        registry.register(
            "http_request_duration_seconds",
            "REST request latency (watches excluded)",
            latency.clone(),
        );
        let writes = Counter::default();
        registry.register(
            "object_writes",
            "Policies and tools created, replaced, patched or deleted",
            writes.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "unauthenticated_requests",
            "Requests refused for a missing or unknown token",
            refused.clone(),
        );
        let restored = Counter::default();
        registry.register(
            "workload_restores",
            "Tap and aggregator objects re-applied after a change or deletion",
            restored.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "policy_status_writes",
            "Policy status updates written",
            status_writes.clone(),
        );
        let status_errors = Counter::default();
        registry.register(
            "policy_status_errors",
            "Policy status updates that failed",
            status_errors.clone(),
        );
        let taps = Family::<StateLabels, Gauge>::default();
        registry.register(
            "taps",
            "Nodes by tap state (Connected, Pending, Disconnected)",
            taps.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            writes,
            refused,
            restored,
            status_writes,
            status_errors,
            taps,
        }
    }

    pub fn wrote(&self) {
        self.writes.inc();
    }

    pub fn refused(&self) {
        self.refused.inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
