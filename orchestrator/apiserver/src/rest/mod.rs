//! The generic REST implementation: one code path for every resource's get,
//! list, create, update, patch, delete and deletecollection, with the
//! per-resource differences coming from its [`crate::registry::ResourceDef`].
//! It names no resource: what one resource does differently lives in its
//! module under [`crate::resources`].
//!
//! | module | concern |
//! |---|---|
//! | [`request`] | the parsed request: parameters, body, patch document |
//! | [`admission`] | decoding, unknown fields, namespace lifecycle, create/update preparation |
//! | [`read`] | get and list |
//! | [`write`] | create, update, patch, the read-modify-write loop |
//! | [`delete`] | delete and deletecollection |
//! | [`render`] | objects, Tables and metadata-only responses |
//! | [`status`], [`scale`] | the generic status and scale subresources |

mod admission;
mod delete;
pub mod noderestriction;
mod read;
pub mod render;
pub mod request;
pub mod scale;
pub mod status;
mod write;

use std::sync::Arc;

use serde_json::Value;
use tapestry_store::{KeyValue, Store};

pub(crate) use delete::delete_is_dry_run;
pub use render::{json_bytes_response, json_response, render_one, table, Rendering, TableObject};
pub use request::Request;

use crate::error::{ApiError, ApiResult};
use crate::openapi::OpenApiDocs;
use crate::patch::FieldManagement;
use crate::registry::Registry;

/// Attempts at a read-modify-write before giving up on conflicts.
const MAX_CAS_ATTEMPTS: usize = 16;

/// Everything a handler needs, shared by all requests.
pub struct Api {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub fields: FieldManagement,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// JSON property names for decoding protobuf bodies.
    pub proto_names: Arc<dyn tapestry_kubeproto::JsonNames + Send + Sync>,
    pub openapi: OpenApiDocs,
    /// Set once RBAC is loaded; checks that writes of roles and bindings
    /// grant nothing their writer does not hold.
    pub authorizer: std::sync::OnceLock<Arc<crate::authz::Authorizer>>,
    /// Signs and checks service account tokens; set once the keys are
    /// loaded.
    pub service_account_tokens: std::sync::OnceLock<Arc<crate::satokens::TokenIssuer>>,
    /// Watches one user may hold open at once; past it a watch is 429.
    pub max_watches_per_user: std::sync::atomic::AtomicUsize,
    /// Open watches by user.
    pub(crate) open_watches: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// Watches one user may hold open at once by default: far more than a
/// kubelet, controller manager or operator opens, far fewer than would
/// let one client exhaust the server.
pub const MAX_WATCHES_PER_USER: usize = 1000;

impl Api {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Registry,
        fields: FieldManagement,
        metrics: Arc<crate::metrics::Metrics>,
        openapi: OpenApiDocs,
    ) -> Self {
        Api {
            store,
            registry,
            fields,
            metrics,
            proto_names: openapi.names(),
            openapi,
            authorizer: std::sync::OnceLock::new(),
            service_account_tokens: std::sync::OnceLock::new(),
            max_watches_per_user: MAX_WATCHES_PER_USER.into(),
            open_watches: Arc::default(),
        }
    }

    /// A request the server makes on its own behalf (bootstrap objects,
    /// its controllers).
    pub fn internal_request(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> ApiResult<Request> {
        let def = self.registry.get(group, version, plural).ok_or_else(|| {
            ApiError::Internal(format!("no resource {plural} in {group}/{version}"))
        })?;
        Ok(Request::internal(def, namespace, name))
    }

    /// Create an object on the server's own behalf (bootstrap objects).
    pub async fn create_internal(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        namespace: Option<&str>,
        obj: Value,
    ) -> ApiResult<()> {
        let req = self.internal_request(group, version, plural, namespace, None)?;
        let obj = self.admit_body(&req, obj, &mut Vec::new(), None)?;
        self.create_object(&req, obj, Some("tapestry-apiserver"))
            .await
            .map(|_| ())
    }

    fn key(&self, req: &Request, name: &str) -> String {
        req.def.key(req.namespace.as_deref(), name)
    }

    pub(crate) async fn get_kv(&self, req: &Request, name: &str) -> ApiResult<KeyValue> {
        let mut target = req.target();
        target.name = name.to_string();
        self.store
            .get(&self.key(req, name))
            .await
            .map_err(|e| ApiError::from_store(e, &target))?
            .ok_or(ApiError::NotFound(target))
    }
}
