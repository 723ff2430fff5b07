//! What policies and tools share: the REST face over a cluster-scoped
//! custom resource — create, read, replace, merge-patch, delete, list with
//! pagination, watch as Server-Sent Events — with `ETag` = resourceVersion
//! and `If-Match` preconditions, and every error as problem+json naming the
//! field.
//!
//! The objects live only in the Kubernetes API: a body is checked here
//! (types, then [`Face::check`]) and then written with
//! `fieldValidation=Strict`, so the API server's schema — unknown fields
//! included — has the last word, and its causes come back with their
//! field paths.

use std::convert::Infallible;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use kube::api::{ApiResource, ListParams, WatchEvent, WatchParams};
use kube::core::ClusterResourceScope;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::problem::{ApiResult, FieldProblem, Problem};
use super::AppState;

/// The field manager the REST API writes as.
pub const FIELD_MANAGER: &str = "tapestry-fleet-manager";

/// How one custom resource kind appears in the REST API: its REST body is
/// `{"name": ..., <the spec's fields>, "resourceVersion": ..., "status": ...}`.
pub trait Face: Send + Sync + 'static {
    type Resource: Resource<DynamicType = (), Scope = ClusterResourceScope>
        + Clone
        + Debug
        + DeserializeOwned
        + Serialize
        + Send
        + Sync
        + 'static;
    type Spec: DeserializeOwned + Serialize + Send;
    /// "policy", "tool": how errors name the kind.
    const WHAT: &'static str;
    /// Where the kind is served: "/v1/policies".
    const COLLECTION: &'static str;

    fn spec(resource: &Self::Resource) -> &Self::Spec;
    fn status(resource: &Self::Resource) -> Value;

    /// What the schema cannot say about a spec; field paths relative to it.
    fn check(
        state: &AppState,
        name: &str,
        spec: &Self::Spec,
    ) -> impl std::future::Future<Output = Result<(), Vec<FieldProblem>>> + Send;
}

/// The REST body of an object.
pub fn body<F: Face>(resource: &F::Resource) -> Value {
    let mut out = Map::new();
    out.insert(
        "name".into(),
        json!(resource.meta().name.clone().unwrap_or_default()),
    );
    if let Ok(Value::Object(spec)) = serde_json::to_value(F::spec(resource)) {
        out.extend(spec);
    }
    if let Some(rv) = &resource.meta().resource_version {
        out.insert("resourceVersion".into(), json!(rv));
    }
    let status = F::status(resource);
    if !status.is_null() {
        out.insert("status".into(), status);
    }
    Value::Object(out)
}

fn etag(resource_version: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{resource_version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// The resourceVersion an `If-Match` header names (`*` and absent: none).
fn if_match(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Problem::bad_request("If-Match is not text"))?
        .trim();
    if value == "*" {
        return Ok(None);
    }
    // One entity-tag (RFC 9110): "version" or W/"version", as the ETag.
    let tag = value.strip_prefix("W/").unwrap_or(value);
    match tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(tag) if !tag.is_empty() && !tag.contains(['"', ',']) => Ok(Some(tag.to_string())),
        _ => Err(Problem::bad_request(format!(
            "If-Match must hold one ETag as GET returns it (\"VERSION\"), or *; not {value:?}"
        ))),
    }
}

/// A JSON response with the object's ETag.
fn with_etag(status: StatusCode, resource: Value) -> Response {
    let rv = resource["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut resp = (status, axum::Json(resource)).into_response();
    resp.headers_mut().insert(header::ETAG, etag(&rv));
    resp
}

/// What a request body holds: the name it gives and its spec fields.
struct Request {
    name: Option<String>,
    spec: Map<String, Value>,
}

fn parse_body(bytes: &Bytes) -> ApiResult<Request> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Problem::bad_request(format!("the body is not JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(Problem::field("", "the body must be a JSON object"));
    };
    // Read-only fields a client may send back from a GET are ignored.
    fields.remove("resourceVersion");
    fields.remove("status");
    let name = match fields.remove("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name),
        Some(other) => {
            return Err(Problem::field(
                "name",
                format!("must be a string, not {other}"),
            ))
        }
    };
    Ok(Request { name, spec: fields })
}

/// The typed spec of a body, or the first field whose type is wrong.
async fn checked_spec<F: Face>(
    state: &AppState,
    name: &str,
    spec: &Map<String, Value>,
) -> ApiResult<F::Spec> {
    let typed: F::Spec =
        serde_path_to_error::deserialize(Value::Object(spec.clone())).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            Problem::field(field, e.into_inner().to_string())
        })?;
    let mut problems = name_problems(name);
    if let Err(more) = F::check(state, name, &typed).await {
        problems.extend(more);
    }
    if problems.is_empty() {
        Ok(typed)
    } else {
        Err(Problem::invalid(problems))
    }
}

fn name_problems(name: &str) -> Vec<FieldProblem> {
    tapestry_apimachinery::validation::dns1123_subdomain_errors(name)
        .into_iter()
        .map(|message| FieldProblem {
            field: "name".into(),
            message,
        })
        .collect()
}

fn api_resource<F: Face>() -> ApiResource {
    ApiResource::erase::<F::Resource>(&())
}

/// The object as the API server takes it: the client's spec fields as
/// sent, so the server's strict field check sees any it does not know.
fn object<F: Face>(
    name: &str,
    spec: Map<String, Value>,
    resource_version: Option<String>,
) -> Value {
    let ar = api_resource::<F>();
    let mut metadata = json!({ "name": name });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    json!({"apiVersion": ar.api_version, "kind": ar.kind, "metadata": metadata, "spec": spec})
}

/// A raw request to the API server, its answer decoded whatever the status
/// (so a refusal's causes reach the client).
/// The API server's status and answer. The answer is parsed by the caller:
/// straight into the resource on success, into a `Status` on refusal.
async fn send(state: &AppState, request: http::Request<Vec<u8>>) -> ApiResult<(StatusCode, Bytes)> {
    let response = state
        .client
        .send(request.map(kube::client::Body::from))
        .await
        .map_err(|e| Problem::upstream(&e))?;
    let status = response.status();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|e| Problem::internal(format!("reading the API server's answer: {e}")))?
        .to_bytes();
    Ok((status, bytes))
}

/// A refusal's answer as JSON (`Null` if it is not JSON).
fn refused(answer: &[u8]) -> Value {
    serde_json::from_slice(answer).unwrap_or(Value::Null)
}

fn collection_url<F: Face>() -> String {
    F::Resource::url_path(&(), None)
}

fn object_url<F: Face>(name: &str) -> String {
    format!("{}/{name}", collection_url::<F>())
}

/// `?fieldValidation=Strict&fieldManager=...` on a write.
fn strict(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}fieldValidation=Strict&fieldManager={FIELD_MANAGER}")
}

/// An API server refusal as the REST API words it: causes become field
/// problems with paths relative to the spec, a conflict on a write that
/// named a version becomes 412.
fn refusal<F: Face>(status: StatusCode, answer: &Value, name: &str, pinned: bool) -> Problem {
    let message = answer["message"].as_str().unwrap_or_default();
    match status {
        StatusCode::NOT_FOUND => Problem::not_found(F::WHAT, name),
        StatusCode::CONFLICT if pinned && answer["reason"] == "Conflict" => {
            Problem::precondition_failed(F::WHAT, name)
        }
        StatusCode::CONFLICT => Problem::new(StatusCode::CONFLICT, message),
        StatusCode::UNPROCESSABLE_ENTITY => {
            let causes = answer["details"]["causes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let problems: Vec<FieldProblem> = causes
                .iter()
                .map(|c| FieldProblem {
                    field: rest_field(c["field"].as_str().unwrap_or_default()),
                    message: c["message"].as_str().unwrap_or_default().to_string(),
                })
                .collect();
            if problems.is_empty() {
                Problem::field("", message)
            } else {
                Problem::invalid(problems)
            }
        }
        StatusCode::BAD_REQUEST if message.contains("unknown field") => {
            // `... strict decoding error: unknown field "spec.foo", unknown field "spec.bar"`
            let problems = message
                .split("unknown field \"")
                .skip(1)
                .filter_map(|rest| rest.split('"').next())
                .map(|field| FieldProblem {
                    field: rest_field(field),
                    message: "unknown field".into(),
                })
                .collect();
            Problem::invalid(problems)
        }
        s if s.is_client_error() => Problem::new(s, message),
        s => Problem::new(
            StatusCode::BAD_GATEWAY,
            format!("the Kubernetes API server answered {s}: {message}"),
        ),
    }
}

/// A field path of the stored object as the REST body names it.
fn rest_field(field: &str) -> String {
    match field {
        "metadata.name" => "name".into(),
        f => f.strip_prefix("spec.").unwrap_or(f).to_string(),
    }
}

pub async fn create<F: Face>(state: &AppState, bytes: Bytes) -> ApiResult<Response> {
    let request = parse_body(&bytes)?;
    let name = request
        .name
        .clone()
        .ok_or_else(|| Problem::field("name", "required"))?;
    checked_spec::<F>(state, &name, &request.spec).await?;
    let payload =
        serde_json::to_vec(&object::<F>(&name, request.spec, None)).map_err(Problem::internal)?;
    let req = http::Request::post(strict(&collection_url::<F>()))
        .header(header::CONTENT_TYPE, "application/json")
        .body(payload)
        .map_err(Problem::internal)?;
    let (status, answer) = send(state, req).await?;
    if !status.is_success() {
        return Err(refusal::<F>(status, &refused(&answer), &name, false));
    }
    let resource: F::Resource = serde_json::from_slice(&answer).map_err(Problem::internal)?;
    state.metrics.wrote();
    let mut resp = with_etag(StatusCode::CREATED, body::<F>(&resource));
    if let Ok(location) = HeaderValue::from_str(&format!("{}/{name}", F::COLLECTION)) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    Ok(resp)
}

/// Whether an object could have this name; one that could not is not
/// asked for (it would not even make a valid URL).
pub fn could_exist(name: &str) -> bool {
    name_problems(name).is_empty()
}

async fn read<F: Face>(state: &AppState, name: &str) -> ApiResult<F::Resource> {
    if !could_exist(name) {
        return Err(Problem::not_found(F::WHAT, name));
    }
    let api: Api<F::Resource> = Api::all(state.client.clone());
    match api.get_opt(name).await {
        Ok(Some(resource)) => Ok(resource),
        Ok(None) => Err(Problem::not_found(F::WHAT, name)),
        Err(e) => Err(Problem::upstream(&e)),
    }
}

pub async fn get<F: Face>(state: &AppState, name: &str) -> ApiResult<Response> {
    let resource = read::<F>(state, name).await?;
    Ok(with_etag(StatusCode::OK, body::<F>(&resource)))
}

/// PUT: the whole object; `If-Match` pins the version replaced. Without
/// it the current version is replaced, whatever it is (custom resources
/// need a version on every update, so it is read first and the write is
/// retried if another lands in between).
pub async fn replace<F: Face>(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    let request = parse_body(&bytes)?;
    if request.name.as_deref().is_some_and(|n| n != name) {
        return Err(Problem::field(
            "name",
            format!("must be {name:?}, the name in the URL"),
        ));
    }
    checked_spec::<F>(state, name, &request.spec).await?;
    if let Some(pinned) = if_match(headers)? {
        return write::<F>(state, name, request.spec, pinned).await;
    }
    for _ in 0..WRITE_ATTEMPTS {
        let current = read::<F>(state, name).await?;
        let current_rv = current.meta().resource_version.clone().unwrap_or_default();
        match write::<F>(state, name, request.spec.clone(), current_rv).await {
            Err(p) if p.status == StatusCode::PRECONDITION_FAILED.as_u16() => continue,
            other => return other,
        }
    }
    Err(kept_changing::<F>(name))
}

/// How often a write that lost a race is retried before giving up.
const WRITE_ATTEMPTS: usize = 8;

fn kept_changing<F: Face>(name: &str) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        format!("{} {name:?} kept changing; try again", F::WHAT),
    )
}

/// Store a checked `spec` as the object's spec if it is still at version
/// `pinned` (412 if not).
async fn write<F: Face>(
    state: &AppState,
    name: &str,
    spec: Map<String, Value>,
    pinned: String,
) -> ApiResult<Response> {
    // The status subresource keeps status: replacing the main resource
    // never touches it.
    let payload =
        serde_json::to_vec(&object::<F>(name, spec, Some(pinned))).map_err(Problem::internal)?;
    let req = http::Request::put(strict(&object_url::<F>(name)))
        .header(header::CONTENT_TYPE, "application/json")
        .body(payload)
        .map_err(Problem::internal)?;
    let (status, answer) = send(state, req).await?;
    if !status.is_success() {
        return Err(refusal::<F>(status, &refused(&answer), name, true));
    }
    let resource: F::Resource = serde_json::from_slice(&answer).map_err(Problem::internal)?;
    state.metrics.wrote();
    Ok(with_etag(StatusCode::OK, body::<F>(&resource)))
}

/// PATCH as JSON merge patch (RFC 7386) of the REST body: applied to the
/// current object, checked like a PUT, written pinned to the version it was
/// applied to (retried on a concurrent write unless `If-Match` pinned one).
pub async fn patch<F: Face>(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/merge-patch+json")
        && !content_type.starts_with("application/json")
    {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("PATCH takes application/merge-patch+json, not {content_type:?}"),
        ));
    }
    let patch: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Problem::bad_request(format!("the body is not JSON: {e}")))?;
    if !patch.is_object() {
        return Err(Problem::field("", "a merge patch must be a JSON object"));
    }
    let pinned = if_match(headers)?;
    for _ in 0..WRITE_ATTEMPTS {
        let current = read::<F>(state, name).await?;
        let current_rv = current.meta().resource_version.clone().unwrap_or_default();
        if pinned.as_deref().is_some_and(|p| p != current_rv) {
            return Err(Problem::precondition_failed(F::WHAT, name));
        }
        let mut merged = body::<F>(&current);
        json_patch::merge(&mut merged, &patch);
        let request = parse_body(&Bytes::from(
            serde_json::to_vec(&merged).map_err(Problem::internal)?,
        ))?;
        if request.name.as_deref() != Some(name) {
            return Err(Problem::field("name", "cannot be changed"));
        }
        checked_spec::<F>(state, name, &request.spec).await?;
        match write::<F>(state, name, request.spec, current_rv).await {
            Err(p) if p.status == StatusCode::PRECONDITION_FAILED.as_u16() && pinned.is_none() => {
                continue
            }
            other => return other,
        }
    }
    Err(kept_changing::<F>(name))
}

pub async fn delete<F: Face>(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let pinned = if_match(headers)?;
    if !could_exist(name) {
        return Err(Problem::not_found(F::WHAT, name));
    }
    let mut options = json!({"propagationPolicy": "Background"});
    if let Some(rv) = &pinned {
        options["preconditions"] = json!({"resourceVersion": rv});
    }
    let req = http::Request::delete(object_url::<F>(name))
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&options).map_err(Problem::internal)?)
        .map_err(Problem::internal)?;
    let (status, answer) = send(state, req).await?;
    if !status.is_success() {
        return Err(refusal::<F>(
            status,
            &refused(&answer),
            name,
            pinned.is_some(),
        ));
    }
    state.metrics.wrote();
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Query of a list or watch.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// At most this many items; the answer's `continue` fetches the next page.
    #[param(minimum = 1)]
    pub limit: Option<i32>,
    /// The `continue` of the previous page.
    #[serde(rename = "continue")]
    pub continue_: Option<String>,
    /// Stream changes as Server-Sent Events instead of listing.
    #[serde(default)]
    pub watch: bool,
    /// With `watch`: changes after this version (else the `Last-Event-ID`
    /// header's, else everything as it is now, then changes).
    pub resource_version: Option<String>,
}

/// A page of objects.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `continue` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#continue: Option<String>,
    /// The version the page was read at: watch from it.
    pub resource_version: String,
}

pub async fn list<F: Face>(
    state: Arc<AppState>,
    query: ListQuery,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    // Checked for watches too, which ignore it: a wrong query is refused
    // whatever else it asks.
    let limit = match query.limit {
        None => None,
        Some(limit) => match u32::try_from(limit) {
            Ok(limit @ 1..) => Some(limit),
            _ => {
                return Err(Problem::bad_query(vec![FieldProblem::new(
                    "limit",
                    "must be at least 1",
                )]))
            }
        },
    };
    if query.watch {
        let from = query.resource_version.clone().or_else(|| {
            headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        return Ok(watch::<F>(state, from).into_response());
    }
    let api: Api<F::Resource> = Api::all(state.client.clone());
    let mut params = ListParams::default();
    if let Some(limit) = limit {
        params = params.limit(limit);
    }
    if let Some(token) = &query.continue_ {
        params = params.continue_token(token);
    }
    let list = api.list(&params).await.map_err(|e| match &e {
        kube::Error::Api(s) if s.code == 410 => Problem::new(
            StatusCode::GONE,
            "the continue token has expired: list again from the start",
        ),
        kube::Error::Api(s) if s.code == 400 => Problem::bad_request(s.message.clone()),
        _ => Problem::upstream(&e),
    })?;
    let page = Page {
        items: list.items.iter().map(body::<F>).collect::<Vec<_>>(),
        r#continue: list.metadata.continue_.filter(|c| !c.is_empty()),
        resource_version: list.metadata.resource_version.unwrap_or_default(),
    };
    Ok(axum::Json(page).into_response())
}

/// One Server-Sent Event of a watch (the document's schema for each event
/// of a `text/event-stream` answer).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ChangeEvent {
    pub event: ChangeKind,
    /// The object's resourceVersion: resume after it with `Last-Event-ID`
    /// (or `resourceVersion`). Absent on ERROR.
    #[schema(nullable = false)]
    pub id: Option<String>,
    /// JSON: the object's REST body; for ERROR a problem details object.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// What happened to the object; ERROR ends the stream (410 in its data
/// when the version to resume from is too old: list again).
#[derive(ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum ChangeKind {
    ADDED,
    MODIFIED,
    DELETED,
    ERROR,
}

/// Changes as Server-Sent Events: `event:` ADDED, MODIFIED or DELETED,
/// `id:` the resourceVersion (resume with `Last-Event-ID`), `data:` the
/// object's REST body. Without a version the stream opens with every
/// object as ADDED. A version too old to resume from ends the stream with
/// an `event: ERROR` (410): list again.
fn watch<F: Face>(
    state: Arc<AppState>,
    from: Option<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = changes::<F>(state, from).map(Ok);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn event_of<F: Face>(kind: &str, resource: &F::Resource) -> Event {
    let rv = resource.meta().resource_version.clone().unwrap_or_default();
    Event::default()
        .event(kind)
        .id(rv)
        .json_data(body::<F>(resource))
        .unwrap_or_else(|_| {
            Event::default()
                .event("ERROR")
                .data("could not encode the object")
        })
}

fn error_event(problem: Problem) -> Event {
    Event::default()
        .event("ERROR")
        .json_data(&problem)
        .unwrap_or_else(|_| Event::default().event("ERROR").data(problem.detail))
}

fn changes<F: Face>(state: Arc<AppState>, from: Option<String>) -> impl Stream<Item = Event> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let api: Api<F::Resource> = Api::all(state.client.clone());
        let from = match from {
            Some(rv) => rv,
            None => match api.list(&ListParams::default()).await {
                Ok(list) => {
                    for resource in &list.items {
                        if tx.send(event_of::<F>("ADDED", resource)).await.is_err() {
                            return;
                        }
                    }
                    list.metadata.resource_version.unwrap_or_default()
                }
                Err(e) => {
                    let _ = tx.send(error_event(Problem::upstream(&e))).await;
                    return;
                }
            },
        };
        let mut from = from;
        loop {
            let params = WatchParams::default().timeout(290);
            let stream = match api.watch(&params, &from).await {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = tx.send(error_event(Problem::upstream(&e))).await;
                    return;
                }
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let (kind, resource) = match event {
                    Ok(WatchEvent::Added(r)) => ("ADDED", r),
                    Ok(WatchEvent::Modified(r)) => ("MODIFIED", r),
                    Ok(WatchEvent::Deleted(r)) => ("DELETED", r),
                    Ok(WatchEvent::Bookmark(b)) => {
                        from = b.metadata.resource_version;
                        continue;
                    }
                    Ok(WatchEvent::Error(e)) if e.code == 410 => {
                        let _ = tx
                            .send(error_event(Problem::new(
                                StatusCode::GONE,
                                "the version to resume from is too old: list again",
                            )))
                            .await;
                        return;
                    }
                    Ok(WatchEvent::Error(e)) => {
                        let _ = tx
                            .send(error_event(Problem::new(
                                StatusCode::BAD_GATEWAY,
                                e.message,
                            )))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(error_event(Problem::upstream(&e))).await;
                        return;
                    }
                };
                // A renewed watch resumes after the last event sent.
                if let Some(rv) = &resource.meta().resource_version {
                    from = rv.clone();
                }
                if tx.send(event_of::<F>(kind, &resource)).await.is_err() {
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn if_match_of(value: &str) -> ApiResult<Option<String>> {
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_MATCH, HeaderValue::from_str(value).unwrap());
        if_match(&headers)
    }

    #[test]
    fn if_match_takes_one_entity_tag() {
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
        assert_eq!(if_match_of("*").unwrap(), None);
        assert_eq!(if_match_of("\"42\"").unwrap().as_deref(), Some("42"));
        assert_eq!(if_match_of("W/\"42\"").unwrap().as_deref(), Some("42"));
        for bad in ["", "42", "\"\"", "\"4\"2\"", "\"1\", \"2\"", "{}", "W/42"] {
            let problem = if_match_of(bad).unwrap_err();
            assert_eq!(problem.status, 400, "{bad:?}");
        }
    }

    #[test]
    fn only_names_an_object_could_have_are_looked_up() {
        assert!(could_exist("web"));
        assert!(could_exist("a.b-c"));
        for name in ["", "Web", "a b", "é", "a/b", "-a", &"a".repeat(254)] {
            assert!(!could_exist(name), "{name:?}");
        }
    }
}
