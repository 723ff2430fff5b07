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
        let timeout = match req.query.get("timeoutSeconds").filter(|t| !t.is_empty()) {
            Some(t) => Some(Duration::from_secs(t.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("invalid timeoutSeconds {t:?}"))
            })?)),
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
        let (tx, rx) = mpsc::channel::<Bytes>(WATCH_BUFFER);
        let api = self.clone();
        let def = req.def.clone();
        let start = match rv.as_deref() {
            None | Some("0") => None,
            Some(rv) => Some(parse_resource_version(rv)?),
        };
        tokio::spawn(async move {
            api.metrics.watchers.inc();
            let run = api.run_watch(&def, prefix, start, send_initial, &spec, &tx);
            tokio::select! {
                result = run => {
                    if let Err(e) = result {
                        let _ = tx.send(event_line("ERROR", &e.to_status())).await;
                    }
                }
                _ = shutdown.cancelled() => {}
            }
            api.metrics.watchers.dec();
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
        let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
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
                for kv in &list.items {
                    let obj = spec.decode_if_needed(def, kv)?;
                    if !spec.matches(def, obj.as_ref()) {
                        continue;
                    }
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
                        Some(prev) => spec.matches(def, spec.decode_if_needed(def, prev)?.as_ref()),
                        None => false,
                    };
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
