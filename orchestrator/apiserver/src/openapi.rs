//! OpenAPI documents served at /openapi/v2 and /openapi/v3.

use std::collections::HashMap;
use std::sync::Arc;

use axum::response::Response;
use http::StatusCode;
use serde_json::json;
use tapestry_apimachinery::PatchSchema;

use crate::registry::Registry;
use crate::rest::json_response;

pub struct OpenApiDocs;

struct NoSchema;

impl PatchSchema for NoSchema {
    fn field(&self, _: &str, _: &str) -> Option<tapestry_apimachinery::FieldSchema> {
        None
    }
}

impl OpenApiDocs {
    pub fn build(_registry: &Registry) -> Self {
        OpenApiDocs
    }

    pub fn schema(&self) -> Arc<dyn PatchSchema> {
        Arc::new(NoSchema)
    }

    fn missing() -> Response {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
            &[],
        )
    }

    pub fn v2(&self) -> Response {
        Self::missing()
    }

    pub fn v3_index(&self) -> Response {
        Self::missing()
    }

    pub fn v3(&self, _path: &str, _query: &HashMap<String, String>) -> Response {
        Self::missing()
    }
}
