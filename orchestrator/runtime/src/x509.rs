//! Who a client certificate names: Kubernetes reads the user from its
//! common name and the groups from its organizations.

/// The names of a certificate's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub common_name: String,
    pub organizations: Vec<String>,
}

/// The subject of a DER certificate.
pub fn subject(der: &[u8]) -> Result<Subject, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let common_name = subject
        .iter_common_name()
        .find_map(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let organizations = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok().map(str::to_string))
        .collect();
    Ok(Subject {
        common_name,
        organizations,
    })
}
