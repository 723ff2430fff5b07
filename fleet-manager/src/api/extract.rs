//! Extractors whose refusals are problem details like every other error
//! (axum's own answer in plain text).

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::StatusCode;
use serde::de::DeserializeOwned;

use super::problem::{FieldProblem, Problem};

/// The query string as `T`; a value of the wrong type is a 400 naming the
/// parameter.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(Query)
            .map_err(|e| {
                let field = e.path().to_string();
                let field = if field == "." { String::new() } else { field };
                Problem::bad_query(vec![FieldProblem::new(field, e.into_inner().to_string())])
            })
    }
}

/// The `{name}` of the URL. One that is not UTF-8 once percent-decoded
/// names nothing that can exist: 404.
pub struct Name(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Name {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(name)| Name(name))
            .map_err(|e| Problem::new(StatusCode::NOT_FOUND, e.body_text()))
    }
}
