//! Per-policy packet transforms: filter → dedup → slice → mask.
//!
//! Each transform is a config struct (deserialised from the policy) that
//! builds a runtime piece. The pieces work on borrowed bytes and return
//! verdicts instead of new buffers, so `replay` can run zero-copy over a
//! mapped file and `serve` only copies when masking rewrites bytes.

pub mod dedup;
pub mod filter;
pub mod mask;
pub mod slice;

use serde::{Deserialize, Serialize};

use crate::parse::Layers;

/// The transform part of a policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// tcpdump (pcap-filter) expression; empty keeps everything.
    #[serde(default)]
    pub filter: String,
    #[serde(default)]
    pub dedup: Option<dedup::DedupConfig>,
    #[serde(default)]
    pub slice: Option<slice::SliceConfig>,
    #[serde(default)]
    pub mask: Option<mask::MaskConfig>,
}

/// What to do with a packet that survived the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Captured bytes to keep (≤ the input length).
    pub keep: usize,
    /// Overwrite `[from, keep)` with `byte`, if set.
    pub mask: Option<(usize, u8)>,
    /// Parsed headers, when a stage (or the caller) needed them.
    pub layers: Option<Layers>,
}

/// A built pipeline.
pub struct Pipeline {
    filter: filter::Filter,
    dedup: Option<dedup::Dedup>,
    slice: Option<slice::SliceConfig>,
    mask: Option<mask::MaskConfig>,
    need_layers: bool,
}

impl PipelineConfig {
    /// Builds the runtime pipeline for frames of `linktype`. `want_layers`
    /// asks for parsed headers in every verdict (tool groups hash flows).
    pub fn build(
        &self,
        linktype: u32,
        want_layers: bool,
    ) -> Result<Pipeline, crate::bpf::FilterError> {
        let filter = filter::Filter::new(&self.filter, linktype)?;
        let need_layers = want_layers
            || self.dedup.is_some()
            || self.mask.is_some()
            || matches!(self.slice, Some(slice::SliceConfig::Payload(_)));
        Ok(Pipeline {
            filter,
            dedup: self.dedup.as_ref().map(|d| d.build()),
            slice: self.slice,
            mask: self.mask,
            need_layers,
        })
    }
}

impl Pipeline {
    /// Runs the packet through every stage. `None` means it was dropped
    /// (filtered out or a duplicate).
    #[inline]
    pub fn process(&mut self, data: &[u8], wire_len: u32, ts_ns: u64) -> Option<Verdict> {
        if !self.filter.matches(data, wire_len) {
            return None;
        }
        let layers = self.need_layers.then(|| Layers::parse(data));
        if let (Some(d), Some(l)) = (self.dedup.as_mut(), layers.as_ref()) {
            if d.is_duplicate(data, wire_len, l, ts_ns) {
                return None;
            }
        }
        let keep = match (&self.slice, layers.as_ref()) {
            (Some(s), l) => s.keep_len(data.len(), l),
            (None, _) => data.len(),
        };
        let mask = match (&self.mask, layers.as_ref()) {
            (Some(m), Some(l)) => m.range_start(l, keep).map(|s| (s, m.byte)),
            _ => None,
        };
        Some(Verdict { keep, mask, layers })
    }

    /// The filter's program when filtering is the pipeline's only stage,
    /// so a caller can run it without building verdicts.
    pub fn filter_only(&self) -> Option<&crate::bpf::Program> {
        (self.dedup.is_none() && self.slice.is_none() && self.mask.is_none() && !self.need_layers)
            .then(|| self.filter.program())
    }

    pub fn dedup_stats(&self) -> Option<dedup::DedupStats> {
        self.dedup.as_ref().map(|d| d.stats())
    }

    /// Whether the filter is a libpcap program that can reject packets.
    pub fn filter(&self) -> &filter::Filter {
        &self.filter
    }
}

/// Applies a verdict to a copy of the packet's bytes.
pub fn apply(data: &[u8], v: &Verdict) -> Vec<u8> {
    let mut out = data[..v.keep].to_vec();
    if let Some((from, byte)) = v.mask {
        if from < out.len() {
            out[from..].fill(byte);
        }
    }
    out
}
