//! The status subresource: reads the whole object, writes only its status
//! (the rule lives in the update preparation, [`super::admission`]).

use async_trait::async_trait;
use axum::response::Response;

use super::{Api, Request};
use crate::error::ApiResult;
use crate::registry::{
    ResourceDef, Subresource, SubresourceDef, SubresourceDiscovery, SubresourceRest,
};

pub struct StatusRest;

impl StatusRest {
    pub fn def() -> SubresourceDef {
        SubresourceDef {
            kind: Subresource::Status,
            rest: std::sync::Arc::new(StatusRest),
        }
    }

    /// A CertificateSigningRequest's `approval`: like status, but only its
    /// conditions change.
    pub fn approval_def() -> SubresourceDef {
        SubresourceDef {
            kind: Subresource::Approval,
            rest: std::sync::Arc::new(StatusRest),
        }
    }
}

#[async_trait]
impl SubresourceRest for StatusRest {
    fn discovery(&self, def: &ResourceDef) -> SubresourceDiscovery {
        SubresourceDiscovery {
            kind: def.kind.clone(),
            group_version: None,
            verbs: &["get", "patch", "update"],
        }
    }

    async fn get(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        api.get(req).await
    }

    async fn update(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        api.update(req).await
    }

    async fn patch(&self, api: &Api, req: &Request) -> ApiResult<Response> {
        api.patch(req).await
    }
}
