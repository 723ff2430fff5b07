//! What this tap reports about itself: the [`StatusBoard`] the agent's
//! parts write their state to, and its [`StatusBoard::snapshot`] as the
//! shared `TapStatus` (`tapestry_proto::heartbeat`), the JSON the heartbeat
//! Lease carries for the fleet manager.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{atomic::Ordering::Relaxed, Mutex},
};

use tapestry_proto::heartbeat::{PolicyCounters, TapStatus};

use crate::metrics::{Metrics, PolicyCount};

/// One tapped interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TappedInterface {
    pub name: String,
    /// `namespace/name` of the pod behind it (absent for `--iface`).
    pub pod: Option<String>,
    /// The policies tapping it.
    pub policies: Vec<String>,
}

/// What the reconciler has attached, for the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tapped {
    pub interfaces: Vec<TappedInterface>,
    /// Placed policies: their bit and the bit's counters when they got it.
    pub policies: BTreeMap<String, (u8, PolicyCount)>,
}

/// Shared state the agent's parts write and the heartbeat reads.
#[derive(Default)]
pub struct StatusBoard {
    inner: Mutex<Board>,
}

#[derive(Default)]
struct Board {
    tapped: Tapped,
    /// Current problems by the part reporting them, with the sequence
    /// number of the report that last changed them.
    problems: BTreeMap<&'static str, (u64, Vec<String>)>,
    sequence: u64,
}

impl StatusBoard {
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        // The board holds plain data: a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_tapped(&self, tapped: Tapped) {
        self.board().tapped = tapped;
    }

    /// Replaces the problems `part` reports (empty: all is well there).
    /// Returns whether they changed, so callers log only news.
    pub fn set_problems(&self, part: &'static str, problems: Vec<String>) -> bool {
        let mut b = self.board();
        if b.problems.get(part).map(|(_, p)| p) == Some(&problems)
            || (problems.is_empty() && !b.problems.contains_key(part))
        {
            return false;
        }
        if problems.is_empty() {
            b.problems.remove(part);
        } else {
            b.sequence += 1;
            let seq = b.sequence;
            b.problems.insert(part, (seq, problems));
        }
        true
    }

    /// The status now; `ring_full` is the kernel's count of packets lost to
    /// a full ring buffer (no policy can be told for them). Per policy,
    /// since it was placed on this tap: `seen` = packets the kernel matched
    /// and handed to the agent, `captured` = of those sent to the
    /// aggregator, `dropped` = of those the agent dropped.
    pub fn snapshot(&self, metrics: &Metrics, ring_full: u64) -> TapStatus {
        let b = self.board();
        let mut policies: BTreeMap<String, PolicyCounters> = BTreeMap::new();
        for (name, (bit, base)) in &b.tapped.policies {
            let now = metrics.policy.get(*bit);
            policies.insert(
                name.clone(),
                PolicyCounters {
                    pods: 0,
                    seen: now.seen.saturating_sub(base.seen),
                    captured: now.sent.saturating_sub(base.sent),
                    dropped: now.dropped.saturating_sub(base.dropped),
                },
            );
        }
        let mut pods = BTreeSet::new();
        for i in &b.tapped.interfaces {
            let Some(pod) = &i.pod else { continue };
            pods.insert(pod.as_str());
            for p in &i.policies {
                if let Some(s) = policies.get_mut(p) {
                    s.pods += 1;
                }
            }
        }
        let last_error = b
            .problems
            .values()
            .max_by_key(|(seq, _)| *seq)
            .and_then(|(_, p)| p.last().cloned())
            .unwrap_or_default();
        TapStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pods_tapped: pods.len() as u64,
            interfaces: b.tapped.interfaces.iter().map(|i| i.name.clone()).collect(),
            policies,
            dropped: ring_full + metrics.queue_dropped_packets.load(Relaxed),
            connected: metrics.connected.load(Relaxed),
            last_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::BitTally;

    #[test]
    fn counters_start_when_a_policy_is_placed_and_errors_clear() {
        let metrics = Metrics::default();
        // Bit 0 counted 2 packets for an earlier owner.
        metrics.policy.add_seen(&BitTally::of_masks(&[1, 1]));
        let board = StatusBoard::default();
        board.set_tapped(Tapped {
            interfaces: vec![
                TappedInterface {
                    name: "v1".into(),
                    pod: Some("ns/a".into()),
                    policies: vec!["p".into(), "q".into()],
                },
                TappedInterface {
                    name: "v2".into(),
                    pod: Some("ns/b".into()),
                    policies: vec!["q".into()],
                },
            ],
            policies: [
                ("p".to_string(), (0, metrics.policy.get(0))),
                ("q".to_string(), (1, metrics.policy.get(1))),
            ]
            .into(),
        });
        metrics.policy.add_seen(&BitTally::of_masks(&[0b11, 0b10]));
        metrics.policy.add_sent(&BitTally::of_masks(&[0b11]));
        metrics.policy.add_dropped(&BitTally::of_masks(&[0b10]));
        let s = board.snapshot(&metrics, 5);
        assert_eq!(s.pods_tapped, 2);
        assert_eq!(
            s.policies["p"],
            PolicyCounters {
                pods: 1,
                seen: 1,
                captured: 1,
                dropped: 0
            }
        );
        assert_eq!(
            s.policies["q"],
            PolicyCounters {
                pods: 2,
                seen: 2,
                captured: 1,
                dropped: 1
            }
        );
        assert_eq!(s.dropped, 5);
        assert_eq!(s.interfaces, ["v1", "v2"]);

        assert!(board.set_problems("pods", vec!["a".into()]));
        assert!(board.set_problems("aggregator", vec!["b".into()]));
        assert!(!board.set_problems("aggregator", vec!["b".into()]));
        assert_eq!(board.snapshot(&metrics, 0).last_error, "b");
        board.set_problems("aggregator", vec![]);
        assert_eq!(board.snapshot(&metrics, 0).last_error, "a");
        board.set_problems("pods", vec![]);
        assert_eq!(board.snapshot(&metrics, 0).last_error, "");
    }
}
