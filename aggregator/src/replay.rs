//! `aggregator replay`: the policy pipeline over a capture file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;

use crate::capture::{CaptureFile, PcapNgOut};
use crate::transforms::{Pipeline, PipelineConfig};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayStats {
    pub read: u64,
    pub written: u64,
    pub duplicates: u64,
    /// The input ended early or was malformed at some point; everything
    /// before it was processed (as tcpdump does).
    pub truncated: Option<String>,
}

/// Runs `cfg` over `input` and writes the kept packets to `output` as
/// pcapng. The filter is compiled before the output is created, so an
/// invalid expression leaves no file behind.
pub fn replay(cfg: &PipelineConfig, input: &Path, output: &Path) -> anyhow::Result<ReplayStats> {
    let file = CaptureFile::open(input)?;
    let ifaces = file
        .interfaces()
        .with_context(|| format!("reading {}", input.display()))?;
    // One pipeline per link type: the same expression compiles differently
    // for, say, Ethernet and raw IP.
    let mut pipelines: HashMap<u32, Pipeline> = HashMap::new();
    for i in &ifaces {
        if let std::collections::hash_map::Entry::Vacant(e) = pipelines.entry(i.linktype) {
            e.insert(cfg.build(i.linktype, false)?);
        }
    }
    if ifaces.is_empty() {
        // Still validate the expression for the common case.
        cfg.build(crate::bpf::LINKTYPE_ETHERNET, false)?;
    }
    let out = File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let mut out = PcapNgOut::new(BufWriter::with_capacity(1 << 20, out))?;
    // Input interface index → output interface id.
    let mut iface_map: Vec<Option<u32>> = Vec::new();
    let mut stats = ReplayStats::default();
    // Classic pcap through a filter alone (the common case): no verdicts,
    // no interface bookkeeping per packet.
    if let Some(mut records) = file.pcap_records()? {
        let iface = records.interface();
        if let Some(program) = pipelines.get(&iface.linktype).and_then(|p| p.filter_only()) {
            let mut runner = program.batch_runner();
            let selection =
                records.select(|packets, wire_lens, keep| runner.run(packets, wire_lens, keep));
            stats.read = selection.read;
            let mut out_if = None;
            for p in records.packets_at(&selection.offsets) {
                let id = match out_if {
                    Some(id) => id,
                    None => *out_if.insert(
                        out.add_interface(
                            iface.linktype,
                            iface.snaplen.max(p.data.len() as u32),
                            None,
                            None,
                        )
                        .with_context(|| format!("writing {}", output.display()))?,
                    ),
                };
                out.write_packet(id, p.ts_ns, p.wire_len, p.data, 0)
                    .with_context(|| format!("writing {}", output.display()))?;
                stats.written += 1;
            }
            if out_if.is_none() {
                out.add_interface(iface.linktype, iface.snaplen, None, None)?;
            }
            out.get_mut()
                .flush()
                .with_context(|| format!("writing {}", output.display()))?;
            stats.truncated = records.truncated().map(str::to_string);
            return Ok(stats);
        }
    }
    let mut error: Option<anyhow::Error> = None;
    let mut scratch = Vec::new();
    // Per-packet lookups go through interface index, not a hash map.
    let mut slots: Vec<u32> = Vec::new();
    let mut by_slot: Vec<Pipeline> = Vec::new();
    let mut slot_of_linktype: HashMap<u32, u32> = HashMap::new();
    let summary = file.for_each(|ifaces, p| {
        stats.read += 1;
        let i = p.iface as usize;
        let Some(iface) = ifaces.get(i) else {
            return true;
        };
        if slots.len() <= i {
            slots.resize(i + 1, u32::MAX);
        }
        if slots[i] == u32::MAX {
            let slot = match slot_of_linktype.get(&iface.linktype) {
                Some(&s) => s,
                None => {
                    let pl = match pipelines.remove(&iface.linktype) {
                        Some(pl) => pl,
                        None => match cfg.build(iface.linktype, false) {
                            Ok(pl) => pl,
                            Err(e) => {
                                error = Some(e.into());
                                return false;
                            }
                        },
                    };
                    by_slot.push(pl);
                    let s = by_slot.len() as u32 - 1;
                    slot_of_linktype.insert(iface.linktype, s);
                    s
                }
            };
            slots[i] = slot;
        }
        let pipeline = &mut by_slot[slots[i] as usize];
        let Some(v) = pipeline.process(p.data, p.wire_len, p.ts_ns) else {
            return true;
        };
        if iface_map.len() <= i {
            iface_map.resize(i + 1, None);
        }
        let out_if = match iface_map[i] {
            Some(id) => id,
            None => match out.add_interface(
                iface.linktype,
                iface.snaplen.max(v.keep as u32),
                iface.name.as_deref(),
                None,
            ) {
                Ok(id) => {
                    iface_map[i] = Some(id);
                    id
                }
                Err(e) => {
                    error = Some(e.into());
                    return false;
                }
            },
        };
        let data = match v.mask {
            Some((from, byte)) if from < v.keep => {
                scratch.clear();
                scratch.extend_from_slice(&p.data[..v.keep]);
                scratch[from..].fill(byte);
                &scratch[..]
            }
            _ => &p.data[..v.keep],
        };
        if let Err(e) = out.write_packet(out_if, p.ts_ns, p.wire_len, data, 0) {
            error = Some(e.into());
            return false;
        }
        stats.written += 1;
        true
    })?;
    if let Some(e) = error {
        return Err(e.context(format!("writing {}", output.display())));
    }
    // A file whose packets were all filtered out still needs an interface
    // for readers that expect one.
    if iface_map.iter().all(Option::is_none) {
        if let Some(i) = ifaces.first() {
            out.add_interface(i.linktype, i.snaplen, i.name.as_deref(), None)?;
        }
    }
    out.get_mut()
        .flush()
        .with_context(|| format!("writing {}", output.display()))?;
    stats.duplicates = pipelines
        .values()
        .filter_map(|p| p.dedup_stats())
        .map(|s| s.duplicates)
        .sum();
    stats.truncated = summary.truncated;
    Ok(stats)
}
