//! Slicing: keep only the first bytes of each packet.

use serde::{Deserialize, Serialize};

use crate::parse::Layers;

/// Written as `{ bytes: N }` or `{ payload: N }`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "SliceSpec", into = "SliceSpec")]
pub enum SliceConfig {
    /// Keep the first N bytes of the frame (like a snap length).
    Bytes(usize),
    /// Keep all recognised headers (L2–L4) plus N bytes of payload.
    Payload(usize),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SliceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload: Option<usize>,
}

impl TryFrom<SliceSpec> for SliceConfig {
    type Error = String;
    fn try_from(s: SliceSpec) -> Result<Self, String> {
        match (s.bytes, s.payload) {
            (Some(0), None) => Err("bytes: must be at least 1".into()),
            (Some(n), None) => Ok(SliceConfig::Bytes(n)),
            (None, Some(n)) => Ok(SliceConfig::Payload(n)),
            _ => Err("exactly one of `bytes` or `payload` is required".into()),
        }
    }
}

impl From<SliceConfig> for SliceSpec {
    fn from(c: SliceConfig) -> Self {
        match c {
            SliceConfig::Bytes(n) => SliceSpec {
                bytes: Some(n),
                payload: None,
            },
            SliceConfig::Payload(n) => SliceSpec {
                bytes: None,
                payload: Some(n),
            },
        }
    }
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
