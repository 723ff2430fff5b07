//! CertificateSigningRequests, as kube-controller-manager's csrapproving,
//! csrsigning and tokencleaner controllers:
//! - approves what nodes may have without a person looking: a client
//!   certificate for a node asked with a bootstrap token (a node joining)
//!   or by that node itself (renewal), and a node's serving certificate
//!   asked by that node. Everything else waits for `kubectl certificate
//!   approve`;
//! - signs approved requests for the `kubernetes.io/` signers with the
//!   cluster CA, after checking each against its signer's rules (a request
//!   that breaks them is marked Failed, never signed);
//! - deletes bootstrap token Secrets past their expiration.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tapestry_runtime::csr::{self, KUBELET_CLIENT_SIGNER, KUBELET_SERVING_SIGNER, NODES_GROUP};
use tapestry_runtime::{key_of, Queue, Requeue};
use tokio_util::sync::CancellationToken;

use crate::Ctx;

/// The cluster CA, with which approved requests are signed.
#[derive(Clone)]
pub struct Signer {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { .. }")
    }
}

const BOOTSTRAPPERS: &str = "system:bootstrappers";

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.csrs
        .on_change(move |csr: &CertificateSigningRequest, deleted| {
            if !deleted {
                q.add(key_of(csr));
            }
        });
}

fn has(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status != "False"))
}

fn condition(kind: &str, reason: &str, message: &str) -> CertificateSigningRequestCondition {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    CertificateSigningRequestCondition {
        type_: kind.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// Why a request may be approved without a person, if it may.
fn auto_approval(
    csr: &CertificateSigningRequest,
    requested: &csr::Requested,
) -> Option<&'static str> {
    let spec = &csr.spec;
    let usages = spec.usages.clone().unwrap_or_default();
    if csr::check(&spec.signer_name, requested, &usages) != Some(Ok(())) {
        return None;
    }
    let groups = spec.groups.clone().unwrap_or_default();
    let in_group = |g: &str| groups.iter().any(|x| x == g);
    let by_itself =
        spec.username.as_deref() == Some(requested.common_name.as_str()) && in_group(NODES_GROUP);
    match spec.signer_name.as_str() {
        KUBELET_CLIENT_SIGNER if in_group(BOOTSTRAPPERS) => {
            Some("Auto approving kubelet client certificate after a bootstrap token's request.")
        }
        KUBELET_CLIENT_SIGNER if by_itself => {
            Some("Auto approving self kubelet client certificate renewal.")
        }
        KUBELET_SERVING_SIGNER if by_itself => {
            Some("Auto approving kubelet serving certificate requested by its node.")
        }
        _ => None,
    }
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let Some(csr) = ctx.csrs.get(None, &key) else {
        return Ok(Requeue::Done);
    };
    let issued = csr
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty());
    if issued || has(&csr, "Denied") || has(&csr, "Failed") {
        return Ok(Requeue::Done);
    }
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let name = csr.name_any();
    let parsed = String::from_utf8(csr.spec.request.0.clone())
        .map_err(|_| "not PEM text".to_string())
        .and_then(|pem| csr::parse(&pem));
    let mut conditions = csr
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    if !has(&csr, "Approved") {
        let Some(reason) = parsed
            .as_ref()
            .ok()
            .and_then(|(r, _)| auto_approval(&csr, r))
        else {
            return Ok(Requeue::Done);
        };
        conditions.push(condition("Approved", "AutoApproved", reason));
        let patch = json!({"status": {"conditions": conditions}});
        api.patch_subresource(
            "approval",
            &name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        tracing::info!(csr = %name, requester = ?csr.spec.username, "{reason}");
        // The approval's own event brings the request back for signing.
        return Ok(Requeue::Done);
    }
    let Some(signer) = &ctx.config.signer else {
        return Ok(Requeue::Done);
    };
    if !csr.spec.signer_name.starts_with("kubernetes.io/") {
        return Ok(Requeue::Done);
    }
    let usages = csr.spec.usages.clone().unwrap_or_default();
    let outcome = parsed.and_then(|(requested, request)| {
        match csr::check(&csr.spec.signer_name, &requested, &usages) {
            None => Ok(None),
            Some(Err(e)) => Err(e),
            Some(Ok(())) => csr::sign(
                &request,
                &requested,
                &usages,
                csr.spec.expiration_seconds.map(i64::from),
                &signer.cert_pem,
                &signer.key_pem,
            )
            .map(Some),
        }
    });
    let patch = match outcome {
        // Another signer's request.
        Ok(None) => return Ok(Requeue::Done),
        Ok(Some(cert)) => {
            let encoded = k8s_openapi::ByteString(cert.into_bytes());
            json!({"status": {"certificate": encoded}})
        }
        Err(e) => {
            tracing::warn!(csr = %name, "not signed: {e}");
            conditions.push(condition("Failed", "SignerValidationFailure", &e));
            json!({"status": {"conditions": conditions}})
        }
    };
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(Requeue::Done)
}

/// How often expired bootstrap tokens are looked for.
const TOKEN_CLEANUP_PERIOD: Duration = Duration::from_secs(60);

/// Delete bootstrap token Secrets past their expiration, until `shutdown`.
pub async fn clean_tokens(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), "kube-system");
    loop {
        if let Err(e) = clean_tokens_once(&api).await {
            tracing::debug!("cleaning bootstrap tokens: {e}");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TOKEN_CLEANUP_PERIOD) => {}
        }
    }
}

async fn clean_tokens_once(api: &Api<Secret>) -> anyhow::Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let tokens = ListParams::default().fields("type=bootstrap.kubernetes.io/token");
    for secret in api.list(&tokens).await? {
        let expiration = secret
            .data
            .as_ref()
            .and_then(|d| d.get("expiration"))
            .and_then(|e| std::str::from_utf8(&e.0).ok())
            .and_then(|e| e.parse::<k8s_openapi::jiff::Timestamp>().ok());
        if expiration.is_some_and(|e| e <= now) {
            let name = secret.name_any();
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(secret = %name, "deleted an expired bootstrap token"),
                Err(e) if tapestry_runtime::is_status(&e, 404) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
