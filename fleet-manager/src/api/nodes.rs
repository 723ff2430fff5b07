//! Read-only views: every node's tap (`/v1/nodes`) and a policy's status
//! (`/v1/policies/{name}/status`). Nodes are answered from the fleet's
//! informers, so listing thousands costs no API server round trip.

use std::ops::Bound;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tapestry_proto::crd::{TapPolicy, TapPolicyStatus};
use utoipa::{IntoParams, ToSchema};

use super::extract::{Name, Query};
use super::problem::{ApiResult, FieldProblem, Problem};
use super::AppState;
use crate::fleet::NodeTap;

/// Paging of `/v1/nodes`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NodeQuery {
    /// At most this many nodes; the answer's `continue` fetches the next page.
    #[param(minimum = 1)]
    pub limit: Option<i32>,
    /// The `continue` of the previous page.
    #[serde(rename = "continue")]
    pub continue_: Option<String>,
}

/// A page of nodes, by name.
#[derive(Serialize, ToSchema)]
pub struct NodePage {
    pub items: Vec<NodeTap>,
    /// Pass as `continue` for the next page; absent on the last.
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_: Option<String>,
}

#[utoipa::path(
    get, path = "/v1/nodes", tag = "nodes", operation_id = "list_nodes",
    summary = "Every node's tap: Connected, Pending or Disconnected, with what it reported",
    params(NodeQuery),
    responses(
        (status = 200, description = "A page of nodes", body = NodePage),
        (status = 400, description = "A query parameter is wrong (named)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The Kubernetes API failed checking the token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(query): Query<NodeQuery>,
) -> ApiResult<Response> {
    if query.limit.is_some_and(|l| l < 1) {
        return Err(Problem::bad_query(vec![FieldProblem::new(
            "limit",
            "must be at least 1",
        )]));
    }
    let limit = query.limit.map_or(usize::MAX, |l| l as usize);
    // The page is the node view's serialised entries written one after
    // another: with thousands of nodes, building a `NodePage` and
    // serialising it again was most of the answer's time.
    let mut body = Vec::new();
    let mut continue_ = None;
    {
        let view = state.fleet.refresh_taps(Timestamp::now());
        // The continue token is the last name of the previous page.
        let after = match &query.continue_ {
            Some(after) => Bound::Excluded(after.as_str()),
            None => Bound::Unbounded,
        };
        let mut page = view.entries.range::<str, _>((after, Bound::Unbounded));
        body.reserve(
            view.entries.values().next().map_or(0, |t| t.json.len() + 1)
                * view.entries.len().min(limit),
        );
        body.extend_from_slice(b"{\"items\":[");
        for (i, (name, tap)) in page.by_ref().take(limit).enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&tap.json);
            continue_ = Some(name.clone());
        }
        if page.next().is_none() {
            continue_ = None;
        }
    }
    body.extend_from_slice(b"]");
    if let Some(name) = continue_ {
        body.extend_from_slice(b",\"continue\":");
        serde_json::to_writer(&mut body, &name).map_err(Problem::internal)?;
    }
    body.extend_from_slice(b"}");
    Ok(([(http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[utoipa::path(
    get, path = "/v1/nodes/{name}", tag = "nodes", operation_id = "read_node",
    summary = "One node's tap",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "The node's tap", body = NodeTap),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such node", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The Kubernetes API failed checking the token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn read(
    State(state): State<Arc<AppState>>,
    Name(name): Name,
) -> ApiResult<Json<NodeTap>> {
    state
        .fleet
        .tap(&name, Timestamp::now())
        .map(Json)
        .ok_or_else(|| Problem::not_found("node", &name))
}

#[utoipa::path(
    get, path = "/v1/policies/{name}/status", tag = "policies", operation_id = "read_policy_status",
    summary = "A policy's status: conditions, matched pods and nodes, packets captured, delivered per tool and lost",
    params(("name" = String, Path, example = "web")),
    responses(
        (status = 200, description = "The status", body = TapPolicyStatus,
         headers(("ETag" = String, description = "The policy's version"))),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such policy", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The Kubernetes API failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn policy_status(
    State(state): State<Arc<AppState>>,
    Name(name): Name,
) -> ApiResult<Response> {
    if !super::objects::could_exist(&name) {
        return Err(Problem::not_found("policy", &name));
    }
    let api: kube::Api<TapPolicy> = kube::Api::all(state.client.clone());
    let policy = api
        .get_opt(&name)
        .await
        .map_err(|e| Problem::upstream(&e))?
        .ok_or_else(|| Problem::not_found("policy", &name))?;
    let rv = policy.metadata.resource_version.clone().unwrap_or_default();
    let mut response = Json(crate::status::of(&policy)).into_response();
    if let Ok(etag) = http::HeaderValue::from_str(&format!("\"{rv}\"")) {
        response.headers_mut().insert(http::header::ETAG, etag);
    }
    Ok(response)
}
