//! Errors as RFC 9457 problem details (`application/problem+json`), each
//! naming the fields that are wrong.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

/// One field that is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldProblem {
    /// Path of the field in the request body, e.g. `rules[0].ports[1]`.
    pub field: String,
    pub message: String,
}

impl FieldProblem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldProblem {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<tapestry_proto::policy::FieldError> for FieldProblem {
    fn from(e: tapestry_proto::policy::FieldError) -> Self {
        FieldProblem::new(e.field, e.reason)
    }
}

/// A problem details object (RFC 9457).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem; `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The fields that are wrong, for validation problems.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldProblem>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            type_: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// 422: the body is well-formed but says something wrong.
    pub fn invalid(errors: Vec<FieldProblem>) -> Self {
        Problem {
            type_: "https://tapestry.io/problems/invalid".into(),
            ..Problem::with_errors(StatusCode::UNPROCESSABLE_ENTITY, errors)
        }
    }

    /// 400: query parameters that are wrong, each named.
    pub fn bad_query(errors: Vec<FieldProblem>) -> Self {
        Problem::with_errors(StatusCode::BAD_REQUEST, errors)
    }

    fn with_errors(status: StatusCode, errors: Vec<FieldProblem>) -> Self {
        let detail = errors
            .iter()
            .map(|e| {
                if e.field.is_empty() {
                    e.message.clone()
                } else {
                    format!("{}: {}", e.field, e.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        Problem {
            errors,
            ..Problem::new(status, detail)
        }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Problem::invalid(vec![FieldProblem {
            field: field.into(),
            message: message.into(),
        }])
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(what: &str, name: &str) -> Self {
        Problem::new(StatusCode::NOT_FOUND, format!("{what} {name:?} not found"))
    }

    pub fn unauthorized() -> Self {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required (Authorization: Bearer TOKEN)",
        )
    }

    pub fn forbidden(detail: &str) -> Self {
        Problem::new(StatusCode::FORBIDDEN, detail.to_string())
    }

    pub fn precondition_failed(what: &str, name: &str) -> Self {
        Problem::new(
            StatusCode::PRECONDITION_FAILED,
            format!("{what} {name:?} has changed: its ETag no longer matches If-Match"),
        )
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %detail, "request failed");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, detail.to_string())
    }

    /// 502/503: the Kubernetes API the objects live in failed us.
    pub fn upstream(e: &kube::Error) -> Self {
        Problem::new(
            StatusCode::BAD_GATEWAY,
            format!("the Kubernetes API server failed: {e}"),
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, Problem>;
