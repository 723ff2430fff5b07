//! Reads the ring buffer (tokio `AsyncFd`), turns records into packets and
//! batches them into the bounded send queue. A full queue drops the batch
//! and counts it: the kernel side must never wait for the aggregator.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tapestry_proto::records::{Record, RecordsBuilder};
use tapestry_proto::tap::v1::Direction;
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};
use tracing::{debug, warn};

use crate::{
    abi,
    metrics::{BitTally, Metrics},
    DropCounter,
};

/// A batch on its way to the aggregator: its packets packed as they came
/// off the ring (one copy), and how many matched each policy.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: RecordsBuilder,
    pub tally: BitTally,
}

impl Batch {
    pub fn packets(&self) -> u64 {
        u64::from(self.records.count())
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_packets: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// Converts the kernel's CLOCK_BOOTTIME stamps to Unix time.
struct Clock {
    offset_ns: i128,
    refreshed: Instant,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    fn new() -> Self {
        let mut c = Clock {
            offset_ns: 0,
            refreshed: Instant::now(),
        };
        c.refresh();
        c
    }
    fn refresh(&mut self) {
        self.offset_ns = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME);
        self.refreshed = Instant::now();
    }
    fn to_unix(&self, boot_ns: u64) -> u64 {
        (boot_ns as i128 + self.offset_ns).max(0) as u64
    }
}

pub struct Reader {
    pub ring: RingBuf<MapData>,
    pub queue: mpsc::Sender<Batch>,
    pub limits: BatchLimits,
    pub metrics: Arc<Metrics>,
    pub drops: Arc<DropCounter>,
}

impl Reader {
    /// Runs until `stop` turns true, then drains the ring once more and
    /// flushes (the programs are detached before that).
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let Reader {
            ring,
            queue,
            limits,
            metrics,
            drops,
        } = self;
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd
        // owns the RingBuf, and always reports that same fd.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        let mut clock = Clock::new();
        let mut batch = Batch::default();
        let mut started = Instant::now();
        // The kernel wakes us only past a fill level; this tick bounds latency.
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        metrics.reader_alive.store(true, Relaxed);
        let mut flush = |batch: &mut Batch, started: &mut Instant| {
            if batch.is_empty() {
                return;
            }
            // The next batch is likely the size of this one: allocating that
            // much avoids both regrowth under load and a full-size buffer for
            // every trickle batch.
            let expected = batch
                .records
                .encoded_bytes()
                .clamp(4096, limits.max_bytes + 4096);
            let b = std::mem::replace(
                batch,
                Batch {
                    records: RecordsBuilder::with_capacity(expected),
                    tally: BitTally::default(),
                },
            );
            let n = b.packets();
            metrics.policy.add_seen(&b.tally);
            match queue.try_send(b) {
                Ok(()) => {
                    metrics.queue_batches.fetch_add(1, Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b)) => {
                    metrics.policy.add_dropped(&b.tally);
                    metrics.queue_dropped_packets.fetch_add(n, Relaxed);
                    drops.add(n);
                }
            }
            *started = Instant::now();
        };
        loop {
            let stopping = tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    drain(guard.get_inner_mut(), &clock, &mut batch, &mut started, &limits, &metrics, &mut flush);
                    guard.clear_ready();
                    false
                }
                _ = tick.tick() => {
                    drain(ring.get_mut(), &clock, &mut batch, &mut started, &limits, &metrics, &mut flush);
                    false
                }
                _ = stop.changed() => true,
            };
            if stopping || *stop.borrow() {
                drain(
                    ring.get_mut(),
                    &clock,
                    &mut batch,
                    &mut started,
                    &limits,
                    &metrics,
                    &mut flush,
                );
                flush(&mut batch, &mut started);
                debug!("ring reader stopped");
                metrics.reader_alive.store(false, Relaxed);
                return Ok(());
            }
            if started.elapsed() >= limits.max_age {
                flush(&mut batch, &mut started);
            }
            if clock.refreshed.elapsed() > Duration::from_secs(1) {
                clock.refresh();
            }
        }
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    clock: &Clock,
    batch: &mut Batch,
    started: &mut Instant,
    limits: &BatchLimits,
    metrics: &Metrics,
    flush: &mut impl FnMut(&mut Batch, &mut Instant),
) {
    // Counted once per drain: an atomic add per record costs as much as
    // the rest of the record's bookkeeping.
    let mut records = 0u64;
    // Bounded so one busy ring cannot starve the runtime.
    for _ in 0..65536 {
        let Some(item) = ring.next() else { break };
        records += 1;
        match abi::parse_record(&item) {
            Ok((h, data)) => {
                if batch.is_empty() {
                    *started = Instant::now();
                }
                let direction = if h.direction == abi::DIR_INGRESS {
                    Direction::Ingress
                } else {
                    Direction::Egress
                };
                batch.records.push(
                    &Record {
                        timestamp_ns: clock.to_unix(h.ts_boot_ns),
                        wire_length: h.wire_len,
                        source_id: h.ifindex,
                        direction: direction as u8,
                        policy_mask: h.policy_mask,
                    },
                    data,
                );
                batch.tally.add(h.policy_mask);
            }
            Err(e) => {
                if metrics.ring_malformed.fetch_add(1, Relaxed) < 10 {
                    warn!("skipping a malformed ring record: {e}");
                }
            }
        }
        drop(item);
        if batch.records.count() as usize >= limits.max_packets
            || batch.records.captured_bytes() >= limits.max_bytes
        {
            flush(batch, started);
        }
    }
    metrics.ring_records.fetch_add(records, Relaxed);
}
