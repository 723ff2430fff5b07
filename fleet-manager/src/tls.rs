//! The REST API's serving identity: a certificate and key given by the
//! operator (e.g. issued by the cluster CA), or a self-signed pair kept in
//! a directory so clients can pin it across restarts.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

/// A certificate chain and its key, PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity { .. }")
    }
}

impl Identity {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Identity> {
        Ok(Identity {
            cert_pem: fs::read_to_string(cert)
                .with_context(|| format!("reading {}", cert.display()))?,
            key_pem: fs::read_to_string(key)
                .with_context(|| format!("reading {}", key.display()))?,
        })
    }

    /// `DIR/fleet-manager.crt` and `.key`, created self-signed for `names`
    /// (DNS names or IPs) on first use. Clients trust the certificate
    /// itself (`curl --cacert DIR/fleet-manager.crt`).
    pub fn self_signed_in(dir: &Path, names: &[String]) -> Result<Identity> {
        let cert = dir.join("fleet-manager.crt");
        let key = dir.join("fleet-manager.key");
        if cert.exists() && key.exists() {
            return Identity::from_files(&cert, &key);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let pair = rcgen::generate_simple_self_signed(names.to_vec())
            .context("generating a self-signed certificate")?;
        let identity = Identity {
            cert_pem: pair.cert.pem(),
            key_pem: pair.signing_key.serialize_pem(),
        };
        write_file(&key, &identity.key_pem, 0o600)?;
        write_file(&cert, &identity.cert_pem, 0o644)?;
        Ok(identity)
    }

    pub(crate) fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let certs = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the serving certificate")?;
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .context("parsing the serving key")?
            .context("no private key in the serving key file")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the serving certificate and key do not go together")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}
