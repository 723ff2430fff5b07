//! Dedup: drop the second copy of a packet seen twice within a window, e.g.
//! at both ends of a pod-to-pod path.
//!
//! Copies of one packet differ in flight: routing rewrites the Ethernet
//! header and decrements TTL / hop limit (so the IPv4 checksum changes),
//! and veths carry packets whose transport checksum is not yet filled in
//! (checksum offload). The key therefore hashes the packet from the network
//! header on, with TTL, hop limit and checksums zeroed.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::parse::{Layers, L3};

fn default_window_us() -> u64 {
    1_000
}

fn default_max_entries() -> usize {
    1 << 20
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// A copy arriving within this many microseconds of the first is a
    /// duplicate.
    #[serde(default = "default_window_us")]
    pub window_us: u64,
    /// Bound on remembered packets; past it the oldest are forgotten.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            window_us: default_window_us(),
            max_entries: default_max_entries(),
        }
    }
}

impl DedupConfig {
    pub fn build(&self) -> Dedup {
        Dedup {
            window_ns: self.window_us.saturating_mul(1_000),
            max_entries: self.max_entries.max(1),
            seen: HashMap::default(),
            order: VecDeque::new(),
            clock: 0,
            stats: DedupStats::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    pub duplicates: u64,
    /// Entries forgotten early because the table was full.
    pub evicted: u64,
}

/// Keys are already hashes; hashing them again would only cost time.
#[derive(Default)]
struct IdentityHasher(u64);
impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub struct Dedup {
    window_ns: u64,
    max_entries: usize,
    /// key → time last seen.
    seen: HashMap<u64, u64, BuildHasherDefault<IdentityHasher>>,
    /// Insertion order, for expiry.
    order: VecDeque<(u64, u64)>,
    /// The latest timestamp seen; taps' clocks interleave, so expiry follows
    /// the maximum rather than each packet's own time.
    clock: u64,
    stats: DedupStats,
}

/// Largest header block we normalise on the stack; longer headers (rare
/// IPv6 extension chains) are hashed as they are.
const MAX_NORMALISED: usize = 256;

/// The dedup key of a packet.
pub fn key(data: &[u8], wire_len: u32, l: &Layers) -> u64 {
    let Some(l3) = l.l3.filter(|&o| o <= data.len()) else {
        // Not IP: the whole frame is the identity.
        return xxh3_64_with_seed(data, wire_len as u64);
    };
    let hdr_end = l.headers_len(data.len()).max(l3);
    let wire_l3 = (wire_len as u64).saturating_sub(l3 as u64);
    let mut buf = [0u8; MAX_NORMALISED];
    let hdr = &data[l3..hdr_end];
    let seed = if hdr.len() <= MAX_NORMALISED {
        let b = &mut buf[..hdr.len()];
        b.copy_from_slice(hdr);
        let mut zero = |off: usize, n: usize| {
            if let Some(s) = b.get_mut(off..off + n) {
                s.fill(0);
            }
        };
        match l.l3_kind {
            L3::V4 => {
                zero(8, 1); // TTL
                zero(10, 2); // header checksum
            }
            L3::V6 => zero(7, 1), // hop limit
            L3::Other => {}
        }
        if let Some(l4) = l.l4 {
            let o = l4 - l3;
            match l.proto {
                6 => zero(o + 16, 2),
                17 => zero(o + 6, 2),
                _ => {}
            }
        }
        xxh3_64_with_seed(b, wire_l3)
    } else {
        xxh3_64_with_seed(hdr, wire_l3)
    };
    xxh3_64_with_seed(&data[hdr_end..], seed) ^ xxh3_64(&seed.to_le_bytes()).rotate_left(17)
}

impl Dedup {
    /// Records the packet and tells whether an equal one was seen within the
    /// window.
    pub fn is_duplicate(&mut self, data: &[u8], wire_len: u32, l: &Layers, ts_ns: u64) -> bool {
        let k = key(data, wire_len, l);
        self.clock = self.clock.max(ts_ns);
        self.expire();
        if let Some(&seen) = self.seen.get(&k) {
            // Within the window (either order: taps' clocks interleave).
            if seen.abs_diff(ts_ns) <= self.window_ns {
                self.stats.duplicates += 1;
                // The first copy stays the reference: a stream of identical
                // packets spaced just under the window is not all dropped.
                return true;
            }
        }
        if self.order.len() >= self.max_entries {
            if let Some((old_k, old_ts)) = self.order.pop_front() {
                if self.seen.get(&old_k) == Some(&old_ts) {
                    self.seen.remove(&old_k);
                }
                self.stats.evicted += 1;
            }
        }
        self.seen.insert(k, ts_ns);
        self.order.push_back((k, ts_ns));
        false
    }

    fn expire(&mut self) {
        let horizon = self.clock.saturating_sub(self.window_ns);
        while let Some(&(k, ts)) = self.order.front() {
            if ts >= horizon {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&k) == Some(&ts) {
                self.seen.remove(&k);
            }
        }
    }

    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(ttl: u8, mac: u8, csum: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 54];
        p[0] = mac;
        p[12] = 0x08;
        p[14] = 0x45;
        p[22] = ttl;
        p[23] = 6;
        p[24] = csum;
        p[46] = 0x50;
        p[50] = csum;
        p.extend_from_slice(payload);
        p
    }

    fn dup(d: &mut Dedup, p: &[u8], ts: u64) -> bool {
        d.is_duplicate(p, p.len() as u32, &Layers::parse(p), ts)
    }

    #[test]
    fn ignores_fields_changed_in_flight() {
        let mut d = DedupConfig::default().build();
        assert!(!dup(&mut d, &pkt(64, 1, 1, b"abc"), 1_000));
        assert!(dup(&mut d, &pkt(63, 2, 9, b"abc"), 1_500));
        assert!(!dup(&mut d, &pkt(64, 1, 1, b"abd"), 1_600));
        assert_eq!(d.stats().duplicates, 1);
    }

    #[test]
    fn window_expires() {
        let mut d = DedupConfig {
            window_us: 1,
            max_entries: 16,
        }
        .build();
        assert!(!dup(&mut d, &pkt(64, 1, 1, b"x"), 0));
        assert!(dup(&mut d, &pkt(64, 1, 1, b"x"), 900));
        assert!(!dup(&mut d, &pkt(64, 1, 1, b"x"), 5_000));
        assert!(d.len() <= 2);
    }

    #[test]
    fn table_is_bounded() {
        let mut d = DedupConfig {
            window_us: 1_000_000,
            max_entries: 8,
        }
        .build();
        for i in 0..100u32 {
            dup(&mut d, &pkt(64, 1, 1, &i.to_be_bytes()), i as u64);
        }
        assert!(d.len() <= 8);
        assert_eq!(d.stats().evicted, 92);
    }
}
