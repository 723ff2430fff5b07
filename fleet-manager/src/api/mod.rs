//! The REST API: `/v1/policies`, `/v1/tools` (read and write),
//! `/v1/nodes` and `/v1/policies/{name}/status` (read-only), its OpenAPI
//! 3.1 document (`/openapi.json`, generated from the handlers and types
//! below) and a page that reads it to people (`/docs`), `/metrics` and
//! `/healthz`. Every `/v1` route and `/metrics` require a bearer token.

pub mod auth;
mod docs;
pub mod extract;
pub mod nodes;
pub mod objects;
pub mod policies;
pub mod problem;
pub mod tools;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::Extension;
use axum::Router;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Schema, SchemaType};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr};
use utoipa::Modify;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::fleet::Fleet;
use crate::metrics::{Metrics, RequestLabels};
use extract::{Name, Query};
use objects::{ChangeEvent, ListQuery};
use problem::{ApiResult, Problem};

/// What every handler shares.
pub struct AppState {
    pub client: kube::Client,
    pub auth: auth::Authenticator,
    pub authorizer: auth::Authorizer,
    pub metrics: Arc<Metrics>,
    pub fleet: Arc<Fleet>,
}

type Shared = State<Arc<AppState>>;

/// The REST face of one kind: list (or watch), create, get, replace,
/// merge-patch and delete, each documented for the OpenAPI document, with
/// an example body, an example patch and an example name.
macro_rules! face_routes {
    ($module:ident, $face:ty, $body:ident, $page:ident, $tag:tt, $collection:tt, $item:tt, $what:tt,
     $example:tt, $patch_example:tt, $name_example:tt) => {
        pub mod $module {
            use super::*;

            /// A page of objects.
            #[derive(utoipa::ToSchema)]
            #[allow(dead_code)]
            #[serde(rename_all = "camelCase")]
            #[derive(serde::Serialize)]
            pub struct $page {
                pub items: Vec<$body>,
                /// Pass as `continue` for the next page; absent on the last.
                #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
                #[schema(nullable = false)]
                pub continue_: Option<String>,
                /// The version the page was read at: watch from it.
                pub resource_version: String,
            }

            #[utoipa::path(
                get, path = $collection, tag = $tag,
                operation_id = concat!("list_", $tag),
                summary = concat!("List ", $what, "s, or watch them as Server-Sent Events"),
                params(ListQuery, ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "With watch: resume after this event")),
                responses(
                    (status = 200, description = "A page of objects; with watch=true, events ADDED, MODIFIED, DELETED (data: the object, id: its version) and ERROR",
                     content(($page = "application/json"), (ChangeEvent = "text/event-stream"))),
                    (status = 400, description = "A query parameter is wrong (named)", body = Problem, content_type = "application/problem+json"),
                    (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
                    (status = 410, description = "The continue token expired", body = Problem, content_type = "application/problem+json"),
                    (status = 502, description = "The Kubernetes API failed", body = Problem, content_type = "application/problem+json"),
                ),
                security(("bearer" = []))
            )]
            pub async fn list(
                State(state): Shared,
                Query(query): Query<ListQuery>,
                headers: HeaderMap,
            ) -> ApiResult<Response> {
                objects::list::<$face>(state, query, &headers).await
            }

            #[utoipa::path(
                post, path = $collection, tag = $tag,
                operation_id = concat!("create_", $what),
                summary = concat!("Create a ", $what),
                request_body(content = $body, content_type = "application/json", example = json!($example)),
                responses(
                    (status = 201, description = "Created", body = $body,
                     headers(("ETag" = String, description = "The version"), ("Location" = String))),
                    (status = 400, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
                    (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
                    (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"),
                    (status = 422, description = "Invalid: each wrong field named", body = Problem, content_type = "application/problem+json"),
                    (status = 502, description = "The Kubernetes API failed", body = Problem, content_type = "application/problem+json"),
                ),
                security(("bearer" = []))
            )]
            pub async fn create(State(state): Shared, body: Bytes) -> ApiResult<Response> {
                objects::create::<$face>(&state, body).await
            }

            #[utoipa::path(
                get, path = $item, tag = $tag,
                operation_id = concat!("read_", $what),
                summary = concat!("Read a ", $what),
                params(("name" = String, Path, example = $name_example)),
                responses(
                    (status = 200, description = "The object", body = $body,
                     headers(("ETag" = String, description = "The version"))),
                    (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
                    (status = 404, description = "No such object", body = Problem, content_type = "application/problem+json"),
                    (status = 502, description = "The Kubernetes API failed", body = Problem, content_type = "application/problem+json"),
                ),
                security(("bearer" = []))
            )]
            pub async fn read(State(state): Shared, Name(name): Name) -> ApiResult<Response> {
                objects::get::<$face>(&state, &name).await
            }

            #[utoipa::path(
                put, path = $item, tag = $tag,
                operation_id = concat!("replace_", $what),
                summary = concat!("Replace a ", $what),
                params(("name" = String, Path, example = $name_example),
                       ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(\*|(W/)?"[^",]+")$"#,
                        description = "Replace only this version (an ETag)")),
                request_body(content = $body, content_type = "application/json", example = json!($example)),
                responses(
                    (status = 200, description = "Replaced", body = $body,
                     headers(("ETag" = String, description = "The new version"))),
                    (status = 400, description = "Not JSON, or a bad If-Match", body = Problem, content_type = "application/problem+json"),
                    (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
                    (status = 404, description = "No such object", body = Problem, content_type = "application/problem+json"),
                    (status = 409, description = "It kept changing", body = Problem, content_type = "application/problem+json"),
                    (status = 412, description = "If-Match names an older version", body = Problem, content_type = "application/problem+json"),
                    (status = 422, description = "Invalid: each wrong field named", body = Problem, content_type = "application/problem+json"),
                    (status = 502, description = "The Kubernetes API failed", body = Problem, content_type = "application/problem+json"),
                ),
                security(("bearer" = []))
            )]
            pub async fn replace(
                State(state): Shared,
                Name(name): Name,
                headers: HeaderMap,
                body: Bytes,
            ) -> ApiResult<Response> {
                objects::replace::<$face>(&state, &name, &headers, body).await
            }

            #[utoipa::path(
                patch, path = $item, tag = $tag,
                operation_id = concat!("patch_", $what),
                summary = concat!("Change some fields of a ", $what, " (JSON merge patch, RFC 7386)"),
                params(("name" = String, Path, example = $name_example),
                       ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(\*|(W/)?"[^",]+")$"#,
                        description = "Patch only this version (an ETag)")),
                request_body(content = Object, content_type = "application/merge-patch+json",
                             description = "Fields to set; null removes one", example = json!($patch_example)),
                responses(
                    (status = 200, description = "Patched", body = $body,
                     headers(("ETag" = String, description = "The new version"))),
                    (status = 400, description = "Not JSON, or a bad If-Match", body = Problem, content_type = "application/problem+json"),
                    (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
                    (status = 404, description = "No such object", body = Problem, content_type = "application/problem+json"),
                    (status = 409, description = "It kept changing", body = Problem, content_type = "application/problem+json"),
                    (status = 412, description = "If-Match names an older version", body = Problem, content_type = "application/problem+json"),
                    (status = 415, description = "Not a merge patch", body = Problem, content_type = "application/problem+json"),
                    (status = 422, description = "Invalid: each wrong field named", body = Problem, content_type = "application/problem+json"),
                    (status = 502, description = "The Kubernetes API failed", body = Problem, content_type = "application/problem+json"),
                ),
                security(("bearer" = []))
            )]
            pub async fn patch(
                State(state): Shared,
                Name(name): Name,
                headers: HeaderMap,
                body: Bytes,
            ) -> ApiResult<Response> {
                objects::patch::<$face>(&state, &name, &headers, body).await
            }

            #[utoipa::path(
                delete, path = $item, tag = $tag,
                operation_id = concat!("delete_", $what),
                summary = concat!("Delete a ", $what),
                params(("name" = String, Path, example = $name_example),
                       ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(\*|(W/)?"[^",]+")$"#,
                        description = "Delete only this version (an ETag)")),
                responses(
                    (status = 204, description = "Deleted"),
                    (status = 400, description = "A bad If-Match", body = Problem, content_type = "application/problem+json"),
                    (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
                    (status = 404, description = "No such object", body = Problem, content_type = "application/problem+json"),
                    (status = 412, description = "If-Match names an older version", body = Problem, content_type = "application/problem+json"),
                    (status = 502, description = "The Kubernetes API failed", body = Problem, content_type = "application/problem+json"),
                ),
                security(("bearer" = []))
            )]
            pub async fn delete(
                State(state): Shared,
                Name(name): Name,
                headers: HeaderMap,
            ) -> ApiResult<Response> {
                objects::delete::<$face>(&state, &name, &headers).await
            }

            pub fn router() -> OpenApiRouter<Arc<AppState>> {
                OpenApiRouter::new()
                    .routes(routes!(list, create))
                    .routes(routes!(read, replace, patch, delete))
            }
        }
    };
}

face_routes!(
    policy_routes,
    policies::Policies,
    Policy,
    PolicyPage,
    "policies",
    "/v1/policies",
    "/v1/policies/{name}",
    "policy",
    {"name": "web", "namespaces": ["shop"], "podSelector": {"matchLabels": {"app": "web"}}, "tools": ["wireshark"]},
    {"snaplen": 128},
    "web"
);
face_routes!(
    tool_routes,
    tools::Tools,
    Tool,
    ToolPage,
    "tools",
    "/v1/tools",
    "/v1/tools/{name}",
    "tool",
    {"name": "wireshark", "type": "pcapOverIp", "listen": "127.0.0.1:57012"},
    {"listen": "127.0.0.1:57013"},
    "wireshark"
);

use policies::Policy;
use tools::Tool;

/// Adds the bearer-token scheme the paths refer to.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Marks the status of a policy and of a tool read-only (written by the
/// fleet; ignored when a client sends it), which utoipa drops beside a
/// `$ref`: `allOf: [{$ref}, {readOnly: true}]` says the same.
struct ReadOnlyStatus;

impl Modify for ReadOnlyStatus {
    fn modify(&self, openapi: &mut OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for kind in ["Policy", "Tool"] {
            let Some(RefOr::T(Schema::AllOf(all))) = components.schemas.get_mut(kind) else {
                continue;
            };
            for item in &mut all.items {
                let RefOr::T(Schema::Object(object)) = item else {
                    continue;
                };
                let Some(status) = object.properties.get_mut("status") else {
                    continue;
                };
                if let RefOr::Ref(reference) = status {
                    let description = std::mem::take(&mut reference.description);
                    let read_only = ObjectBuilder::new()
                        .schema_type(SchemaType::AnyValue)
                        .read_only(Some(true));
                    *status = AllOfBuilder::new()
                        .item(reference.clone())
                        .item(read_only)
                        .description(Some(description))
                        .into();
                }
            }
        }
    }
}

#[utoipa::path(
    get, path = "/healthz", tag = "service", operation_id = "healthz",
    summary = "Whether the fleet manager is up",
    responses((status = 200, description = "ok", body = String, content_type = "text/plain"))
)]
async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get, path = "/metrics", tag = "service", operation_id = "metrics",
    summary = "Prometheus metrics",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The Kubernetes API failed checking the token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn metrics(State(state): Shared) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// The document as served, made once the router (and so the document) is
/// complete.
struct Rendered {
    json: Bytes,
    page: String,
}

#[utoipa::path(
    get, path = "/openapi.json", tag = "service", operation_id = "openapi",
    summary = "This API's OpenAPI 3.1 document",
    responses((status = 200, description = "The document", body = Object, content_type = "application/json"))
)]
async fn openapi_json(Extension(rendered): Extension<Arc<Rendered>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        rendered.json.clone(),
    )
        .into_response()
}

#[utoipa::path(
    get, path = "/docs", tag = "service", operation_id = "docs",
    summary = "The same document as a page to read",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html"))
)]
async fn docs_page(Extension(rendered): Extension<Arc<Rendered>>) -> Html<String> {
    Html(rendered.page.clone())
}

#[utoipa::path(
    get, path = "/", tag = "service", operation_id = "root",
    summary = "Sends readers to /docs",
    responses((status = 307, description = "To /docs", headers(("Location" = String))))
)]
async fn root() -> axum::response::Redirect {
    axum::response::Redirect::temporary("/docs")
}

/// The API document and the router that serves it.
pub fn router(state: Arc<AppState>) -> (Router, OpenApi) {
    let mut doc = OpenApi::default();
    doc.info.title = "Tapestry fleet manager".into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.info.description = Some(
        "Tap policies (which pods' traffic is mirrored, what is kept of it, which tools get it) \
         and tools (where it goes), stored as tapestry.io/v1alpha1 custom resources; the taps \
         on every node and what they report. Errors are RFC 9457 problem details naming the \
         fields at fault."
            .into(),
    );
    let protected = OpenApiRouter::new()
        .merge(policy_routes::router())
        .merge(tool_routes::router())
        .routes(routes!(nodes::list))
        .routes(routes!(nodes::read))
        .routes(routes!(nodes::policy_status))
        .routes(routes!(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let (router, mut doc) = OpenApiRouter::with_openapi(doc)
        .merge(protected)
        .routes(routes!(healthz))
        .routes(routes!(openapi_json))
        .routes(routes!(docs_page))
        .routes(routes!(root))
        .split_for_parts();
    BearerScheme.modify(&mut doc);
    ReadOnlyStatus.modify(&mut doc);
    let rendered = Arc::new(Rendered {
        json: Bytes::from(doc.to_pretty_json().unwrap_or_default()),
        page: docs::render(&doc),
    });
    let router = router
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no such endpoint; see /docs") })
        .layer(Extension(rendered))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state);
    (router, doc)
}

/// Count every request by route and code; time all but watches.
async fn count_requests(State(state): Shared, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let watching = request
        .uri()
        .query()
        .is_some_and(|q| q.contains("watch=true"));
    let started = Instant::now();
    let response = next.run(request).await;
    if !watching {
        state
            .metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
    }
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            code: response.status().as_u16(),
        })
        .inc();
    response
}

/// Serve the API over HTTPS on `listener` until `shutdown`.
pub fn serve(
    listener: std::net::TcpListener,
    identity: crate::tls::Identity,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let (router, _) = router(state);
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(identity.server_config()?);
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, tls)?.handle(handle.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    Ok(tokio::spawn(async move {
        if let Err(e) = server.serve(router.into_make_service()).await {
            tracing::error!("REST API server failed: {e}");
        }
    }))
}
