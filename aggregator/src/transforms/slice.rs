//! Slicing: keep only the first bytes of each packet.

use serde::{Deserialize, Serialize};

use crate::parse::Layers;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SliceConfig {
    /// Keep the first N bytes of the frame (like a snap length).
    Bytes(usize),
    /// Keep all recognised headers (L2–L4) plus N bytes of payload.
    Payload(usize),
}

impl SliceConfig {
    #[inline]
    pub fn keep_len(&self, caplen: usize, layers: Option<&Layers>) -> usize {
        match *self {
            SliceConfig::Bytes(n) => n.min(caplen),
            SliceConfig::Payload(n) => {
                let hdr = layers.map_or(caplen, |l| l.headers_len(caplen));
                hdr.saturating_add(n).min(caplen)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_headers_plus_payload() {
        let mut p = vec![0u8; 54];
        p[12] = 0x08;
        p[14] = 0x45;
        p[23] = 6;
        p[46] = 0x50;
        p.extend_from_slice(b"0123456789");
        let l = Layers::parse(&p);
        assert_eq!(SliceConfig::Payload(4).keep_len(p.len(), Some(&l)), 58);
        assert_eq!(SliceConfig::Payload(400).keep_len(p.len(), Some(&l)), 64);
        assert_eq!(SliceConfig::Bytes(20).keep_len(p.len(), Some(&l)), 20);
        assert_eq!(SliceConfig::Bytes(2000).keep_len(p.len(), None), 64);
    }
}
