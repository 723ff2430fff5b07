//! A server on a temporary store, driven in process, for unit tests.

use std::sync::Arc;

use axum::body::Body;
use http_body_util::BodyExt;
use serde_json::Value;
use tapestry_store::RedbStore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::{LocalHandler, ServerConfig};

/// A running server; it stops when dropped.
pub struct TestServer {
    pub api: LocalHandler,
    /// The REST engine behind `api`, for the server's own loops.
    pub engine: Arc<crate::rest::Api>,
    pub store: Arc<dyn tapestry_store::Store>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

/// A server whose configuration `configure` changes from the defaults.
pub async fn start_with(configure: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).expect("store"));
    let shutdown = CancellationToken::new();
    let mut config = ServerConfig::new(
        dir.path().to_path_buf(),
        "127.0.0.1:0".parse().expect("address"),
    );
    configure(&mut config);
    let running = crate::start(config, store.clone(), shutdown.clone())
        .await
        .expect("server");
    TestServer {
        api: running.local_handler(),
        engine: running.api.clone(),
        store,
        shutdown,
        _dir: dir,
    }
}

impl TestServer {
    /// Send a JSON body (a merge patch for PATCH); the status and the JSON
    /// answer.
    pub async fn request(
        &self,
        method: &str,
        uri: &str,
        body: &Value,
    ) -> (http::StatusCode, Value) {
        let content_type = if method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Body::from(body.to_string()))
            .expect("request");
        let resp = self.api.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let answer = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {uri}: {status}, not JSON ({e}): {bytes:?}"));
        (status, answer)
    }

    /// A request with its own content type and headers; the status, the
    /// response headers and the JSON answer (null when not JSON).
    pub async fn raw(
        &self,
        method: &str,
        uri: &str,
        content_type: &str,
        accept: &str,
        body: String,
    ) -> (http::StatusCode, http::HeaderMap, Value) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, content_type);
        if !accept.is_empty() {
            req = req.header(http::header::ACCEPT, accept);
        }
        let req = req.body(Body::from(body)).expect("request");
        let resp = self.api.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The keys the store holds under `prefix`.
    pub async fn api_store_keys(&self, prefix: &str) -> Vec<String> {
        let list = self
            .store
            .list(prefix, Default::default())
            .await
            .expect("list");
        list.items.into_iter().map(|kv| kv.key).collect()
    }

    /// [`Self::request`] that must succeed.
    pub async fn send(&self, method: &str, uri: &str, body: &Value) -> Value {
        let (status, answer) = self.request(method, uri, body).await;
        assert!(status.is_success(), "{method} {uri}: {status} {answer}");
        answer
    }
}
