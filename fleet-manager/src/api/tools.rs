//! `/v1/tools`: where mirrored traffic goes (TapTool objects).

use std::net::SocketAddr;

use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tapestry_proto::crd::{TapTool, TapToolSpec, TapToolStatus};
use utoipa::ToSchema;

use super::objects::Face;
use super::problem::FieldProblem;
use super::AppState;

/// A tool as the REST API reads and writes it: its name, the spec's fields,
/// and (read-only) its version and status.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tool {
    /// A DNS subdomain, unique among tools; fixed once created.
    #[schema(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        max_length = 253
    )]
    pub name: String,
    #[serde(flatten)]
    pub spec: TapToolSpec,
    /// The version, also sent as the `ETag` header; ignored when written.
    #[schema(read_only, nullable = false)]
    pub resource_version: Option<String>,
    /// What the aggregator reports; ignored when written.
    #[schema(nullable = false)]
    pub status: Option<TapToolStatus>,
}

pub struct Tools;

impl Face for Tools {
    type Resource = TapTool;
    type Spec = TapToolSpec;
    const COLLECTION: &'static str = "/v1/tools";
    const WHAT: &'static str = "tool";

    fn spec(resource: &TapTool) -> &TapToolSpec {
        &resource.spec
    }

    fn status(resource: &TapTool) -> Value {
        serde_json::to_value(&resource.status).unwrap_or(Value::Null)
    }

    async fn check(
        state: &AppState,
        name: &str,
        spec: &TapToolSpec,
    ) -> Result<(), Vec<FieldProblem>> {
        let mut problems: Vec<FieldProblem> =
            spec.check().into_iter().map(FieldProblem::from).collect();
        if let Some(listen) = spec.listen.as_deref().and_then(|l| l.parse().ok()) {
            let taken = state.fleet.tools.store.state().into_iter().find(|other| {
                other.name_any() != name
                    && other
                        .spec
                        .listen
                        .as_deref()
                        .and_then(|l| l.parse().ok())
                        .is_some_and(|l| collide(l, listen))
            });
            if let Some(other) = taken {
                problems.push(FieldProblem {
                    field: "listen".into(),
                    message: format!("{listen} is already taken by tool {:?}", other.name_any()),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Whether two listening addresses cannot both be bound on one host.
fn collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_addresses_collide_on_one_port() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(collide(a("127.0.0.1:57012"), a("127.0.0.1:57012")));
        assert!(collide(a("0.0.0.0:57012"), a("127.0.0.1:57012")));
        assert!(!collide(a("127.0.0.1:57012"), a("127.0.0.1:57013")));
        assert!(!collide(a("127.0.0.1:57012"), a("127.0.0.2:57012")));
    }
}
