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
    rest: &'a [u8],
    header: PcapHeader,
    big_endian: bool,
    frac_ns: u64,
    end: usize,
    prefetched: usize,
    truncated: bool,
}

impl<'a> PcapRecords<'a> {
    pub fn new(data: &'a [u8]) -> anyhow::Result<Self> {
        let (rest, parser) =
            PcapParser::new(data).map_err(|e| anyhow::anyhow!("pcap header: {e}"))?;
        let header = parser.header();
        Ok(PcapRecords {
            rest,
            big_endian: header.endianness == pcap_file::Endianness::Big,
            frac_ns: match header.ts_resolution {
                TsResolution::MicroSecond => 1_000,
                TsResolution::NanoSecond => 1,
            },
            header,
            end: data.as_ptr() as usize + data.len(),
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

    /// The next record, or `None` at the end of the file or at a record
    /// cut short (then [`truncated`](Self::truncated) says so).
    #[inline]
    pub fn next_packet(&mut self) -> Option<FilePacket<'a>> {
        let rest = self.rest;
        if rest.is_empty() {
            return None;
        }
        prefetch_ahead(rest.as_ptr() as usize, &mut self.prefetched, self.end);
        if rest.len() < 16 {
            self.truncated = true;
            return None;
        }
        let rd = |o: usize| {
            let v = [rest[o], rest[o + 1], rest[o + 2], rest[o + 3]];
            if self.big_endian {
                u32::from_be_bytes(v)
            } else {
                u32::from_le_bytes(v)
            }
        };
        let caplen = rd(8) as usize;
        if rest.len() - 16 < caplen {
            self.truncated = true;
            return None;
        }
        let pkt = FilePacket {
            ts_ns: rd(0) as u64 * 1_000_000_000 + rd(4) as u64 * self.frac_ns,
            wire_len: rd(12),
            data: &rest[16..16 + caplen],
            iface: 0,
        };
        self.rest = &rest[16 + caplen..];
        Some(pkt)
    }

    /// Why reading stopped early, if it did.
    pub fn truncated(&self) -> Option<&'static str> {
        self.truncated.then_some("truncated dump file")
    }
}

/// How far ahead of the reader to pull the file into the CPU cache.
const PREFETCH_DISTANCE: usize = 4096;

/// Records sit at irregular strides, so the hardware prefetcher misses
/// most record headers and every packet would cost a memory round trip.
/// Sweeping the mapping linearly a few KB ahead of the reader turns that
/// latency-bound walk into a bandwidth-bound stream.
#[inline(always)]
fn prefetch_ahead(cur: usize, prefetched: &mut usize, end: usize) {
    let target = cur.saturating_add(PREFETCH_DISTANCE).min(end);
    let mut p = (*prefetched).max(cur) & !127;
    while p < target {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `p` lies inside the mapped file ([cur, end)); a prefetch
        // has no architectural effect besides filling the cache.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
        }
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
