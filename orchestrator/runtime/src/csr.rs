//! Certificate signing requests as the cluster's signers see them: nodes
//! make them ([`request`]), the controller manager checks them against the
//! rules of the signer they name ([`check`]) and signs them with the
//! cluster CA ([`sign`]).

use std::net::IpAddr;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, DnValue, ExtendedKeyUsagePurpose,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Node client certificates: `system:node:NAME` in `system:nodes`.
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// Kubelets' serving certificates, for their names and addresses.
pub const KUBELET_SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
/// Other client certificates for the API server.
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
/// Taps' client certificates for the aggregator's ingest:
/// `tapestry:tap:NODE` in `tapestry:taps`.
pub const TAP_CLIENT_SIGNER: &str = "tapestry.io/tap-client";
/// The aggregator's serving certificate, for its addresses and names.
pub const AGGREGATOR_SERVING_SIGNER: &str = "tapestry.io/aggregator-serving";
/// The `extra` of a pod-bound service account token's user, as
/// kube-apiserver sets it: the pod, and the node it is bound to. Requests
/// record it, so signers can tell which pod (and node) asks.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The group of nodes' identities.
pub const NODES_GROUP: &str = "system:nodes";
/// A node's user name is this prefix and its node name.
pub const NODE_USER_PREFIX: &str = "system:node:";

/// The user a node speaks as.
pub fn node_user(node: &str) -> String {
    format!("{NODE_USER_PREFIX}{node}")
}

/// The longest a signed certificate lives (kube-controller-manager's
/// `--cluster-signing-duration` default), and what requests without
/// `expirationSeconds` get.
pub const MAX_DURATION_SECONDS: i64 = 365 * 24 * 3600;
/// Certificates start this much before signing, for clocks that lag.
const BACKDATE_SECONDS: i64 = 5 * 60;

/// A new key and a PEM request for a certificate naming `common_name` in
/// `organizations`, for `names` (DNS names or IP addresses). Returns (key
/// PEM, request PEM).
pub fn request(
    common_name: &str,
    organizations: &[&str],
    names: &[String],
) -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let params = subject(common_name, organizations, names).map_err(|e| e.to_string())?;
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| e.to_string())?;
    Ok((key.serialize_pem(), csr))
}

/// Certificate parameters naming `common_name` in `organizations`, for
/// `names` (DNS names or IP addresses); everything else is left default.
pub fn subject(
    common_name: &str,
    organizations: &[&str],
    names: &[String],
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for o in organizations {
        params.distinguished_name.push(DnType::OrganizationName, *o);
    }
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.as_str().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    Ok(params)
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    pub common_name: String,
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// SANs no signer here issues (e-mail addresses, URIs).
    pub other_names: usize,
}

/// Parse and verify (its signature) a PEM request.
pub fn parse(pem: &str) -> Result<(Requested, CertificateSigningRequestParams), String> {
    let csr = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| format!("not a valid certificate request: {e}"))?;
    let text = |v: &DnValue| match v {
        DnValue::PrintableString(s) => s.to_string(),
        DnValue::Utf8String(s) => s.clone(),
        DnValue::Ia5String(s) => s.to_string(),
        other => format!("{other:?}"),
    };
    let dn = &csr.params.distinguished_name;
    let common_name = dn.get(&DnType::CommonName).map(text).unwrap_or_default();
    let organizations = dn
        .iter()
        .filter(|(t, _)| **t == DnType::OrganizationName)
        .map(|(_, v)| text(v))
        .collect();
    let mut requested = Requested {
        common_name,
        organizations,
        dns_names: Vec::new(),
        ips: Vec::new(),
        other_names: 0,
    };
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::DnsName(n) => requested.dns_names.push(n.to_string()),
            SanType::IpAddress(ip) => requested.ips.push(*ip),
            _ => requested.other_names += 1,
        }
    }
    Ok((requested, csr))
}

/// Whether `requested` with `usages` is what `signer` issues; why not
/// otherwise. Unknown signers are not ours to judge (None).
pub fn check(signer: &str, requested: &Requested, usages: &[String]) -> Option<Result<(), String>> {
    let node_identity = || -> Result<(), String> {
        let node = requested
            .common_name
            .strip_prefix(NODE_USER_PREFIX)
            .unwrap_or_default();
        if node.is_empty() {
            return Err(format!(
                "subject common name must be {NODE_USER_PREFIX}<node name>, not {:?}",
                requested.common_name
            ));
        }
        if requested.organizations != [NODES_GROUP] {
            return Err(format!(
                "subject organization must be exactly {NODES_GROUP:?}, not {:?}",
                requested.organizations
            ));
        }
        Ok(())
    };
    let usages_within = |allowed: &[&str], needed: &str| -> Result<(), String> {
        if let Some(u) = usages.iter().find(|u| !allowed.contains(&u.as_str())) {
            return Err(format!("usage {u:?} is not allowed (allowed: {allowed:?})"));
        }
        if !usages.iter().any(|u| u == needed) {
            return Err(format!("usage {needed:?} is required"));
        }
        Ok(())
    };
    let no_names = || -> Result<(), String> {
        let names = requested.dns_names.len() + requested.ips.len() + requested.other_names;
        if names > 0 {
            return Err("client certificates carry no subject alternative names".into());
        }
        Ok(())
    };
    Some(match signer {
        KUBELET_CLIENT_SIGNER => node_identity().and_then(|()| no_names()).and_then(|()| {
            usages_within(
                &["key encipherment", "digital signature", "client auth"],
                "client auth",
            )
        }),
        KUBELET_SERVING_SIGNER => node_identity()
            .and_then(|()| {
                if requested.other_names > 0 {
                    Err("only DNS names and IP addresses may be requested".into())
                } else if requested.dns_names.is_empty() && requested.ips.is_empty() {
                    Err("at least one DNS name or IP address is required".into())
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                usages_within(
                    &["key encipherment", "digital signature", "server auth"],
                    "server auth",
                )
            }),
        TAP_CLIENT_SIGNER => {
            use tapestry_proto::identity::{tap_node, TAPS_GROUP, TAP_USER_PREFIX};
            if tap_node(&requested.common_name).is_none() {
                Err(format!(
                    "subject common name must be {TAP_USER_PREFIX}<node name>, not {:?}",
                    requested.common_name
                ))
            } else if requested.organizations != [TAPS_GROUP] {
                Err(format!(
                    "subject organization must be exactly {TAPS_GROUP:?}, not {:?}",
                    requested.organizations
                ))
            } else {
                no_names().and_then(|()| {
                    usages_within(
                        &["key encipherment", "digital signature", "client auth"],
                        "client auth",
                    )
                })
            }
        }
        AGGREGATOR_SERVING_SIGNER => {
            if requested.other_names > 0 {
                Err("only DNS names and IP addresses may be requested".into())
            } else if requested.dns_names.is_empty() && requested.ips.is_empty() {
                Err("at least one DNS name or IP address is required".into())
            } else if !requested.organizations.is_empty() {
                Err("a serving certificate names no organization".into())
            } else {
                usages_within(
                    &["key encipherment", "digital signature", "server auth"],
                    "server auth",
                )
            }
        }
        CLIENT_SIGNER => {
            if requested.common_name.is_empty() {
                Err("subject common name is required".into())
            } else {
                no_names().and_then(|()| {
                    usages_within(
                        &["key encipherment", "digital signature", "client auth"],
                        "client auth",
                    )
                })
            }
        }
        _ => return None,
    })
}

/// Sign a checked request with the CA (PEM certificate and key), valid
/// from now for `seconds` (at most [`MAX_DURATION_SECONDS`]). Returns the
/// certificate PEM.
pub fn sign(
    csr: &CertificateSigningRequestParams,
    requested: &Requested,
    usages: &[String],
    seconds: Option<i64>,
    ca_cert_pem: &str,
    ca_key_pem: &str,
) -> Result<String, String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| format!("CA key: {e}"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)
        .map_err(|e| format!("CA certificate: {e}"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, requested.common_name.as_str());
    for o in &requested.organizations {
        params
            .distinguished_name
            .push(DnType::OrganizationName, o.as_str());
    }
    params.subject_alt_names = csr
        .params
        .subject_alt_names
        .iter()
        .filter(|s| matches!(s, SanType::DnsName(_) | SanType::IpAddress(_)))
        .cloned()
        .collect();
    params.key_usages = usages
        .iter()
        .filter_map(|u| match u.as_str() {
            "digital signature" => Some(KeyUsagePurpose::DigitalSignature),
            "key encipherment" => Some(KeyUsagePurpose::KeyEncipherment),
            _ => None,
        })
        .collect();
    params.extended_key_usages = usages
        .iter()
        .filter_map(|u| match u.as_str() {
            "client auth" => Some(ExtendedKeyUsagePurpose::ClientAuth),
            "server auth" => Some(ExtendedKeyUsagePurpose::ServerAuth),
            _ => None,
        })
        .collect();
    let now = time::OffsetDateTime::now_utc();
    let lifetime = seconds
        .unwrap_or(MAX_DURATION_SECONDS)
        .min(MAX_DURATION_SECONDS);
    params.not_before = now - time::Duration::seconds(BACKDATE_SECONDS);
    params.not_after = now + time::Duration::seconds(lifetime);
    // The serial number is derived from the (fresh) public key.
    let cert = params
        .signed_by(&csr.public_key, &issuer)
        .map_err(|e| format!("signing: {e}"))?;
    Ok(cert.pem())
}

/// The validity of a PEM certificate (its first): (not before, not after)
/// as Unix seconds.
pub fn validity(cert_pem: &str) -> Result<(i64, i64), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| format!("unreadable certificate PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// When a certificate valid over `(start, end)` should be replaced: at
/// 70–90% of its lifetime (spread by `jitter` in 0..1), as the kubelet
/// renews its certificates.
pub fn renew_at((start, end): (i64, i64), jitter: f64) -> i64 {
    let lifetime = (end - start).max(0) as f64;
    start + (lifetime * (0.7 + 0.2 * jitter.clamp(0.0, 1.0))).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test-ca");
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn usages(u: &[&str]) -> Vec<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_node_client_request_is_signed_for_its_name() {
        let (_, pem) = request("system:node:a", &[NODES_GROUP], &[]).unwrap();
        let (requested, csr) = parse(&pem).unwrap();
        assert_eq!(requested.common_name, "system:node:a");
        assert_eq!(requested.organizations, [NODES_GROUP]);
        let u = usages(&["digital signature", "client auth"]);
        assert_eq!(check(KUBELET_CLIENT_SIGNER, &requested, &u), Some(Ok(())));
        let (ca_cert, ca_key) = ca();
        let cert = sign(&csr, &requested, &u, Some(3600), &ca_cert, &ca_key).unwrap();
        let (start, end) = validity(&cert).unwrap();
        assert!((end - start - 3600 - BACKDATE_SECONDS).abs() <= 1);
        let der = x509_parser::pem::parse_x509_pem(cert.as_bytes()).unwrap().1;
        let subject = crate::x509::subject(&der.contents).unwrap();
        assert_eq!(subject.common_name, "system:node:a");
        assert_eq!(subject.organizations, [NODES_GROUP]);
    }

    #[test]
    fn signers_refuse_what_they_do_not_issue() {
        let client = usages(&["digital signature", "client auth"]);
        let serving = usages(&["digital signature", "server auth"]);
        let (_, pem) = request("system:node:a", &["system:masters"], &[]).unwrap();
        let (r, _) = parse(&pem).unwrap();
        assert!(check(KUBELET_CLIENT_SIGNER, &r, &client).unwrap().is_err());
        let (_, pem) = request("admin", &[NODES_GROUP], &[]).unwrap();
        let (r, _) = parse(&pem).unwrap();
        assert!(check(KUBELET_CLIENT_SIGNER, &r, &client).unwrap().is_err());
        let (_, pem) = request("system:node:a", &[NODES_GROUP], &["10.0.0.1".into()]).unwrap();
        let (r, _) = parse(&pem).unwrap();
        assert!(check(KUBELET_CLIENT_SIGNER, &r, &client).unwrap().is_err());
        assert_eq!(check(KUBELET_SERVING_SIGNER, &r, &serving), Some(Ok(())));
        assert!(check(KUBELET_SERVING_SIGNER, &r, &client).unwrap().is_err());
        assert!(check("example.com/mine", &r, &client).is_none());
    }

    #[test]
    fn tap_and_aggregator_signers_issue_only_their_identities() {
        let client = usages(&["digital signature", "client auth"]);
        let serving = usages(&["digital signature", "server auth"]);
        let (_, pem) = request("tapestry:tap:node-1", &["tapestry:taps"], &[]).unwrap();
        let (tap, _) = parse(&pem).unwrap();
        assert_eq!(check(TAP_CLIENT_SIGNER, &tap, &client), Some(Ok(())));
        assert!(check(TAP_CLIENT_SIGNER, &tap, &serving).unwrap().is_err());
        let (_, pem) = request("tapestry:tap:node-1", &[NODES_GROUP], &[]).unwrap();
        let (r, _) = parse(&pem).unwrap();
        assert!(check(TAP_CLIENT_SIGNER, &r, &client).unwrap().is_err());
        let (_, pem) = request("system:node:node-1", &["tapestry:taps"], &[]).unwrap();
        let (r, _) = parse(&pem).unwrap();
        assert!(check(TAP_CLIENT_SIGNER, &r, &client).unwrap().is_err());
        let names = [
            "10.0.0.7".to_string(),
            "aggregator.tapestry-system.svc".into(),
        ];
        let (_, pem) = request("aggregator", &[], &names).unwrap();
        let (agg, _) = parse(&pem).unwrap();
        assert_eq!(
            check(AGGREGATOR_SERVING_SIGNER, &agg, &serving),
            Some(Ok(()))
        );
        assert!(check(AGGREGATOR_SERVING_SIGNER, &agg, &client)
            .unwrap()
            .is_err());
        assert!(check(AGGREGATOR_SERVING_SIGNER, &tap, &serving)
            .unwrap()
            .is_err());
    }

    #[test]
    fn renewal_comes_before_expiry() {
        assert_eq!(renew_at((0, 1000), 0.0), 700);
        assert_eq!(renew_at((0, 1000), 1.0), 900);
    }
}
