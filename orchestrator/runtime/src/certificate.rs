//! Certificates obtained through the API: a CertificateSigningRequest made
//! and waited on ([`obtain`]), kept in a file with its key ([`save`],
//! [`kept`]) and renewed before it expires ([`keep`]). Nodes join with it;
//! taps and the aggregator keep their TLS identities with it.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio_util::sync::CancellationToken;

use crate::csr;
use crate::identity::LiveIdentity;

/// What to ask a signer for.
#[derive(Clone, Debug)]
pub struct Ask {
    pub signer: String,
    pub common_name: String,
    pub organizations: Vec<String>,
    /// Subject alternative names: DNS names or IP addresses.
    pub names: Vec<String>,
    /// `client auth` or `server auth` (with digital signature and key
    /// encipherment).
    pub purpose: String,
    /// The request objects' name prefix.
    pub generate_name: String,
    /// The lifetime asked for (the signer may give less).
    pub expiration_seconds: Option<i32>,
}

/// How long a request may wait for approval before it is given up.
pub const APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a failed renewal waits before it is tried again.
const RENEWAL_RETRY: Duration = Duration::from_secs(30);

/// Make a request for `ask` with a fresh key and wait (at most
/// [`APPROVAL_TIMEOUT`]) until it is issued. Returns (certificate PEM, key
/// PEM); a denied or failed request is an error with its reason.
pub async fn obtain(client: &kube::Client, ask: &Ask) -> Result<(String, String)> {
    let organizations: Vec<&str> = ask.organizations.iter().map(String::as_str).collect();
    let (key_pem, request_pem) =
        csr::request(&ask.common_name, &organizations, &ask.names).map_err(anyhow::Error::msg)?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let request = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(ask.generate_name.clone()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request_pem.into_bytes()),
            signer_name: ask.signer.clone(),
            usages: Some(vec![
                "digital signature".into(),
                "key encipherment".into(),
                ask.purpose.clone(),
            ]),
            expiration_seconds: ask.expiration_seconds,
            ..Default::default()
        },
        status: None,
    };
    let created = api.create(&PostParams::default(), &request).await?;
    let name = created.metadata.name.unwrap_or_default();
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        let csr = api.get(&name).await?;
        let status = csr.status.unwrap_or_default();
        let conditions = status.conditions.unwrap_or_default();
        if let Some(c) = conditions
            .iter()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status != "False")
        {
            bail!(
                "certificate signing request {name} {}: {}",
                c.type_.to_lowercase(),
                c.message.as_deref().unwrap_or("no reason given")
            );
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            let cert = String::from_utf8(cert.0).context("issued certificate is not PEM")?;
            tracing::info!(csr = %name, signer = %ask.signer, "certificate issued");
            return Ok((cert, key_pem));
        }
        if started.elapsed() > APPROVAL_TIMEOUT {
            bail!("certificate signing request {name} was not approved within {} s; approve it with `kubectl certificate approve {name}`", APPROVAL_TIMEOUT.as_secs());
        }
        if !told && started.elapsed() > Duration::from_secs(5) {
            tracing::info!(csr = %name, "waiting for the certificate signing request to be approved and signed");
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The certificate and key kept in `file`, if they name `common_name`,
/// cover `names` and are valid now.
pub fn kept(file: &Path, common_name: &str, names: &[String]) -> Option<(String, String)> {
    let text = std::fs::read_to_string(file).ok()?;
    let (start, end) = csr::validity(&text).ok()?;
    let now = unix_now();
    if now < start || now >= end {
        return None;
    }
    let (cn, sans) = crate::x509::names(&text).ok()?;
    if cn != common_name || !names.iter().all(|n| sans.contains(n)) {
        return None;
    }
    // The key is there and belongs to the certificate.
    LiveIdentity::from_pem(&text, &text).ok()?;
    Some((text.clone(), text))
}

/// Keep a certificate and its key in one file only its owner can read,
/// replaced atomically (readers see the old pair or the new, never a mix).
pub fn save(file: &Path, (cert, key): &(String, String)) -> Result<()> {
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    use std::io::Write;
    f.write_all(cert.as_bytes())?;
    if !cert.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    f.write_all(key.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))
}

/// A spread in 0..1 so that identities obtained together renew apart.
pub fn jitter() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.5, |d| f64::from(d.subsec_nanos() % 1000) / 999.0)
}

/// Keep a certificate for `ask` in `file` (certificate then key): use a
/// valid one already there or obtain one now, then renew it at 70–90% of
/// its lifetime until `shutdown`. Returns once `file` holds a certificate;
/// the renewals run on a task of their own.
pub async fn keep(
    client: kube::Client,
    ask: Ask,
    file: PathBuf,
    shutdown: CancellationToken,
) -> Result<()> {
    if kept(&file, &ask.common_name, &ask.names).is_none() {
        let pair = obtain(&client, &ask).await?;
        save(&file, &pair)?;
    }
    tokio::spawn(async move {
        let jitter = jitter();
        loop {
            let due = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| csr::validity(&t).ok())
                .map_or(0, |v| csr::renew_at(v, jitter));
            let wait = (due - unix_now()).max(0) as u64;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            }
            match obtain(&client, &ask)
                .await
                .and_then(|pair| save(&file, &pair))
            {
                Ok(()) => {
                    tracing::info!(signer = %ask.signer, file = %file.display(), "certificate renewed")
                }
                Err(e) => {
                    tracing::warn!(signer = %ask.signer, "renewing a certificate: {e:#}");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RENEWAL_RETRY) => {}
                    }
                }
            }
        }
    });
    Ok(())
}
