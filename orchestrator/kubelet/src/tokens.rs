//! Projected service account tokens. Each is requested through the
//! TokenRequest API, bound to its pod, and requested again once 80% of its
//! lifetime has passed (as the kubelet does), its file replaced in place,
//! for as long as the pod's containers run.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount, ServiceAccountTokenProjection};
use kube::api::PostParams;
use kube::Api;

use crate::volumes::{check_path, write_atomic, DEFAULT_MODE};
use crate::Kubelet;

const DEFAULT_EXPIRATION: i64 = 3600;
/// The shortest lifetime a projection may ask for (the API's minimum).
const MIN_EXPIRATION: i64 = 600;
/// A token is replaced at least daily, however long it is valid.
const MAX_AGE: i64 = 24 * 3600;
/// However short a token's lifetime looks, it is not requested more often.
const MIN_REFRESH: i64 = 10;
const RETRY_BASE: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A token in hand. Times are this node's, in Unix seconds: the issuer's
/// clock may differ.
#[derive(Clone, Debug, PartialEq)]
struct Issued {
    token: String,
    expires: i64,
    refresh_at: i64,
}

impl Issued {
    /// A token requested at `now`, which the server says is valid for
    /// `ttl` seconds, until `expires` by its clock. What is left of its
    /// lifetime counts, if less (a skewed clock cannot lengthen it).
    fn new(token: String, now: i64, expires: i64, ttl: i64) -> Issued {
        let lifetime = match expires > now {
            true => ttl.min(expires - now),
            false => ttl,
        }
        .max(0);
        Issued {
            token,
            expires: now + lifetime,
            refresh_at: now + (lifetime * 4 / 5).clamp(MIN_REFRESH, MAX_AGE),
        }
    }
}

/// One projected token and how requesting and writing it goes.
#[derive(Default)]
struct Slot {
    issued: Option<Issued>,
    /// The token in hand is in the volume's file.
    written: bool,
    failures: u32,
    next_try: Option<Instant>,
    last_error: String,
}

impl Slot {
    /// A new token is to be requested (not before the retry time).
    fn renewal_due(&self, now: i64, at: Instant) -> bool {
        self.issued.as_ref().is_none_or(|i| now >= i.refresh_at)
            && self.next_try.is_none_or(|t| at >= t)
    }

    /// There is something to request or to write.
    fn due(&self, now: i64, at: Instant) -> bool {
        self.renewal_due(now, at) || (!self.written && self.next_try.is_none_or(|t| at >= t))
    }

    /// Remember a failure; the next try waits, longer each time.
    fn failed(&mut self, error: String) {
        self.failures += 1;
        self.next_try = Some(Instant::now() + retry_after(self.failures));
        self.last_error = error;
    }

    async fn renew(
        &mut self,
        kubelet: &Kubelet,
        pod: &Pod,
        projection: &ServiceAccountTokenProjection,
        field: &str,
    ) -> Result<()> {
        match request(kubelet, pod, projection, field).await {
            Ok(issued) => {
                *self = Slot {
                    issued: Some(issued),
                    ..Slot::default()
                };
                Ok(())
            }
            Err(e) => {
                let error = format!("{e:#}");
                let retry = retry_after(self.failures + 1);
                tracing::warn!(pod_uid = pod.metadata.uid.as_deref().unwrap_or_default(), %error,
                    retry_s = retry.as_secs(), "requesting a service account token failed");
                self.failed(error);
                Err(e)
            }
        }
    }
}

fn retry_after(failures: u32) -> Duration {
    (RETRY_BASE * (1u32 << failures.saturating_sub(1).min(6))).min(RETRY_MAX)
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A serviceAccountToken source of one of the pod's projected volumes.
struct TokenSource<'a> {
    volume: &'a str,
    /// Its index among the volume's sources.
    source: usize,
    projection: &'a ServiceAccountTokenProjection,
    mode: i32,
    field: String,
}

fn token_sources(pod: &Pod) -> Vec<TokenSource<'_>> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    let mut out = Vec::new();
    for (i, v) in volumes.into_iter().flatten().enumerate() {
        let Some(projected) = &v.projected else {
            continue;
        };
        for (j, s) in projected.sources.iter().flatten().enumerate() {
            if let Some(projection) = &s.service_account_token {
                out.push(TokenSource {
                    volume: &v.name,
                    source: j,
                    projection,
                    mode: projected.default_mode.unwrap_or(DEFAULT_MODE),
                    field: format!("spec.volumes[{i}].projected.sources[{j}].serviceAccountToken"),
                });
            }
        }
    }
    out
}

/// The pod's service account and namespace, and the TokenRequest for a
/// token bound to the pod.
fn token_request(
    pod: &Pod,
    projection: &ServiceAccountTokenProjection,
    field: &str,
) -> Result<(String, String, TokenRequest)> {
    let expiration = projection.expiration_seconds.unwrap_or(DEFAULT_EXPIRATION);
    if expiration < MIN_EXPIRATION {
        bail!("{field}.expirationSeconds: must be at least {MIN_EXPIRATION}, not {expiration}");
    }
    let m = &pod.metadata;
    let (Some(name), Some(uid)) = (&m.name, &m.uid) else {
        bail!("{field}: a token is bound to its pod, and the pod has no name or uid");
    };
    let ns = m.namespace.clone().unwrap_or_else(|| "default".into());
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // None named: the API server's own audiences.
            audiences: projection
                .audience
                .iter()
                .filter(|a| !a.is_empty())
                .cloned()
                .collect(),
            expiration_seconds: Some(expiration),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.clone()),
                uid: Some(uid.clone()),
            }),
        },
        ..TokenRequest::default()
    };
    Ok((ns, account, request))
}

async fn request(
    kubelet: &Kubelet,
    pod: &Pod,
    projection: &ServiceAccountTokenProjection,
    field: &str,
) -> Result<Issued> {
    let (ns, account, request) = token_request(pod, projection, field)?;
    let now = unix_now();
    let api: Api<ServiceAccount> = Api::namespaced(kubelet.client.clone(), &ns);
    let answer = api
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("{field}: requesting a token of service account {ns}/{account}")
        })?;
    let status = answer
        .status
        .filter(|s| !s.token.is_empty())
        .with_context(|| {
            format!(
                "{field}: the token request of service account {ns}/{account} returned no token"
            )
        })?;
    let ttl = answer
        .spec
        .expiration_seconds
        .or(request.spec.expiration_seconds)
        .unwrap_or(DEFAULT_EXPIRATION);
    Ok(Issued::new(
        status.token,
        now,
        status.expiration_timestamp.0.as_second(),
        ttl,
    ))
}

/// The tokens of one pod's projected volumes, by volume name and index of
/// the source. They live as long as the pod's worker.
#[derive(Default)]
pub struct Tokens {
    slots: HashMap<(String, usize), Slot>,
    /// The volumes a restarted agent finds on disk have been looked for.
    adopted: bool,
}

impl Tokens {
    /// The token of a projected volume's source: the one in hand until it
    /// is due, else a new one. While requests fail (tried again after a
    /// back-off, not on every call) the one in hand serves until it
    /// expires; without one, the error says why.
    pub async fn token(
        &mut self,
        kubelet: &Kubelet,
        pod: &Pod,
        volume: &str,
        source: usize,
        projection: &ServiceAccountTokenProjection,
        field: &str,
    ) -> Result<String> {
        let now = unix_now();
        let slot = self.slots.entry((volume.to_string(), source)).or_default();
        if slot.renewal_due(now, Instant::now()) {
            // A failure is remembered in the slot.
            let _ = slot.renew(kubelet, pod, projection, field).await;
        }
        match &slot.issued {
            Some(i) if now < i.expires => Ok(i.token.clone()),
            _ if slot.last_error.is_empty() => bail!("{field}: no valid token"),
            _ => bail!("{}", slot.last_error),
        }
    }

    /// The volume's files now hold its tokens in hand.
    pub fn written(&mut self, volume: &str) {
        for ((v, _), slot) in &mut self.slots {
            slot.written |= v == volume;
        }
    }

    /// Whether [`Tokens::refresh`] has anything to do: a token is due or
    /// not yet in its file, or a restarted agent has yet to look for the
    /// token files it wrote.
    pub fn due(&self, pod: &Pod) -> bool {
        let (now, at) = (unix_now(), Instant::now());
        (!self.adopted && !token_sources(pod).is_empty())
            || self.slots.values().any(|s| s.due(now, at))
    }

    /// Request the due tokens again and replace their files. Call while
    /// the pod's containers run; failures are logged and tried again.
    pub async fn refresh(&mut self, kubelet: &Kubelet, pod: &Pod, pod_dir: &Path) {
        let adopting = !std::mem::replace(&mut self.adopted, true);
        for s in token_sources(pod) {
            let dir = pod_dir.join("volumes").join(s.volume);
            let key = (s.volume.to_string(), s.source);
            // A restarted agent does not know the tokens it wrote before:
            // they are replaced at once.
            if adopting && dir.exists() {
                self.slots.entry(key.clone()).or_default();
            }
            // A volume not written yet gets its token when a container starts.
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            let (now, at) = (unix_now(), Instant::now());
            if !slot.due(now, at) {
                continue;
            }
            if slot.renewal_due(now, at)
                && slot
                    .renew(kubelet, pod, s.projection, &s.field)
                    .await
                    .is_err()
            {
                continue;
            }
            let Some(issued) = &slot.issued else {
                continue;
            };
            let path = dir.join(&s.projection.path);
            let written = check_path(&s.projection.path, &s.field)
                .and_then(|_| write_atomic(&path, issued.token.as_bytes(), s.mode));
            match written {
                Ok(()) => slot.written = true,
                Err(e) => {
                    let error = format!("{}: {e:#}", s.field);
                    tracing::warn!(pod_uid = pod.metadata.uid.as_deref().unwrap_or_default(), %error,
                        "replacing a service account token file failed");
                    slot.failed(error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop", "uid": "u-1"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn tokens_are_renewed_after_80_percent_of_their_lifetime() {
        let i = Issued::new("t".into(), 1000, 1000 + 3607, 3607);
        assert_eq!((i.expires, i.refresh_at), (1000 + 3607, 1000 + 2885));
        // An issuer whose clock runs 100s behind: what is left counts.
        let i = Issued::new("t".into(), 1000, 1000 + 3500, 3600);
        assert_eq!((i.expires, i.refresh_at), (4500, 1000 + 2800));
        // A token valid for a year (the API server's extended tokens) is
        // still replaced as its requested lifetime says.
        let i = Issued::new("t".into(), 1000, 1000 + 365 * 86400, 3607);
        assert_eq!(i.refresh_at, 1000 + 2885);
        // Long lifetimes: at least daily.
        let i = Issued::new("t".into(), 0, 7 * 86400, 7 * 86400);
        assert_eq!(i.refresh_at, 86400);
        // An expiry already past by this node's clock: the lifetime asked.
        let i = Issued::new("t".into(), 1000, 10, 600);
        assert_eq!((i.expires, i.refresh_at), (1600, 1480));
    }

    #[test]
    fn a_slot_is_due_when_empty_old_or_retry_time_has_come() {
        let at = Instant::now();
        let mut slot = Slot::default();
        assert!(slot.renewal_due(0, at));
        slot.issued = Some(Issued::new("t".into(), 0, 3600, 3600));
        // In hand but not in its file: only writing is due.
        assert!(slot.due(0, at) && !slot.renewal_due(0, at));
        slot.written = true;
        assert!(!slot.due(2879, at));
        assert!(slot.due(2880, at) && slot.renewal_due(2880, at));
        slot.failed("boom".into());
        assert!(!slot.due(2880, at));
        assert!(slot.renewal_due(2880, at + Duration::from_secs(3)));
        assert_eq!(slot.last_error, "boom");
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        let waits: Vec<u64> = (1..=8).map(|f| retry_after(f).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn the_token_request_binds_the_pods_service_account_token_to_the_pod() {
        let p = pod(
            serde_json::json!({"containers": [], "serviceAccountName": "builder",
            "volumes": [{"name": "data", "emptyDir": {}},
                        {"name": "kube-api-access-x", "projected": {"defaultMode": 0o440, "sources": [
                            {"configMap": {"name": "kube-root-ca.crt"}},
                            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}]}),
        );
        let sources = token_sources(&p);
        assert_eq!(sources.len(), 1);
        let s = &sources[0];
        assert_eq!(
            (s.volume, s.source, s.mode),
            ("kube-api-access-x", 1, 0o440)
        );
        assert_eq!(
            s.field,
            "spec.volumes[1].projected.sources[1].serviceAccountToken"
        );
        let (ns, account, request) = token_request(&p, s.projection, &s.field).unwrap();
        assert_eq!((ns.as_str(), account.as_str()), ("shop", "builder"));
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "metadata": {}, "spec": {"audiences": [], "expirationSeconds": 3607,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u-1"}}})
        );

        // The default account, a named audience, the default lifetime.
        let p = pod(
            serde_json::json!({"containers": [], "volumes": [{"name": "t", "projected":
            {"sources": [{"serviceAccountToken": {"path": "t", "audience": "vault"}}]}}]}),
        );
        let s = &token_sources(&p)[0];
        let (_, account, request) = token_request(&p, s.projection, &s.field).unwrap();
        assert_eq!(account, "default");
        assert_eq!(request.spec.audiences, ["vault"]);
        assert_eq!(request.spec.expiration_seconds, Some(3600));
        assert_eq!(s.mode, 0o644);

        let short = ServiceAccountTokenProjection {
            path: "t".into(),
            expiration_seconds: Some(60),
            ..Default::default()
        };
        let e = token_request(
            &p,
            &short,
            "spec.volumes[0].projected.sources[0].serviceAccountToken",
        );
        assert_eq!(
            format!("{:#}", e.unwrap_err()),
            "spec.volumes[0].projected.sources[0].serviceAccountToken.expirationSeconds: must be at least 600, not 60"
        );
    }

    #[test]
    fn only_projected_volumes_with_tokens_need_refreshing() {
        let mut tokens = Tokens::default();
        let plain =
            pod(serde_json::json!({"containers": [], "volumes": [{"name": "d", "emptyDir": {}}]}));
        assert!(!tokens.due(&plain));
        let with_token = pod(
            serde_json::json!({"containers": [], "volumes": [{"name": "t", "projected":
            {"sources": [{"serviceAccountToken": {"path": "t"}}]}}]}),
        );
        // Not yet looked for files a previous agent wrote.
        assert!(tokens.due(&with_token));
        tokens.adopted = true;
        assert!(!tokens.due(&with_token));
        let slot = Slot {
            issued: Some(Issued::new("t".into(), unix_now(), unix_now() + 3600, 3600)),
            ..Slot::default()
        };
        tokens.slots.insert(("t".into(), 0), slot);
        assert!(tokens.due(&with_token));
        tokens.written("other");
        assert!(tokens.due(&with_token));
        tokens.written("t");
        assert!(!tokens.due(&with_token));
        tokens.slots.get_mut(&("t".into(), 0)).unwrap().issued = None;
        assert!(tokens.due(&with_token));
    }
}
