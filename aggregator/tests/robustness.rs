//! Bounded fuzzing of parse → filter → dedup → slice → mask (and the
//! capture-file reader) on random, mutated and truncated packets.
//!
//! Runs for `FUZZ_SECONDS` (default 5) per target with a fixed seed
//! sequence, so CI spends a known time on it. Besides "never panics", the
//! filter target is differential: our evaluator must agree with libpcap's
//! own interpreter (`pcap_offline_filter`) on every input.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tapestry_aggregator::bpf::{Program, RawInsn, BATCH, LINKTYPE_ETHERNET};
use tapestry_aggregator::capture::CaptureFile;
use tapestry_aggregator::parse::Layers;
use tapestry_aggregator::synth;
use tapestry_aggregator::transforms::dedup::DedupConfig;
use tapestry_aggregator::transforms::mask::MaskConfig;
use tapestry_aggregator::transforms::slice::SliceConfig;
use tapestry_aggregator::transforms::{apply, PipelineConfig};

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    Duration::from_secs_f64(secs)
}

/// A packet derived from the mix: mutated, truncated, or pure noise.
fn input(rng: &mut SmallRng, corpus: &[synth::Frame]) -> Vec<u8> {
    match rng.random_range(0..10) {
        0 => {
            let n = rng.random_range(0..200);
            (0..n).map(|_| rng.random()).collect()
        }
        _ => {
            let mut p = corpus[rng.random_range(0..corpus.len())].data.clone();
            for _ in 0..rng.random_range(0..6) {
                if p.is_empty() {
                    break;
                }
                let i = rng.random_range(0..p.len().min(80));
                p[i] = match rng.random_range(0..3) {
                    0 => rng.random(),
                    1 => p[i] ^ (1 << rng.random_range(0..8)),
                    _ => [0x00, 0xff, 0x45, 0x4f, 0x60, 0x81, 0x06, 0x11][rng.random_range(0..8)],
                };
            }
            if rng.random_ratio(1, 2) {
                let cut = rng.random_range(0..=p.len());
                p.truncate(cut);
            }
            p
        }
    }
}

const EXPRS: &[&str] = &[
    "tcp port 80",
    "udp and not vlan",
    "vlan and (tcp[tcpflags] & (tcp-syn|tcp-fin) != 0)",
    "ip6 and tcp portrange 1000-2000",
    "ip[6:2] & 0x1fff != 0 or icmp",
    "net 10.1.0.0/16 and greater 100",
    "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x47455420",
    "ip6 proto 58 or arp",
];

#[test]
fn evaluator_agrees_with_libpcap_and_pipeline_never_panics() {
    let corpus = synth::frames(42, 2_000);
    let mut rng = SmallRng::seed_from_u64(1);
    let ours: Vec<Program> = EXPRS
        .iter()
        .map(|e| Program::compile(e, LINKTYPE_ETHERNET, 65535).unwrap())
        .collect();
    let dead = pcap::Capture::dead(pcap::Linktype(1)).unwrap();
    let theirs: Vec<_> = EXPRS
        .iter()
        .map(|e| dead.compile(e, true).unwrap())
        .collect();
    let mut pipelines: Vec<_> = EXPRS
        .iter()
        .enumerate()
        .map(|(i, e)| {
            PipelineConfig {
                filter: e.to_string(),
                dedup: Some(DedupConfig {
                    window_us: 50,
                    max_entries: 4096,
                }),
                slice: Some(if i % 2 == 0 {
                    SliceConfig::Payload(i)
                } else {
                    SliceConfig::Bytes(i * 7 + 1)
                }),
                mask: Some(MaskConfig {
                    payload_offset: i,
                    byte: 0xaa,
                }),
            }
            .build(LINKTYPE_ETHERNET, true)
            .unwrap()
        })
        .collect();
    let mut runners: Vec<_> = ours.iter().map(|p| p.batch_runner()).collect();
    let deadline = Instant::now() + budget();
    let mut n = 0u64;
    while Instant::now() < deadline {
        // The same inputs in batches, as `aggregator replay` runs them.
        let batch: Vec<Vec<u8>> = (0..BATCH).map(|_| input(&mut rng, &corpus)).collect();
        let slices: Vec<&[u8]> = batch.iter().map(|p| &p[..]).collect();
        let wires: Vec<u32> = batch.iter().map(|p| p.len() as u32).collect();
        let mut keep = [false; BATCH];
        for (i, r) in runners.iter_mut().enumerate() {
            r.run(&slices, &wires, &mut keep);
            for (p, k) in batch.iter().zip(keep) {
                assert_eq!(
                    k,
                    theirs[i].filter(p),
                    "{} in a batch on {:02x?}",
                    EXPRS[i],
                    p
                );
            }
        }
        for _ in 0..1_000 {
            let p = input(&mut rng, &corpus);
            let l = Layers::parse(&p);
            assert!(l.headers_len(p.len()) <= p.len());
            let _ = l.symmetric_flow_hash();
            for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                // `BpfProgram::filter` uses the buffer length as wire length.
                assert_eq!(
                    o.matches(&p, p.len() as u32),
                    t.filter(&p),
                    "{} on {:02x?}",
                    EXPRS[i],
                    p
                );
            }
            for pl in pipelines.iter_mut() {
                let wire = p.len() as u32 + rng.random_range(0..3);
                if let Some(v) = pl.process(&p, wire, n * 10) {
                    assert!(v.keep <= p.len());
                    let out = apply(&p, &v);
                    assert_eq!(out.len(), v.keep);
                }
            }
            n += 1;
        }
    }
    eprintln!("{n} inputs");
}

#[test]
fn random_programs_never_panic() {
    // Random instruction streams: either rejected by validation or run to
    // a return without panicking.
    let mut rng = SmallRng::seed_from_u64(2);
    let corpus = synth::frames(43, 500);
    let codes: Vec<u16> = vec![
        0x00, 0x20, 0x28, 0x30, 0x40, 0x48, 0x50, 0x60, 0x80, 0x01, 0x61, 0x81, 0xb1, 0x02, 0x03,
        0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3c, 0x44, 0x4c, 0x54, 0x5c, 0x64, 0x6c, 0x74,
        0x7c, 0x84, 0x94, 0x9c, 0xa4, 0xac, 0x05, 0x15, 0x1d, 0x25, 0x2d, 0x35, 0x3d, 0x45, 0x4d,
        0x06, 0x0e, 0x16, 0x07, 0x87,
    ];
    let deadline = Instant::now() + budget();
    let (mut loaded, mut rejected) = (0u64, 0u64);
    while Instant::now() < deadline {
        let len = rng.random_range(1..24);
        let raw: Vec<RawInsn> = (0..len)
            .map(|_| RawInsn {
                code: if rng.random_ratio(1, 20) {
                    rng.random()
                } else {
                    codes[rng.random_range(0..codes.len())]
                },
                jt: rng.random_range(0..4),
                jf: rng.random_range(0..4),
                k: if rng.random_ratio(1, 2) {
                    rng.random_range(0..80)
                } else {
                    rng.random()
                },
            })
            .collect();
        match Program::from_raw(&raw) {
            Ok(p) => {
                loaded += 1;
                let pkts: Vec<Vec<u8>> = (0..20).map(|_| input(&mut rng, &corpus)).collect();
                let wires: Vec<u32> = pkts.iter().map(|_| rng.random()).collect();
                for (pkt, &wire) in pkts.iter().zip(&wires) {
                    let _ = p.run(pkt, wire);
                }
                let slices: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
                let mut keep = [false; 20];
                p.batch_runner().run(&slices, &wires, &mut keep);
            }
            Err(_) => rejected += 1,
        }
    }
    assert!(
        loaded > 0 && rejected > 0,
        "loaded {loaded}, rejected {rejected}"
    );
}

#[test]
fn capture_reader_survives_garbage_and_truncation() {
    let mut rng = SmallRng::seed_from_u64(3);
    let frames = synth::frames(44, 200);
    let pcap = synth::write_pcap(Vec::new(), frames, 65535).unwrap();
    let deadline = Instant::now() + budget();
    while Instant::now() < deadline {
        let mut f = pcap.clone();
        f.truncate(rng.random_range(0..=f.len()));
        for _ in 0..rng.random_range(0..4) {
            if f.len() > 24 {
                let i = rng.random_range(24..f.len());
                f[i] = rng.random();
            }
        }
        if let Ok(c) = CaptureFile::from_bytes(&f) {
            let mut n = 0;
            let _ = c.for_each(|_, p| {
                assert!(p.data.len() <= f.len());
                n += 1;
                true
            });
        }
    }
}
