//! Reading pcap/pcapng capture files and writing pcapng.
//!
//! Files are memory-mapped and parsed in place with `pcap-file`'s parsers,
//! so reading a packet costs no copy. Output goes through `pcap-file`'s
//! pcapng writer with nanosecond timestamps (`if_tsresol = 9`).

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use anyhow::{bail, Context};
use pcap_file::pcap::{PcapHeader, PcapParser};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::Block;
use pcap_file::pcapng::{PcapNgParser, PcapNgWriter};
use pcap_file::{DataLink, PcapError, TsResolution};

use crate::bpf::BATCH;

/// A packet borrowed from a capture file.
#[derive(Debug, Clone, Copy)]
pub struct FilePacket<'a> {
    pub ts_ns: u64,
    pub wire_len: u32,
    pub data: &'a [u8],
    /// Interface index in the file (always 0 for pcap).
    pub iface: u32,
}

/// An interface of the input file.
#[derive(Debug, Clone)]
pub struct FileInterface {
    pub linktype: u32,
    pub snaplen: u32,
    pub name: Option<String>,
}

/// How a read ended.
#[derive(Debug, Default)]
pub struct ReadSummary {
    pub packets: u64,
    /// Set when the file ended mid-record or held a malformed block; the
    /// packets before it were delivered.
    pub truncated: Option<String>,
}

/// A memory-mapped capture file.
pub struct CaptureFile {
    map: memmap2::Mmap,
}

const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xd4, 0xc3, 0xb2, 0xa1],
    [0xa1, 0xb2, 0xc3, 0xd4],
    [0x4d, 0x3c, 0xb2, 0xa1],
    [0xa1, 0xb2, 0x3c, 0x4d],
];
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

impl CaptureFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the mapping is read-only; a file truncated under us would
        // fault, which is the same contract every mmap reader accepts.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        // Mapping a large capture page by page costs the kernel more than
        // reading it: 200,000 page-table entries to fill and tear down for
        // 800 MB. With HugePage, pages read from disk for this mapping come
        // in 2 MiB folios that map whole, as folios already cached that
        // large do (any file the kernel read ahead); 4 KiB folios, as a file
        // just written in small writes leaves behind, still map page by page.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(CaptureFile { map })
    }

    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut m = memmap2::MmapMut::map_anon(bytes.len().max(1))?;
        m[..bytes.len()].copy_from_slice(bytes);
        let map = m.make_read_only()?;
        Ok(CaptureFile { map })
    }

    /// The interfaces the file declares, read without delivering packets.
    pub fn interfaces(&self) -> anyhow::Result<Vec<FileInterface>> {
        let mut out = Vec::new();
        let data = &self.map[..];
        if data.len() >= 4 && PCAP_MAGICS.contains(&[data[0], data[1], data[2], data[3]]) {
            let (_, parser) =
                PcapParser::new(data).map_err(|e| anyhow::anyhow!("pcap header: {e}"))?;
            let h = parser.header();
            out.push(FileInterface {
                linktype: u32::from(h.datalink),
                snaplen: h.snaplen,
                name: None,
            });
            return Ok(out);
        }
        self.for_each_inner(|_, _| true, Some(&mut out))?;
        Ok(out)
    }

    /// The record walker, when the file is classic pcap (one interface,
    /// no blocks to interpret), for callers that want the tightest loop.
    pub fn pcap_records(&self) -> anyhow::Result<Option<PcapRecords<'_>>> {
        let data = &self.map[..];
        if data.len() >= 4 && PCAP_MAGICS.contains(&[data[0], data[1], data[2], data[3]]) {
            return PcapRecords::new(data).map(Some);
        }
        Ok(None)
    }

    /// Calls `f` with each packet and the file's interfaces; `f` returns
    /// `false` to stop early.
    pub fn for_each(
        &self,
        f: impl FnMut(&[FileInterface], FilePacket<'_>) -> bool,
    ) -> anyhow::Result<ReadSummary> {
        self.for_each_inner(f, None)
    }

    fn for_each_inner(
        &self,
        mut f: impl FnMut(&[FileInterface], FilePacket<'_>) -> bool,
        ifaces_only: Option<&mut Vec<FileInterface>>,
    ) -> anyhow::Result<ReadSummary> {
        let data = &self.map[..];
        if data.len() < 4 {
            bail!("not a capture file: too short");
        }
        let magic = [data[0], data[1], data[2], data[3]];
        if PCAP_MAGICS.contains(&magic) {
            if ifaces_only.is_some() {
                return Ok(ReadSummary::default());
            }
            read_pcap(data, f)
        } else if magic == PCAPNG_MAGIC {
            read_pcapng(data, &mut f, ifaces_only)
        } else {
            bail!("not a pcap or pcapng file (magic {magic:02x?})")
        }
    }
}

fn read_pcap(
    data: &[u8],
    mut f: impl FnMut(&[FileInterface], FilePacket<'_>) -> bool,
) -> anyhow::Result<ReadSummary> {
    let mut records = PcapRecords::new(data)?;
    let ifaces = [records.interface()];
    let mut summary = ReadSummary::default();
    while let Some(pkt) = records.next_packet() {
        summary.packets += 1;
        if !f(&ifaces, pkt) {
            break;
        }
    }
    summary.truncated = records.truncated().map(str::to_string);
    Ok(summary)
}

/// Walks the records of a classic pcap file in place.
///
/// Record headers are parsed here rather than through `pcap-file`'s
/// per-record parser: this loop is most of the cost of a replay, and
/// libpcap accepts wire lengths above the snap length, which `PcapPacket`
/// would reject.
pub struct PcapRecords<'a> {
    data: &'a [u8],
    /// Offset of the next record in `data`.
    pos: usize,
    header: PcapHeader,
    big_endian: bool,
    frac_ns: u64,
    prefetched: usize,
    truncated: bool,
}

/// Why a record could not be read at an offset.
enum RecordAt<'a> {
    /// The packet and the offset of the record after it.
    Packet(FilePacket<'a>, usize),
    End,
    Truncated,
}

/// The packets a [`PcapRecords::select`] kept.
#[derive(Debug, Default)]
pub struct Selection {
    /// Record offsets, in file order; read them with [`PcapRecords::packet_at`].
    pub offsets: Vec<usize>,
    /// Records read.
    pub read: u64,
    /// Stretches of the file walked side by side.
    pub lanes: usize,
    /// A stretch did not start on a record boundary after all, and the file
    /// from there on was walked in sequence instead.
    pub resynced: bool,
}

/// Stretches walked side by side by [`PcapRecords::select`]: enough
/// independent record chains for their memory round trips to overlap.
/// More lanes measured slower: their prefetches queue behind each other.
const SELECT_LANES: usize = 32;
/// Below this many bytes per stretch the set-up is not worth it.
const SELECT_MIN_LANE_BYTES: usize = 64 << 10;
/// How many records in a row must look sane before a position is taken
/// for a record boundary.
const BOUNDARY_CHAIN: usize = 8;
/// How far past a stretch's nominal start to look for a record boundary
/// (a little over the largest snap length libpcap writes).
const BOUNDARY_SCAN: usize = 262_144 + 16;

impl<'a> PcapRecords<'a> {
    pub fn new(data: &'a [u8]) -> anyhow::Result<Self> {
        let (rest, parser) =
            PcapParser::new(data).map_err(|e| anyhow::anyhow!("pcap header: {e}"))?;
        let header = parser.header();
        Ok(PcapRecords {
            data,
            pos: data.len() - rest.len(),
            big_endian: header.endianness == pcap_file::Endianness::Big,
            frac_ns: match header.ts_resolution {
                TsResolution::MicroSecond => 1_000,
                TsResolution::NanoSecond => 1,
            },
            header,
            prefetched: 0,
            truncated: false,
        })
    }

    /// The file's single interface.
    pub fn interface(&self) -> FileInterface {
        FileInterface {
            linktype: u32::from(self.header.datalink),
            snaplen: self.header.snaplen,
            name: None,
        }
    }

    #[inline(always)]
    fn field(&self, at: usize) -> u32 {
        let v = [
            self.data[at],
            self.data[at + 1],
            self.data[at + 2],
            self.data[at + 3],
        ];
        if self.big_endian {
            u32::from_be_bytes(v)
        } else {
            u32::from_le_bytes(v)
        }
    }

    #[inline(always)]
    fn record_at(&self, pos: usize) -> RecordAt<'a> {
        let left = self.data.len() - pos;
        if left == 0 {
            return RecordAt::End;
        }
        if left < 16 {
            return RecordAt::Truncated;
        }
        let caplen = self.field(pos + 8) as usize;
        if left - 16 < caplen {
            return RecordAt::Truncated;
        }
        let next = pos + 16 + caplen;
        let data: &'a [u8] = self.data;
        RecordAt::Packet(
            FilePacket {
                ts_ns: self.field(pos) as u64 * 1_000_000_000
                    + self.field(pos + 4) as u64 * self.frac_ns,
                wire_len: self.field(pos + 12),
                data: &data[pos + 16..next],
                iface: 0,
            },
            next,
        )
    }

    /// The next record, or `None` at the end of the file or at a record
    /// cut short (then [`truncated`](Self::truncated) says so).
    #[inline]
    pub fn next_packet(&mut self) -> Option<FilePacket<'a>> {
        let base = self.data.as_ptr() as usize;
        prefetch_ahead(
            base + self.pos,
            &mut self.prefetched,
            base + self.data.len(),
        );
        match self.record_at(self.pos) {
            RecordAt::Packet(p, next) => {
                self.pos = next;
                Some(p)
            }
            RecordAt::End => None,
            RecordAt::Truncated => {
                self.truncated = true;
                None
            }
        }
    }

    /// The packet of the record at `offset`, as [`Selection`] names it.
    pub fn packet_at(&self, offset: usize) -> Option<FilePacket<'a>> {
        match self.record_at(offset) {
            RecordAt::Packet(p, _) => Some(p),
            _ => None,
        }
    }

    /// The packets at `offsets` (as a [`Selection`] lists them), pulling
    /// the ones a few places ahead into the cache: kept packets are
    /// scattered over the file, and by the time they are written out the
    /// walk has long evicted them.
    pub fn packets_at<'s>(
        &'s self,
        offsets: &'s [usize],
    ) -> impl Iterator<Item = FilePacket<'a>> + 's {
        const HEADER_AHEAD: usize = 16;
        const PACKET_AHEAD: usize = 8;
        let base = self.data.as_ptr() as usize;
        offsets.iter().enumerate().filter_map(move |(i, &at)| {
            if let Some(&ahead) = offsets.get(i + HEADER_AHEAD) {
                prefetch_line(base + ahead);
            }
            if let Some(&ahead) = offsets.get(i + PACKET_AHEAD) {
                // Its header came in `HEADER_AHEAD - PACKET_AHEAD` packets ago.
                if let Some(p) = self.packet_at(ahead) {
                    let start = p.data.as_ptr() as usize;
                    let mut line = (start + 64) & !63;
                    while line < start + p.data.len() {
                        prefetch_line(line);
                        line += 64;
                    }
                }
            }
            self.packet_at(at)
        })
    }

    /// Why reading stopped early, if it did.
    pub fn truncated(&self) -> Option<&'static str> {
        self.truncated.then_some("truncated dump file")
    }

    /// Reads every remaining record and returns, in file order, the
    /// offsets of those `keep` accepts. `keep` gets batches of at most
    /// [`BATCH`] packets (bytes and wire lengths) in no particular order
    /// and marks the ones to keep.
    ///
    /// Following one chain of records costs a memory round trip per
    /// record, since each header gives the next one's position. The file
    /// is instead cut into stretches that start at likely record
    /// boundaries, and their chains are walked side by side, each
    /// prefetching its next header while the others work, so the round
    /// trips overlap. Each stretch's walk must end exactly where the next
    /// one began; if one does not, that start was no boundary and the rest
    /// of the file is walked in sequence, so the outcome (records read,
    /// kept, truncation) is always that of a walk in sequence.
    pub fn select(&mut self, keep: impl FnMut(&[&'a [u8]], &[u32], &mut [bool])) -> Selection {
        self.select_in(SELECT_LANES, SELECT_MIN_LANE_BYTES, keep)
    }

    fn select_in(
        &mut self,
        max_lanes: usize,
        min_lane_bytes: usize,
        mut keep: impl FnMut(&[&'a [u8]], &[u32], &mut [bool]),
    ) -> Selection {
        struct Lane {
            pos: usize,
            end: usize,
            truncated: bool,
            read: u64,
            kept: Vec<usize>,
        }
        let max_lanes = max_lanes.clamp(1, BATCH);
        let len = self.data.len();
        let span = (len - self.pos) / max_lanes.max(1);
        let mut starts = vec![self.pos];
        if span >= min_lane_bytes {
            for k in 1..max_lanes {
                let last = starts[starts.len() - 1];
                if let Some(b) = self.boundary_after((self.pos + span * k).max(last + 1)) {
                    if b < len && b > last {
                        starts.push(b);
                    }
                }
            }
        }
        let mut lanes: Vec<Lane> = starts
            .iter()
            .enumerate()
            .map(|(k, &start)| Lane {
                pos: start,
                end: starts.get(k + 1).copied().unwrap_or(len),
                truncated: false,
                read: 0,
                kept: Vec::new(),
            })
            .collect();
        let mut sel = Selection {
            lanes: lanes.len(),
            ..Selection::default()
        };
        let base = self.data.as_ptr() as usize;
        let mut batch = Batch::default();
        // Each round takes one record from every lane, so a lane's next
        // header, prefetched when its current one was read, has a whole
        // round to arrive; rounds are gathered into a batch for the filter.
        loop {
            let mut active = 0;
            for (l, lane) in lanes.iter_mut().enumerate() {
                if lane.pos >= lane.end {
                    continue;
                }
                match self.record_at(lane.pos) {
                    RecordAt::Packet(p, next) => {
                        // The next header and the packet headers after it
                        // span at most two lines.
                        prefetch_line(base + next.min(len - 1));
                        prefetch_line(base + (next + 64).min(len - 1));
                        batch.push(p, l, lane.pos);
                        lane.read += 1;
                        lane.pos = next;
                        active += usize::from(next < lane.end);
                    }
                    // `pos < end <= len`, so this is a cut-short record.
                    RecordAt::End | RecordAt::Truncated => {
                        lane.truncated = true;
                        lane.end = lane.pos;
                    }
                }
            }
            if active > 0 && batch.len() + active <= BATCH {
                continue;
            }
            if batch.is_empty() {
                break;
            }
            batch.select(&mut keep, |l, at| lanes[l].kept.push(at));
        }
        sel.offsets
            .reserve_exact(lanes.iter().map(|l| l.kept.len()).sum());
        for (k, lane) in lanes.iter_mut().enumerate() {
            sel.read += lane.read;
            sel.offsets.append(&mut lane.kept);
            self.pos = lane.pos;
            if lane.truncated {
                self.truncated = true;
                break;
            }
            if starts.get(k + 1).is_some_and(|&next| next != lane.pos) {
                sel.resynced = true;
                break;
            }
        }
        if sel.resynced {
            loop {
                let at = self.pos;
                let next = self.next_packet();
                if let Some(p) = next {
                    sel.read += 1;
                    batch.push(p, 0, at);
                }
                if batch.len() == BATCH || (next.is_none() && !batch.is_empty()) {
                    batch.select(&mut keep, |_, at| sel.offsets.push(at));
                }
                if next.is_none() {
                    break;
                }
            }
        }
        sel
    }

    /// The first position at or after `from` (within [`BOUNDARY_SCAN`])
    /// where [`BOUNDARY_CHAIN`] records in a row look like records of this
    /// file.
    fn boundary_after(&self, from: usize) -> Option<usize> {
        let stop = self.data.len().min(from.saturating_add(BOUNDARY_SCAN));
        (from..stop).find(|&p| self.plausible_chain(p))
    }

    fn plausible_chain(&self, mut p: usize) -> bool {
        let frac_limit = if self.frac_ns == 1 {
            1_000_000_000
        } else {
            1_000_000
        };
        let max_caplen = self.header.snaplen.max(262_144);
        for _ in 0..BOUNDARY_CHAIN {
            let left = self.data.len() - p;
            if left == 0 {
                return true;
            }
            if left < 16 {
                return false;
            }
            let caplen = self.field(p + 8);
            let wire = self.field(p + 12);
            if self.field(p + 4) >= frac_limit
                || caplen > max_caplen
                || caplen > wire
                || left - 16 < caplen as usize
            {
                return false;
            }
            p += 16 + caplen as usize;
        }
        true
    }
}

/// Packets gathered for one call of a [`PcapRecords::select`] filter.
struct Batch<'a> {
    packets: Vec<&'a [u8]>,
    wire_lens: Vec<u32>,
    /// (lane, record offset) of each packet.
    origins: Vec<(usize, usize)>,
    keep: [bool; BATCH],
}

impl Default for Batch<'_> {
    fn default() -> Self {
        Batch {
            packets: Vec::with_capacity(BATCH),
            wire_lens: Vec::with_capacity(BATCH),
            origins: Vec::with_capacity(BATCH),
            keep: [false; BATCH],
        }
    }
}

impl<'a> Batch<'a> {
    #[inline(always)]
    fn push(&mut self, p: FilePacket<'a>, lane: usize, at: usize) {
        self.packets.push(p.data);
        self.wire_lens.push(p.wire_len);
        self.origins.push((lane, at));
    }

    fn len(&self) -> usize {
        self.packets.len()
    }

    fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Filters the batch, reports each kept packet's origin, and empties it.
    fn select(
        &mut self,
        keep: &mut impl FnMut(&[&'a [u8]], &[u32], &mut [bool]),
        mut kept: impl FnMut(usize, usize),
    ) {
        let n = self.len();
        keep(&self.packets, &self.wire_lens, &mut self.keep[..n]);
        for (&k, &(lane, at)) in self.keep[..n].iter().zip(&self.origins) {
            if k {
                kept(lane, at);
            }
        }
        self.packets.clear();
        self.wire_lens.clear();
        self.origins.clear();
    }
}

/// How far ahead of the reader to pull the file into the CPU cache.
const PREFETCH_DISTANCE: usize = 4096;

#[inline(always)]
fn prefetch_line(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: callers pass addresses inside the mapped file; a prefetch has
    // no architectural effect besides filling the cache.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Records sit at irregular strides, so the hardware prefetcher misses
/// most record headers and every packet would cost a memory round trip.
/// Sweeping the mapping linearly a few KB ahead of the reader turns that
/// latency-bound walk into a bandwidth-bound stream.
#[inline(always)]
fn prefetch_ahead(cur: usize, prefetched: &mut usize, end: usize) {
    let target = cur.saturating_add(PREFETCH_DISTANCE).min(end);
    let mut p = (*prefetched).max(cur) & !127;
    while p < target {
        prefetch_line(p);
        // The adjacent-line prefetcher pairs 64-byte lines, so one hint per
        // 128 bytes brings in everything.
        p += 128;
    }
    *prefetched = p;
}

/// Nanoseconds per tick for an `if_tsresol` value.
fn tick_ns(resol: u8) -> (u64, u64) {
    if resol & 0x80 == 0 {
        let exp = (resol as u32).min(18);
        if exp <= 9 {
            (10u64.pow(9 - exp), 1)
        } else {
            (1, 10u64.pow(exp - 9))
        }
    } else {
        // Power-of-two resolution: ns = ticks * 1e9 / 2^n.
        (1_000_000_000, 1u64 << (resol & 0x7f).min(63))
    }
}

fn read_pcapng(
    data: &[u8],
    f: &mut impl FnMut(&[FileInterface], FilePacket<'_>) -> bool,
    mut ifaces_only: Option<&mut Vec<FileInterface>>,
) -> anyhow::Result<ReadSummary> {
    let (mut rest, mut parser) =
        PcapNgParser::new(data).map_err(|e| anyhow::anyhow!("pcapng section header: {e}"))?;
    let mut ifaces: Vec<FileInterface> = Vec::new();
    // (multiplier, divisor) per interface.
    let mut ticks: Vec<(u64, u64)> = Vec::new();
    let mut summary = ReadSummary::default();
    while !rest.is_empty() {
        let (r, block) = match parser.next_block(rest) {
            Ok(x) => x,
            Err(e) => {
                summary.truncated = Some(match e {
                    PcapError::IncompleteBuffer => "truncated dump file".to_string(),
                    e => e.to_string(),
                });
                break;
            }
        };
        rest = r;
        match block {
            Block::SectionHeader(_) => {
                ifaces.clear();
                ticks.clear();
            }
            Block::InterfaceDescription(idb) => {
                let mut resol = 6u8;
                let mut name = None;
                for o in &idb.options {
                    match o {
                        InterfaceDescriptionOption::IfTsResol(r) => resol = *r,
                        InterfaceDescriptionOption::IfName(n) => name = Some(n.to_string()),
                        _ => {}
                    }
                }
                let iface = FileInterface {
                    linktype: u32::from(idb.linktype),
                    snaplen: idb.snaplen,
                    name,
                };
                if let Some(out) = ifaces_only.as_deref_mut() {
                    out.push(iface.clone());
                }
                ifaces.push(iface);
                ticks.push(tick_ns(resol));
            }
            Block::EnhancedPacket(epb) if ifaces_only.is_none() => {
                let i = epb.interface_id as usize;
                let Some(&(mul, div)) = ticks.get(i) else {
                    summary.truncated = Some(format!("packet refers to unknown interface {i}"));
                    break;
                };
                // pcap-file hands back the raw tick count as nanoseconds.
                let raw = epb.timestamp.as_nanos() as u64;
                let ts_ns = (raw as u128 * mul as u128 / div as u128) as u64;
                let data = match epb.data {
                    Cow::Borrowed(b) => b,
                    Cow::Owned(_) => unreachable!("the parser borrows from its input"),
                };
                summary.packets += 1;
                if !f(
                    &ifaces,
                    FilePacket {
                        ts_ns,
                        wire_len: epb.original_len,
                        data,
                        iface: i as u32,
                    },
                ) {
                    break;
                }
            }
            Block::SimplePacket(spb) if ifaces_only.is_none() => {
                if ifaces.is_empty() {
                    summary.truncated = Some("simple packet before any interface".into());
                    break;
                }
                let data = match spb.data {
                    Cow::Borrowed(b) => b,
                    Cow::Owned(_) => unreachable!("the parser borrows from its input"),
                };
                summary.packets += 1;
                if !f(
                    &ifaces,
                    FilePacket {
                        ts_ns: 0,
                        wire_len: spb.original_len,
                        data,
                        iface: 0,
                    },
                ) {
                    break;
                }
            }
            // Listing interfaces stops at the first packet: later IDBs are
            // picked up while reading.
            Block::EnhancedPacket(_) | Block::SimplePacket(_) | Block::Packet(_)
                if ifaces_only.is_some() =>
            {
                break
            }
            _ => {}
        }
    }
    Ok(summary)
}

/// pcapng `epb_flags` direction bits.
pub const EPB_INBOUND: u32 = 0b01;
pub const EPB_OUTBOUND: u32 = 0b10;

/// A pcapng writer that adds interfaces as they appear.
pub struct PcapNgOut<W: Write> {
    writer: PcapNgWriter<W>,
    interfaces: u32,
    bytes: u64,
}

impl<W: Write> PcapNgOut<W> {
    pub fn new(w: W) -> io::Result<Self> {
        let writer = PcapNgWriter::new(w).map_err(to_io)?;
        Ok(PcapNgOut {
            writer,
            interfaces: 0,
            bytes: 28,
        })
    }

    /// Declares an interface and returns its id in this section.
    pub fn add_interface(
        &mut self,
        linktype: u32,
        snaplen: u32,
        name: Option<&str>,
        description: Option<&str>,
    ) -> io::Result<u32> {
        let mut options = vec![InterfaceDescriptionOption::IfTsResol(9)];
        if let Some(n) = name {
            options.push(InterfaceDescriptionOption::IfName(Cow::Owned(
                n.to_string(),
            )));
        }
        if let Some(d) = description {
            options.push(InterfaceDescriptionOption::IfDescription(Cow::Owned(
                d.to_string(),
            )));
        }
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::from(linktype),
            snaplen,
            options,
        };
        self.bytes += self.writer.write_pcapng_block(idb).map_err(to_io)? as u64;
        self.interfaces += 1;
        Ok(self.interfaces - 1)
    }

    /// Writes one packet. `flags` are `epb_flags` (0 = none).
    ///
    /// The Enhanced Packet Block is laid out here, in the section's
    /// (native) byte order, rather than through `pcap-file`'s block
    /// encoder, which serialises every block twice (once to measure it) in
    /// field-sized writes.
    #[inline]
    pub fn write_packet(
        &mut self,
        iface: u32,
        ts_ns: u64,
        wire_len: u32,
        data: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if iface >= self.interfaces {
            return Err(io::Error::other(format!("no interface {iface} declared")));
        }
        let caplen = u32::try_from(data.len())
            .ok()
            .filter(|&l| l <= u32::MAX - 64)
            .ok_or_else(|| io::Error::other("packet too large for pcapng"))?;
        let pad = (4 - data.len() % 4) % 4;
        // 28 bytes of header and 4 of trailer; the flags option takes 8
        // bytes plus 4 for opt_endofopt.
        let opts = if flags != 0 { 12 } else { 0 };
        let total = 32 + caplen + pad as u32 + opts;
        let mut head = [0u8; 28];
        let put = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        put(&mut head, 0, 6);
        put(&mut head, 4, total);
        put(&mut head, 8, iface);
        put(&mut head, 12, (ts_ns >> 32) as u32);
        put(&mut head, 16, ts_ns as u32);
        put(&mut head, 20, caplen);
        // A slice can only shorten; the wire length stays what it was.
        put(&mut head, 24, wire_len.max(caplen));
        let w = self.writer.get_mut();
        w.write_all(&head)?;
        w.write_all(data)?;
        let mut tail = [0u8; 3 + 12 + 4];
        let mut n = pad;
        if flags != 0 {
            tail[n..n + 2].copy_from_slice(&2u16.to_ne_bytes());
            tail[n + 2..n + 4].copy_from_slice(&4u16.to_ne_bytes());
            tail[n + 4..n + 8].copy_from_slice(&flags.to_ne_bytes());
            n += 12;
        }
        put(&mut tail, n, total);
        w.write_all(&tail[..n + 4])?;
        self.bytes += total as u64;
        Ok(())
    }

    /// Bytes written so far (for size-based rotation).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    pub fn get_mut(&mut self) -> &mut W {
        self.writer.get_mut()
    }

    pub fn into_inner(self) -> W {
        self.writer.into_inner()
    }
}

fn to_io(e: PcapError) -> io::Error {
    match e {
        PcapError::IoError(e) => e,
        e => io::Error::other(e.to_string()),
    }
}

/// The 24-byte header of a classic pcap stream (microsecond timestamps,
/// Ethernet), as PCAP-over-IP and the HTTP stream send it.
pub fn pcap_stream_header(snaplen: u32) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    h[16..20].copy_from_slice(&snaplen.to_le_bytes());
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h
}

/// Appends one classic pcap record (microsecond timestamps) to `out`.
#[inline]
pub fn pcap_stream_record(out: &mut Vec<u8>, ts_ns: u64, wire_len: u32, data: &[u8]) {
    let secs = (ts_ns / 1_000_000_000) as u32;
    let usecs = ((ts_ns % 1_000_000_000) / 1_000) as u32;
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&usecs.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&wire_len.max(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// What a walk in sequence gives: kept offsets, records read, where it
    /// stopped, and whether the file was cut short.
    fn in_sequence(
        data: &[u8],
        keep: impl Fn(&[u8], u32) -> bool,
    ) -> (Vec<usize>, u64, usize, bool) {
        let mut r = PcapRecords::new(data).unwrap();
        let (mut kept, mut read) = (Vec::new(), 0);
        loop {
            let at = r.pos;
            let Some(p) = r.next_packet() else { break };
            read += 1;
            if keep(p.data, p.wire_len) {
                kept.push(at);
            }
        }
        (kept, read, r.pos, r.truncated().is_some())
    }

    fn in_lanes(
        data: &[u8],
        lanes: usize,
        keep: impl Fn(&[u8], u32) -> bool,
    ) -> (Selection, usize, bool) {
        let mut r = PcapRecords::new(data).unwrap();
        let sel = r.select_in(lanes, 1, |pkts, wires, out| {
            assert!(pkts.len() <= BATCH);
            for ((p, &w), o) in pkts.iter().zip(wires).zip(out.iter_mut()) {
                *o = keep(p, w);
            }
        });
        (sel, r.pos, r.truncated().is_some())
    }

    fn keep(data: &[u8], wire: u32) -> bool {
        data.get(23) == Some(&6) || wire.is_multiple_of(5)
    }

    #[test]
    fn lanes_give_what_a_walk_in_sequence_gives() {
        let mut rng = SmallRng::seed_from_u64(5);
        let clean = synth::write_pcap(Vec::new(), synth::frames(11, 3_000), 65535).unwrap();
        let mut laned = 0;
        for case in 0..300 {
            let mut f = clean.clone();
            // Cut short, bytes flipped (a flipped length derails the chain
            // the lanes' starts were found on), or both.
            if case % 3 != 0 {
                f.truncate(rng.random_range(24..=f.len()));
            }
            if case % 3 != 1 {
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(24..f.len());
                    f[i] = rng.random();
                }
            }
            let want = in_sequence(&f, keep);
            for lanes in [1, 2, 7, 32] {
                let (sel, pos, truncated) = in_lanes(&f, lanes, keep);
                laned += usize::from(sel.lanes > 1);
                assert_eq!(
                    (&sel.offsets, sel.read, pos, truncated),
                    (&want.0, want.1, want.2, want.3),
                    "case {case}, {lanes} lanes"
                );
            }
        }
        assert!(laned > 500, "only {laned} walks used lanes");
    }

    #[test]
    fn a_lane_started_inside_a_packet_is_caught() {
        // Payloads made of record look-alikes: a lane's boundary search
        // that lands inside one takes the look-alikes for records.
        let mut fake = Vec::new();
        for _ in 0..40 {
            fake.extend_from_slice(&[0; 8]);
            fake.extend_from_slice(&20u32.to_le_bytes());
            fake.extend_from_slice(&20u32.to_le_bytes());
            fake.extend_from_slice(&[0x45; 20]);
        }
        let frames = (0..400).map(|i| synth::Frame {
            ts_ns: i * 1_000,
            data: fake[..fake.len() - (i as usize % 7)].to_vec(),
        });
        let f = synth::write_pcap(Vec::new(), frames, 65535).unwrap();
        let want = in_sequence(&f, keep);
        let mut resynced = 0;
        for lanes in 2..=32 {
            let (sel, pos, truncated) = in_lanes(&f, lanes, keep);
            resynced += usize::from(sel.resynced);
            assert_eq!(
                (&sel.offsets, sel.read, pos, truncated),
                (&want.0, want.1, want.2, want.3),
                "{lanes} lanes"
            );
        }
        assert!(resynced > 0, "no lane started inside a packet");
    }
}
