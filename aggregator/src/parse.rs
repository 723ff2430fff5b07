//! Just enough header parsing for slicing, masking, dedup and flow hashing.
//!
//! Every read is bounds-checked: a truncated or garbage packet yields a
//! partial [`Layers`] (whatever could be read), never a panic.

/// Offsets and flow identity of an Ethernet frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layers {
    /// Start of the network header (after Ethernet and any VLAN tags).
    pub l3: Option<usize>,
    pub l3_kind: L3,
    /// Start of the transport header.
    pub l4: Option<usize>,
    /// IP protocol number of the transport header.
    pub proto: u8,
    /// Start of the transport payload (end of all headers we know).
    pub payload: Option<usize>,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum L3 {
    #[default]
    Other,
    V4,
    V6,
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_QINQ: u16 = 0x9100;

#[inline]
fn be16(p: &[u8], off: usize) -> Option<u16> {
    let b = p.get(off..off.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

impl Layers {
    /// Parses an Ethernet frame.
    pub fn parse(p: &[u8]) -> Layers {
        let mut l = Layers::default();
        let Some(mut ethertype) = be16(p, 12) else {
            return l;
        };
        let mut off = 14;
        // Bounded so a frame made of VLAN tags cannot loop long.
        for _ in 0..4 {
            if !matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ) {
                break;
            }
            let Some(t) = be16(p, off + 2) else {
                return l;
            };
            ethertype = t;
            off += 4;
        }
        match ethertype {
            ETH_P_IP => l.parse_v4(p, off),
            ETH_P_IPV6 => l.parse_v6(p, off),
            _ => {}
        }
        l
    }

    fn parse_v4(&mut self, p: &[u8], off: usize) {
        self.l3 = Some(off);
        self.l3_kind = L3::V4;
        let Some(h) = p.get(off..off + 20) else {
            return;
        };
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return;
        }
        self.proto = h[9];
        self.src[..4].copy_from_slice(&h[12..16]);
        self.dst[..4].copy_from_slice(&h[16..20]);
        // Only the first fragment carries the transport header.
        let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
        if frag_off != 0 {
            self.payload = Some(off + ihl);
            return;
        }
        self.parse_l4(p, off + ihl);
    }

    fn parse_v6(&mut self, p: &[u8], off: usize) {
        self.l3 = Some(off);
        self.l3_kind = L3::V6;
        let Some(h) = p.get(off..off + 40) else {
            return;
        };
        self.src.copy_from_slice(&h[8..24]);
        self.dst.copy_from_slice(&h[24..40]);
        let mut next = h[6];
        let mut off = off + 40;
        // Walk a bounded number of extension headers.
        for _ in 0..8 {
            match next {
                // hop-by-hop, routing, destination options
                0 | 43 | 60 => {
                    let (Some(&nh), Some(&len)) = (p.get(off), p.get(off + 1)) else {
                        self.proto = next;
                        return;
                    };
                    next = nh;
                    off += (len as usize + 1) * 8;
                }
                // fragment
                44 => {
                    let Some(f) = p.get(off..off + 8) else {
                        self.proto = next;
                        return;
                    };
                    next = f[0];
                    let frag_off = u16::from_be_bytes([f[2], f[3]]) & 0xfff8;
                    off += 8;
                    if frag_off != 0 {
                        self.proto = next;
                        self.payload = Some(off);
                        return;
                    }
                }
                _ => break,
            }
        }
        self.proto = next;
        self.parse_l4(p, off);
    }

    fn parse_l4(&mut self, p: &[u8], off: usize) {
        self.l4 = Some(off);
        let hdr_len = match self.proto {
            6 => match p.get(off + 12) {
                Some(&b) => ((b >> 4) as usize * 4).max(20),
                None => 20,
            },
            17 | 136 => 8, // UDP, UDP-Lite
            1 | 58 => 8,   // ICMP, ICMPv6
            132 => 12,     // SCTP common header
            _ => 0,
        };
        if matches!(self.proto, 6 | 17 | 136 | 132) {
            if let (Some(s), Some(d)) = (be16(p, off), be16(p, off + 2)) {
                self.sport = s;
                self.dport = d;
            }
        }
        self.payload = Some(off + hdr_len);
    }

    /// Length of all known headers, clamped to the captured length.
    pub fn headers_len(&self, caplen: usize) -> usize {
        let end = self.payload.or(self.l4).or(self.l3).unwrap_or(14);
        end.min(caplen)
    }

    /// A hash of the flow that is the same for both directions, so a tool
    /// group can keep both halves of a conversation on one member.
    pub fn symmetric_flow_hash(&self) -> u64 {
        let a = (&self.src, self.sport);
        let b = (&self.dst, self.dport);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut h = Fnv::new();
        h.write(lo.0);
        h.write(&lo.1.to_be_bytes());
        h.write(hi.0);
        h.write(&hi.1.to_be_bytes());
        h.write(&[self.proto]);
        mix64(h.0)
    }
}

/// FNV-1a; tiny inputs, and the final mix spreads it across buckets.
struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A 64-bit finaliser (splitmix64's) so `hash % n` is well spread.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn eth_v4_tcp(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut p = vec![0u8; 14 + 20 + 20];
        p[12] = 0x08;
        p[14] = 0x45;
        let tot = (40 + payload.len()) as u16;
        p[16..18].copy_from_slice(&tot.to_be_bytes());
        p[22] = 64;
        p[23] = 6;
        p[26..30].copy_from_slice(&src);
        p[30..34].copy_from_slice(&dst);
        p[34..36].copy_from_slice(&sport.to_be_bytes());
        p[36..38].copy_from_slice(&dport.to_be_bytes());
        p[46] = 0x50;
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn parses_tcp_over_vlan() {
        let mut p = eth_v4_tcp([1, 2, 3, 4], [5, 6, 7, 8], 1000, 80, b"hello");
        // Insert an 802.1Q tag.
        p.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        let l = Layers::parse(&p);
        assert_eq!(l.l3, Some(18));
        assert_eq!(l.l4, Some(38));
        assert_eq!(l.payload, Some(58));
        assert_eq!((l.sport, l.dport, l.proto), (1000, 80, 6));
        assert_eq!(l.headers_len(p.len()), 58);
    }

    #[test]
    fn flow_hash_is_symmetric() {
        let a = Layers::parse(&eth_v4_tcp([1, 2, 3, 4], [5, 6, 7, 8], 1000, 80, b""));
        let b = Layers::parse(&eth_v4_tcp([5, 6, 7, 8], [1, 2, 3, 4], 80, 1000, b""));
        let c = Layers::parse(&eth_v4_tcp([5, 6, 7, 8], [1, 2, 3, 4], 81, 1000, b""));
        assert_eq!(a.symmetric_flow_hash(), b.symmetric_flow_hash());
        assert_ne!(a.symmetric_flow_hash(), c.symmetric_flow_hash());
    }

    #[test]
    fn truncation_never_panics() {
        let p = eth_v4_tcp([1, 2, 3, 4], [5, 6, 7, 8], 1000, 80, b"hello");
        for cut in 0..p.len() {
            let l = Layers::parse(&p[..cut]);
            assert!(l.headers_len(cut) <= cut);
        }
    }
}
