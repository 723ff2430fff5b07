//! Who is calling and what they may do: bearer tokens, checked against a
//! token file (kube-apiserver's format) or, without one, against the
//! cluster through the TokenReview API; then every request is put to the
//! cluster's authorizer as a SubjectAccessReview for the caller (tap
//! policies and tools as `tappolicies`/`taptools.tapestry.io`, nodes as
//! `nodes`), so the REST API lets a user do exactly what RBAC lets them
//! do with kubectl, never more than its own identity could. Every endpoint
//! but `/healthz` and the API document requires a token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use tapestry_apimachinery::tokens::{TokenFile, User};

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
        cache: Mutex<HashMap<String, (Instant, Option<User>)>>,
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
    pub async fn authenticate(&self, token: &str) -> Result<Option<User>, Problem> {
        match self {
            Authenticator::File(file) => Ok(file.authenticate(token).cloned()),
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
                    .and_then(|u| {
                        Some(User {
                            name: u.username?,
                            uid: u.uid.unwrap_or_default(),
                            groups: u.groups.unwrap_or_default(),
                            extra: u.extra.unwrap_or_default(),
                        })
                    });
                remember(cache, token.to_string(), user.clone());
                Ok(user)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keep an answer for [`REVIEW_TTL`], in at most [`REVIEW_CACHE`] entries.
fn remember<T>(cache: &Mutex<HashMap<String, (Instant, T)>>, key: String, value: T) {
    let mut cache = lock(cache);
    if cache.len() >= REVIEW_CACHE {
        cache.retain(|_, (at, _)| at.elapsed() < REVIEW_TTL);
        if cache.len() >= REVIEW_CACHE {
            cache.clear();
        }
    }
    cache.insert(key, (Instant::now(), value));
}

/// What a request does, in the cluster's RBAC terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub verb: &'static str,
    /// (API group, resource, subresource, name); None for a path that is
    /// no resource (`/metrics`).
    pub resource: Option<(&'static str, &'static str, &'static str, String)>,
    pub path: String,
}

impl Action {
    /// The action of `method` on `path` (`?watch=true` lists as `watch`).
    pub fn of(method: &http::Method, path: &str, watch: bool) -> Action {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let resource = match parts.as_slice() {
            ["v1", "policies", rest @ ..] => Some(("tapestry.io", "tappolicies", rest)),
            ["v1", "tools", rest @ ..] => Some(("tapestry.io", "taptools", rest)),
            ["v1", "nodes", rest @ ..] => Some(("", "nodes", rest)),
            _ => None,
        };
        let Some((group, plural, rest)) = resource else {
            return Action {
                verb: non_resource_verb(method),
                resource: None,
                path: path.to_string(),
            };
        };
        let name = rest.first().map(|n| n.to_string()).unwrap_or_default();
        let sub = if rest.get(1) == Some(&"status") {
            "status"
        } else {
            ""
        };
        let verb = match *method {
            http::Method::GET | http::Method::HEAD if name.is_empty() && watch => "watch",
            http::Method::GET | http::Method::HEAD if name.is_empty() => "list",
            http::Method::GET | http::Method::HEAD => "get",
            http::Method::POST => "create",
            http::Method::PUT => "update",
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => non_resource_verb(method),
        };
        Action {
            verb,
            resource: Some((group, plural, sub, name)),
            path: path.to_string(),
        }
    }

    /// Worded like the cluster's own refusals.
    pub fn refusal(&self, user: &str) -> String {
        match &self.resource {
            Some((group, plural, sub, name)) => {
                let full = if sub.is_empty() {
                    plural.to_string()
                } else {
                    format!("{plural}/{sub}")
                };
                let what = if name.is_empty() {
                    String::new()
                } else {
                    format!(" {name:?}")
                };
                format!(
                    "User {user:?} cannot {} resource {full:?}{what} in API group {group:?}",
                    self.verb
                )
            }
            None => format!("User {user:?} cannot {} path {:?}", self.verb, self.path),
        }
    }
}

fn non_resource_verb(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET | http::Method::HEAD => "get",
        http::Method::POST => "post",
        http::Method::PUT => "put",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "unknown",
    }
}

/// Asks the cluster whether a user may do something, with recent answers
/// cached.
pub struct Authorizer {
    client: kube::Client,
    cache: Mutex<HashMap<String, (Instant, bool)>>,
}

impl Authorizer {
    pub fn new(client: kube::Client) -> Self {
        Authorizer {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn allowed(&self, user: &User, action: &Action) -> Result<bool, Problem> {
        let key = format!("{}\0{}\0{:?}", user.name, user.groups.join(","), action);
        if let Some((at, allowed)) = lock(&self.cache).get(&key) {
            if at.elapsed() < REVIEW_TTL {
                return Ok(*allowed);
            }
        }
        let mut spec = SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: Some(user.uid.clone()).filter(|u| !u.is_empty()),
            groups: Some(user.groups.clone()),
            ..Default::default()
        };
        match &action.resource {
            Some((group, plural, sub, name)) => {
                spec.resource_attributes = Some(ResourceAttributes {
                    verb: Some(action.verb.into()),
                    group: Some(group.to_string()),
                    resource: Some(plural.to_string()),
                    subresource: Some(sub.to_string()).filter(|s| !s.is_empty()),
                    name: Some(name.clone()).filter(|n| !n.is_empty()),
                    ..Default::default()
                })
            }
            None => {
                spec.non_resource_attributes = Some(NonResourceAttributes {
                    path: Some(action.path.clone()),
                    verb: Some(action.verb.into()),
                })
            }
        }
        let review = SubjectAccessReview {
            spec,
            ..Default::default()
        };
        let api: kube::Api<SubjectAccessReview> = kube::Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Problem::upstream(&e))?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        remember(&self.cache, key, allowed);
        Ok(allowed)
    }
}

/// The middleware: a request without a valid bearer token gets 401, one
/// the caller may not make 403.
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
        return refuse(request, Problem::unauthorized()).await;
    };
    let user = match state.auth.authenticate(token).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            state.metrics.refused();
            return refuse(request, Problem::unauthorized()).await;
        }
        Err(problem) => return refuse(request, problem).await,
    };
    let watch = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let action = Action::of(request.method(), request.uri().path(), watch);
    match state.authorizer.allowed(&user, &action).await {
        Ok(true) => next.run(request).await,
        Ok(false) => {
            state.metrics.refused();
            tracing::info!(user = %user.name, action = ?action, "refused");
            refuse(request, Problem::forbidden(&action.refusal(&user.name))).await
        }
        Err(problem) => refuse(request, problem).await,
    }
}

/// How much of a refused request's body is read, and for how long.
const REFUSED_BODY_LIMIT: usize = 1 << 20;
const REFUSED_BODY_WAIT: Duration = Duration::from_secs(2);

/// Answer a request the handler never sees. Its body is read (bounded in
/// size and time) first: answering mid-upload makes HTTP/2 reset the
/// stream, and some clients (curl among them) then report the reset
/// instead of the 401/403 that explains it.
async fn refuse(request: Request, problem: Problem) -> Response {
    let body = request.into_body();
    let _ = tokio::time::timeout(
        REFUSED_BODY_WAIT,
        axum::body::to_bytes(body, REFUSED_BODY_LIMIT),
    )
    .await;
    problem.into_response()
}
