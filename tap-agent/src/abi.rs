//! Rust mirror of `ebpf/include/tap_abi.h`. Layouts must match the C side;
//! the size tests below pin them.

/// Programs, by ELF function name (and kernel program name, ≤ 15 bytes).
pub const PROG_INGRESS: &str = "tapestry_ing";
pub const PROG_EGRESS: &str = "tapestry_egr";
/// Every program this agent loads starts with this; used to find stale ones.
pub const PROG_PREFIX: &str = "tapestry_";

pub const MAP_IFACES: &str = "tap_ifaces";
pub const MAP_RULES: &str = "tap_rules";
pub const MAP_CIDRS: &str = "tap_cidrs";
pub const MAP_RING: &str = "tap_ring";
pub const MAP_COUNTERS: &str = "tap_counters";
pub const GLOBAL_WAKEUP_BYTES: &str = "tap_wakeup_bytes";

pub const MAX_POLICIES: usize = 64;
pub const MAX_RULES: usize = 64;
/// Largest bucket of the kernel side: longer packets are truncated to it.
pub const MAX_CAPTURE: u32 = 65792;

pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

pub const RECORD_VERSION: u8 = 1;
pub const RECORD_HEADER_LEN: usize = 32;

pub const RULE_PROTO: u8 = 1 << 0;
pub const RULE_PORTS: u8 = 1 << 1;
pub const RULE_CIDR: u8 = 1 << 2;

/// `struct tap_iface`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceCfg {
    pub policy_mask: u64,
    pub always_mask: [u64; 2],
    pub rule_mask: u64,
    pub snaplen: u32,
    pub _pad: u32,
}

/// `struct tap_rule`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub policy: u8,
    pub proto: u8,
    pub dir_mask: u8,
    pub flags: u8,
    pub port_lo: u16,
    pub port_hi: u16,
}

/// `struct tap_rules`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    pub rules: [Rule; MAX_RULES],
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            rules: [Rule::default(); MAX_RULES],
        }
    }
}

// SAFETY: plain-old-data, `repr(C)`, no padding the kernel would not expect.
unsafe impl aya::Pod for IfaceCfg {}
unsafe impl aya::Pod for Rule {}
unsafe impl aya::Pod for Rules {}

/// Indexes of `tap_counters` (`enum tap_counter`), with metric names.
pub const COUNTERS: &[(u32, &str, &str)] = &[
    (0, "seen", "Packets on tapped interfaces"),
    (1, "matched", "Packets some policy wanted"),
    (2, "captured", "Packets written to the ring buffer"),
    (
        3,
        "ringbuf_full",
        "Packets lost because the ring buffer was full",
    ),
    (4, "truncated", "Packets cut to the largest capture bucket"),
    (5, "load_error", "Packets whose bytes could not be copied"),
];
pub const COUNTER_MAX: u32 = 6;
/// Index of `ringbuf_full` in [`COUNTERS`].
pub const COUNTER_RINGBUF_FULL: usize = 3;

/// The header of one ring buffer record, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub ts_boot_ns: u64,
    pub policy_mask: u64,
    pub ifindex: u32,
    pub wire_len: u32,
    pub cap_len: u32,
    pub direction: u8,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("record version {0}, expected {RECORD_VERSION}")]
    Version(u8),
    #[error("record claims {claimed} captured bytes but carries {have}")]
    Length { claimed: u32, have: usize },
    #[error("record direction {0} is neither ingress nor egress")]
    Direction(u8),
}

/// Splits a record into its header and captured bytes, checking everything
/// the kernel wrote (a bad record is an error, never a panic).
pub fn parse_record(buf: &[u8]) -> Result<(RecordHeader, &[u8]), RecordError> {
    if buf.len() < RECORD_HEADER_LEN {
        return Err(RecordError::Short(buf.len()));
    }
    let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
    let h = RecordHeader {
        ts_boot_ns: u64_at(0),
        policy_mask: u64_at(8),
        ifindex: u32_at(16),
        wire_len: u32_at(20),
        cap_len: u32_at(24),
        direction: buf[28],
    };
    if buf[29] != RECORD_VERSION {
        return Err(RecordError::Version(buf[29]));
    }
    if h.direction != DIR_INGRESS && h.direction != DIR_EGRESS {
        return Err(RecordError::Direction(h.direction));
    }
    let data = &buf[RECORD_HEADER_LEN..];
    if h.cap_len as usize > data.len() {
        return Err(RecordError::Length {
            claimed: h.cap_len,
            have: data.len(),
        });
    }
    Ok((h, &data[..h.cap_len as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_c() {
        assert_eq!(std::mem::size_of::<IfaceCfg>(), 40);
        assert_eq!(std::mem::size_of::<Rule>(), 8);
        assert_eq!(std::mem::size_of::<Rules>(), 8 * MAX_RULES);
    }

    fn record(cap: u32, dir: u8, version: u8, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&7u64.to_ne_bytes());
        b.extend_from_slice(&1u64.to_ne_bytes());
        b.extend_from_slice(&3u32.to_ne_bytes());
        b.extend_from_slice(&1500u32.to_ne_bytes());
        b.extend_from_slice(&cap.to_ne_bytes());
        b.extend_from_slice(&[dir, version, 0, 0]);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn parses_records_and_rejects_garbage() {
        let r = record(3, DIR_EGRESS, RECORD_VERSION, &[1, 2, 3, 0, 0]);
        let (h, d) = parse_record(&r).unwrap();
        assert_eq!(
            (h.ifindex, h.wire_len, h.cap_len, h.direction),
            (3, 1500, 3, 2)
        );
        assert_eq!(d, &[1, 2, 3]);
        assert_eq!(parse_record(&r[..10]), Err(RecordError::Short(10)));
        assert!(parse_record(&record(9, DIR_EGRESS, RECORD_VERSION, &[1])).is_err());
        assert!(parse_record(&record(0, 9, RECORD_VERSION, &[])).is_err());
        assert!(parse_record(&record(0, DIR_INGRESS, 2, &[])).is_err());
        // Arbitrary bytes never panic.
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = parse_record(&junk);
        }
    }
}
