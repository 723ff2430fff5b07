//! API errors rendered as Kubernetes `Status` objects.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{json, Value};
use tapestry_store::StoreError;

pub use tapestry_apimachinery::Cause;

/// What identifies the object an error is about.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub group: String,
    /// Plural resource name (`deployments`).
    pub resource: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug)]
pub enum ApiError {
    NotFound(Target),
    /// A path naming no served resource.
    NoSuchResource,
    AlreadyExists(Target),
    Conflict {
        target: Target,
        message: String,
    },
    Invalid {
        target: Target,
        causes: Vec<Cause>,
    },
    BadRequest(String),
    Gone(String),
    Unauthorized,
    Forbidden(String),
    MethodNotSupported {
        target: Target,
        verb: String,
    },
    /// 405 with its own message (e.g. creates of a terminating CRD's kind).
    MethodNotAllowed {
        target: Target,
        message: String,
    },
    NotAcceptable(String),
    UnsupportedMediaType(String),
    RequestEntityTooLarge(String),
    /// 429: the client holds too much already (open watches).
    TooManyRequests(String),
    Timeout(String),
    Internal(String),
}

impl ApiError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }

    /// Map a store error for an operation on `target`.
    pub fn from_store(e: StoreError, target: &Target) -> Self {
        match e {
            StoreError::NotFound(_) => ApiError::NotFound(target.clone()),
            StoreError::AlreadyExists(_) => ApiError::AlreadyExists(target.clone()),
            StoreError::Conflict { .. } => ApiError::Conflict {
                target: target.clone(),
                message: OBJECT_MODIFIED.into(),
            },
            StoreError::Compacted {
                requested,
                compacted,
            } => ApiError::Gone(format!(
                "too old resource version: {requested} ({compacted})"
            )),
            StoreError::FutureRevision { requested, current } => ApiError::Timeout(format!(
                "Too large resource version: {requested}, current: {current}"
            )),
            other => ApiError::Internal(other.to_string()),
        }
    }

    fn code(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) | ApiError::NoSuchResource => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists(_) | ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotSupported { .. } | ApiError::MethodNotAllowed { .. } => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestEntityTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) | ApiError::NoSuchResource => "NotFound",
            ApiError::AlreadyExists(_) => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Gone(_) => "Expired",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::MethodNotSupported { .. } | ApiError::MethodNotAllowed { .. } => {
                "MethodNotAllowed"
            }
            ApiError::NotAcceptable(_) => "NotAcceptable",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::RequestEntityTooLarge(_) => "RequestEntityTooLarge",
            ApiError::TooManyRequests(_) => "TooManyRequests",
            ApiError::Timeout(_) => "Timeout",
            ApiError::Internal(_) => "InternalError",
        }
    }

    fn message(&self) -> String {
        let qualified = |t: &Target| {
            if t.group.is_empty() {
                t.resource.clone()
            } else {
                format!("{}.{}", t.resource, t.group)
            }
        };
        match self {
            ApiError::NotFound(t) => format!("{} \"{}\" not found", qualified(t), t.name),
            ApiError::NoSuchResource => "the server could not find the requested resource".into(),
            ApiError::AlreadyExists(t) => {
                format!("{} \"{}\" already exists", qualified(t), t.name)
            }
            ApiError::Conflict { target, message } => format!(
                "Operation cannot be fulfilled on {} \"{}\": {message}",
                qualified(target),
                target.name
            ),
            ApiError::Invalid { target, causes } => {
                let rendered: Vec<String> = causes.iter().map(Cause::render).collect();
                let body = if rendered.len() == 1 {
                    rendered[0].clone()
                } else {
                    format!("[{}]", rendered.join(", "))
                };
                format!("{} \"{}\" is invalid: {body}", target.kind, target.name)
            }
            ApiError::MethodNotSupported { target, verb } => {
                format!(
                    "{verb} is not supported on resources of kind \"{}\"",
                    qualified(target)
                )
            }
            ApiError::MethodNotAllowed { message, .. } => message.clone(),
            ApiError::Unauthorized => "Unauthorized".into(),
            ApiError::BadRequest(m)
            | ApiError::Gone(m)
            | ApiError::Forbidden(m)
            | ApiError::NotAcceptable(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::RequestEntityTooLarge(m)
            | ApiError::TooManyRequests(m)
            | ApiError::Timeout(m)
            | ApiError::Internal(m) => m.clone(),
        }
    }

    /// The `Status` object kube-apiserver would return.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        let target = match self {
            ApiError::NotFound(t)
            | ApiError::AlreadyExists(t)
            | ApiError::Conflict { target: t, .. }
            | ApiError::Invalid { target: t, .. }
            | ApiError::MethodNotSupported { target: t, .. }
            | ApiError::MethodNotAllowed { target: t, .. } => Some(t),
            _ => None,
        };
        if let Some(t) = target {
            let mut details = json!({ "name": t.name, "group": t.group, "kind": t.resource });
            if let ApiError::Invalid { causes, .. } = self {
                details["kind"] = json!(t.kind);
                details["causes"] = causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
            }
            status["details"] = details;
        }
        if let ApiError::TooManyRequests(_) = self {
            status["details"] = json!({"retryAfterSeconds": 1});
        }
        if let ApiError::NoSuchResource = self {
            status["details"] = json!({});
        }
        if let ApiError::Timeout(_) = self {
            status["details"] = json!({ "retryAfterSeconds": 1 });
        }
        status
    }

    pub fn status_code(&self) -> StatusCode {
        self.code()
    }
}

pub const OBJECT_MODIFIED: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(m) = &self {
            tracing::error!(error = %m, "internal error");
        }
        let body = serde_json::to_vec(&self.to_status()).unwrap_or_default();
        (
            self.code(),
            [(http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
