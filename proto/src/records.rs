//! Packed packet records: how a tap's batch carries its packets
//! (`tapestry.tap.v2.Batch.records`, format [`FORMAT_V1`]).
//!
//! Each record is a fixed 32-byte little-endian header followed by the
//! captured bytes, padded with zeros to a multiple of 8:
//!
//! ```text
//! offset  size  field
//!      0     8  timestamp, nanoseconds since the Unix epoch
//!      8     4  wire length (the packet's length on the wire)
//!     12     4  captured length (the bytes that follow)
//!     16     4  source id (a Source of the stream's Hello)
//!     20     1  direction (tapestry.tap.v1.Direction)
//!     21     3  reserved, zero
//!     24     8  policy mask (bit i: the Hello's policy_names[i] matched)
//!     32     …  captured bytes, then padding to 8
//! ```
//!
//! The tap appends records to one buffer as it reads its ring (one copy);
//! the aggregator reads them in place, each packet's bytes a slice of the
//! received buffer. Nothing in a batch is trusted: a record that runs past
//! the end, or claims more captured bytes than its wire length, ends the
//! reading with an error instead of a panic.

use bytes::{BufMut, Bytes, BytesMut};

/// The record format of this module.
pub const FORMAT_V1: u32 = 1;
/// Bytes of a record header.
pub const HEADER_LEN: usize = 32;
const ALIGN: usize = 8;

/// One packet's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    pub timestamp_ns: u64,
    pub wire_length: u32,
    pub source_id: u32,
    /// `tapestry.tap.v1.Direction` as its number.
    pub direction: u8,
    pub policy_mask: u64,
}

fn padded(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN
}

/// The space a record with `captured` bytes takes in a batch.
pub fn encoded_len(captured: usize) -> usize {
    HEADER_LEN + padded(captured)
}

/// Builds a batch's records.
#[derive(Debug, Default)]
pub struct RecordsBuilder {
    buf: BytesMut,
    count: u32,
    captured: usize,
}

impl RecordsBuilder {
    pub fn with_capacity(bytes: usize) -> Self {
        RecordsBuilder {
            buf: BytesMut::with_capacity(bytes),
            count: 0,
            captured: 0,
        }
    }

    /// Append a packet (at most `u32::MAX` captured bytes are kept).
    pub fn push(&mut self, record: &Record, data: &[u8]) {
        let data = &data[..data.len().min(u32::MAX as usize)];
        self.buf.reserve(encoded_len(data.len()));
        // The header laid out in place, then one copy of it and one of the
        // data: this runs once per packet on the tap.
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(&record.timestamp_ns.to_le_bytes());
        header[8..12].copy_from_slice(&record.wire_length.max(data.len() as u32).to_le_bytes());
        header[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
        header[16..20].copy_from_slice(&record.source_id.to_le_bytes());
        header[20] = record.direction;
        header[24..32].copy_from_slice(&record.policy_mask.to_le_bytes());
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(data);
        self.buf.put_bytes(0, padded(data.len()) - data.len());
        self.count += 1;
        self.captured += data.len();
    }

    /// Records so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Captured bytes so far (without headers and padding).
    pub fn captured_bytes(&self) -> usize {
        self.captured
    }

    /// Bytes the records take so far (headers and padding included).
    pub fn encoded_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The encoded records and their count.
    pub fn finish(self) -> (Bytes, u32) {
        (self.buf.freeze(), self.count)
    }
}

/// Why a batch's records could not all be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordsError {
    UnknownFormat(u32),
    /// The record at this offset runs past the end of the batch.
    Truncated {
        offset: usize,
    },
    /// The record at this offset claims more captured bytes than its wire
    /// length.
    CapturedBeyondWire {
        offset: usize,
    },
}

impl std::fmt::Display for RecordsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordsError::UnknownFormat(v) => write!(f, "unknown record format {v}"),
            RecordsError::Truncated { offset } => {
                write!(f, "record at byte {offset} runs past the end of the batch")
            }
            RecordsError::CapturedBeyondWire { offset } => write!(
                f,
                "record at byte {offset} has more captured bytes than its wire length"
            ),
        }
    }
}

impl std::error::Error for RecordsError {}

/// Reads records in place: each packet's bytes are a slice of `buf`.
pub struct Records {
    buf: Bytes,
    offset: usize,
    failed: bool,
}

/// The records of a batch in `format`.
pub fn read(format: u32, buf: Bytes) -> Result<Records, RecordsError> {
    if format != FORMAT_V1 {
        return Err(RecordsError::UnknownFormat(format));
    }
    Ok(Records {
        buf,
        offset: 0,
        failed: false,
    })
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Iterator for Records {
    type Item = Result<(Record, Bytes), RecordsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.buf.len() {
            return None;
        }
        let at = self.offset;
        let rest = &self.buf[at..];
        if rest.len() < HEADER_LEN {
            self.failed = true;
            return Some(Err(RecordsError::Truncated { offset: at }));
        }
        let record = Record {
            timestamp_ns: le_u64(rest, 0),
            wire_length: le_u32(rest, 8),
            source_id: le_u32(rest, 16),
            direction: rest[20],
            policy_mask: le_u64(rest, 24),
        };
        let captured = le_u32(rest, 12) as usize;
        if captured > record.wire_length as usize {
            self.failed = true;
            return Some(Err(RecordsError::CapturedBeyondWire { offset: at }));
        }
        let end = HEADER_LEN
            .checked_add(padded(captured))
            .filter(|end| *end <= rest.len());
        let Some(end) = end else {
            self.failed = true;
            return Some(Err(RecordsError::Truncated { offset: at }));
        };
        let data = self.buf.slice(at + HEADER_LEN..at + HEADER_LEN + captured);
        self.offset = at + end;
        Some(Ok((record, data)))
    }
}

/// The `records` field's number in `tapestry.tap.v2.Batch`.
const BATCH_RECORDS_FIELD: u32 = 5;

/// A `tapestry.tap.v2.Batch` as the two pieces of its gRPC message: the
/// length prefix with every field but `records`, then the records block
/// itself, untouched. A sender hands both to HTTP/2 as they are, so the
/// block is not copied into an encoder's buffer on its way out.
/// Protobuf takes fields in any order; `records` comes last.
pub fn grpc_message(mut batch: crate::tap::v2::Batch) -> [Bytes; 2] {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    use prost::Message as _;
    let records = std::mem::take(&mut batch.records);
    let head_len = batch.encoded_len();
    let records_key_len = if records.is_empty() {
        0
    } else {
        key_len(BATCH_RECORDS_FIELD) + encoded_len_varint(records.len() as u64)
    };
    let message_len = head_len + records_key_len + records.len();
    let mut head = BytesMut::with_capacity(5 + head_len + records_key_len);
    // Uncompressed, then the length (gRPC's message framing).
    head.put_u8(0);
    head.put_u32(u32::try_from(message_len).unwrap_or(u32::MAX));
    batch.encode_raw(&mut head);
    if !records.is_empty() {
        encode_key(BATCH_RECORDS_FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(records.len() as u64, &mut head);
    }
    [head.freeze(), records]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> Record {
        Record {
            timestamp_ns: 1_700_000_000_000_000_000 + i,
            wire_length: 1500,
            source_id: i as u32,
            direction: (i % 3) as u8,
            policy_mask: 1 << (i % 64),
        }
    }

    #[test]
    fn records_read_back_as_written_in_place() {
        let mut b = RecordsBuilder::default();
        let payloads: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; i * 7]).collect();
        for (i, p) in payloads.iter().enumerate() {
            b.push(&record(i as u64), p);
        }
        assert_eq!(b.count(), 20);
        let (buf, n) = b.finish();
        assert_eq!(n, 20);
        assert_eq!(buf.len() % 8, 0);
        let base = buf.as_ptr() as usize;
        let read: Vec<_> = read(FORMAT_V1, buf.clone())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(read.len(), 20);
        for (i, (r, data)) in read.iter().enumerate() {
            assert_eq!(*r, record(i as u64));
            assert_eq!(data.as_ref(), payloads[i].as_slice());
            // A slice of the batch, not a copy.
            let at = data.as_ptr() as usize;
            assert!(data.is_empty() || (at >= base && at < base + buf.len()));
        }
    }

    #[test]
    fn a_batch_in_two_pieces_is_the_grpc_message_prost_reads() {
        use prost::Message as _;
        for records in [Bytes::new(), Bytes::from(vec![7u8; 300])] {
            let batch = crate::tap::v2::Batch {
                sequence: 42,
                hello: Some(crate::tap::v1::Hello {
                    node: "node-a".into(),
                    ..Default::default()
                }),
                record_format: FORMAT_V1,
                record_count: 3,
                records: records.clone(),
                dropped_since_last: 5,
                resumed_after: 41,
            };
            let [head, block] = grpc_message(batch.clone());
            assert_eq!(block, records);
            let mut message = head.to_vec();
            message.extend_from_slice(&block);
            assert_eq!(message[0], 0, "not compressed");
            let len = u32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, message.len() - 5);
            assert_eq!(crate::tap::v2::Batch::decode(&message[5..]).unwrap(), batch);
        }
    }

    #[test]
    fn a_wire_length_below_the_captured_bytes_is_raised() {
        let mut b = RecordsBuilder::default();
        let mut r = record(1);
        r.wire_length = 2;
        b.push(&r, &[1, 2, 3, 4]);
        let (buf, _) = b.finish();
        let (r, _) = read(FORMAT_V1, buf).unwrap().next().unwrap().unwrap();
        assert_eq!(r.wire_length, 4);
    }

    #[test]
    fn malformed_batches_end_in_an_error_never_a_panic() {
        let mut b = RecordsBuilder::default();
        b.push(&record(1), &[9; 100]);
        b.push(&record(2), &[8; 10]);
        let (buf, _) = b.finish();
        // Every truncation of a valid batch.
        for cut in 0..buf.len() {
            let r: Vec<_> = read(FORMAT_V1, buf.slice(..cut)).unwrap().collect();
            assert!(r.iter().filter(|x| x.is_err()).count() <= 1);
            if cut != 0 && cut != encoded_len(100) {
                assert!(r.last().unwrap().is_err(), "cut at {cut}");
            }
        }
        // Arbitrary bytes.
        let mut seed = 0x9e3779b97f4a7c15u64;
        for len in 0..400 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            for item in read(FORMAT_V1, Bytes::from(junk)).unwrap() {
                if item.is_err() {
                    break;
                }
            }
        }
        // A huge captured length.
        let mut bad = BytesMut::new();
        bad.put_u64_le(1);
        bad.put_u32_le(u32::MAX);
        bad.put_u32_le(u32::MAX);
        bad.put_bytes(0, 16);
        let r: Vec<_> = read(FORMAT_V1, bad.freeze()).unwrap().collect();
        assert_eq!(r, vec![Err(RecordsError::Truncated { offset: 0 })]);
        assert!(read(2, Bytes::new()).is_err());
    }
}
