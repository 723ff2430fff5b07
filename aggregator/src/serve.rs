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

pub struct ServeOptions {
    pub grpc: String,
    pub http: String,
    pub source: Source,
    /// TLS on the gRPC port, with taps authenticated by client
    /// certificate; `None` serves plaintext and takes any tap's word.
    pub tls: Option<crate::tls::TlsFiles>,
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
}

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    streams: Arc<dashmap::DashMap<String, HttpStream>>,
}

/// Binds everything and spawns the servers; returns once listening.
pub async fn start(opts: ServeOptions) -> anyhow::Result<Running> {
    let registry = Arc::new(Registry::default());
    let cx = SinkContext {
        registry: registry.clone(),
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
    };

    let tls = opts
        .tls
        .as_ref()
        .map(crate::tls::server_config)
        .transpose()?;
    let ingest = TapIngestServer::new(IngestService {
        policies: topology.ingest_table(),
        registry: registry.clone(),
        stopping: stop_ingest,
        require_certificates: tls.is_some(),
    })
    .max_decoding_message_size(MAX_MESSAGE);
    let subscribe = ToolSubscribeServer::new(SubscribeService {
        hubs: cx.grpc_hubs.clone(),
    })
    .max_encoding_message_size(MAX_MESSAGE);
    let router = tonic::transport::Server::builder()
        .add_service(ingest)
        .add_service(crate::sources::grpc::RetiredIngest)
        .add_service(subscribe);
    let grpc_registry = registry.clone();
    tokio::spawn(async move {
        let r = match tls {
            Some(config) => {
                router
                    .serve_with_incoming(crate::tls::incoming(grpc_l, config, grpc_registry))
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
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http_l, app).await {
            tracing::error!("HTTP server: {e}");
        }
    });

    match opts.source {
        Source::Config(_) => {
            tokio::spawn(end_stopped_policies(topology));
        }
        Source::Live(live) => {
            let endpoints = Endpoints {
                http: running.http,
                grpc: running.grpc,
                advertise_host: live.advertise_host,
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

/// Owns a fixed topology for the life of the process, ending the
/// policies that reach a capture limit.
async fn end_stopped_policies(mut topology: Topology) {
    loop {
        let deadline = topology.next_deadline();
        let stops = topology.stop_events();
        match deadline {
            Some(d) => {
                tokio::select! {
                    _ = stops.notified() => {}
                    _ = tokio::time::sleep_until(d.into()) => {}
                }
            }
            None => stops.notified().await,
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

async fn stream_pcap(State(s): State<HttpState>, Path(name): Path<String>) -> Response {
    let Some(stream) = s.streams.get(&name).map(|e| e.clone()) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no http sink named {name:?}\n"),
        )
            .into_response();
    };
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
        rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static;
}

impl<S> ChainRx for S
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static,
{
    fn chain_rx(
        self,
        rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
        use futures::StreamExt;
        self.chain(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))
    }
}
