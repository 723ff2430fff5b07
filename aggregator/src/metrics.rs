//! Counters and latency histograms, rendered as Prometheus text.
//!
//! Hot paths bump plain atomics held by the component that owns them; the
//! registry only keeps `Arc`s to them for rendering, so counting costs no
//! lock and no lookup.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use hdrhistogram::Histogram;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Per-tap ingest counters.
#[derive(Debug, Default)]
pub struct TapStats {
    pub batches: Counter,
    pub packets: Counter,
    pub bytes: Counter,
    /// Packets the tap itself reported dropping.
    pub tap_dropped: Counter,
    pub streams: Counter,
    /// Streams of this tap open now.
    pub connected: AtomicU64,
    /// Batches that never arrived: gaps in the tap's sequence numbers
    /// (lost in flight when a stream broke).
    pub sequence_gaps: Counter,
    /// Batches whose records could not all be read (the rest is dropped).
    pub malformed_batches: Counter,
    /// The tap's last sequence number taken in.
    pub last_sequence: AtomicU64,
    /// Records longer than any tool takes, cut at ingest.
    pub truncated_records: Counter,
    /// Pod identities the tap claimed for pods bound to another node (or
    /// unknown to the cluster): refused, the packets keep only the
    /// interface.
    pub foreign_pods: Counter,
}

/// Per-policy counters.
#[derive(Debug, Default)]
pub struct PolicyStats {
    pub received: Counter,
    pub matched: Counter,
    pub duplicates: Counter,
    pub delivered: Counter,
    pub bytes: Counter,
    /// Packets dropped because the policy worker's queue was full.
    pub dropped: Counter,
    /// Packets taps reported losing on streams that carried only this
    /// policy (a tap's loss is attributable only then).
    pub tap_dropped: Counter,
    /// Per tool the policy names: packets handed over and lost at the
    /// tool's full queue.
    pub tools: Mutex<BTreeMap<String, Arc<RouteStats>>>,
    /// Set once a capture limit ended the policy.
    pub stop: Mutex<Option<crate::limits::StopRecord>>,
}

impl PolicyStats {
    /// Packets of this policy lost inside the aggregator: at its own
    /// queue and at its tools' queues. (What taps lose is theirs to
    /// report; see `tap_dropped`.)
    pub fn lost(&self) -> u64 {
        let to_tools: u64 = self
            .tools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|r| r.dropped.get())
            .sum();
        self.dropped.get() + to_tools
    }

    pub fn stopped(&self) -> Option<crate::limits::StopRecord> {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One policy → tool arrow.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Packets the tool's queue accepted from this policy.
    pub delivered: Counter,
    /// Packets lost because the tool's queue was full.
    pub dropped: Counter,
}

/// Per-sink counters and capture-to-sink latency.
#[derive(Debug)]
pub struct SinkStats {
    pub packets: Counter,
    pub bytes: Counter,
    /// Packets dropped because the sink's queue was full.
    pub dropped: Counter,
    /// Packets dropped for individual clients that did not keep up.
    pub client_dropped: Counter,
    pub clients: AtomicU64,
    /// Clients turned away: the sink already served its maximum.
    pub refused_too_many: Counter,
    /// Clients turned away: their address is not loopback nor allowed.
    pub refused_not_allowed: Counter,
    /// Clients turned away: no valid bearer token for the tool.
    pub refused_unauthenticated: Counter,
    /// Clients turned away: their TLS handshake failed or took too long.
    pub refused_handshake: Counter,
    pub errors: Counter,
    /// Packets a sink could not write (a file sink's disk full or
    /// failing): taken from its queue but not delivered.
    pub write_failed: Counter,
    /// Whether the sink is serving (false: it could not start).
    pub ready: AtomicBool,
    /// Nanoseconds from capture to hand-off at the sink.
    pub latency: Mutex<Histogram<u64>>,
}

impl Default for SinkStats {
    fn default() -> Self {
        SinkStats {
            packets: Counter::default(),
            bytes: Counter::default(),
            dropped: Counter::default(),
            client_dropped: Counter::default(),
            clients: AtomicU64::new(0),
            refused_too_many: Counter::default(),
            refused_not_allowed: Counter::default(),
            refused_unauthenticated: Counter::default(),
            refused_handshake: Counter::default(),
            errors: Counter::default(),
            write_failed: Counter::default(),
            ready: AtomicBool::new(true),
            // 1 µs .. 60 s at 3 significant digits.
            latency: Mutex::new(
                Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid bounds"),
            ),
        }
    }
}

impl SinkStats {
    /// Records hand-off of packets captured at `ts_ns` (one lock per batch).
    pub fn record_latency(&self, now_ns: u64, ts: impl Iterator<Item = u64>) {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for t in ts {
            let _ = h.record(now_ns.saturating_sub(t).clamp(1_000, 60_000_000_000));
        }
    }
}

#[derive(Default)]
pub struct Registry {
    pub taps: DashMap<String, Arc<TapStats>>,
    /// Ingest connections and streams refused, by reason.
    pub ingest_refused: DashMap<&'static str, Arc<Counter>>,
    /// HTTP connections refused (a failed TLS handshake), by reason.
    pub http_refused: DashMap<&'static str, Arc<Counter>>,
    pub policies: Mutex<Vec<(String, Arc<PolicyStats>)>>,
    pub sinks: Mutex<Vec<(String, String, Arc<SinkStats>)>>,
}

impl Registry {
    pub fn tap(&self, id: &str) -> Arc<TapStats> {
        self.taps.entry(id.to_string()).or_default().clone()
    }

    /// Counts an ingest connection or stream refused for `reason`.
    pub fn refuse_ingest(&self, reason: &'static str) {
        self.ingest_refused.entry(reason).or_default().add(1);
    }

    /// Counts an HTTP connection refused for `reason`.
    pub fn refuse_http(&self, reason: &'static str) {
        self.http_refused.entry(reason).or_default().add(1);
    }

    /// Shows `stats` under `name`, in place of an earlier policy so named.
    pub fn register_policy(&self, name: &str, stats: Arc<PolicyStats>) {
        let mut v = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = stats,
            None => v.push((name.to_string(), stats)),
        }
    }

    pub fn unregister_policy(&self, name: &str) {
        let mut v = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|(n, _)| n != name);
    }

    /// Shows `stats` under `name`, in place of an earlier sink so named.
    pub fn register_sink(&self, name: &str, type_name: &str, stats: Arc<SinkStats>) {
        let mut v = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        let entry = (name.to_string(), type_name.to_string(), stats);
        match v.iter_mut().find(|(n, _, _)| n == name) {
            Some(e) => *e = entry,
            None => v.push(entry),
        }
    }

    pub fn unregister_sink(&self, name: &str) {
        let mut v = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|(n, _, _)| n != name);
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        macro_rules! fam {
            ($name:expr, $help:expr, $kind:expr, $rows:expr) => {{
                let _ = writeln!(o, "# HELP {} {}\n# TYPE {} {}", $name, $help, $name, $kind);
                for (labels, v) in $rows {
                    let _ = writeln!(o, "{}{{{}}} {}", $name, labels, v);
                }
            }};
        }
        let mut taps: Vec<_> = self
            .taps
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        taps.sort_by(|a, b| a.0.cmp(&b.0));
        let tl = |t: &str| format!("tap=\"{}\"", esc(t));
        fam!(
            "tapestry_aggregator_tap_packets_total",
            "Packets received from a tap.",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.packets.get()))
        );
        fam!(
            "tapestry_aggregator_tap_bytes_total",
            "Captured bytes received from a tap.",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.bytes.get()))
        );
        fam!(
            "tapestry_aggregator_tap_batches_total",
            "Batches received from a tap.",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.batches.get()))
        );
        fam!(
            "tapestry_aggregator_tap_reported_drops_total",
            "Packets a tap reported dropping before sending.",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.tap_dropped.get()))
        );
        fam!(
            "tapestry_aggregator_tap_streams_total",
            "Ingest streams opened by a tap.",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.streams.get()))
        );
        fam!(
            "tapestry_aggregator_tap_connected",
            "Ingest streams of a tap open now.",
            "gauge",
            taps.iter().map(|(k, s)| (tl(k), s.connected.load(Relaxed)))
        );
        fam!(
            "tapestry_aggregator_tap_sequence_gap_batches_total",
            "Batches of a tap that never arrived (gaps in its sequence numbers).",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.sequence_gaps.get()))
        );
        fam!(
            "tapestry_aggregator_tap_truncated_records_total",
            "Records of a tap longer than libpcap's largest snapshot, cut to it at ingest.",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.truncated_records.get()))
        );
        fam!(
            "tapestry_aggregator_tap_foreign_pods_total",
            "Pod identities a certified tap claimed for pods not bound to its node, refused.",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.foreign_pods.get()))
        );
        let by_reason = |m: &DashMap<&'static str, Arc<Counter>>| {
            let mut v: Vec<_> = m.iter().map(|e| (*e.key(), e.value().get())).collect();
            v.sort();
            v
        };
        fam!(
            "tapestry_aggregator_ingest_refused_total",
            "Ingest connections and streams refused, by reason.",
            "counter",
            by_reason(&self.ingest_refused)
                .into_iter()
                .map(|(r, v)| (format!("reason=\"{r}\""), v))
        );
        fam!(
            "tapestry_aggregator_http_refused_total",
            "HTTP connections refused (failed TLS handshakes), by reason.",
            "counter",
            by_reason(&self.http_refused)
                .into_iter()
                .map(|(r, v)| (format!("reason=\"{r}\""), v))
        );
        fam!(
            "tapestry_aggregator_tap_malformed_batches_total",
            "Batches of a tap whose records could not all be read.",
            "counter",
            taps.iter().map(|(k, s)| (tl(k), s.malformed_batches.get()))
        );

        let policies = self
            .policies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pl = |p: &str| format!("policy=\"{}\"", esc(p));
        fam!(
            "tapestry_aggregator_policy_received_total",
            "Packets offered to a policy.",
            "counter",
            policies.iter().map(|(k, s)| (pl(k), s.received.get()))
        );
        fam!(
            "tapestry_aggregator_policy_matched_total",
            "Packets that passed a policy's filter.",
            "counter",
            policies.iter().map(|(k, s)| (pl(k), s.matched.get()))
        );
        fam!(
            "tapestry_aggregator_policy_duplicates_total",
            "Packets a policy's dedup removed.",
            "counter",
            policies.iter().map(|(k, s)| (pl(k), s.duplicates.get()))
        );
        fam!(
            "tapestry_aggregator_policy_packets_total",
            "Packets a policy delivered to its sinks and groups.",
            "counter",
            policies.iter().map(|(k, s)| (pl(k), s.delivered.get()))
        );
        fam!(
            "tapestry_aggregator_policy_bytes_total",
            "Bytes a policy delivered (after slicing).",
            "counter",
            policies.iter().map(|(k, s)| (pl(k), s.bytes.get()))
        );
        fam!(
            "tapestry_aggregator_policy_dropped_total",
            "Packets dropped because a policy's queue was full.",
            "counter",
            policies.iter().map(|(k, s)| (pl(k), s.dropped.get()))
        );
        fam!(
            "tapestry_aggregator_policy_tap_dropped_total",
            "Packets taps reported losing on streams that carried only this policy.",
            "counter",
            policies.iter().map(|(k, s)| (pl(k), s.tap_dropped.get()))
        );
        fam!(
            "tapestry_aggregator_policy_stopped",
            "1 once a capture limit ended the policy.",
            "gauge",
            policies
                .iter()
                .map(|(k, s)| (pl(k), u64::from(s.stopped().is_some())))
        );
        let routes: Vec<(String, Arc<RouteStats>)> = policies
            .iter()
            .flat_map(|(p, s)| {
                let tools = s.tools.lock().unwrap_or_else(|e| e.into_inner());
                tools
                    .iter()
                    .map(|(t, r)| (format!("{},tool=\"{}\"", pl(p), esc(t)), r.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        fam!(
            "tapestry_aggregator_policy_tool_packets_total",
            "Packets a policy handed to one tool's queue.",
            "counter",
            routes.iter().map(|(l, r)| (l, r.delivered.get()))
        );
        fam!(
            "tapestry_aggregator_policy_tool_dropped_total",
            "Packets of a policy lost because one tool's queue was full.",
            "counter",
            routes.iter().map(|(l, r)| (l, r.dropped.get()))
        );

        let sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sl = |n: &str, t: &str| format!("sink=\"{}\",type=\"{}\"", esc(n), t);
        fam!(
            "tapestry_aggregator_sink_packets_total",
            "Packets a sink handed to its tool.",
            "counter",
            sinks.iter().map(|(n, t, s)| (sl(n, t), s.packets.get()))
        );
        fam!(
            "tapestry_aggregator_sink_bytes_total",
            "Bytes a sink handed to its tool.",
            "counter",
            sinks.iter().map(|(n, t, s)| (sl(n, t), s.bytes.get()))
        );
        fam!(
            "tapestry_aggregator_sink_dropped_total",
            "Packets dropped because a sink's queue was full.",
            "counter",
            sinks.iter().map(|(n, t, s)| (sl(n, t), s.dropped.get()))
        );
        fam!(
            "tapestry_aggregator_sink_client_dropped_total",
            "Packets dropped for clients of a sink that did not keep up.",
            "counter",
            sinks
                .iter()
                .map(|(n, t, s)| (sl(n, t), s.client_dropped.get()))
        );
        fam!(
            "tapestry_aggregator_sink_refused_total",
            "Clients a sink turned away, by reason.",
            "counter",
            sinks.iter().flat_map(|(n, t, s)| {
                [
                    ("too_many_clients", s.refused_too_many.get()),
                    ("not_allowed", s.refused_not_allowed.get()),
                    ("unauthenticated", s.refused_unauthenticated.get()),
                    ("tls_handshake", s.refused_handshake.get()),
                ]
                .map(|(reason, v)| (format!("{},reason=\"{reason}\"", sl(n, t)), v))
            })
        );
        fam!(
            "tapestry_aggregator_sink_errors_total",
            "Write errors at a sink.",
            "counter",
            sinks.iter().map(|(n, t, s)| (sl(n, t), s.errors.get()))
        );
        fam!(
            "tapestry_aggregator_sink_write_failed_total",
            "Packets a sink took from its queue but could not write (a full or failing disk): not delivered.",
            "counter",
            sinks.iter().map(|(n, t, s)| (sl(n, t), s.write_failed.get()))
        );
        fam!(
            "tapestry_aggregator_sink_ready",
            "1 while a sink serves, 0 if it could not start.",
            "gauge",
            sinks
                .iter()
                .map(|(n, t, s)| (sl(n, t), u64::from(s.ready.load(Relaxed))))
        );
        fam!(
            "tapestry_aggregator_sink_clients",
            "Connected clients of a sink.",
            "gauge",
            sinks.iter().map(|(n, t, s)| (
                sl(n, t),
                s.clients.load(std::sync::atomic::Ordering::Relaxed)
            ))
        );
        let name = "tapestry_aggregator_sink_latency_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} Capture-to-sink latency.\n# TYPE {name} summary"
        );
        for (n, t, s) in &sinks {
            let h = s.latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for q in [0.5, 0.9, 0.99, 0.999] {
                let _ = writeln!(
                    o,
                    "{name}{{{},quantile=\"{q}\"}} {}",
                    sl(n, t),
                    h.value_at_quantile(q) as f64 / 1e9
                );
            }
            let _ = writeln!(
                o,
                "{name}_sum{{{}}} {}",
                sl(n, t),
                h.mean() * h.len() as f64 / 1e9
            );
            let _ = writeln!(o, "{name}_count{{{}}} {}", sl(n, t), h.len());
        }
        o
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
