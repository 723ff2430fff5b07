//! `aggregator serve`: gRPC ingest and subscribe, the HTTP endpoints, and
//! the topology between them.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tapestry_proto::tap::v2::tap_ingest_server::TapIngestServer;
use tapestry_proto::tool::v1::tool_subscribe_server::ToolSubscribeServer;
use tokio::net::TcpListener;

use crate::cluster::reconciler::{ClusterHandle, Endpoints, Reconciler};
use crate::cluster::status::{self, StatusWriter};
use crate::config::Config;
use crate::metrics::Registry;
use crate::sinks::grpc::service::SubscribeService;
use crate::sinks::http::config::HttpStream;
use crate::sinks::SinkContext;
use crate::sources::grpc::IngestService;
use crate::topology::Topology;

/// gRPC messages from taps carry whole batches; allow large ones.
const MAX_MESSAGE: usize = 64 << 20;

/// HTTP/2 flow control for the gRPC port: room for several whole batches
/// in flight per stream (acknowledgements bound what a tap sends anyway),
/// and frames as large as a batch usually is.
const INGEST_STREAM_WINDOW: u32 = 8 << 20;
const INGEST_CONNECTION_WINDOW: u32 = 32 << 20;
const INGEST_MAX_FRAME: u32 = 1 << 20;

/// How long stopping may take to deliver what was taken in before it.
pub const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

pub struct ServeOptions {
    pub grpc: String,
    pub http: String,
    pub source: Source,
    /// TLS on the gRPC port, with taps authenticated by client
    /// certificate; `None` serves plaintext and takes any tap's word.
    pub tls: Option<crate::tls::TlsFiles>,
    /// The HTTP port over TLS too, with the same certificate.
    pub http_tls: bool,
}

/// Where tools and policies come from.
pub enum Source {
    /// A fixed set, for the life of the process (`--config`, flags).
    Config(Config),
    /// Tools and policies that come, change and go while running: fed
    /// through [`Running::cluster`] (by the watchers in cluster mode).
    Live(LiveOptions),
}

pub struct LiveOptions {
    pub status: Arc<dyn StatusWriter>,
    /// How often status is written (when it changed).
    pub status_period: std::time::Duration,
    /// See [`Endpoints::advertise_host`].
    pub advertise_host: Option<String>,
    /// Where tools' token Secrets are read (None: tools that name one
    /// fail to start, saying so).
    pub client: Option<kube::Client>,
    /// Where pods run: certified taps' pod identities are checked (None:
    /// taken on the tap's word).
    pub pods: Option<Arc<dyn crate::sources::grpc::PodPlacement>>,
}

/// Where a running aggregator listens.
#[derive(Clone)]
pub struct Running {
    pub registry: Arc<Registry>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Sinks listening at start (PCAP-over-IP), by name.
    pub sinks: Vec<(String, SocketAddr)>,
    /// With [`Source::Live`]: where changes go.
    pub cluster: Option<ClusterHandle>,
    /// Cancelled to stop ingest: every tap stream gets its last
    /// acknowledgement and ends, so no batch is left in doubt.
    pub stop_ingest: tokio_util::sync::CancellationToken,
    /// With [`Source::Config`]: asks the owner of the topology to drain it.
    drain: Option<tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>>,
}

impl Running {
    /// Stop taking in batches: each tap stream ends once what it sent so
    /// far is acknowledged (waiting at most `within`).
    pub async fn stop_ingest(&self, within: std::time::Duration) {
        self.stop_ingest.cancel();
        let deadline = tokio::time::Instant::now() + within;
        while self
            .registry
            .taps
            .iter()
            .any(|t| t.connected.load(std::sync::atomic::Ordering::Relaxed) > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Stops ingest, then delivers everything taken in to the tools and
    /// ends them: pcapng files are written out and closed. In cluster mode
    /// the reconciler does the draining at [`crate::cluster::Change::Stop`].
    pub async fn shutdown(&self, ingest_within: std::time::Duration) {
        self.stop_ingest(ingest_within).await;
        let Some(drain) = &self.drain else {
            return;
        };
        let (done, drained) = tokio::sync::oneshot::channel();
        if drain.send(done).await.is_ok() {
            let _ = drained.await;
        }
    }
}

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    streams: Arc<dashmap::DashMap<String, HttpStream>>,
}

/// Binds everything and spawns the servers; returns once listening.
pub async fn start(opts: ServeOptions) -> anyhow::Result<Running> {
    let registry = Arc::new(Registry::default());
    // Sinks that offer TLS (PCAP-over-IP) use the gRPC port's certificate,
    // speaking their own protocol (no ALPN).
    let tls = opts
        .tls
        .as_ref()
        .map(crate::tls::server_config)
        .transpose()?;
    let sink_tls = tls.as_ref().map(|grpc| {
        let mut config = (**grpc).clone();
        config.alpn_protocols.clear();
        Arc::new(config)
    });
    let cx = SinkContext {
        registry: registry.clone(),
        tls: sink_tls,
        client: match &opts.source {
            Source::Live(live) => live.client.clone(),
            Source::Config(_) => None,
        },
        ..SinkContext::default()
    };
    let topology = match &opts.source {
        Source::Config(cfg) => Topology::from_config(cfg, cx.clone()).await?,
        Source::Live(_) => Topology::new(cx.clone()),
    };
    let grpc_l = TcpListener::bind(&opts.grpc)
        .await
        .map_err(|e| anyhow::anyhow!("--grpc {}: {e}", opts.grpc))?;
    let http_l = TcpListener::bind(&opts.http)
        .await
        .map_err(|e| anyhow::anyhow!("--http {}: {e}", opts.http))?;
    let stop_ingest = tokio_util::sync::CancellationToken::new();
    let mut running = Running {
        registry: registry.clone(),
        grpc: grpc_l.local_addr()?,
        http: http_l.local_addr()?,
        sinks: topology.listening(),
        cluster: None,
        stop_ingest: stop_ingest.clone(),
        drain: None,
    };

    let http_tls = match (&tls, opts.http_tls) {
        (Some(grpc), true) => Some(crate::tls::http_config(grpc)),
        (None, true) => anyhow::bail!("--http-tls needs the gRPC port's TLS certificate"),
        (_, false) => None,
    };
    let ingest = TapIngestServer::new(IngestService {
        policies: topology.ingest_table(),
        registry: registry.clone(),
        stopping: stop_ingest,
        require_certificates: tls.is_some(),
        pods: match &opts.source {
            Source::Live(live) => live.pods.clone(),
            Source::Config(_) => None,
        },
    })
    .max_decoding_message_size(MAX_MESSAGE);
    let subscribe = ToolSubscribeServer::new(SubscribeService {
        hubs: cx.grpc_hubs.clone(),
    })
    .max_encoding_message_size(MAX_MESSAGE);
    // Taps send batches of up to a MiB or more: HTTP/2's default 64 KiB
    // window and 16 KiB frames would make each one a dozen round trips of
    // window updates and sixty-odd frames, paid in wakeups on both sides.
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(INGEST_STREAM_WINDOW)
        .initial_connection_window_size(INGEST_CONNECTION_WINDOW)
        .max_frame_size(INGEST_MAX_FRAME)
        .add_service(ingest)
        .add_service(crate::sources::grpc::RetiredIngest)
        .add_service(subscribe);
    let grpc_registry = registry.clone();
    tokio::spawn(async move {
        let r = match tls {
            Some(config) => {
                router
                    .serve_with_incoming(crate::tls::incoming(
                        grpc_l,
                        config,
                        grpc_registry,
                        crate::tls::Port::Grpc,
                    ))
                    .await
            }
            None => {
                router
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc_l))
                    .await
            }
        };
        if let Err(e) = r {
            tracing::error!("gRPC server: {e}");
        }
    });

    let state = HttpState {
        registry,
        streams: cx.http_hubs.clone(),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/tools/{name}/pcap", get(stream_pcap))
        .with_state(state);
    let http_registry = running.registry.clone();
    tokio::spawn(async move {
        match http_tls {
            Some(config) => match crate::tls::TlsListener::new(http_l, config, http_registry) {
                Ok(l) => serve_http(l, app).await,
                Err(e) => tracing::error!("HTTP server: {e}"),
            },
            None => serve_http(http_l, app).await,
        }
    });

    match opts.source {
        Source::Config(_) => {
            let (drain, requests) = tokio::sync::mpsc::channel(1);
            running.drain = Some(drain);
            tokio::spawn(end_stopped_policies(topology, requests));
        }
        Source::Live(live) => {
            let endpoints = Endpoints {
                http: running.http,
                grpc: running.grpc,
                advertise_host: live.advertise_host,
                http_tls: opts.http_tls,
            };
            let (reconciler, handle, changes) = Reconciler::new(topology, endpoints);
            let (snapshots, snapshot_rx) = tokio::sync::watch::channel(Arc::default());
            let writer = tokio::spawn(status::run(snapshot_rx, live.status));
            tokio::spawn(async move {
                let stopped = reconciler.run(changes, snapshots, live.status_period).await;
                // The snapshot sender is gone: the writer finishes the
                // last snapshot and returns.
                let _ = writer.await;
                if let Some(done) = stopped {
                    let _ = done.send(());
                }
            });
            running.cluster = Some(handle);
        }
    }
    Ok(running)
}

/// Serves `app` on every connection `listener` accepts, each on a task of
/// its own, with the project's HTTP bounds: a client must send a request's
/// headers within 30 s (an idle HTTP/1 connection is closed after as
/// long), an HTTP/2 peer that stops answering pings is dropped. Handlers
/// see the client's address as `ConnectInfo<SocketAddr>`.
async fn serve_http<L>(mut listener: L, app: Router)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    use tower::ServiceExt as _;
    loop {
        let (io, peer) = listener.accept().await;
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |req: axum::http::Request<hyper::body::Incoming>| {
                    let mut req = req.map(Body::new);
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    app.clone().oneshot(req)
                },
            );
            let builder =
                tapestry_runtime::http::server(tapestry_runtime::http::HEADER_READ_TIMEOUT);
            if let Err(e) = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), service)
                .await
            {
                tracing::debug!(%peer, "HTTP connection ended: {e}");
            }
        });
    }
}

/// Owns a fixed topology for the life of the process, ending the
/// policies that reach a capture limit, until asked to drain it.
async fn end_stopped_policies(
    mut topology: Topology,
    mut drain: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
) {
    loop {
        let deadline = topology.next_deadline();
        let stops = topology.stop_events();
        let limit = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stops.notified() => {}
            _ = limit => {}
            request = drain.recv(), if !drain.is_closed() => {
                // Every `Running` gone without asking: keep serving, as the
                // process does until its signal.
                let Some(done) = request else { continue };
                topology.drain(DRAIN_WITHIN).await;
                let _ = done.send(());
                return;
            }
        }
        topology.reap_stopped();
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.registry.render(),
    )
}

async fn stream_pcap(
    State(s): State<HttpState>,
    Path(name): Path<String>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    let Some(stream) = s.streams.get(&name).map(|e| e.clone()) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no http sink named {name:?}\n"),
        )
            .into_response();
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(refusal) = crate::sinks::admit(
        &name,
        &stream.token,
        authorization,
        Some(peer.ip()),
        &stream.hub.stats,
    ) {
        let (status, message) = match refusal {
            crate::sinks::Refusal::Unauthenticated(m) => (StatusCode::UNAUTHORIZED, m),
            crate::sinks::Refusal::NotAllowed(m) => (StatusCode::FORBIDDEN, m),
        };
        return (
            status,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(serde_json::json!({"error": message})),
        )
            .into_response();
    }
    let sub = match stream.hub.subscribe() {
        Ok(sub) => sub,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({"error": format!("sink {name:?}: {e}")})),
            )
                .into_response()
        }
    };
    let head = bytes::Bytes::copy_from_slice(&crate::capture::pcap_stream_header(stream.snaplen));
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(head) }).chain_rx(sub.rx);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/vnd.tcpdump.pcap")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

trait ChainRx {
    fn chain_rx(
        self,
        rx: crate::sinks::ClientRx<bytes::Bytes>,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static;
}

impl<S> ChainRx for S
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static,
{
    fn chain_rx(
        self,
        rx: crate::sinks::ClientRx<bytes::Bytes>,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
        use futures::StreamExt;
        self.chain(rx.map(Ok))
    }
}
