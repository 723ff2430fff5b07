//! Masking: overwrite payload bytes from an offset, so tools see headers and
//! sizes but not content (secrets, personal data).

use serde::{Deserialize, Serialize};

use crate::parse::Layers;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MaskConfig {
    /// Bytes of transport payload left as they are; the rest is overwritten.
    #[serde(default)]
    pub payload_offset: usize,
    /// The byte written over masked payload.
    #[serde(default)]
    pub byte: u8,
}

impl MaskConfig {
    /// Where masking starts in a packet of which `keep` bytes are kept, or
    /// `None` if nothing is left to mask. Frames without a recognised
    /// transport header have no payload we can tell apart, and are left
    /// unmasked only up to the end of the headers we did recognise.
    #[inline]
    pub fn range_start(&self, layers: &Layers, keep: usize) -> Option<usize> {
        let start = layers.headers_len(keep).saturating_add(self.payload_offset);
        (start < keep).then_some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_after_offset() {
        let mut p = vec![0u8; 54];
        p[12] = 0x08;
        p[14] = 0x45;
        p[23] = 17;
        p.extend_from_slice(b"secret");
        let l = Layers::parse(&p);
        // UDP header is 8 bytes: payload starts at 42.
        let m = MaskConfig {
            payload_offset: 2,
            byte: 0,
        };
        assert_eq!(m.range_start(&l, p.len()), Some(44));
        assert_eq!(m.range_start(&l, 44), None);
    }
}
