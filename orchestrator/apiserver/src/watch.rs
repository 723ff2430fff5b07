//! Watches: a stream of newline-delimited `WatchEvent`s fed by the store's
//! ordered, gap-free watch, filtered by selectors and rendered as requested.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use tapestry_store::{EventKind, KeyValue, ListOptions, StoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};
use crate::objects::{append_served_or_decode, decode, parse_resource_version, SelectorView};
use crate::registry::ResourceDef;
use crate::rest::{render_one, table, Api, Rendering, Request};
use crate::selectors::{FieldSelector, LabelSelector};

/// Events buffered per watch connection before the writer waits for the
/// client; a client that stops reading only stalls its own stream.
const WATCH_BUFFER: usize = 256;
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(10);

struct WatchSpec {
    labels: LabelSelector,
    fields: FieldSelector,
    rendering: Rendering,
    bookmarks: bool,
    timeout: Option<Duration>,
    view: SelectorView,
    omit_managed_fields: bool,
}

impl Api {
    pub async fn watch(
        self: &Arc<Self>,
        req: Request,
        shutdown: CancellationToken,
    ) -> ApiResult<Response> {
        let labels =
            LabelSelector::parse(req.query.get("labelSelector").map_or("", String::as_str))
                .map_err(ApiError::BadRequest)?;
        let fields =
            FieldSelector::parse(req.query.get("fieldSelector").map_or("", String::as_str))
                .map_err(ApiError::BadRequest)?;
        for f in fields.fields() {
            if !req.def.supports_field(f) {
                return Err(ApiError::BadRequest(format!(
                    "field label not supported: {f}"
                )));
            }
        }
        // An int64 as Kubernetes has it: beyond that range is a bad request.
        let timeout = match req.query.get("timeoutSeconds").filter(|t| !t.is_empty()) {
            Some(t) => match t.parse::<i64>() {
                Ok(n) if n >= 0 => Some(Duration::from_secs(n as u64)),
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "invalid timeoutSeconds {t:?}: a number of seconds from 0 to {}",
                        i64::MAX
                    )))
                }
            },
            None => None,
        };
        let spec = WatchSpec {
            rendering: Rendering::negotiate(&req),
            bookmarks: req
                .query
                .get("allowWatchBookmarks")
                .is_some_and(|v| v == "true" || v == "1"),
            labels,
            fields,
            timeout,
            view: SelectorView::new(&req.def),
            omit_managed_fields: req.omit_managed_fields,
        };
        let prefix = self.scan_prefix(&req, &spec.fields);
        let rv = req
            .query
            .get("resourceVersion")
            .filter(|v| !v.is_empty())
            .cloned();
        let send_initial = req.query.get("sendInitialEvents").map(String::as_str) == Some("true");
        let slot = match &req.user {
            Some(user) => Some(WatchSlot::take(self, &user.name)?),
            None => None,
        };
        let (tx, rx) = mpsc::channel::<Bytes>(WATCH_BUFFER);
        let api = self.clone();
        let def = req.def.clone();
        let start = match rv.as_deref() {
            None | Some("0") => None,
            Some(rv) => Some(parse_resource_version(rv)?),
        };
        tokio::spawn(async move {
            // Counted out however the watch ends, a panic included.
            let _registered = Registered::new(api.metrics.watchers.clone());
            let _slot = slot;
            let run = api.run_watch(&def, prefix, start, send_initial, &spec, &tx);
            tokio::select! {
                result = run => {
                    if let Err(e) = result {
                        let _ = tx.send(event_line("ERROR", &e.to_status())).await;
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
        let stream =
            tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
        Response::builder()
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CACHE_CONTROL, "no-cache, private")
            .body(Body::from_stream(stream))
            .map_err(ApiError::internal)
    }

    async fn run_watch(
        &self,
        def: &Arc<crate::registry::ResourceDef>,
        prefix: String,
        start: Option<i64>,
        send_initial: bool,
        spec: &WatchSpec,
        tx: &mpsc::Sender<Bytes>,
    ) -> ApiResult<()> {
        // A timeout past the clock's range is no deadline at all.
        let deadline = spec
            .timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(t));
        let mut selected = Selected::new(spec.filtered());
        // Without a resourceVersion (or with sendInitialEvents) the watch
        // starts with the current state as synthetic ADDED events.
        let from = match start {
            Some(rv) if !send_initial => rv,
            _ => {
                let list = self
                    .store
                    .list(
                        &prefix,
                        ListOptions {
                            revision: start,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| ApiError::from_store(e, &Default::default()))?;
                selected.seen_from(0);
                for kv in &list.items {
                    let obj = spec.decode_if_needed(def, kv)?;
                    if !spec.matches(def, obj.as_ref()) {
                        continue;
                    }
                    selected.set(&kv.key, true);
                    if tx
                        .send(spec.event_line(def, "ADDED", kv, obj)?)
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                if send_initial && spec.bookmarks {
                    let bm = bookmark(def, list.revision, true);
                    if tx.send(event_line("BOOKMARK", &bm)).await.is_err() {
                        return Ok(());
                    }
                }
                list.revision
            }
        };
        let (mut events, progress) = self
            .store
            .watch_with_progress(&prefix, from)
            .await
            .map_err(|e| match e {
                StoreError::Compacted {
                    requested,
                    compacted,
                } => ApiError::Gone(format!(
                    "too old resource version: {requested} ({compacted})"
                )),
                other => ApiError::from_store(other, &Default::default()),
            })?;
        selected.seen_from(from);
        let mut last_rv = from;
        let mut bookmark_timer = tokio::time::interval(BOOKMARK_INTERVAL);
        bookmark_timer.tick().await;
        loop {
            let sleep_until = deadline
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
            // Every event of this watch up to `progress` has been sent (the
            // loop handles one before polling again), so a bookmark may
            // carry the store's progress even when this resource is quiet.
            let bookmark_rv = || last_rv.max(progress.revision());
            tokio::select! {
                _ = tokio::time::sleep_until(sleep_until) => {
                    // A last bookmark lets the client resume from here.
                    if spec.bookmarks {
                        let _ = tx.send(event_line("BOOKMARK", &bookmark(def, bookmark_rv(), false))).await;
                    }
                    return Ok(());
                }
                _ = tx.closed() => return Ok(()),
                // The resource is served differently now (its CRD changed or
                // went away): the client lists and watches again.
                _ = def.retired.cancelled() => return Ok(()),
                _ = bookmark_timer.tick(), if spec.bookmarks => {
                    if tx.send(event_line("BOOKMARK", &bookmark(def, bookmark_rv(), false))).await.is_err() {
                        return Ok(());
                    }
                }
                next = events.next() => {
                    let Some(event) = next else { return Ok(()) };
                    let event = event.map_err(|e| match e {
                        StoreError::Compacted { requested, compacted } => ApiError::Gone(format!(
                            "too old resource version: {requested} ({compacted})"
                        )),
                        other => ApiError::Internal(other.to_string()),
                    })?;
                    last_rv = event.revision();
                    let new = spec.decode_if_needed(def, &event.kv)?;
                    let matches_new = spec.matches(def, new.as_ref());
                    let matches_old = match &event.prev {
                        Some(prev) => match selected.matched(prev) {
                            Some(known) => known,
                            None => spec.matches(def, spec.decode_if_needed(def, prev)?.as_ref()),
                        },
                        None => false,
                    };
                    selected.set(&event.kv.key, matches_new && event.kind != EventKind::Deleted);
                    // Objects entering or leaving the selection appear as
                    // ADDED or DELETED to this watcher.
                    let kind = match event.kind {
                        EventKind::Created if matches_new => "ADDED",
                        EventKind::Modified if matches_new && matches_old => "MODIFIED",
                        EventKind::Modified if matches_new => "ADDED",
                        EventKind::Modified if matches_old => "DELETED",
                        EventKind::Deleted if matches_new => "DELETED",
                        _ => continue,
                    };
                    let line = spec.event_line(def, kind, &event.kv, new)?;
                    if tx.send(line).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Which keys a filtered watch's selectors matched at the versions it last
/// saw, so the version an event replaces need not be decoded again: the
/// watch saw it, unless it is older than the watch. A watch without
/// selectors matches everything and tracks nothing.
struct Selected {
    filtered: bool,
    /// Versions after this revision have all passed through the watch (the
    /// initial list counts as seeing every version it holds: 0).
    seen_after: Option<i64>,
    /// Keys whose last seen version matched; only matching keys are kept,
    /// so a node's watch of its own pods holds just those.
    keys: std::collections::HashSet<String>,
}

impl Selected {
    fn new(filtered: bool) -> Self {
        Selected {
            filtered,
            seen_after: None,
            keys: Default::default(),
        }
    }

    /// Every version after `revision` will pass through the watch (the
    /// first call counts).
    fn seen_from(&mut self, revision: i64) {
        self.seen_after.get_or_insert(revision);
    }

    /// Whether `prev` matched, when that is known without decoding it.
    fn matched(&self, prev: &KeyValue) -> Option<bool> {
        if !self.filtered {
            return Some(true);
        }
        let seen_after = self.seen_after?;
        (prev.mod_revision > seen_after).then(|| self.keys.contains(&prev.key))
    }

    fn set(&mut self, key: &str, matches: bool) {
        if !self.filtered {
            return;
        }
        if !matches {
            self.keys.remove(key);
        } else if !self.keys.contains(key) {
            self.keys.insert(key.to_owned());
        }
    }
}

impl WatchSpec {
    fn filtered(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }

    /// The object as far as the rendering or the selectors need it: whole
    /// for tables and metadata, the selected fields for filtered watches of
    /// objects (whose lines are the stored bytes), nothing otherwise.
    fn decode_if_needed(&self, def: &ResourceDef, kv: &KeyValue) -> ApiResult<Option<Value>> {
        if self.rendering != Rendering::Object {
            decode(def, kv).map(Some)
        } else if self.filtered() {
            self.view.read(def, kv).map(Some)
        } else {
            Ok(None)
        }
    }

    fn matches(&self, def: &ResourceDef, obj: Option<&Value>) -> bool {
        match obj {
            Some(obj) if self.filtered() => Api::matches(def, &self.labels, &self.fields, obj),
            _ => true,
        }
    }

    /// The event's line for this watcher; `decoded` is the object when
    /// [`Self::decode_if_needed`] decoded it.
    fn event_line(
        &self,
        def: &ResourceDef,
        kind: &str,
        kv: &KeyValue,
        decoded: Option<Value>,
    ) -> ApiResult<Bytes> {
        if self.rendering == Rendering::Object {
            let mut line = Vec::with_capacity(kv.value.len() + 48);
            line.extend_from_slice(b"{\"type\":\"");
            line.extend_from_slice(kind.as_bytes());
            line.extend_from_slice(b"\",\"object\":");
            append_served_or_decode(def, kv, &mut line, self.omit_managed_fields)?;
            line.extend_from_slice(b"}\n");
            return Ok(Bytes::from(line));
        }
        let obj = match decoded {
            Some(obj) => obj,
            None => decode(def, kv)?,
        };
        Ok(event_line(kind, &render(def, &obj, self.rendering)))
    }
}

/// Every Table event carries its column definitions, so each one stands on
/// its own for clients that print watch events as they come.
fn render(def: &crate::registry::ResourceDef, obj: &Value, rendering: Rendering) -> Value {
    match rendering {
        Rendering::Table { include } => {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(json!(""));
            table(
                def,
                std::slice::from_ref(obj),
                include,
                json!({"resourceVersion": rv}),
                true,
            )
        }
        other => render_one(def, obj, other).into_owned(),
    }
}

fn bookmark(def: &crate::registry::ResourceDef, rv: i64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": metadata})
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// One of a user's open watches, given back when dropped.
struct WatchSlot {
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    user: String,
}

impl WatchSlot {
    /// A slot for `user`, unless they hold the most they may.
    fn take(api: &Api, user: &str) -> ApiResult<WatchSlot> {
        let max = api
            .max_watches_per_user
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut open = api.open_watches.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(user.to_string()).or_default();
        if *n >= max {
            return Err(ApiError::TooManyRequests(format!(
                "too many open watches: user {user:?} holds {n}, the most one user may"
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            open: api.open_watches.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// One open watch in the `apiserver_registered_watchers` gauge while alive.
struct Registered(prometheus_client::metrics::gauge::Gauge);

impl Registered {
    fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Registered(gauge)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    /// The (type, name) of the next `n` events of a watch response.
    async fn events(body: &mut Body, buffered: &mut Vec<u8>, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while out.len() < n {
            if let Some(end) = buffered.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffered.drain(..=end).collect();
                let event: Value = serde_json::from_slice(&line).expect("event");
                let name = event["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default();
                out.push((
                    event["type"].as_str().unwrap_or_default().to_string(),
                    name.to_string(),
                ));
                continue;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("an event in time")
                .expect("open stream")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                buffered.extend_from_slice(&data);
            }
        }
        out
    }

    /// A timeout past the clock's range (`timeoutSeconds=2^63-1`) is no
    /// deadline, not a panic, and the watch leaves the open-watches gauge
    /// when its client goes; past int64 (`2^64-1`) it is a bad request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timeout_past_the_clock_is_no_deadline() {
        let server = crate::testing::start().await;
        let cms = "/api/v1/namespaces/default/configmaps";
        server
            .send("POST", cms, &json!({"metadata": {"name": "a"}}))
            .await;
        let watchers = || server.engine.metrics.watchers.get();
        let before = watchers();
        let req = http::Request::builder()
            .uri(format!("{cms}?watch=1&timeoutSeconds={}", u64::MAX))
            .body(Body::empty())
            .expect("request");
        let response = server.api.clone().oneshot(req).await.expect("watch");
        assert_eq!(response.status(), http::StatusCode::BAD_REQUEST);
        let req = http::Request::builder()
            .uri(format!("{cms}?watch=1&timeoutSeconds={}", i64::MAX))
            .body(Body::empty())
            .expect("request");
        let response = server.api.clone().oneshot(req).await.expect("watch");
        assert_eq!(response.status(), http::StatusCode::OK);
        let mut body = response.into_body();
        let mut buffered = Vec::new();
        assert_eq!(
            events(&mut body, &mut buffered, 1).await,
            [("ADDED".into(), "a".into())]
        );
        assert_eq!(watchers(), before + 1);
        drop(body);
        for _ in 0..250 {
            if watchers() == before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the closed watch is still counted: {}", watchers());
    }

    /// One user holds at most `max_watches_per_user` watches open: the
    /// next is 429 TooManyRequests, another user is not affected, and a
    /// closed watch gives its place back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_watches_are_capped_per_user() {
        let server = crate::testing::start().await;
        let api = server.engine.clone();
        api.max_watches_per_user
            .store(2, std::sync::atomic::Ordering::Relaxed);
        let watch = |name: &str| {
            let api = api.clone();
            let name = name.to_string();
            async move {
                let mut req = api
                    .internal_request("", "v1", "configmaps", Some("default"), None)
                    .expect("request");
                req.user = Some(std::sync::Arc::new(crate::pki::User {
                    name,
                    ..Default::default()
                }));
                api.watch(req, tokio_util::sync::CancellationToken::new())
                    .await
            }
        };
        let first = watch("alice").await.expect("first");
        let _second = watch("alice").await.expect("second");
        let refused = watch("alice").await.expect_err("a third");
        assert_eq!(refused.to_status()["code"], 429);
        assert_eq!(refused.to_status()["reason"], "TooManyRequests");
        assert!(watch("bob").await.is_ok(), "another user is not affected");
        drop(first);
        for _ in 0..250 {
            if watch("alice").await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("a closed watch did not give its place back");
    }

    /// Objects entering and leaving a label selection appear as ADDED and
    /// DELETED, whether the watch started with a list or from a version
    /// (whose earlier objects it never saw).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn selected_watches_see_objects_enter_and_leave() {
        let server = crate::testing::start().await;
        let api = server.api.clone();
        let cms = "/api/v1/namespaces/default/configmaps";
        let cm = |name: &str, app: &str| json!({"metadata": {"name": name, "labels": {"app": app}}, "data": {"k": "1"}});
        server.send("POST", cms, &cm("a", "web")).await;
        let b = server.send("POST", cms, &cm("b", "db")).await;
        let rv = b["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();

        let open = |query: String| {
            let api = api.clone();
            async move {
                let req = http::Request::builder()
                    .uri(format!("{cms}?watch=1&labelSelector=app%3Dweb{query}"))
                    .body(Body::empty())
                    .expect("request");
                api.oneshot(req).await.expect("watch").into_body()
            }
        };
        let mut listed = open(String::new()).await;
        let mut resumed = open(format!("&resourceVersion={rv}")).await;
        let (mut listed_buf, mut resumed_buf) = (Vec::new(), Vec::new());
        assert_eq!(
            events(&mut listed, &mut listed_buf, 1).await,
            [("ADDED".into(), "a".into())]
        );

        let patch = |name: &str, body: Value| {
            let uri = format!("{cms}/{name}");
            let server = &server;
            async move { server.send("PATCH", &uri, &body).await }
        };
        let label = |app: &str| json!({"metadata": {"labels": {"app": app}}});
        patch("b", label("web")).await;
        patch("b", json!({"data": {"k": "2"}})).await;
        patch("a", label("db")).await;
        patch("a", json!({"data": {"k": "3"}})).await;
        patch("a", label("web")).await;
        server.send("DELETE", &format!("{cms}/b"), &json!({})).await;

        let want: Vec<(String, String)> = [
            ("ADDED", "b"),
            ("MODIFIED", "b"),
            ("DELETED", "a"),
            ("ADDED", "a"),
            ("DELETED", "b"),
        ]
        .iter()
        .map(|(t, n)| (t.to_string(), n.to_string()))
        .collect();
        assert_eq!(events(&mut listed, &mut listed_buf, 5).await, want);
        assert_eq!(events(&mut resumed, &mut resumed_buf, 5).await, want);
    }
}
