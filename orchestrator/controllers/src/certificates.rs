//! CertificateSigningRequests, as kube-controller-manager's csrapproving,
//! csrsigning and tokencleaner controllers:
//! - approves what nodes may have without a person looking: a client
//!   certificate for a node asked with a bootstrap token (a node joining)
//!   or by that node itself (renewal), and a node's serving certificate
//!   asked by that node. For Tapestry's own signers it approves a tap's
//!   client certificate asked from a pod on the node the certificate
//!   names, and an aggregator's serving certificate for its own pod's
//!   addresses and its namespace's Service names, each only for a
//!   requester allowed to `create` `certificatesigningrequests/tapclient`
//!   (or `/aggregatorserving`). Everything else waits for `kubectl
//!   certificate approve`;
//! - signs approved requests for the `kubernetes.io/` and `tapestry.io/`
//!   signers with the cluster CA, after checking each against its
//!   signer's rules (a request that breaks them is marked Failed, never
//!   signed);
//! - deletes bootstrap token Secrets past their expiration, and requests
//!   that are done with (as csrcleaner: approved or denied an hour ago,
//!   pending for a day).

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
use tapestry_runtime::csr::{
    self, AGGREGATOR_SERVING_SIGNER, EXTRA_NODE_NAME, EXTRA_POD_NAME, EXTRA_POD_UID,
    KUBELET_CLIENT_SIGNER, KUBELET_SERVING_SIGNER, NODES_GROUP, TAP_CLIENT_SIGNER,
};
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
async fn auto_approval(
    ctx: &Ctx,
    csr: &CertificateSigningRequest,
    requested: &csr::Requested,
) -> anyhow::Result<Option<&'static str>> {
    let spec = &csr.spec;
    let usages = spec.usages.clone().unwrap_or_default();
    if csr::check(&spec.signer_name, requested, &usages) != Some(Ok(())) {
        return Ok(None);
    }
    match spec.signer_name.as_str() {
        TAP_CLIENT_SIGNER => {
            let node = tapestry_proto::identity::tap_node(&requested.common_name);
            let on_that_node = node.is_some() && extra(csr, EXTRA_NODE_NAME) == node;
            return Ok(
                (on_that_node && may_request(ctx, csr, "tapclient").await?).then_some(
                    "Auto approving a tap's client certificate asked from a pod on its node.",
                ),
            );
        }
        AGGREGATOR_SERVING_SIGNER => {
            return Ok((serves_its_own_names(ctx, csr, requested)
                && may_request(ctx, csr, "aggregatorserving").await?)
                .then_some(
                    "Auto approving an aggregator's serving certificate for its pod's addresses.",
                ));
        }
        _ => {}
    }
    Ok(kubelet_approval(csr, requested))
}

/// The one value of a requester's `extra` entry.
fn extra<'a>(csr: &'a CertificateSigningRequest, key: &str) -> Option<&'a str> {
    match csr.spec.extra.as_ref()?.get(key)?.as_slice() {
        [one] => Some(one.as_str()),
        _ => None,
    }
}

/// Whether the requester may `create` `certificatesigningrequests/SUB`:
/// the permission that makes a Tapestry certificate's auto-approval apply
/// to them (as `nodeclient` does for kube-controller-manager's approver).
async fn may_request(
    ctx: &Ctx,
    csr: &CertificateSigningRequest,
    sub: &str,
) -> anyhow::Result<bool> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let spec = &csr.spec;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: spec.username.clone(),
            uid: spec.uid.clone(),
            groups: spec.groups.clone(),
            extra: spec.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some("certificates.k8s.io".into()),
                resource: Some("certificatesigningrequests".into()),
                subresource: Some(sub.into()),
                verb: Some("create".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(ctx.client.clone());
    let answer = api.create(&Default::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Whether an aggregator's serving request names only what is its own:
/// IP addresses of the requester's pod, and DNS names of Services in its
/// namespace (`NAME.NS`, `NAME.NS.svc`, `NAME.NS.svc.cluster.local`).
fn serves_its_own_names(ctx: &Ctx, csr: &CertificateSigningRequest, r: &csr::Requested) -> bool {
    let Some(namespace) = csr
        .spec
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix("system:serviceaccount:"))
        .and_then(|u| u.split_once(':'))
        .map(|(ns, _)| ns)
    else {
        return false;
    };
    // The very pod the token was bound to, not a later one of that name.
    let Some(pod) = extra(csr, EXTRA_POD_NAME)
        .and_then(|p| ctx.pods.get(Some(namespace), p))
        .filter(|p| p.metadata.uid.as_deref() == extra(csr, EXTRA_POD_UID))
    else {
        return false;
    };
    let status = pod.status.as_ref();
    let pod_ips: Vec<std::net::IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let ips_ok = r.ips.iter().all(|ip| pod_ips.contains(ip));
    let names_ok = r.dns_names.iter().all(|name| {
        let rest = [".svc.cluster.local", ".svc", ""]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)?
                    .strip_suffix(&format!(".{namespace}"))
            });
        rest.is_some_and(|service| ctx.services.get(Some(namespace), service).is_some())
    });
    ips_ok && names_ok
}

/// The kubelet's certificates that are approved without a person.
fn kubelet_approval(
    csr: &CertificateSigningRequest,
    requested: &csr::Requested,
) -> Option<&'static str> {
    let spec = &csr.spec;
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
        let reason = match parsed.as_ref() {
            Ok((r, _)) => auto_approval(&ctx, &csr, r).await?,
            Err(_) => None,
        };
        let Some(reason) = reason else {
            // An aggregator may ask before its pod's address is known:
            // a young request for a Tapestry signer is looked at again.
            let young = csr.metadata.creation_timestamp.as_ref().is_some_and(|t| {
                k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second()
                    < RECHECK_FOR.as_secs() as i64
            });
            if young && csr.spec.signer_name.starts_with("tapestry.io/") {
                return Ok(Requeue::After(RECHECK_EVERY));
            }
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
    if !csr.spec.signer_name.starts_with("kubernetes.io/")
        && !csr.spec.signer_name.starts_with("tapestry.io/")
    {
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

/// Delete bootstrap token Secrets past their expiration, and requests
/// done with, until `shutdown`.
pub async fn clean_tokens(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), "kube-system");
    loop {
        if let Err(e) = clean_tokens_once(&api).await {
            tracing::debug!("cleaning bootstrap tokens: {e}");
        }
        if let Err(e) = clean_requests_once(&ctx).await {
            tracing::debug!("cleaning certificate signing requests: {e}");
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

/// How long, and how often, a Tapestry request that is not (yet) approved
/// is looked at again.
const RECHECK_FOR: Duration = Duration::from_secs(120);
const RECHECK_EVERY: Duration = Duration::from_secs(2);

/// How long a decided request is kept, and an undecided one.
const DECIDED_KEPT: i64 = 3600;
const PENDING_KEPT: i64 = 24 * 3600;

/// Delete requests that are done with: kube-controller-manager's
/// csrcleaner keeps approved and denied ones an hour, pending ones a day.
async fn clean_requests_once(ctx: &Ctx) -> anyhow::Result<()> {
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    for csr in ctx.csrs.store.state() {
        let created = csr
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(now, |t| t.0.as_second());
        let decided = has(&csr, "Approved") || has(&csr, "Denied") || has(&csr, "Failed");
        let kept = if decided { DECIDED_KEPT } else { PENDING_KEPT };
        if now - created < kept {
            continue;
        }
        let name = csr.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(csr = %name, "deleted a certificate signing request done with"),
            Err(e) if tapestry_runtime::is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
