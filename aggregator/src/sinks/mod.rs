//! Sinks: where a policy's packets leave for security tools.
//!
//! Each sink is a config struct (one variant of [`SinkConfig`]) that builds
//! a running task fed by its own bounded queue. Policies hand batches over
//! with `try_send`; a full queue drops the batch and counts it, so a slow
//! tool never slows ingest or the other sinks. Sinks with several clients
//! (PCAP-over-IP, HTTP, gRPC) give every client its own bounded queue
//! through a [`Hub`], so one stalled client only loses its own packets.
//!
//! A built sink is a [`RunningSink`]: the handle policies send to, plus a
//! stop token. Stopping one sink cancels only its own tasks and waits for
//! the ones that hold a bound socket, so a replacement can bind the same
//! address at once; other sinks and their clients never notice.

pub mod grpc;
pub mod http;
pub mod pcap_over_ip;
pub mod pcapng_file;
pub mod vxlan;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::event::Batch;
use crate::metrics::{Registry, SinkStats};

pub fn default_queue() -> usize {
    1024
}

pub fn default_client_queue() -> usize {
    256
}

/// Clients one sink serves at once; more are refused (and counted).
pub fn default_max_clients() -> usize {
    64
}

pub fn default_snaplen() -> u32 {
    262_144
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    PcapOverIp(pcap_over_ip::config::PcapOverIpConfig),
    Http(http::config::HttpConfig),
    PcapngFile(pcapng_file::config::PcapngFileConfig),
    Grpc(grpc::config::GrpcConfig),
    Vxlan(vxlan::config::VxlanConfig),
}

/// Fields every sink has.
pub struct Common<'a> {
    pub name: &'a str,
    pub queue: usize,
}

impl SinkConfig {
    pub fn common(&self) -> Common<'_> {
        match self {
            SinkConfig::PcapOverIp(c) => Common {
                name: &c.name,
                queue: c.queue,
            },
            SinkConfig::Http(c) => Common {
                name: &c.name,
                queue: c.queue,
            },
            SinkConfig::PcapngFile(c) => Common {
                name: &c.name,
                queue: c.queue,
            },
            SinkConfig::Grpc(c) => Common {
                name: &c.name,
                queue: c.queue,
            },
            SinkConfig::Vxlan(c) => Common {
                name: &c.name,
                queue: c.queue,
            },
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::PcapOverIp(_) => "pcap_over_ip",
            SinkConfig::Http(_) => "http",
            SinkConfig::PcapngFile(_) => "pcapng_file",
            SinkConfig::Grpc(_) => "grpc",
            SinkConfig::Vxlan(_) => "vxlan",
        }
    }

    /// Checks values serde cannot; the error starts with the field name.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            SinkConfig::PcapOverIp(c) => c.validate(),
            SinkConfig::Http(c) => c.validate(),
            SinkConfig::PcapngFile(c) => c.validate(),
            SinkConfig::Grpc(c) => c.validate(),
            SinkConfig::Vxlan(c) => c.validate(),
        }
    }

    /// Starts the sink: its tasks, its queue, its metrics.
    pub async fn build(&self, cx: &SinkContext) -> anyhow::Result<RunningSink> {
        let c = self.common();
        let stats = Arc::new(SinkStats::default());
        let (tx, rx) = mpsc::channel(c.queue);
        let stop = CancellationToken::new();
        let started = match self {
            SinkConfig::PcapOverIp(cfg) => cfg.build(rx, stats.clone(), stop.clone()).await?,
            SinkConfig::Http(cfg) => cfg.build(cx, rx, stats.clone(), stop.clone()),
            SinkConfig::PcapngFile(cfg) => {
                cfg.build(rx, tx.clone(), stats.clone(), stop.clone())?
            }
            SinkConfig::Grpc(cfg) => cfg.build(cx, rx, stats.clone(), stop.clone()),
            SinkConfig::Vxlan(cfg) => cfg.build(rx, stats.clone(), stop.clone()).await?,
        };
        cx.registry
            .register_sink(c.name, self.type_name(), stats.clone());
        Ok(RunningSink {
            handle: SinkHandle {
                name: c.name.into(),
                tx,
                stats,
            },
            address: started.address,
            stop,
            holders: started.holders,
        })
    }
}

/// What a sink's build leaves running besides its queue.
#[derive(Default)]
pub struct Started {
    /// The address it listens on, if it listens.
    pub address: Option<SocketAddr>,
    /// Tasks holding a bound socket; stopping waits for them.
    pub holders: Vec<JoinHandle<()>>,
}

/// A sink that runs until [`RunningSink::stop`].
pub struct RunningSink {
    pub handle: SinkHandle,
    /// Where it listens (PCAP-over-IP).
    pub address: Option<SocketAddr>,
    stop: CancellationToken,
    holders: Vec<JoinHandle<()>>,
}

impl RunningSink {
    /// Ends the sink: its clients are disconnected and its listener is
    /// closed when this returns. Packets still queued for it are dropped;
    /// a file sink closes its file once the last policy lets go of it.
    pub async fn stop(self, cx: &SinkContext) {
        let name = &*self.handle.name;
        self.stop.cancel();
        // Only remove the lookups that still point at this sink.
        let stats = &self.handle.stats;
        cx.http_hubs
            .remove_if(name, |_, s| Arc::ptr_eq(&s.hub.stats, stats));
        cx.grpc_hubs
            .remove_if(name, |_, h| Arc::ptr_eq(&h.stats, stats));
        for h in self.holders {
            let _ = h.await;
        }
        cx.registry.unregister_sink(name);
    }
}

/// The captured bytes a tool with `snaplen` receives of `data`.
#[inline]
pub fn snap(data: &[u8], snaplen: u32) -> &[u8] {
    &data[..data.len().min(snaplen as usize)]
}

pub fn check_addr(field: &str, v: &str) -> Result<(), String> {
    v.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|e| format!("{field}: {v:?} is not an address:port ({e})"))
}

/// Shared state sinks register into while they are built.
#[derive(Default, Clone)]
pub struct SinkContext {
    pub registry: Arc<Registry>,
    /// HTTP stream sinks by name, served under `/v1/tools/NAME/pcap`.
    pub http_hubs: Arc<DashMap<String, http::config::HttpStream>>,
    /// gRPC subscribe sinks by name.
    pub grpc_hubs: Arc<DashMap<String, Arc<Hub<Arc<tapestry_proto::tool::v1::ToolBatch>>>>>,
}

/// What policies hold to feed a sink.
#[derive(Clone)]
pub struct SinkHandle {
    pub name: Arc<str>,
    tx: mpsc::Sender<Batch>,
    pub stats: Arc<SinkStats>,
}

impl SinkHandle {
    /// Hands a batch over without waiting; a full (or closed) queue drops
    /// it and counts its packets. Returns whether the queue took it.
    #[inline]
    pub fn offer(&self, b: Batch) -> bool {
        match self.tx.try_send(b) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b)) => {
                self.stats.dropped.add(b.len() as u64);
                false
            }
        }
    }
}

/// Fan-out to any number of clients, each with its own bounded queue.
pub struct Hub<T> {
    clients: Mutex<Vec<HubClient<T>>>,
    pub stats: Arc<SinkStats>,
    client_queue: usize,
    max_clients: usize,
}

/// A client a [`Hub`] turned away: it already serves `max` clients.
#[derive(Debug)]
pub struct TooManyClients {
    pub max: usize,
}

impl std::fmt::Display for TooManyClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the sink already serves its maximum of {} clients",
            self.max
        )
    }
}

struct HubClient<T> {
    tx: mpsc::Sender<T>,
    dropped: Arc<AtomicU64>,
}

/// A client's end of a hub.
pub struct Subscription<T> {
    pub rx: mpsc::Receiver<T>,
    /// Packets this client lost because its queue was full.
    pub dropped: Arc<AtomicU64>,
}

impl<T: Clone> Hub<T> {
    pub fn new(stats: Arc<SinkStats>, client_queue: usize, max_clients: usize) -> Self {
        Hub {
            clients: Mutex::new(Vec::new()),
            stats,
            client_queue: client_queue.max(1),
            max_clients,
        }
    }

    /// A new client's end, unless the hub is full (counted as a refusal).
    pub fn subscribe(&self) -> Result<Subscription<T>, TooManyClients> {
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        self.forget_gone(&mut c);
        if c.len() >= self.max_clients {
            self.stats.refused_too_many.add(1);
            return Err(TooManyClients {
                max: self.max_clients,
            });
        }
        let (tx, rx) = mpsc::channel(self.client_queue);
        let dropped = Arc::new(AtomicU64::new(0));
        c.push(HubClient {
            tx,
            dropped: dropped.clone(),
        });
        self.stats.clients.store(c.len() as u64, Relaxed);
        Ok(Subscription { rx, dropped })
    }

    /// Forget the clients that went away (their ends were dropped).
    pub fn prune(&self) {
        self.forget_gone(&mut self.clients.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn forget_gone(&self, clients: &mut Vec<HubClient<T>>) {
        clients.retain(|cl| !cl.tx.is_closed());
        self.stats.clients.store(clients.len() as u64, Relaxed);
    }

    /// Offers `item` (carrying `packets` packets) to every client; returns
    /// how many clients took it. Clients that went away are forgotten.
    pub fn broadcast(&self, item: &T, packets: u64) -> usize {
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken = 0;
        c.retain(|cl| match cl.tx.try_send(item.clone()) {
            Ok(()) => {
                taken += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                cl.dropped.fetch_add(packets, Relaxed);
                self.stats.client_dropped.add(packets);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        self.stats.clients.store(c.len() as u64, Relaxed);
        taken
    }

    pub fn clients(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The next batch for a sink, or None once it is stopped or every sender
/// has let go of its queue.
pub(crate) async fn next_batch(
    rx: &mut mpsc::Receiver<Batch>,
    stop: &CancellationToken,
) -> Option<Batch> {
    tokio::select! {
        _ = stop.cancelled() => None,
        b = rx.recv() => b,
    }
}
