//! A TLS identity (certificate and key) that can be replaced while in use:
//! clients present it and servers serve it on every new connection, so a
//! rotated certificate takes effect without restarting anything.

use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

#[derive(Debug)]
pub struct LiveIdentity {
    current: RwLock<Arc<CertifiedKey>>,
    /// The PEM certificate, for its names and dates.
    cert_pem: RwLock<String>,
}

/// A certificate chain and key from PEM.
fn certified(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate".into());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| format!("unreadable key: {e}"))?
        .ok_or("no private key")?;
    CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| format!("certificate and key: {e}"))
}

impl LiveIdentity {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<LiveIdentity, String> {
        Ok(LiveIdentity {
            current: RwLock::new(Arc::new(certified(cert_pem, key_pem)?)),
            cert_pem: RwLock::new(cert_pem.to_string()),
        })
    }

    /// Use another certificate and key from the next connection on.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        let new = Arc::new(certified(cert_pem, key_pem)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        *self.cert_pem.write().unwrap_or_else(|e| e.into_inner()) = cert_pem.to_string();
        Ok(())
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesClientCert for LiveIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}
