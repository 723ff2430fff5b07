//! The agent's counters and its HTTP endpoints (`/metrics`, `/healthz`).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use aya::maps::{MapData, PerCpuArray};

use crate::{abi, bpf};

/// Userspace counters; kernel counters are read from the map at scrape time.
#[derive(Default)]
pub struct Metrics {
    pub ring_records: AtomicU64,
    pub ring_malformed: AtomicU64,
    pub queue_dropped_packets: AtomicU64,
    pub queue_batches: AtomicU64,
    pub sent_packets: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub sent_batches: AtomicU64,
    /// Batches sent and not yet acknowledged.
    pub in_flight_batches: AtomicU64,
    /// Batches (and their packets) sent on a stream that broke and never
    /// taken in by the aggregator.
    pub lost_in_flight_batches: AtomicU64,
    pub lost_in_flight_packets: AtomicU64,
    pub connect_attempts: AtomicU64,
    pub connect_failures: AtomicU64,
    pub stream_errors: AtomicU64,
    pub connected: AtomicBool,
    pub attached_interfaces: AtomicU64,
    pub reader_alive: AtomicBool,
    pub policy: PolicyCounters,
}

/// Packets per policy bit as they pass through the agent: handed over by
/// the kernel (`seen`), sent to the aggregator, dropped on the way. Indexed
/// by bit, not name: a bit's next owner starts from the value it finds
/// (see `status::Tapped`).
pub struct PolicyCounters {
    seen: [AtomicU64; abi::MAX_POLICIES],
    sent: [AtomicU64; abi::MAX_POLICIES],
    dropped: [AtomicU64; abi::MAX_POLICIES],
}

/// One bit's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCount {
    pub seen: u64,
    pub sent: u64,
    pub dropped: u64,
}

impl Default for PolicyCounters {
    fn default() -> Self {
        PolicyCounters {
            seen: std::array::from_fn(|_| AtomicU64::new(0)),
            sent: std::array::from_fn(|_| AtomicU64::new(0)),
            dropped: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl PolicyCounters {
    pub fn add_seen(&self, t: &BitTally) {
        t.add_to(&self.seen);
    }
    pub fn add_sent(&self, t: &BitTally) {
        t.add_to(&self.sent);
    }
    pub fn add_dropped(&self, t: &BitTally) {
        t.add_to(&self.dropped);
    }
    pub fn get(&self, bit: u8) -> PolicyCount {
        let i = bit as usize % abi::MAX_POLICIES;
        PolicyCount {
            seen: self.seen[i].load(Relaxed),
            sent: self.sent[i].load(Relaxed),
            dropped: self.dropped[i].load(Relaxed),
        }
    }
}

/// Packets per policy bit in one batch, counted locally so the shared
/// counters take one atomic add per bit present, not per packet.
#[derive(Clone, Debug)]
pub struct BitTally([u64; abi::MAX_POLICIES]);

impl Default for BitTally {
    fn default() -> Self {
        BitTally([0; abi::MAX_POLICIES])
    }
}

impl BitTally {
    /// The tally of packets with these policy masks.
    pub fn of_masks(masks: &[u64]) -> BitTally {
        let mut t = BitTally::default();
        for m in masks {
            t.add(*m);
        }
        t
    }

    /// Count one packet that matched the policies of `mask`.
    pub fn add(&mut self, mask: u64) {
        let mut m = mask;
        while m != 0 {
            self.0[m.trailing_zeros() as usize % abi::MAX_POLICIES] += 1;
            m &= m - 1;
        }
    }

    fn add_to(&self, counters: &[AtomicU64; abi::MAX_POLICIES]) {
        for (c, &n) in counters.iter().zip(&self.0) {
            if n > 0 {
                c.fetch_add(n, Relaxed);
            }
        }
    }
}

pub struct MetricsState {
    pub metrics: Arc<Metrics>,
    pub counters: Mutex<PerCpuArray<MapData, u64>>,
}

impl MetricsState {
    pub fn kernel_counters(&self) -> Vec<u64> {
        bpf::read_counters(&self.counters.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Packets the kernel lost because the ring buffer was full.
    pub fn ring_full(&self) -> u64 {
        self.kernel_counters()
            .get(abi::COUNTER_RINGBUF_FULL)
            .copied()
            .unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let m = &self.metrics;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP tapestry_tap_kernel_packets_total Packets counted by the TC programs, by outcome.\n# TYPE tapestry_tap_kernel_packets_total counter"
        );
        for ((_, name, _), v) in abi::COUNTERS.iter().zip(self.kernel_counters()) {
            let _ = writeln!(
                s,
                "tapestry_tap_kernel_packets_total{{counter=\"{name}\"}} {v}"
            );
        }
        let counters: [(&str, &str, u64); 13] = [
            (
                "ring_records_total",
                "Records read from the ring buffer",
                m.ring_records.load(Relaxed),
            ),
            (
                "ring_malformed_total",
                "Ring records that failed to parse (skipped)",
                m.ring_malformed.load(Relaxed),
            ),
            (
                "queue_dropped_packets_total",
                "Packets dropped because the send queue was full (aggregator slow or away)",
                m.queue_dropped_packets.load(Relaxed),
            ),
            (
                "sent_packets_total",
                "Packets the aggregator acknowledged",
                m.sent_packets.load(Relaxed),
            ),
            (
                "sent_bytes_total",
                "Captured bytes the aggregator acknowledged",
                m.sent_bytes.load(Relaxed),
            ),
            (
                "sent_batches_total",
                "Batches the aggregator acknowledged",
                m.sent_batches.load(Relaxed),
            ),
            (
                "lost_in_flight_batches_total",
                "Batches sent on a stream that broke and never taken in by the aggregator",
                m.lost_in_flight_batches.load(Relaxed),
            ),
            (
                "lost_in_flight_packets_total",
                "Packets of those batches",
                m.lost_in_flight_packets.load(Relaxed),
            ),
            (
                "in_flight_batches",
                "Batches sent and not yet acknowledged",
                m.in_flight_batches.load(Relaxed),
            ),
            (
                "connect_attempts_total",
                "Connections attempted to the aggregator",
                m.connect_attempts.load(Relaxed),
            ),
            (
                "connect_failures_total",
                "Failed connection attempts",
                m.connect_failures.load(Relaxed),
            ),
            (
                "stream_errors_total",
                "Streams that ended in an error",
                m.stream_errors.load(Relaxed),
            ),
            (
                "queue_batches",
                "Batches waiting in the send queue",
                m.queue_batches.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(s, "# HELP tapestry_tap_{name} {help}.\n# TYPE tapestry_tap_{name} {kind}\ntapestry_tap_{name} {v}");
        }
        let gauges = [
            (
                "connected",
                "1 while a stream to the aggregator is open",
                m.connected.load(Relaxed) as u64,
            ),
            (
                "attached_interfaces",
                "Interfaces with the tap attached",
                m.attached_interfaces.load(Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP tapestry_tap_{name} {help}.\n# TYPE tapestry_tap_{name} gauge\ntapestry_tap_{name} {v}");
        }
        s
    }
}

/// Serves `/metrics` and `/healthz` until the listener fails.
pub async fn serve(addr: SocketAddr, state: Arc<MetricsState>) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<MetricsState>>| async move { s.render() }),
        )
        .route(
            "/healthz",
            get(|State(s): State<Arc<MetricsState>>| async move {
                let m = &s.metrics;
                if m.reader_alive.load(Relaxed) {
                    (
                        StatusCode::OK,
                        format!(
                            "ok\nattached_interfaces {}\nconnected {}\n",
                            m.attached_interfaces.load(Relaxed),
                            m.connected.load(Relaxed)
                        ),
                    )
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ring reader stopped\n".to_string(),
                    )
                }
            }),
        )
        .with_state(state);
    // A port still held (a replaced tap on this node not yet gone, or a
    // second node agent sharing the host's network) is waited out: the
    // tap captures meanwhile, and serves metrics once the port is free.
    let mut warned = false;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if !warned {
                    tracing::warn!(%addr, "metrics address in use; retrying every 2 s");
                    warned = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if warned {
        tracing::info!(%addr, "serving metrics");
    }
    axum::serve(listener, app).await?;
    Ok(())
}
