//! `/v1/policies`: tap policies (TapPolicy objects) through the REST face.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tapestry_proto::crd::{TapPolicy, TapPolicySpec, TapPolicyStatus, TapTool};
use utoipa::ToSchema;

use super::objects::Face;
use super::problem::FieldProblem;
use super::AppState;

/// A tap policy as the REST API reads and writes it: its name, the spec's
/// fields, and (read-only) its version and status.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// A DNS subdomain, unique among policies; fixed once created.
    #[schema(
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        max_length = 253
    )]
    pub name: String,
    #[serde(flatten)]
    pub spec: TapPolicySpec,
    /// The version, also sent as the `ETag` header; ignored when written.
    #[schema(read_only, nullable = false)]
    pub resource_version: Option<String>,
    /// What the fleet reports; ignored when written.
    #[schema(nullable = false)]
    pub status: Option<TapPolicyStatus>,
}

pub struct Policies;

impl Face for Policies {
    type Resource = TapPolicy;
    type Spec = TapPolicySpec;
    const COLLECTION: &'static str = "/v1/policies";
    const WHAT: &'static str = "policy";

    fn spec(resource: &TapPolicy) -> &TapPolicySpec {
        &resource.spec
    }

    fn status(resource: &TapPolicy) -> Value {
        serde_json::to_value(&resource.status).unwrap_or(Value::Null)
    }

    async fn check(
        state: &AppState,
        _name: &str,
        spec: &TapPolicySpec,
    ) -> Result<(), Vec<FieldProblem>> {
        let mut problems: Vec<FieldProblem> =
            spec.check().into_iter().map(FieldProblem::from).collect();
        if !spec.filter.is_empty() {
            if let Err(message) = compile_filter(spec.filter.clone()).await {
                problems.push(FieldProblem {
                    field: "filter".into(),
                    message,
                });
            }
        }
        let mut references: Vec<(String, &String)> = spec
            .tools
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("tools[{i}]"), t))
            .collect();
        for (i, group) in spec.tool_groups.iter().enumerate() {
            for (j, tool) in group.tools.iter().enumerate() {
                references.push((format!("toolGroups[{i}].tools[{j}]"), tool));
            }
        }
        for (field, tool) in references {
            if !tool_exists(state, tool).await {
                problems.push(FieldProblem {
                    field,
                    message: format!("no tool named {tool:?} (create it under /v1/tools first)"),
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

/// Compile a tcpdump expression with libpcap, as the aggregator will: its
/// error is libpcap's own message.
async fn compile_filter(filter: String) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        let capture = pcap::Capture::dead(pcap::Linktype::ETHERNET)
            .map_err(|e| format!("libpcap is unavailable: {e}"))?;
        capture
            .compile(&filter, true)
            .map(drop)
            .map_err(|e| match e {
                pcap::Error::PcapError(message) => message,
                other => other.to_string(),
            })
    })
    .await
    .unwrap_or_else(|e| Err(format!("compiling the filter failed: {e}")))
}

/// Whether a TapTool exists; the informer answers for tools it knows, the
/// API server for the rest (one created a moment ago).
async fn tool_exists(state: &AppState, name: &str) -> bool {
    if state.fleet.tools.get(None, name).is_some() {
        return true;
    }
    let api: kube::Api<TapTool> = kube::Api::all(state.client.clone());
    matches!(api.get_opt(name).await, Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn libpcap_judges_filters() {
        assert_eq!(compile_filter("tcp port 80".into()).await, Ok(()));
        let err = compile_filter("tcp port eighty".into()).await.unwrap_err();
        assert!(err.contains("eighty"), "{err}");
        assert!(compile_filter("tcp and and".into()).await.is_err());
    }
}
