//! Capture limits: how many packets or bytes a policy delivers, or for how
//! long it runs, before it stops.
//!
//! Counting happens in [`Budget`], owned by the policy's single worker
//! thread, so it needs no atomics and is exact across batches: a policy
//! with `max_packets: 100` hands exactly 100 packets to each of its tools.
//! Only packets that reach at least one tool count; bytes are counted after
//! slicing and masking (what the tools receive). A packet that would carry
//! the byte count past `max_bytes` is not delivered, so a policy never
//! delivers more than its limits.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Packets delivered before the policy stops.
    #[serde(default)]
    pub max_packets: Option<u64>,
    /// Bytes delivered before the policy stops.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// How long the policy runs, from when this aggregator started running
    /// it (`90s`, `10m`, `1h30m`, `1.5h`, `250ms`).
    #[serde(default)]
    pub duration: Option<CaptureDuration>,
}

impl LimitsConfig {
    /// Checks values serde cannot; the error starts with the field name.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_packets == Some(0) {
            return Err("max_packets: must be at least 1".into());
        }
        if self.max_bytes == Some(0) {
            return Err("max_bytes: must be at least 1".into());
        }
        Ok(())
    }
}

/// A duration written like `1h30m`: numbers (decimals allowed) with units
/// `ms`, `s`, `m`, `h`, concatenated (as in a TapPolicy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CaptureDuration(pub Duration);

impl std::str::FromStr for CaptureDuration {
    type Err = String;

    /// The same syntax as a TapPolicy's `limits.duration`.
    fn from_str(s: &str) -> Result<Self, String> {
        tapestry_proto::crd::parse_duration(s).map(CaptureDuration)
    }
}

impl TryFrom<String> for CaptureDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<CaptureDuration> for String {
    fn from(d: CaptureDuration) -> String {
        d.to_string()
    }
}

impl fmt::Display for CaptureDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_millis() == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            write!(f, "{}ms", self.0.as_millis())
        }
    }
}

/// Why a policy stopped; the names are what `status.stopped.reason` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxPackets,
    MaxBytes,
    Duration,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::MaxPackets => "MaxPackets",
            StopReason::MaxBytes => "MaxBytes",
            StopReason::Duration => "Duration",
        }
    }
}

/// A policy that reached a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopRecord {
    pub reason: StopReason,
    pub message: String,
    pub at: SystemTime,
}

impl StopRecord {
    /// `at` as RFC 3339 (UTC, seconds).
    pub fn at_rfc3339(&self) -> String {
        rfc3339(self.at)
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// What the worker does with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Deliver,
    /// Deliver it; it reaches a limit, so it is the policy's last.
    DeliverLast(StopReason),
    /// Do not deliver it; the policy is done.
    Refuse(StopReason),
}

/// A policy run's deliveries against its limits.
pub struct Budget {
    limits: LimitsConfig,
    packets: u64,
    bytes: u64,
    /// When the run started, on both clocks: the monotonic one decides,
    /// the wall clock dates the stop.
    started: (Instant, SystemTime),
}

impl Budget {
    pub fn new(limits: LimitsConfig) -> Budget {
        Budget {
            limits,
            packets: 0,
            bytes: 0,
            started: (Instant::now(), SystemTime::now()),
        }
    }

    /// New limits for the same run: counts and start time carry over.
    pub fn set_limits(&mut self, limits: LimitsConfig) {
        self.limits = limits;
    }

    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// When the duration limit ends the run, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.limits
            .duration
            .map(|d| self.started.0.checked_add(d.0).unwrap_or(self.started.0))
    }

    /// Whether the duration limit has passed at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// The count limit already reached, if any (after limits were lowered).
    pub fn reached(&self) -> Option<StopReason> {
        if self.limits.max_packets.is_some_and(|m| self.packets >= m) {
            Some(StopReason::MaxPackets)
        } else if self.limits.max_bytes.is_some_and(|m| self.bytes >= m) {
            Some(StopReason::MaxBytes)
        } else {
            None
        }
    }

    /// Counts a packet of `len` delivered bytes, if the limits allow it.
    pub fn admit(&mut self, len: usize) -> Admit {
        let len = len as u64;
        if self.limits.max_packets.is_some_and(|m| self.packets >= m) {
            return Admit::Refuse(StopReason::MaxPackets);
        }
        if self
            .limits
            .max_bytes
            .is_some_and(|m| self.bytes.saturating_add(len) > m)
        {
            return Admit::Refuse(StopReason::MaxBytes);
        }
        self.packets += 1;
        self.bytes += len;
        if self.limits.max_packets == Some(self.packets) {
            Admit::DeliverLast(StopReason::MaxPackets)
        } else if self.limits.max_bytes == Some(self.bytes) {
            Admit::DeliverLast(StopReason::MaxBytes)
        } else {
            Admit::Deliver
        }
    }

    /// The record of a stop for `reason`, dated now (or, for the duration
    /// limit, when it ran out).
    pub fn stop_record(&self, reason: StopReason) -> StopRecord {
        let (message, at) = match reason {
            StopReason::MaxPackets => (
                format!(
                    "delivered {} packets, the limit (limits.maxPackets)",
                    self.packets
                ),
                SystemTime::now(),
            ),
            StopReason::MaxBytes => (
                format!(
                    "delivered {} bytes; limits.maxBytes is {}",
                    self.bytes,
                    self.limits.max_bytes.unwrap_or(0)
                ),
                SystemTime::now(),
            ),
            StopReason::Duration => {
                let d = self.limits.duration.map_or(Duration::ZERO, |d| d.0);
                (
                    format!(
                        "ran for {} (limits.duration), delivering {} packets",
                        CaptureDuration(d),
                        self.packets
                    ),
                    self.started.1 + d,
                )
            }
        };
        StopRecord {
            reason,
            message,
            at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_crd_pattern() {
        let d = |s: &str| s.parse::<CaptureDuration>().map(|d| d.0);
        assert_eq!(d("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("2m30s"), Ok(Duration::from_secs(150)));
        for bad in ["", "10", "h", "1d", "1.2.3s", "-1s", "1 h", "1e3s"] {
            assert!(d(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            CaptureDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }

    #[test]
    fn max_packets_delivers_exactly_the_limit() {
        let mut b = Budget::new(LimitsConfig {
            max_packets: Some(3),
            ..Default::default()
        });
        assert_eq!(b.admit(10), Admit::Deliver);
        assert_eq!(b.admit(10), Admit::Deliver);
        assert_eq!(b.admit(10), Admit::DeliverLast(StopReason::MaxPackets));
        assert_eq!(b.admit(10), Admit::Refuse(StopReason::MaxPackets));
    }

    #[test]
    fn max_bytes_never_overshoots() {
        let mut b = Budget::new(LimitsConfig {
            max_bytes: Some(25),
            ..Default::default()
        });
        assert_eq!(b.admit(10), Admit::Deliver);
        assert_eq!(b.admit(10), Admit::Deliver);
        assert_eq!(b.admit(10), Admit::Refuse(StopReason::MaxBytes));
        let mut b = Budget::new(LimitsConfig {
            max_bytes: Some(20),
            ..Default::default()
        });
        assert_eq!(b.admit(10), Admit::Deliver);
        assert_eq!(b.admit(10), Admit::DeliverLast(StopReason::MaxBytes));
    }

    #[test]
    fn raised_limits_continue_the_count() {
        let mut b = Budget::new(LimitsConfig {
            max_packets: Some(1),
            ..Default::default()
        });
        assert_eq!(b.admit(1), Admit::DeliverLast(StopReason::MaxPackets));
        b.set_limits(LimitsConfig {
            max_packets: Some(2),
            ..Default::default()
        });
        assert_eq!(b.admit(1), Admit::DeliverLast(StopReason::MaxPackets));
        assert_eq!(b.reached(), Some(StopReason::MaxPackets));
        b.set_limits(LimitsConfig::default());
        assert_eq!(b.reached(), None);
    }

    #[test]
    fn duration_dates_the_stop_at_the_deadline() {
        let b = Budget::new(LimitsConfig {
            duration: Some(CaptureDuration(Duration::from_secs(60))),
            ..Default::default()
        });
        assert!(!b.expired(Instant::now()));
        assert!(b.expired(Instant::now() + Duration::from_secs(61)));
        let r = b.stop_record(StopReason::Duration);
        assert_eq!(r.at, b.started.1 + Duration::from_secs(60));
        assert!(r.at_rfc3339().ends_with('Z'), "{}", r.at_rfc3339());
    }
}
