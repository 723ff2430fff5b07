//! Who is calling: bearer tokens, checked against a token file
//! (kube-apiserver's format) or, without one, against the cluster through
//! the TokenReview API, so the REST API trusts exactly whom the cluster
//! trusts. Every endpoint but `/healthz` requires a token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use tapestry_apimachinery::tokens::TokenFile;

use super::problem::Problem;
use super::AppState;

/// How long a TokenReview's answer is reused, and how many are kept.
const REVIEW_TTL: Duration = Duration::from_secs(10);
const REVIEW_CACHE: usize = 1024;

pub enum Authenticator {
    File(TokenFile),
    /// TokenReview through this client, with recent answers cached.
    Cluster {
        client: kube::Client,
        cache: Mutex<HashMap<String, (Instant, Option<String>)>>,
    },
}

impl Authenticator {
    pub fn cluster(client: kube::Client) -> Self {
        Authenticator::Cluster {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The user a token belongs to, if any.
    pub async fn authenticate(&self, token: &str) -> Result<Option<String>, Problem> {
        match self {
            Authenticator::File(file) => Ok(file.authenticate(token).map(|u| u.name.clone())),
            Authenticator::Cluster { client, cache } => {
                if let Some((at, user)) = lock(cache).get(token) {
                    if at.elapsed() < REVIEW_TTL {
                        return Ok(user.clone());
                    }
                }
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(token.to_string()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
                let answer = api
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| Problem::upstream(&e))?;
                let user = answer
                    .status
                    .filter(|s| s.authenticated == Some(true))
                    .and_then(|s| s.user)
                    .and_then(|u| u.username);
                let mut cache = lock(cache);
                if cache.len() >= REVIEW_CACHE {
                    cache.retain(|_, (at, _)| at.elapsed() < REVIEW_TTL);
                    if cache.len() >= REVIEW_CACHE {
                        cache.clear();
                    }
                }
                cache.insert(token.to_string(), (Instant::now(), user.clone()));
                Ok(user)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The middleware: a request without a valid bearer token gets 401.
pub async fn require_token(
    State(state): State<std::sync::Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        state.metrics.refused();
        return Problem::unauthorized().into_response();
    };
    match state.auth.authenticate(token).await {
        Ok(Some(_)) => next.run(request).await,
        Ok(None) => {
            state.metrics.refused();
            Problem::unauthorized().into_response()
        }
        Err(problem) => problem.into_response(),
    }
}
