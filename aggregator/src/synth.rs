//! A deterministic synthetic traffic mix, for tests, the benchmark and
//! synthetic taps: IPv4/IPv6, TCP with assorted flags, UDP, ICMP, VLAN
//! tags, ARP, fragments, across a few hosts, nets and ports.

use std::io::{self, Write};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One generated frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub ts_ns: u64,
    pub data: Vec<u8>,
}

pub struct Mix {
    rng: SmallRng,
    ts_ns: u64,
    pub(crate) flows: Vec<Flow>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Flow {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    vlan: Option<u16>,
}

const PORTS: [u16; 10] = [80, 443, 53, 22, 8080, 5432, 6379, 9000, 1514, 3000];

impl Mix {
    pub fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let flows = (0..256)
            .map(|_| {
                let v6 = rng.random_ratio(1, 5);
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                if v6 {
                    src[..2].copy_from_slice(&[0xfd, 0x00]);
                    dst[..2].copy_from_slice(&[0xfd, 0x00]);
                    src[15] = rng.random_range(1..20);
                    dst[15] = rng.random_range(1..20);
                    src[7] = rng.random_range(0..3);
                    dst[7] = rng.random_range(0..3);
                } else {
                    src[..4].copy_from_slice(&[
                        10,
                        rng.random_range(0..3),
                        rng.random_range(0..4),
                        rng.random_range(1..20),
                    ]);
                    dst[..4].copy_from_slice(&[
                        10,
                        rng.random_range(0..3),
                        rng.random_range(0..4),
                        rng.random_range(1..20),
                    ]);
                }
                let proto = match rng.random_range(0..10) {
                    0..=5 => 6,
                    6..=8 => 17,
                    _ => {
                        if v6 {
                            58
                        } else {
                            1
                        }
                    }
                };
                Flow {
                    v6,
                    src,
                    dst,
                    sport: rng.random_range(1024..65535),
                    dport: PORTS[rng.random_range(0..PORTS.len())],
                    proto,
                    vlan: rng.random_ratio(1, 8).then(|| rng.random_range(1..5)),
                }
            })
            .collect();
        Mix {
            rng,
            ts_ns: 1_700_000_000_000_000_000,
            flows,
        }
    }

    /// The next frame. Timestamps advance in whole microseconds so classic
    /// pcap files hold them exactly.
    pub fn next_frame(&mut self) -> Frame {
        self.ts_ns += self.rng.random_range(1..50) * 1_000;
        let data = match self.rng.random_range(0..100) {
            0 => arp(&mut self.rng),
            _ => {
                let f = self.flows[self.rng.random_range(0..self.flows.len())];
                // Half the packets go the other way.
                let f = if self.rng.random() { f } else { f.reversed() };
                self.frame(&f)
            }
        };
        Frame {
            ts_ns: self.ts_ns,
            data,
        }
    }

    fn frame(&mut self, f: &Flow) -> Vec<u8> {
        let rng = &mut self.rng;
        let plen = match rng.random_range(0..4) {
            0 => 0,
            1 => rng.random_range(1..64),
            2 => rng.random_range(64..600),
            _ => rng.random_range(600..1400),
        };
        let mut l4 = Vec::with_capacity(plen + 20);
        match f.proto {
            6 => {
                l4.extend_from_slice(&f.sport.to_be_bytes());
                l4.extend_from_slice(&f.dport.to_be_bytes());
                l4.extend_from_slice(&rng.random::<u32>().to_be_bytes());
                l4.extend_from_slice(&rng.random::<u32>().to_be_bytes());
                l4.push(0x50);
                let flags = [0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x10, 0x18, 0x29]
                    [rng.random_range(0..10)];
                l4.push(flags);
                l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
            }
            17 => {
                l4.extend_from_slice(&f.sport.to_be_bytes());
                l4.extend_from_slice(&f.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + plen) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            _ => {
                let t = if f.v6 {
                    [128u8, 129][rng.random_range(0..2)]
                } else {
                    [8u8, 0][rng.random_range(0..2)]
                };
                l4.extend_from_slice(&[t, 0, 0, 0]);
                l4.extend_from_slice(&rng.random::<u32>().to_be_bytes());
            }
        }
        let start = l4.len();
        l4.resize(start + plen, 0);
        rng.fill(&mut l4[start..]);
        let mut p = Vec::with_capacity(l4.len() + 60);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, f.dst[3]]);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, f.src[3]]);
        if let Some(v) = f.vlan {
            p.extend_from_slice(&[0x81, 0x00]);
            p.extend_from_slice(&v.to_be_bytes());
        }
        if f.v6 {
            p.extend_from_slice(&[0x86, 0xdd]);
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.push(f.proto);
            p.push(64);
            p.extend_from_slice(&f.src);
            p.extend_from_slice(&f.dst);
        } else {
            p.extend_from_slice(&[0x08, 0x00]);
            // One in fifty IPv4 packets is a non-first fragment.
            let frag: u16 = if rng.random_ratio(1, 50) {
                0x00b9
            } else {
                0x4000
            };
            let ip_start = p.len();
            p.push(0x45);
            p.push(0);
            p.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            p.extend_from_slice(&rng.random::<u16>().to_be_bytes());
            p.extend_from_slice(&frag.to_be_bytes());
            p.push(rng.random_range(30..=64));
            p.push(f.proto);
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(&f.src[..4]);
            p.extend_from_slice(&f.dst[..4]);
            let c = ipv4_checksum(&p[ip_start..ip_start + 20]);
            p[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        }
        p.extend_from_slice(&l4);
        p
    }
}

impl Flow {
    fn reversed(self) -> Flow {
        Flow {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..self
        }
    }
}

fn arp(rng: &mut SmallRng) -> Vec<u8> {
    let mut p = vec![0xff; 6];
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 10, 0, 0, rng.random_range(1..20)]);
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, rng.random_range(1..20)]);
    p
}

pub fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in h.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes frames as a classic pcap file (microsecond timestamps,
/// Ethernet). `snaplen` truncates the stored bytes like a capture would.
pub fn write_pcap<W: Write>(
    mut w: W,
    frames: impl IntoIterator<Item = Frame>,
    snaplen: u32,
) -> io::Result<W> {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    h[16..20].copy_from_slice(&snaplen.to_le_bytes());
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    w.write_all(&h)?;
    let mut rec = Vec::with_capacity(2048);
    for f in frames {
        rec.clear();
        let cap = f.data.len().min(snaplen as usize);
        crate::capture::pcap_stream_record(&mut rec, f.ts_ns, f.data.len() as u32, &f.data[..cap]);
        w.write_all(&rec)?;
    }
    Ok(w)
}

/// `n` frames of the mix.
pub fn frames(seed: u64, n: usize) -> Vec<Frame> {
    let mut m = Mix::new(seed);
    (0..n).map(|_| m.next_frame()).collect()
}
