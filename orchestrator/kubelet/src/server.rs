//! The kubelet HTTPS API (port 10250 by default): container logs and exec,
//! for the API server only — clients must present a certificate signed by
//! the cluster CA.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::logs::{self, LogOptions};
use crate::pods::{container_id, PodDirs};
use crate::runtime::State;
use crate::ws::{self, Message};
use crate::Kubelet;

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::FORBIDDEN => "Forbidden",
        _ => "InternalError",
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .unwrap_or_else(|_| Response::new(full("")))
}

fn tls(kubelet: &Kubelet) -> Result<TlsAcceptor> {
    let identity = match &kubelet.config.serving {
        Some(identity) => identity.clone(),
        None => {
            let mut names = vec![kubelet.config.node_name.clone(), "localhost".to_string()];
            names.push(kubelet.config.node_ip.to_string());
            let key = rcgen::KeyPair::generate()?;
            let params = rcgen::CertificateParams::new(names)?;
            let cert = params.self_signed(&key)?;
            let identity = tapestry_runtime::identity::LiveIdentity::from_pem(
                &cert.pem(),
                &key.serialize_pem(),
            )
            .map_err(anyhow::Error::msg)?;
            Arc::new(identity)
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut kubelet.config.client_ca_pem.as_bytes()) {
        roots.add(c.context("parsing the client CA")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Whether the client is the API server, by its kubelet-client
/// certificate's name: the CA signs other clients' certificates too (the
/// fleet manager's, users'), and none of them may exec into pods.
fn api_server_client(conn: &rustls::ServerConnection) -> Result<(), String> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no client certificate")?;
    let cn = tapestry_runtime::x509::subject(cert.as_ref())?.common_name;
    if cn == tapestry_runtime::KUBELET_CLIENT_CN {
        Ok(())
    } else {
        Err(format!(
            "client certificate CN={cn:?} is not the API server's ({})",
            tapestry_runtime::KUBELET_CLIENT_CN
        ))
    }
}

pub async fn start(
    kubelet: Arc<Kubelet>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let bind = SocketAddr::new(kubelet.config.node_ip, kubelet.config.port);
    let listener = TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding the kubelet API on {bind}"))?;
    let addr = listener.local_addr()?;
    let acceptor = tls(&kubelet)?;
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(c) => c,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
                },
            };
            let acceptor = acceptor.clone();
            let kubelet = kubelet.clone();
            tokio::spawn(async move {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let refusal = api_server_client(stream.get_ref().1).err();
                if let Some(why) = &refusal {
                    tracing::warn!("kubelet API: refusing a client: {why}");
                }
                let svc = hyper::service::service_fn(move |req| {
                    let kubelet = kubelet.clone();
                    let refusal = refusal.clone();
                    async move {
                        Ok::<_, Infallible>(match refusal {
                            Some(why) => status(StatusCode::FORBIDDEN, &why),
                            None => route(kubelet, req).await,
                        })
                    }
                });
                let _ = tapestry_runtime::http::server(tapestry_runtime::http::HEADER_READ_TIMEOUT)
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn truthy(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("1" | "true" | "True"))
}

async fn route(kubelet: Arc<Kubelet>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["healthz"] => Response::new(full("ok")),
        ["metrics"] => metrics(&kubelet),
        ["metrics", "resource"] => resource_metrics(&kubelet).await,
        ["containerLogs", ns, pod, container] => {
            let q: HashMap<String, String> = query_pairs(req.uri().query()).into_iter().collect();
            container_logs(&kubelet, ns, pod, container, &q).await
        }
        [verb @ ("exec" | "attach"), ns, pod, container] => {
            let attach = *verb == "attach";
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            exec(kubelet, req, &ns, &pod, &container, attach).await
        }
        _ => status(StatusCode::NOT_FOUND, &format!("no handler for {path}")),
    }
}

/// Prometheus text: the Service proxy's syncs, their duration, its table.
fn metrics(kubelet: &Kubelet) -> Response<Body> {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &kubelet.metrics) {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding metrics: {e}"),
        );
    }
    let mut response = Response::new(full(text));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// kubelet's `/metrics/resource`: CPU and working set of the node, its
/// pods and their containers.
async fn resource_metrics(kubelet: &Kubelet) -> Response<Body> {
    let pods: Vec<crate::stats::PodRef> = match kubelet.index.lock() {
        Ok(idx) => idx
            .iter()
            .filter_map(|(key, e)| {
                let (namespace, name) = key.split_once('/')?;
                Some(crate::stats::PodRef {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    uid: e.uid.clone(),
                })
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let text =
        match tokio::task::spawn_blocking(move || crate::stats::resource_metrics(&pods)).await {
            Ok(text) => text,
            Err(e) => {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("reading usage: {e}"),
                )
            }
        };
    let mut response = Response::new(full(text));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// The pod's directory and the container's attempts (oldest first).
fn locate(
    kubelet: &Kubelet,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<(String, PodDirs, Vec<u32>), Box<Response<Body>>> {
    let entry = kubelet
        .index
        .lock()
        .ok()
        .and_then(|idx| idx.get(&format!("{ns}/{pod}")).cloned())
        .ok_or_else(|| {
            Box::new(status(
                StatusCode::NOT_FOUND,
                &format!("pod {ns}/{pod} is not running on this node"),
            ))
        })?;
    if !entry
        .containers
        .iter()
        .chain(entry.init_containers.iter())
        .any(|c| c == container)
    {
        return Err(Box::new(status(
            StatusCode::BAD_REQUEST,
            &format!("container {container} is not valid for pod {pod}"),
        )));
    }
    let dirs = PodDirs::new(kubelet, &entry.uid);
    let attempts = dirs.attempts(container);
    Ok((entry.uid, dirs, attempts))
}

/// `kubectl logs` options from the query; an error names the bad one.
fn log_options(q: &HashMap<String, String>, previous: bool) -> Result<LogOptions, String> {
    let mut opts = LogOptions {
        follow: truthy(q.get("follow")) && !previous,
        timestamps: truthy(q.get("timestamps")),
        ..Default::default()
    };
    if let Some(t) = q.get("tailLines") {
        match t.parse::<i64>() {
            Ok(n) if n >= 0 => opts.tail_lines = Some(n as usize),
            _ => return Err(format!("tailLines: invalid value {t:?}")),
        }
    }
    if let Some(s) = q.get("sinceSeconds") {
        match s.parse::<i64>() {
            // Further back than the clock reaches: every line.
            Ok(n) if n > 0 => {
                opts.since = chrono::Duration::try_seconds(n)
                    .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
            }
            _ => return Err(format!("sinceSeconds: invalid value {s:?}")),
        }
    }
    if let Some(s) = q.get("sinceTime") {
        match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => opts.since = Some(t.with_timezone(&chrono::Utc)),
            Err(_) => return Err(format!("sinceTime: invalid RFC 3339 time {s:?}")),
        }
    }
    if let Some(l) = q.get("limitBytes") {
        match l.parse::<usize>() {
            Ok(n) if n > 0 => opts.limit_bytes = Some(n),
            _ => return Err(format!("limitBytes: invalid value {l:?}")),
        }
    }
    Ok(opts)
}

async fn container_logs(
    kubelet: &Kubelet,
    ns: &str,
    pod: &str,
    container: &str,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let (_, dirs, attempts) = match locate(kubelet, ns, pod, container) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let previous = truthy(q.get("previous"));
    let attempt = if previous {
        match attempts.len().checked_sub(2).map(|i| attempts[i]) {
            Some(a) => a,
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                    ),
                )
            }
        }
    } else {
        match attempts.last() {
            Some(a) => *a,
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    &format!("container \"{container}\" in pod \"{pod}\" is waiting to start: ContainerCreating"),
                )
            }
        }
    };
    let opts = match log_options(q, previous) {
        Ok(o) => o,
        Err(message) => return status(StatusCode::BAD_REQUEST, &message),
    };
    let path = dirs.log(container, attempt);
    let (mut first, offset) = match logs::initial(&path, &opts).await {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
        Err(e) => {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("reading log: {e}"),
            )
        }
    };
    let builder = Response::builder().header(http::header::CONTENT_TYPE, "text/plain");
    if let Some(limit) = opts.limit_bytes {
        first.truncate(limit);
    }
    if !opts.follow {
        return builder
            .body(full(first))
            .unwrap_or_else(|_| Response::new(full("")));
    }
    let attempt_dir = dirs.attempt(container, attempt);
    let rt = kubelet.runtime.clone();
    let done = move || matches!(rt.state(&attempt_dir), State::Exited(_));
    let head = futures::stream::once(async move { Bytes::from(first) });
    let mut budget = opts.limit_bytes.unwrap_or(usize::MAX);
    let stream = head
        .chain(logs::follow(path, offset, opts, done))
        .take_while(move |b| {
            let go = budget > 0;
            budget = budget.saturating_sub(b.len());
            futures::future::ready(go)
        })
        .map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
    builder
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(full("")))
}

const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];

async fn exec(
    kubelet: Arc<Kubelet>,
    req: Request<Incoming>,
    ns: &str,
    pod: &str,
    container: &str,
    attach: bool,
) -> Response<Body> {
    let (uid, dirs, attempts) = match locate(&kubelet, ns, pod, container) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let running = attempts
        .last()
        .map(|a| (*a, kubelet.runtime.state(&dirs.attempt(container, *a))));
    let Some((attempt, State::Running(_))) = running else {
        return status(
            StatusCode::BAD_REQUEST,
            &format!("container {container} is not running in pod {pod}"),
        );
    };
    let q = query_pairs(req.uri().query());
    let get = |k: &str| q.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let command: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if attach {
        if truthy(get("stdin").as_ref()) || truthy(get("tty").as_ref()) {
            return status(
                StatusCode::BAD_REQUEST,
                "attach: containers run without stdin; attach without -i/-t to follow their output",
            );
        }
    } else if command.is_empty() {
        return status(
            StatusCode::BAD_REQUEST,
            "command: at least one command argument is required",
        );
    }
    let stdin = truthy(get("stdin").as_ref());
    let tty = truthy(get("tty").as_ref());
    let headers = req.headers();
    let is_ws = headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return status(
            StatusCode::BAD_REQUEST,
            "exec needs a WebSocket upgrade (v5.channel.k8s.io or v4.channel.k8s.io)",
        );
    };
    let offered: Vec<String> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .collect();
    let Some(proto) = PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
        return status(
            StatusCode::BAD_REQUEST,
            &format!("no supported streaming protocol offered (want one of {PROTOCOLS:?})"),
        );
    };
    if !is_ws {
        return status(StatusCode::BAD_REQUEST, "exec needs a WebSocket upgrade");
    }
    let id = container_id(&uid, container, attempt);
    let v5 = *proto == "v5.channel.k8s.io";
    let upgrade = hyper::upgrade::on(req);
    let log = dirs.log(container, attempt);
    let attempt_dir = dirs.attempt(container, attempt);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) if attach => {
                let rt = kubelet.runtime.clone();
                let done = move || matches!(rt.state(&attempt_dir), State::Exited(_));
                if let Err(e) = attach_session(TokioIo::new(io), log, done).await {
                    tracing::debug!(error = %e, "attach session ended with an error");
                }
            }
            Ok(io) => {
                if let Err(e) =
                    session(&kubelet, TokioIo::new(io), &id, command, stdin, tty, v5).await
                {
                    tracing::debug!(error = %e, "exec session ended with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "exec upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header("Sec-WebSocket-Accept", ws::accept_key(&key))
        .header("Sec-WebSocket-Protocol", *proto)
        .body(full(""))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// Stream the container's output (from now on) until it exits or the
/// client goes away.
async fn attach_session<IO: AsyncRead + AsyncWrite + Send + 'static>(
    io: IO,
    log: std::path::PathBuf,
    done: impl Fn() -> bool,
) -> Result<()> {
    let (mut rd, wr) = tokio::io::split(io);
    let w: Writer<IO> = Arc::new(Mutex::new(wr));
    // Client messages are read on their own task: a frame read must not be
    // cut short by the polling below.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let pong_w = w.clone();
    let reader = tokio::spawn(async move {
        loop {
            match ws::read_message(&mut rd).await {
                Ok((Message::Data(_), Some(p))) => {
                    if ws::write_pong(&mut *pong_w.lock().await, &p).await.is_err() {
                        break;
                    }
                }
                Ok((Message::Data(_), None)) => {}
                Ok((Message::Close, _)) | Err(_) => break,
            }
        }
        let _ = gone_tx.send(());
    });
    let mut offset = tokio::fs::metadata(&log)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let finishing = done();
        let mut chunk = Vec::new();
        if let Ok(mut f) = tokio::fs::File::open(&log).await {
            use tokio::io::AsyncSeekExt;
            if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                let _ = f.read_to_end(&mut chunk).await;
            }
        }
        offset += chunk.len() as u64;
        pending.extend_from_slice(&chunk);
        let mut consumed = 0;
        for line in pending.split_inclusive(|b| *b == b'\n') {
            if line.last() != Some(&b'\n') {
                break;
            }
            consumed += line.len();
            if let Some((stderr, partial, msg)) = logs::split_record(&line[..line.len() - 1]) {
                let mut data = msg.to_vec();
                if !partial {
                    data.push(b'\n');
                }
                send(&w, if stderr { 2 } else { 1 }, &data).await?;
            }
        }
        pending.drain(..consumed);
        if finishing && chunk.is_empty() {
            break;
        }
        tokio::select! {
            _ = &mut gone => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    reader.abort();
    send(
        &w,
        3,
        json!({"metadata": {}, "status": "Success"})
            .to_string()
            .as_bytes(),
    )
    .await?;
    let _ = ws::write_close(&mut *w.lock().await).await;
    Ok(())
}

fn openpty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: out pointers are valid; name/termios/winsize may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty returned two descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

fn resize(master: i32, data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let ws = libc::winsize {
        ws_row: v["Height"].as_u64().unwrap_or(24) as u16,
        ws_col: v["Width"].as_u64().unwrap_or(80) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: master is a live pty descriptor; ws is a valid winsize.
    unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) };
}

type Writer<W> = Arc<Mutex<tokio::io::WriteHalf<W>>>;

async fn send<W: AsyncWrite>(w: &Writer<W>, channel: u8, data: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(data.len() + 1);
    msg.push(channel);
    msg.extend_from_slice(data);
    ws::write_binary(&mut *w.lock().await, &msg).await
}

async fn pump<R: AsyncRead + Unpin, W: AsyncWrite>(mut r: R, w: Writer<W>, channel: u8) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if send(&w, channel, &buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Run `command` in the container and stream it over the WebSocket.
async fn session<IO: AsyncRead + AsyncWrite + Send + 'static>(
    kubelet: &Kubelet,
    io: IO,
    id: &str,
    command: Vec<String>,
    stdin: bool,
    tty: bool,
    v5: bool,
) -> Result<()> {
    let (mut rd, wr) = tokio::io::split(io);
    let w: Writer<IO> = Arc::new(Mutex::new(wr));
    let run = async {
        let mut cmd = kubelet.runtime.exec_command(id, &command, tty);
        let mut master: Option<OwnedFd> = None;
        if tty {
            let (m, s) = openpty()?;
            cmd.stdin(Stdio::from(s.try_clone()?))
                .stdout(Stdio::from(s.try_clone()?))
                .stderr(Stdio::from(s));
            // SAFETY: setsid and ioctl are async-signal-safe; the pty becomes the
            // controlling terminal of the exec'd process' session.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    libc::ioctl(0, libc::TIOCSCTTY, 0);
                    Ok(())
                });
            }
            master = Some(m);
        } else {
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        let mut child = cmd.kill_on_drop(true).spawn().context("runc exec")?;
        // Our copies of the pty's slave side must close for the master to see
        // the end of output.
        drop(cmd);
        let mut outputs = Vec::new();
        let mut input: Option<Box<dyn AsyncWrite + Send + Unpin>> = None;
        let master_raw = master.as_ref().map(|m| m.as_raw_fd());
        if let Some(m) = master {
            let reader = tokio::fs::File::from_std(std::fs::File::from(m.try_clone()?));
            outputs.push(tokio::spawn(pump(reader, w.clone(), 1)));
            if stdin {
                input = Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(m))));
            }
        } else {
            if let Some(o) = child.stdout.take() {
                outputs.push(tokio::spawn(pump(o, w.clone(), 1)));
            }
            if let Some(e) = child.stderr.take() {
                outputs.push(tokio::spawn(pump(e, w.clone(), 2)));
            }
            if let Some(i) = child.stdin.take() {
                input = Some(Box::new(i));
            }
        }
        let exit = loop {
            tokio::select! {
                status = child.wait() => break status?,
                msg = ws::read_message(&mut rd) => match msg {
                    Ok((Message::Data(d), pong)) => {
                        if let Some(p) = pong {
                            ws::write_pong(&mut *w.lock().await, &p).await?;
                            continue;
                        }
                        match d.split_first() {
                            Some((0, data)) => {
                                if let Some(i) = input.as_mut() {
                                    if i.write_all(data).await.is_err() || i.flush().await.is_err() {
                                        input = None;
                                    }
                                }
                            }
                            Some((4, data)) => {
                                if let Some(m) = master_raw {
                                    resize(m, data);
                                }
                            }
                            Some((255, [0])) if v5 => input = None,
                            _ => {}
                        }
                    }
                    Ok((Message::Close, _)) | Err(_) => {
                        let _ = child.start_kill();
                        break child.wait().await?;
                    }
                },
            }
        };
        drop(input);
        for o in outputs {
            let _ = tokio::time::timeout(Duration::from_secs(2), o).await;
        }
        anyhow::Ok(exit)
    };
    let result = run.await;
    let st = match &result {
        Ok(exit) => {
            let code = exit
                .code()
                .unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(exit).unwrap_or(0));
            if code == 0 {
                json!({"metadata": {}, "status": "Success"})
            } else {
                json!({"metadata": {}, "status": "Failure",
                       "message": format!("command terminated with non-zero exit code: error executing command [{}], exit code {code}", command.join(" ")),
                       "reason": "NonZeroExitCode",
                       "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
            }
        }
        // Tell the client why, instead of dropping the connection without
        // a word (kubectl then reports an abnormal closure).
        Err(e) => json!({"metadata": {}, "status": "Failure",
                         "message": format!("exec in container failed: {e:#}"),
                         "reason": "InternalError"}),
    };
    let sent = send(&w, 3, st.to_string().as_bytes()).await;
    let _ = ws::write_close(&mut *w.lock().await).await;
    result?;
    Ok(sent?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn log_options_refuse_bad_values_and_survive_huge_ones() {
        let since = |v: &str| super::log_options(&query(&[("sinceSeconds", v)]), false);
        // Further back than the clock reaches: every line, not a panic.
        assert_eq!(since(&i64::MAX.to_string()).unwrap().since, None);
        assert!(since("60").unwrap().since.is_some());
        // Past int64, as Kubernetes reads it: refused (400), not a panic.
        assert!(since(&u64::MAX.to_string()).is_err());
        assert_eq!(
            since("-1").err().unwrap(),
            "sinceSeconds: invalid value \"-1\""
        );
        let tail = super::log_options(&query(&[("tailLines", "x")]), false);
        assert_eq!(tail.err().unwrap(), "tailLines: invalid value \"x\"");
        let follow = super::log_options(&query(&[("follow", "true")]), true).unwrap();
        assert!(!follow.follow, "no following a previous container's log");
    }
}
