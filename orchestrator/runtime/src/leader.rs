//! Leader election through a coordination.k8s.io Lease, as client-go's
//! leaderelection does it: the holder renews `renewTime` every retry
//! period; a candidate takes the lease over only when it has seen the same
//! record unchanged for a whole lease duration (measured on its own clock,
//! so clock skew between processes does not matter). Every write is a
//! compare-and-swap on resourceVersion, so two candidates never both win.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::not_found;

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per process (hostname plus a random suffix).
    pub identity: String,
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// client-go's defaults: 15s lease, 10s renew deadline, 2s retry.
    pub fn new(name: &str, identity: &str) -> Self {
        LeaderConfig {
            namespace: "kube-system".into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// This process's identity, for leases and as the instance that reports
/// events: host name plus a random suffix, chosen once per process.
pub fn identity() -> &'static str {
    static IDENTITY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IDENTITY.get_or_init(new_identity)
}

fn new_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "tapestry".into());
    let suffix = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| {
            u.trim()
                .replace('-', "")
                .chars()
                .take(12)
                .collect::<String>()
        })
        .unwrap_or_else(|_| format!("{:x}", std::process::id()));
    format!("{host}_{suffix}")
}

struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    /// The last record seen and when it was first seen unchanged.
    observed: Option<(String, Instant)>,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl Elector {
    /// One acquire-or-renew attempt; true when this process holds the lease.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let secs = self.cfg.lease_duration.as_secs().max(1) as i32;
        let existing = match self.api.get(&self.cfg.name).await {
            Ok(l) => l,
            Err(e) if not_found(&e) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                        holder_identity: Some(self.cfg.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(now()),
                        renew_time: Some(now()),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if crate::is_status(&e, 409) => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let spec = existing.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = format!(
            "{holder}|{:?}|{:?}",
            spec.renew_time, existing.metadata.resource_version
        );
        let ours = holder == self.cfg.identity;
        if !ours && !holder.is_empty() {
            let held_for = spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(s.max(1) as u64))
                .unwrap_or(self.cfg.lease_duration);
            match &self.observed {
                Some((r, since)) if *r == record => {
                    if since.elapsed() < held_for {
                        return Ok(false);
                    }
                }
                _ => {
                    self.observed = Some((record, Instant::now()));
                    return Ok(false);
                }
            }
        }
        let mut lease = existing;
        let mut spec = spec;
        if !ours {
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.cfg.identity.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(now());
        lease.spec = Some(spec);
        // replace() sends the resourceVersion we read: a compare-and-swap.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = None;
                Ok(true)
            }
            Err(e) if crate::is_status(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up on a clean shutdown so a standby takes over at once.
    async fn release(&mut self) {
        let Ok(mut lease) = self.api.get(&self.cfg.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        let _ = self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await;
    }
}

/// Run `lead(token)` only while this process holds the lease. When
/// leadership is lost the token is cancelled, the task awaited, and the
/// process becomes a candidate again. Returns after `shutdown`.
pub async fn run_elected<F, Fut>(
    client: Client,
    cfg: LeaderConfig,
    shutdown: CancellationToken,
    lead: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut el = Elector {
        api: Api::namespaced(client, &cfg.namespace),
        cfg: cfg.clone(),
        observed: None,
    };
    loop {
        // Candidate: try every retry period.
        loop {
            match el.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::debug!(lease = %cfg.name, "acquiring lease: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(cfg.retry_period) => {}
            }
        }
        tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
        let token = shutdown.child_token();
        // Aborted with this future too: a dropped elector never leaves a
        // leader running behind it.
        let mut task = AbortOnDrop(tokio::spawn(lead(token.clone())));
        let mut last_renew = Instant::now();
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = tokio::time::sleep(cfg.retry_period) => {}
            }
            match el.try_acquire_or_renew().await {
                Ok(true) => last_renew = Instant::now(),
                Ok(false) => break true,
                Err(e) => {
                    tracing::warn!(lease = %cfg.name, "renewing lease: {e}");
                    if last_renew.elapsed() > cfg.renew_deadline {
                        break true;
                    }
                }
            }
        };
        token.cancel();
        let _ = (&mut task.0).await;
        if !lost {
            el.release().await;
            return;
        }
        tracing::warn!(lease = %cfg.name, "lost leadership");
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
