//! The HTTPS server: routing, authentication, metrics and lifecycle.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tapestry_store::Store;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::authz::{acting_user, Attributes, Authorizer};
use crate::discovery;
use crate::endpoint_leases::EndpointLeases;
use crate::error::ApiError;
use crate::metrics::{LatencyLabels, Metrics, RequestLabels};
use crate::openapi::OpenApiDocs;
use crate::patch::FieldManagement;
use crate::pki::{self, LiveTokens, Pki, Tokens};
use crate::registry::{Registry, Served, Subresource};
use crate::resources::{self, Ipv4Range, ServiceAllocator};
use crate::rest::{json_bytes_response, json_response, Api, Request};
use tapestry_apimachinery::tokens::User;

/// Largest request body accepted (kube-apiserver's limit is 3 MiB objects).
const MAX_BODY: usize = 3 * 1024 * 1024;

pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub service_cidr: String,
    /// Keep at least this much history for watches and exact-revision lists.
    pub compaction_interval: Duration,
    pub extra_sans: Vec<String>,
    /// The address other members of the cluster reach this server on, as
    /// listed in the `kubernetes` Service's endpoints; None: the listening
    /// address (loopback when it listens on every address).
    pub advertise_address: Option<IpAddr>,
    /// How long this server stays in the `kubernetes` Service's endpoints
    /// without renewing its lease.
    pub endpoint_lease_duration: Duration,
    /// How often leaked ClusterIP/NodePort allocations are looked for; a
    /// leak is released on the second pass that sees it.
    pub allocation_repair_interval: Duration,
    /// `AlwaysAllow` lets every authenticated request through (for
    /// measuring what RBAC costs, or a throwaway cluster); RBAC otherwise.
    pub always_allow: bool,
    /// How often the resource metrics API scrapes every kubelet.
    pub metric_resolution: Duration,
}

impl ServerConfig {
    /// The defaults of `tapestry server` for what is not given.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        ServerConfig {
            data_dir,
            listen,
            service_cidr: "10.96.0.0/12".into(),
            compaction_interval: Duration::from_secs(300),
            extra_sans: Vec::new(),
            advertise_address: None,
            endpoint_lease_duration: crate::endpoint_leases::DEFAULT_TTL,
            allocation_repair_interval: DEFAULT_ALLOCATION_REPAIR_INTERVAL,
            always_allow: false,
            metric_resolution: crate::resourcemetrics::SCRAPE_INTERVAL,
        }
    }
}

/// A started server: where it listens and how to reach it.
pub struct Running {
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    /// The cluster CA (PEM), which pods find as `kube-root-ca.crt`.
    pub ca_cert_pem: String,
    pub api: Arc<Api>,
    local: LocalHandler,
    task: tokio::task::JoinHandle<()>,
    /// Takes this server out of the `kubernetes` Service's endpoints on
    /// shutdown.
    endpoints: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Wait until the server stopped (after its shutdown token fired) and
    /// left the `kubernetes` Service's endpoints.
    pub async fn wait(self) {
        let _ = self.task.await;
        let _ = self.endpoints.await;
    }

    /// The API for clients in this process, as the admin.
    pub fn local_handler(&self) -> LocalHandler {
        self.local.clone()
    }

    /// The API for a component in this process, as user `name` (what it
    /// may do is up to RBAC): the scheduler and the controller manager.
    pub fn local_handler_as(&self, name: &str) -> LocalHandler {
        LocalHandler {
            router: self.local.router.clone(),
            credential: LocalCredential::User(User {
                name: name.to_string(),
                uid: String::new(),
                groups: Vec::new(),
                ..Default::default()
            }),
        }
    }
}

/// Marks a request from a [`LocalHandler`] (an extension, so no outside
/// client can set it).
#[derive(Clone, Copy)]
struct OmitManagedFields;

/// The API handler as a service, for clients in the server's own process:
/// requests go through the same routing, authentication, admission and
/// storage as requests from outside, with the admin credentials, but
/// without TLS, TCP or HTTP framing on either side. For the scheduler
/// and controllers, which read every pod event and write every binding,
/// that framing cost as much CPU as a share of the handlers themselves.
///
/// Objects come back without `metadata.managedFields`: none of these
/// clients reads them, and decoding them into typed objects was most of
/// the cost of reading a pod. An update without them keeps the stored
/// ones, as in Kubernetes.
#[derive(Clone)]
pub struct LocalHandler {
    router: Router,
    credential: LocalCredential,
}

#[derive(Clone)]
enum LocalCredential {
    /// The admin's bearer token.
    Bearer(http::HeaderValue),
    /// A component's own identity, set as already authenticated.
    User(User),
}

impl<B> tower::Service<http::Request<B>> for LocalHandler
where
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = <Router as tower::Service<http::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match &self.credential {
            LocalCredential::Bearer(token) => {
                req.headers_mut()
                    .insert(http::header::AUTHORIZATION, token.clone());
            }
            LocalCredential::User(user) => {
                req.extensions_mut().insert(Authenticated(user.clone()));
            }
        }
        req.extensions_mut().insert(OmitManagedFields);
        tower::Service::call(&mut self.router, req)
    }
}

struct AppState {
    api: Arc<Api>,
    tokens: Arc<LiveTokens>,
    authorizer: Arc<Authorizer>,
    server_address: String,
    shutdown: CancellationToken,
    kubelet: crate::nodeproxy::KubeletClient,
    resource_metrics: Arc<crate::resourcemetrics::ResourceMetrics>,
}

/// Start serving; returns once the listener is bound, bootstrap objects
/// exist and the admin kubeconfig is written.
pub async fn start(
    config: ServerConfig,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<Running> {
    let data_dir = &config.data_dir;
    pki::secure_data_dir(data_dir)?;
    let range = Ipv4Range::parse(&config.service_cidr).map_err(anyhow::Error::msg)?;
    let allocator = Arc::new(ServiceAllocator::new(store.clone(), range));
    let registry = Registry::new(resources::builtin(allocator.clone(), store.clone()));
    let openapi = OpenApiDocs::build(&registry)?;
    let fields = FieldManagement::new(openapi.schema());
    let metrics = Arc::new(Metrics::new());
    let api = Arc::new(Api::new(store.clone(), registry, fields, metrics, openapi));

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let advertised = SocketAddr::new(
        config
            .advertise_address
            .unwrap_or(if addr.ip().is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                addr.ip()
            }),
        addr.port(),
    );
    let mut sans = config.extra_sans.clone();
    sans.push(advertised.ip().to_string());
    let names = pki::serving_names(addr.ip(), IpAddr::V4(range.first()), &sans);
    let pki = Pki::load_or_create(&data_dir.join("pki"), &names)?;
    let issuer = crate::satokens::TokenIssuer::load_or_create(&pki.dir)?;
    let _ = api.service_account_tokens.set(Arc::new(issuer));
    let (_, admin_token) = Tokens::load_or_create(&data_dir.join("tokens.csv"))?;
    crate::nodeproxy::ensure_node_credentials(data_dir, &pki)?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let server_url = format!("https://{}", SocketAddr::new(host.parse()?, addr.port()));
    pki::ensure_component_credentials(data_dir, &pki.ca_cert_pem, &server_url)?;
    let tokens = Arc::new(LiveTokens::load(&data_dir.join("tokens.csv"))?);
    tokio::spawn(refresh_tokens(tokens.clone(), shutdown.clone()));
    let kubelet = crate::nodeproxy::KubeletClient::new(&pki)?;
    let kubeconfig = data_dir.join("kubeconfig");
    pki::write_kubeconfig(
        &kubeconfig,
        &pki::kubeconfig(&server_url, &pki.ca_cert_pem, "admin", &admin_token),
    )?;

    // Everything the server writes is there now; files made before under
    // another umask (or by an older version) are closed off too.
    pki::secure_data_dir(data_dir)?;
    crate::bootstrap::ensure(&api, range.first(), range.dns(), addr.port()).await?;
    crate::authz::bootstrap::ensure(&api).await?;
    crate::bootstraptokens::ensure_join_token(&api, data_dir).await?;
    tokio::spawn(crate::bootstraptokens::keep_join_token(
        api.clone(),
        data_dir.clone(),
        shutdown.clone(),
    ));
    // Every role and binding is known before the first request.
    if config.always_allow {
        tracing::warn!("--authorization-mode AlwaysAllow: every authenticated request is allowed");
    }
    let authorizer = Authorizer::start(api.clone(), config.always_allow, shutdown.clone())
        .await
        .map_err(|e| anyhow::anyhow!("loading RBAC: {e}"))?;
    let _ = api.authorizer.set(authorizer.clone());
    // In the endpoints before the first request is served.
    let mut endpoint_leases =
        EndpointLeases::new(api.clone(), advertised, config.endpoint_lease_duration);
    if let Err(e) = endpoint_leases.reconcile().await {
        tracing::warn!(error = %e, "reconciling the kubernetes service endpoints");
    }
    // Custom resources are served before the first request is.
    let crd_controller =
        resources::apiextensions::controller::CrdController::new(api.clone(), shutdown.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    let crds_read_at = crd_controller
        .sync()
        .await
        .map_err(|e| anyhow::anyhow!("serving custom resource definitions: {e}"))?;

    let tls = tls_config(&pki)?;
    let state = Arc::new(AppState {
        api: api.clone(),
        tokens,
        authorizer,
        server_address: format!("{host}:{}", addr.port()),
        shutdown: shutdown.clone(),
        kubelet: kubelet.clone(),
        resource_metrics: crate::resourcemetrics::ResourceMetrics::start(
            api.clone(),
            kubelet.clone(),
            config.metric_resolution,
            shutdown.clone(),
        ),
    });
    let router = Router::new().fallback(dispatch).with_state(state);
    let local = LocalHandler {
        router: router.clone(),
        credential: LocalCredential::Bearer(
            http::HeaderValue::from_str(&format!("Bearer {admin_token}"))
                .context("admin token is not a valid header value")?,
        ),
    };
    tokio::spawn(compaction_loop(
        store,
        config.compaction_interval,
        shutdown.clone(),
    ));
    tokio::spawn(allocation_repair_loop(
        allocator,
        config.allocation_repair_interval,
        shutdown.clone(),
    ));
    tokio::spawn(crd_controller.run(crds_read_at));
    let endpoints = tokio::spawn(endpoint_leases.run(shutdown.clone()));
    let task = tokio::spawn(serve(listener, tls, router, shutdown));
    Ok(Running {
        addr,
        kubeconfig,
        ca_cert_pem: pki.ca_cert_pem.clone(),
        api,
        local,
        task,
        endpoints,
    })
}

fn tls_config(pki: &Pki) -> Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut pki.serving_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing serving certificate")?;
    let key = rustls_pemfile::private_key(&mut pki.serving_key_pem.as_bytes())
        .context("parsing serving key")?
        .context("no private key in apiserver.key")?;
    // AES-128-GCM before AES-256-GCM, chosen by the server as Go's TLS
    // (and so kube-apiserver) does on AES hardware: rustls clients, kube-rs
    // among them, list AES-256 first, and encrypting list responses was a
    // tenth of the server's CPU.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    let provider = Arc::new(provider);
    // Client certificates are optional (most clients bring a token); one
    // the cluster CA signed authenticates its subject.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pki.ca_cert_pem.as_bytes()) {
        roots.add(c.context("parsing ca.crt")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    router: Router,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let certified = certificate_user(stream.get_ref().1);
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    let mut req = req.map(Body::new);
                    if let Some(user) = &certified {
                        req.extensions_mut().insert(user.clone());
                    }
                    async move { router.oneshot(req).await }
                });
            let builder =
                tapestry_runtime::http::server(tapestry_runtime::http::HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // In-flight requests finish; watches end with the shutdown token.
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10s; closing");
    }
}

async fn compaction_loop(store: Arc<dyn Store>, interval: Duration, shutdown: CancellationToken) {
    let mut previous: Option<i64> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Ok(current) = store.current_revision().await else {
            continue;
        };
        if let Some(rev) = previous.filter(|r| *r > 0) {
            match store.compact(rev).await {
                Ok(()) => tracing::debug!(revision = rev, "compacted"),
                Err(e) => tracing::warn!(error = %e, "compaction failed"),
            }
        }
        previous = Some(current);
    }
}

/// How often leaked ClusterIP/NodePort allocations are looked for; a leak is
/// released on the second pass that sees it.
pub const DEFAULT_ALLOCATION_REPAIR_INTERVAL: Duration = Duration::from_secs(60);

async fn allocation_repair_loop(
    allocator: Arc<ServiceAllocator>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut suspects = HashMap::new();
    loop {
        if let Err(e) = allocator.repair(&mut suspects).await {
            tracing::warn!(error = %e, "service allocation repair failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn text(code: StatusCode, body: &str) -> Response {
    (
        code,
        [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    uri.query().map(url_decode_pairs).unwrap_or_default()
}

fn url_decode_pairs(q: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], decoded) {
            (_, Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (b, None) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a resource path points.
struct Route {
    group: String,
    version: String,
    segments: Vec<String>,
}

fn split_resource_path(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => Some(Route {
            group: String::new(),
            version: "v1".into(),
            segments: rest.iter().map(|s| s.to_string()).collect(),
        }),
        ["apis", group, version, rest @ ..] if !rest.is_empty() => Some(Route {
            group: group.to_string(),
            version: version.to_string(),
            segments: rest.iter().map(|s| s.to_string()).collect(),
        }),
        _ => None,
    }
}

/// The single entry point: health, discovery, OpenAPI, metrics, then the
/// resource REST handlers.
async fn dispatch(State(state): State<Arc<AppState>>, req: axum::extract::Request) -> Response {
    if let Some((ns, pod, sub)) = crate::nodeproxy::streaming_target(req.uri().path()) {
        let verb = if sub == "log" { "get" } else { "create" };
        let attrs = Attributes::resource(verb, "", "pods", &sub, Some(&ns), Some(&pod));
        let certified = req.extensions().get::<Authenticated>();
        if let Err(e) = authenticate(&state, req.headers(), certified)
            .await
            .and_then(|user| acting_user(&state.authorizer, user, req.headers()))
            .and_then(|user| state.authorizer.check(&user, &attrs))
        {
            return e.into_response();
        }
        return crate::nodeproxy::proxy(&state.api, &state.kubelet, req).await;
    }
    let (parts, body) = req.into_parts();
    let omit_managed_fields = parts.extensions.get::<OmitManagedFields>().is_some();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let path = uri.path().to_string();
    match path.as_str() {
        "/healthz" | "/livez" | "/readyz" => return text(StatusCode::OK, "ok"),
        p if p.starts_with("/healthz/")
            || p.starts_with("/livez/")
            || p.starts_with("/readyz/") =>
        {
            return text(StatusCode::OK, "ok")
        }
        _ => {}
    }
    let user = match authenticate(&state, &headers, parts.extensions.get())
        .await
        .and_then(|user| acting_user(&state.authorizer, user, &headers))
    {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    let started = Instant::now();
    let query = query_map(&uri);
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::RequestEntityTooLarge(format!(
                "request body larger than {MAX_BODY} bytes"
            ))
            .into_response()
        }
    };
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.split(';').next().unwrap_or("").trim())
        .unwrap_or("application/json");
    let (authz, api) = (&state.authorizer, &state.api);
    if let Some(resp) = crate::authz::review::serve(
        authz,
        &state.tokens,
        api,
        &user,
        &method,
        &path,
        content_type,
        &body,
    )
    .await
    {
        return resp;
    }
    if let Some(resp) = (state.resource_metrics)
        .serve(authz, &user, &method, &path, &query)
        .await
    {
        return resp;
    }
    let Some(route) = split_resource_path(&path) else {
        if let Err(e) = authz.check(&user, &Attributes::non_resource(&method, &path)) {
            return e.into_response();
        }
        return serve_static(&state, &method, &path, &query, &headers)
            .unwrap_or_else(|| not_found_path(&path));
    };
    let served = state.api.registry.served();
    let (mut req, watch) = match build_request(&served, route, query, headers, body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    req.omit_managed_fields = omit_managed_fields;
    let verb = verb_of(&method, &req, watch);
    let attrs = Attributes::resource(
        verb,
        &req.def.group,
        &req.def.plural,
        req.sub.map(|s| s.name()).unwrap_or_default(),
        req.namespace.as_deref(),
        req.name.as_deref(),
    );
    if let Err(e) = authz.check(&user, &attrs) {
        return e.into_response();
    }
    req.user = Some(Arc::new(user));
    let labels = (
        req.def.group.to_string(),
        req.def.plural.to_string(),
        req.sub.map(|s| s.name().to_string()).unwrap_or_default(),
    );
    let result = if watch {
        state.api.clone().watch(req, state.shutdown.clone()).await
    } else {
        handle(&state.api, &method, &req).await
    };
    let resp = result.unwrap_or_else(IntoResponse::into_response);
    let metrics = &state.api.metrics;
    metrics
        .requests
        .get_or_create(&RequestLabels {
            verb: verb.to_string(),
            group: labels.0,
            resource: labels.1.clone(),
            subresource: labels.2,
            code: resp.status().as_u16(),
        })
        .inc();
    if !watch {
        metrics
            .latency
            .get_or_create(&LatencyLabels {
                verb: verb.to_string(),
                resource: labels.1,
            })
            .observe(started.elapsed().as_secs_f64());
    }
    resp
}

/// A user known before the request reaches the handler: the one a
/// verified client certificate names (CN, with its organizations as
/// groups, as kube-apiserver's x509 authenticator), or an in-process
/// component. A request extension, so no client can set it.
#[derive(Clone)]
struct Authenticated(User);

fn certificate_user(conn: &rustls::ServerConnection) -> Option<Authenticated> {
    let cert = conn.peer_certificates()?.first()?;
    match tapestry_runtime::x509::subject(cert.as_ref()) {
        Ok(s) if !s.common_name.is_empty() => Some(Authenticated(User {
            name: s.common_name,
            uid: String::new(),
            groups: s.organizations,
            ..Default::default()
        })),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!("client certificate: {e}");
            None
        }
    }
}

/// How soon a changed token file is read again.
const TOKENS_REFRESH: Duration = Duration::from_secs(1);

async fn refresh_tokens(tokens: Arc<LiveTokens>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TOKENS_REFRESH) => tokens.refresh(),
        }
    }
}

/// Who is asking: the client certificate's or the bearer token's user, in
/// `system:authenticated`.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    certified: Option<&Authenticated>,
) -> Result<User, ApiError> {
    if let Some(Authenticated(user)) = certified {
        return Ok(crate::authz::authenticated(user));
    }
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    let user = crate::bootstraptokens::bearer_user(&state.api, &state.tokens, token, &[])
        .await
        .map_err(|e| {
            tracing::debug!("refused a bearer token: {e}");
            ApiError::Unauthorized
        })?;
    Ok(crate::authz::authenticated(&user))
}

fn not_found_path(path: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("the server could not find the requested resource ({path})"),
                "reason": "NotFound", "details": {}, "code": 404}),
        &[],
    )
}

fn ok_json(v: &Value) -> Response {
    json_response(StatusCode::OK, v, &[])
}

fn serve_static(
    state: &AppState,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Option<Response> {
    if method != Method::GET {
        return None;
    }
    let served = state.api.registry.served();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let accept = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let resp = match parts.as_slice() {
        ["version"] => ok_json(&discovery::version()),
        [".well-known", "openid-configuration"] => {
            ok_json(&state.api.service_account_tokens.get()?.discovery())
        }
        ["openid", "v1", "jwks"] => ok_json(&state.api.service_account_tokens.get()?.jwks()),
        ["metrics"] => text(StatusCode::OK, &state.api.metrics.encode()),
        ["api"] | ["apis"] if discovery::aggregated_version(accept).is_some() => {
            let version = discovery::aggregated_version(accept).unwrap_or("v2");
            let core = parts == ["api"];
            let slot = usize::from(!core) * 2 + usize::from(version != "v2");
            let body = served.aggregated[slot].get_or_init(|| {
                serde_json::to_vec(&discovery::aggregated(&served, core, version))
                    .unwrap_or_default()
            });
            let mut resp = json_bytes_response(StatusCode::OK, body.clone(), &[]);
            let content_type = format!(
                "application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"
            );
            if let Ok(v) = http::HeaderValue::from_str(&content_type) {
                resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
            }
            resp.headers_mut()
                .insert(http::header::VARY, http::HeaderValue::from_static("Accept"));
            resp
        }
        ["api"] => ok_json(&discovery::core_versions(&state.server_address)),
        ["api", "v1"] => ok_json(&discovery::resource_list(&served, "", "v1")?),
        ["apis"] => ok_json(&discovery::group_list(&served)),
        ["apis", group] => match discovery::group(&served, group) {
            Some(doc) => ok_json(&doc),
            None => not_found_path(path),
        },
        ["apis", group, version] => match discovery::resource_list(&served, group, version) {
            Some(doc) => ok_json(&doc),
            None => not_found_path(path),
        },
        ["openapi", "v2"] => state.api.openapi.v2(headers),
        ["openapi", "v3"] => state.api.openapi.v3_index(),
        ["openapi", "v3", rest @ ..] => state.api.openapi.v3(&rest.join("/"), query),
        _ => return None,
    };
    Some(resp)
}

/// Resolve `segments` to a resource, namespace, name and subresource.
fn build_request(
    registry: &Served,
    route: Route,
    mut query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(Request, bool), ApiError> {
    let mut segs = route.segments;
    let mut watch = false;
    if segs.first().map(String::as_str) == Some("watch") {
        // Legacy /watch/ paths.
        segs.remove(0);
        watch = true;
    }
    let lookup = |plural: &str| {
        registry
            .get(&route.group, &route.version, plural)
            .cloned()
            .ok_or(ApiError::NoSuchResource)
    };
    let is_namespaced_collection = |segs: &[String]| {
        segs.len() >= 3
            && segs[0] == "namespaces"
            && registry
                .get(&route.group, &route.version, &segs[2])
                .is_some_and(|d| d.namespaced)
    };
    let (def, namespace, name, sub) = if is_namespaced_collection(&segs) {
        let def = lookup(&segs[2])?;
        (
            def,
            Some(segs[1].clone()),
            segs.get(3).cloned(),
            segs.get(4).cloned(),
        )
    } else {
        let def = lookup(&segs[0])?;
        (def, None, segs.get(1).cloned(), segs.get(2).cloned())
    };
    if segs.len() > if namespace.is_some() { 5 } else { 3 } {
        return Err(ApiError::NotFound(crate::error::Target {
            group: route.group,
            resource: segs.join("/"),
            kind: String::new(),
            name: String::new(),
        }));
    }
    let sub = match sub {
        None => None,
        Some(s) => match Subresource::parse(&s).filter(|sub| def.has(*sub)) {
            Some(sub) => Some(sub),
            None => {
                return Err(ApiError::NotFound(crate::error::Target {
                    group: def.group.clone(),
                    resource: format!("{}/{s}", def.plural),
                    kind: def.kind.clone(),
                    name: name.clone().unwrap_or_default(),
                }))
            }
        },
    };
    if def.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::NotFound(crate::error::Target {
            group: def.group.clone(),
            resource: def.plural.clone(),
            kind: def.kind.clone(),
            name: name.clone().unwrap_or_default(),
        }));
    }
    let watch = watch || matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let name = match name {
        // Watching one object is a watch of the collection narrowed by name.
        Some(n) if watch => {
            let mut selector = format!("metadata.name={n}");
            if let Some(existing) = query.get("fieldSelector").filter(|f| !f.is_empty()) {
                selector = format!("{existing},{selector}");
            }
            query.insert("fieldSelector".into(), selector);
            None
        }
        other => other,
    };
    Ok((
        Request {
            def,
            namespace,
            name,
            sub,
            query,
            headers,
            body,
            omit_managed_fields: false,
            user: None,
        },
        watch,
    ))
}

fn verb_of(method: &Method, req: &Request, watch: bool) -> &'static str {
    match (method.clone(), req.name.is_some()) {
        _ if watch => "watch",
        (Method::GET, true) => "get",
        (Method::GET, false) => "list",
        (Method::POST, _) => "create",
        (Method::PUT, _) => "update",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, true) => "delete",
        (Method::DELETE, false) => "deletecollection",
        _ => "other",
    }
}

async fn handle(api: &Api, method: &Method, req: &Request) -> Result<Response, ApiError> {
    let not_allowed = |verb: &str| ApiError::MethodNotSupported {
        target: req.target(),
        verb: verb.to_string(),
    };
    if let Some(sub) = req.sub {
        let rest = req
            .def
            .subresource(sub)
            .ok_or_else(|| not_allowed(method.as_str()))?;
        if req.name.is_none() {
            return Err(not_allowed(method.as_str()));
        }
        return match *method {
            Method::GET => rest.get(api, req).await,
            Method::POST => rest.create(api, req).await,
            Method::PUT => rest.update(api, req).await,
            Method::PATCH => rest.patch(api, req).await,
            ref m => Err(not_allowed(m.as_str())),
        };
    }
    match (method.clone(), req.name.is_some()) {
        (Method::GET, true) => api.get(req).await,
        (Method::GET, false) => api.list(req).await,
        (Method::POST, false) => api.create(req).await,
        (Method::PUT, true) => api.update(req).await,
        (Method::PATCH, true) => api.patch(req).await,
        (Method::DELETE, true) => api.delete(req).await,
        (Method::DELETE, false) => api.delete_collection(req).await,
        (m, _) => Err(not_allowed(m.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rustls clients (kube-rs among them) list AES-256-GCM first; the
    /// server still picks AES-128-GCM, as kube-apiserver does.
    #[tokio::test]
    async fn tls_picks_aes_128_gcm_over_the_clients_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(dir.path(), &["127.0.0.1".to_string()]).expect("pki");
        let acceptor = tls_config(&pki).expect("tls config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            acceptor.accept(tcp).await.expect("handshake")
        });

        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pki.ca_cert_pem.as_bytes()) {
            roots.add(cert.expect("CA certificate")).expect("root");
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let tls = connector
            .connect(name, tcp)
            .await
            .expect("client handshake");
        let suite = tls.get_ref().1.negotiated_cipher_suite().expect("suite");
        assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        server.await.expect("server task");
    }
}
