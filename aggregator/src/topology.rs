//! Wires sinks and policies together from a [`Config`].
//!
//! ingest ──try_send──► policy queue ─► policy worker (filter → dedup →
//! slice → mask → groups) ──try_send──► sink queues ─► sink tasks.
//! Every arrow is a bounded channel with a drop counter.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::{Config, PolicyConfig};
use crate::event::{Batch, Packet};
use crate::metrics::PolicyStats;
use crate::sinks::{SinkContext, SinkHandle};
use crate::transforms::Pipeline;

/// What ingest needs to reach one policy.
pub struct PolicyInput {
    pub name: String,
    /// Bit of this policy in `Packet::policies`.
    pub bit: u64,
    /// Tap policies it takes; empty = all traffic.
    pub tap_policies: Vec<String>,
    tx: mpsc::Sender<Batch>,
    pub stats: Arc<PolicyStats>,
}

impl PolicyInput {
    /// Offers a batch without waiting; a full queue drops and counts the
    /// packets that were this policy's.
    pub fn offer(&self, b: Batch) {
        if let Err(e) = self.tx.try_send(b) {
            let b = match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            };
            let mine = b.iter().filter(|p| p.policies & self.bit != 0).count();
            self.stats.dropped.add(mine as u64);
        }
    }
}

pub struct Topology {
    pub policies: Arc<Vec<PolicyInput>>,
    pub sinks: Vec<SinkHandle>,
    pub cx: SinkContext,
}

impl Topology {
    pub async fn build(cfg: &Config, cx: SinkContext) -> anyhow::Result<Topology> {
        cfg.validate()?;
        let mut sinks = HashMap::new();
        let mut handles = Vec::new();
        for s in &cfg.sinks {
            let h = s.build(&cx).await?;
            sinks.insert(s.common().name.to_string(), h.clone());
            handles.push(h);
        }
        let mut policies = Vec::new();
        for (i, p) in cfg.policies.iter().enumerate() {
            let stats = Arc::new(PolicyStats::default());
            cx.registry
                .policies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((p.name.clone(), stats.clone()));
            let (tx, rx) = mpsc::channel(p.queue);
            let worker = PolicyWorker::new(p, 1u64 << i, &sinks, stats.clone())?;
            std::thread::Builder::new()
                .name(format!("policy-{}", p.name))
                .spawn(move || worker.run(rx))?;
            policies.push(PolicyInput {
                name: p.name.clone(),
                bit: 1u64 << i,
                tap_policies: p.tap_policies.clone(),
                tx,
                stats,
            });
        }
        Ok(Topology {
            policies: Arc::new(policies),
            sinks: handles,
            cx,
        })
    }
}

/// Runs one policy's transforms on a thread of its own: the work is CPU
/// bound, and dedup needs one ordered view of every tap's packets.
struct PolicyWorker {
    name: Arc<str>,
    bit: u64,
    pipeline: Pipeline,
    sinks: Vec<SinkHandle>,
    groups: Vec<Vec<SinkHandle>>,
    stats: Arc<PolicyStats>,
}

impl PolicyWorker {
    fn new(
        p: &PolicyConfig,
        bit: u64,
        sinks: &HashMap<String, SinkHandle>,
        stats: Arc<PolicyStats>,
    ) -> anyhow::Result<Self> {
        let get = |n: &String| {
            sinks
                .get(n)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("unknown sink {n:?}"))
        };
        Ok(PolicyWorker {
            name: p.name.as_str().into(),
            bit,
            pipeline: p
                .pipeline()
                .build(crate::bpf::LINKTYPE_ETHERNET, !p.groups.is_empty())
                .map_err(|e| anyhow::anyhow!("policy {:?}: filter: {}", p.name, e.message))?,
            sinks: p.sinks.iter().map(get).collect::<Result<_, _>>()?,
            groups: p
                .groups
                .iter()
                .map(|g| g.members.iter().map(get).collect::<Result<Vec<_>, _>>())
                .collect::<Result<_, _>>()?,
            stats,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        let mut dups_seen = 0;
        while let Some(batch) = rx.blocking_recv() {
            let mut all = Vec::with_capacity(batch.len());
            let mut members: Vec<Vec<Vec<Packet>>> = self
                .groups
                .iter()
                .map(|g| vec![Vec::new(); g.len()])
                .collect();
            let mut received = 0;
            let mut matched = 0;
            let mut bytes = 0;
            for p in batch.iter() {
                if p.policies & self.bit == 0 {
                    continue;
                }
                received += 1;
                let Some(v) = self.pipeline.process(&p.data, p.wire_len, p.ts_ns) else {
                    continue;
                };
                matched += 1;
                let data = match v.mask {
                    Some(_) => Bytes::from(crate::transforms::apply(&p.data, &v)),
                    None => p.data.slice(..v.keep),
                };
                bytes += data.len() as u64;
                let out = Packet {
                    data,
                    policy: self.name.clone(),
                    ..p.clone()
                };
                if !self.groups.is_empty() {
                    let h = v.layers.map(|l| l.symmetric_flow_hash()).unwrap_or(0);
                    for (g, m) in self.groups.iter().zip(members.iter_mut()) {
                        m[(h % g.len() as u64) as usize].push(out.clone());
                    }
                }
                all.push(out);
            }
            self.stats.received.add(received);
            let dups = self.pipeline.dedup_stats().map_or(0, |s| s.duplicates);
            self.stats.duplicates.add(dups - dups_seen);
            self.stats.matched.add(matched + (dups - dups_seen));
            dups_seen = dups;
            if all.is_empty() {
                continue;
            }
            self.stats.delivered.add(all.len() as u64);
            self.stats.bytes.add(bytes);
            let all: Batch = Arc::new(all);
            for s in &self.sinks {
                s.offer(all.clone());
            }
            for (g, m) in self.groups.iter().zip(members) {
                for (sink, part) in g.iter().zip(m) {
                    if !part.is_empty() {
                        sink.offer(Arc::new(part));
                    }
                }
            }
        }
    }
}
