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
            SinkConfig::PcapOverIp(cfg) => cfg.build(cx, rx, stats.clone(), stop.clone()).await?,
            SinkConfig::Http(cfg) => cfg.build(cx, rx, stats.clone(), stop.clone()).await?,
            SinkConfig::PcapngFile(cfg) => {
                cfg.build(rx, tx.clone(), stats.clone(), stop.clone())?
            }
            SinkConfig::Grpc(cfg) => cfg.build(cx, rx, stats.clone(), stop.clone()).await?,
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
            drains: started.drains,
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
    /// Tasks that end by themselves once every sender has let go of the
    /// queue and what it held is delivered (or at the stop token).
    pub drains: Vec<JoinHandle<()>>,
}

/// A sink that runs until [`RunningSink::stop`].
pub struct RunningSink {
    pub handle: SinkHandle,
    /// Where it listens (PCAP-over-IP).
    pub address: Option<SocketAddr>,
    stop: CancellationToken,
    holders: Vec<JoinHandle<()>>,
    drains: Vec<JoinHandle<()>>,
}

/// How long a stopped file sink may take to write out what it holds.
const FILE_SINK_FINISH: std::time::Duration = std::time::Duration::from_secs(5);

impl RunningSink {
    /// Ends the sink: its clients are disconnected and its listener is
    /// closed when this returns. Packets still queued for a network sink
    /// are dropped; a file sink writes out its queue and closes its file
    /// once the last policy lets go of it.
    pub async fn stop(self, cx: &SinkContext) {
        self.end(cx, std::time::Duration::ZERO).await
    }

    /// Ends the sink once what its queue holds is delivered (waiting at
    /// most `within`), then as [`RunningSink::stop`]. Policies must have
    /// let go of its queue.
    pub async fn drain(self, cx: &SinkContext, within: std::time::Duration) {
        self.end(cx, within).await
    }

    async fn end(self, cx: &SinkContext, within: std::time::Duration) {
        let RunningSink {
            handle: SinkHandle { name, tx, stats },
            stop,
            holders,
            mut drains,
            ..
        } = self;
        // Its own sender goes first, so the queue closes once policies
        // have let go too.
        drop(tx);
        if !within.is_zero() {
            let all = futures::future::join_all(drains.iter_mut());
            if tokio::time::timeout(within, all).await.is_err() {
                tracing::warn!(sink = %name, "not drained within {within:?}; stopping it anyway");
            }
        }
        stop.cancel();
        // Only remove the lookups that still point at this sink.
        cx.http_hubs
            .remove_if(&*name, |_, s| Arc::ptr_eq(&s.hub.stats, &stats));
        cx.grpc_hubs
            .remove_if(&*name, |_, h| Arc::ptr_eq(&h.hub.stats, &stats));
        for h in holders {
            let _ = h.await;
        }
        // A stopped file sink still writes out its queue; a drained one had
        // its time already.
        if within.is_zero() {
            let finished =
                futures::future::join_all(drains.iter_mut().filter(|d| !d.is_finished()));
            if tokio::time::timeout(FILE_SINK_FINISH, finished)
                .await
                .is_err()
            {
                tracing::warn!(sink = %name, "still writing out after {FILE_SINK_FINISH:?}; left to finish on its own");
            }
        }
        cx.registry.unregister_sink(&name);
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

/// A tool's bearer token. Its Debug form never shows it.
#[derive(Clone, PartialEq)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A token from its text (surrounding whitespace is not part of it).
    pub fn new(text: &str) -> Result<Token, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("the token is empty".into());
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token is printable ASCII without spaces".into());
        }
        Ok(Token(t.into()))
    }

    /// The token in `path` (`field` names the setting, for the error).
    pub fn read(field: &str, path: &std::path::Path) -> anyhow::Result<Token> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{field}: {}: {e}", path.display()))?;
        Token::new(&text).map_err(|e| anyhow::anyhow!("{field}: {}: {e}", path.display()))
    }

    /// A sink's token: given, from its file, or from its Secret (read
    /// through the cluster client when the sink starts).
    pub async fn resolve(
        given: Option<&Token>,
        file: Option<&std::path::Path>,
        secret: Option<&SecretRef>,
        cx: &SinkContext,
    ) -> anyhow::Result<Option<Token>> {
        if let Some(t) = given {
            return Ok(Some(t.clone()));
        }
        if let Some(path) = file {
            return Token::read("token_file", path).map(Some);
        }
        let Some(secret) = secret else {
            return Ok(None);
        };
        let client = cx.client.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "tokenSecret {}: secrets are read only in cluster mode",
                secret.name
            )
        })?;
        secret.read(client).await.map(Some)
    }
}

impl SecretRef {
    /// The token the Secret holds now.
    async fn read(&self, client: kube::Client) -> anyhow::Result<Token> {
        let at = format!("tokenSecret {}/{}", client.default_namespace(), self.name);
        let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::default_namespaced(client);
        let found = api
            .get_opt(&self.name)
            .await
            .map_err(|e| anyhow::anyhow!("{at}: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("{at}: no such Secret"))?;
        let data = found
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .ok_or_else(|| anyhow::anyhow!("{at}: no `token` key in it"))?;
        let text = std::str::from_utf8(&data.0)
            .map_err(|_| anyhow::anyhow!("{at}: the token is not text"))?;
        Token::new(text).map_err(|e| anyhow::anyhow!("{at}: {e}"))
    }
}

/// How often a tool's token Secret is read again: a rotated token takes
/// over, and the old one stops working, within this long.
const TOKEN_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// Who may read a tool's stream, as it stands now: no token (loopback
/// only), a token, or none that can be had (its Secret is gone or
/// unreadable: nobody).
#[derive(Clone)]
pub struct ToolAccess(Arc<std::sync::RwLock<Result<Option<Token>, String>>>);

impl ToolAccess {
    /// The sink's token as [`Token::resolve`] finds it at start; one from
    /// a Secret is read again every [`TOKEN_REFRESH`] until `stop`.
    pub async fn start(
        given: Option<&Token>,
        file: Option<&std::path::Path>,
        secret: Option<&SecretRef>,
        cx: &SinkContext,
        stop: &CancellationToken,
    ) -> anyhow::Result<ToolAccess> {
        let access = ToolAccess(Arc::new(std::sync::RwLock::new(Ok(Token::resolve(
            given, file, secret, cx,
        )
        .await?))));
        if let (None, None, Some(secret), Some(client)) = (given, file, secret, &cx.client) {
            let (secret, client, stop) = (secret.clone(), client.clone(), stop.clone());
            let live = access.0.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(TOKEN_REFRESH) => {}
                    }
                    let now = secret
                        .read(client.clone())
                        .await
                        .map(Some)
                        .map_err(|e| format!("{e:#}"));
                    let mut current = live.write().unwrap_or_else(|e| e.into_inner());
                    if *current != now {
                        match &now {
                            Ok(_) => tracing::info!(secret = %secret.name, "tool token changed"),
                            Err(e) => {
                                tracing::warn!(secret = %secret.name, "tool token unavailable, refusing every client: {e}")
                            }
                        }
                        *current = now;
                    }
                }
            });
        }
        Ok(access)
    }

    /// A token (or none) that does not change.
    pub fn fixed(token: Option<Token>) -> ToolAccess {
        ToolAccess(Arc::new(std::sync::RwLock::new(Ok(token))))
    }

    /// What [`admit`] checks against now.
    pub fn current(&self) -> Result<Option<Token>, String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A Secret holding a tool's token (key `token`), in the aggregator's
/// namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct SecretRef {
    pub name: String,
}

/// Whether a client may read a tool's stream: with a token, only clients
/// presenting it (`Authorization: Bearer TOKEN`); without one, only
/// loopback clients (a client's other addresses can be a NAT's, so none
/// of them proves it is on this host). A refusal is counted and logged,
/// and says why.
pub fn admit(
    tool: &str,
    access: &ToolAccess,
    authorization: Option<&str>,
    peer: Option<std::net::IpAddr>,
    stats: &SinkStats,
) -> Result<(), Refusal> {
    let token = match access.current() {
        Ok(token) => token,
        Err(why) => {
            stats.refused_unauthenticated.add(1);
            tracing::warn!(tool, ?peer, "tool client refused: {why}");
            return Err(Refusal::Unauthenticated(format!(
                "tool {tool:?} has no token to check yours against: {why}"
            )));
        }
    };
    match token {
        Some(token) => {
            let presented = authorization
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .unwrap_or("");
            if tapestry_apimachinery::tokens::constant_time_eq(
                presented.as_bytes(),
                token.0.as_bytes(),
            ) {
                return Ok(());
            }
            stats.refused_unauthenticated.add(1);
            tracing::warn!(tool, ?peer, "tool client refused: no valid bearer token");
            Err(Refusal::Unauthenticated(format!(
                "tool {tool:?} needs its bearer token (Authorization: Bearer TOKEN)"
            )))
        }
        None if peer.is_some_and(|p| p.to_canonical().is_loopback()) => Ok(()),
        None => {
            stats.refused_not_allowed.add(1);
            tracing::warn!(
                tool,
                ?peer,
                "tool client refused: the tool has no token, so only loopback clients are served"
            );
            Err(Refusal::NotAllowed(format!(
                "tool {tool:?} has no token: only loopback clients are served"
            )))
        }
    }
}

/// Why a tool's client was turned away.
#[derive(Debug)]
pub enum Refusal {
    /// No token, or the wrong one.
    Unauthenticated(String),
    /// The tool has no token and the client is not local.
    NotAllowed(String),
}

/// Shared state sinks register into while they are built.
#[derive(Default, Clone)]
pub struct SinkContext {
    pub registry: Arc<Registry>,
    /// HTTP stream sinks by name, served under `/v1/tools/NAME/pcap`.
    pub http_hubs: Arc<DashMap<String, http::config::HttpStream>>,
    /// gRPC subscribe sinks by name.
    pub grpc_hubs: grpc::service::Hubs,
    /// The cluster (cluster mode): where tools' token Secrets are read.
    pub client: Option<kube::Client>,
    /// The aggregator's TLS, for sinks that offer it (PCAP-over-IP).
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
pub struct Subscription<T: Clone> {
    pub rx: ClientRx<T>,
    /// Packets this client lost because its queue was full.
    pub dropped: Arc<AtomicU64>,
}

/// A client's queue. Dropping it (the client went away) makes the hub
/// forget the client at once, packets flowing or not.
pub struct ClientRx<T: Clone> {
    rx: mpsc::Receiver<T>,
    hub: std::sync::Weak<Hub<T>>,
}

impl<T: Clone> ClientRx<T> {
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await
    }
}

impl<T: Clone> futures::Stream for ClientRx<T> {
    type Item = T;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.rx.poll_recv(cx)
    }
}

impl<T: Clone> Drop for ClientRx<T> {
    fn drop(&mut self) {
        self.rx.close();
        if let Some(hub) = self.hub.upgrade() {
            hub.prune();
        }
    }
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
    pub fn subscribe(self: &Arc<Self>) -> Result<Subscription<T>, TooManyClients> {
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
        Ok(Subscription {
            rx: ClientRx {
                rx,
                hub: Arc::downgrade(self),
            },
            dropped,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_clients_need_the_token_or_to_be_local() {
        let stats = SinkStats::default();
        let local = Some(std::net::IpAddr::from([127, 0, 0, 1]));
        let remote = Some(std::net::IpAddr::from([10, 0, 0, 7]));
        // No token: this host only.
        assert!(admit("t", &ToolAccess::fixed(None), None, local, &stats).is_ok());
        assert!(matches!(
            admit(
                "t",
                &ToolAccess::fixed(None),
                Some("Bearer x"),
                remote,
                &stats
            ),
            Err(Refusal::NotAllowed(_))
        ));
        assert_eq!(stats.refused_not_allowed.get(), 1);
        // A token: wherever from, only with it.
        let token = Token::new(" abc123\n").unwrap();
        let with_token = ToolAccess::fixed(Some(token.clone()));
        assert!(admit("t", &with_token, Some("Bearer abc123"), remote, &stats).is_ok());
        for wrong in [None, Some("Bearer abc12"), Some("abc123"), Some("Bearer ")] {
            assert!(matches!(
                admit("t", &with_token, wrong, local, &stats),
                Err(Refusal::Unauthenticated(_))
            ));
        }
        assert_eq!(stats.refused_unauthenticated.get(), 4);
        assert!(Token::new("  \n").is_err());
        assert!(Token::new("two words").is_err());
        assert_eq!(format!("{token:?}"), "Token(..)");
    }
}
