//! networking.k8s.io/v1: Ingresses, IngressClasses and NetworkPolicies.
//! They are served and validated; nothing routes Ingresses or enforces
//! NetworkPolicies.

pub mod ingress;
pub mod ingressclass;
pub mod networkpolicy;

use std::sync::Arc;

use serde_json::Value;

use crate::error::Cause;
use crate::registry::ResourceDef;

/// networking.k8s.io/v1 in discovery order; an Ingress's class is
/// defaulted from the IngressClasses in `store`.
pub fn resources(store: Arc<dyn tapestry_store::Store>) -> Vec<ResourceDef> {
    vec![
        ingress::definition(store),
        ingressclass::definition(),
        networkpolicy::definition(),
    ]
}

/// A port name as Kubernetes' `IsValidPortName` checks it (an IANA
/// service name).
pub(crate) fn port_name_errors(name: &str) -> Vec<&'static str> {
    let mut errs = Vec::new();
    if name.len() > 15 {
        errs.push("must be no more than 15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        errs.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if name.contains("--") {
        errs.push("must not contain consecutive hyphens");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        errs.push("must contain at least one letter (a-z)");
    }
    if name.starts_with('-') || name.ends_with('-') {
        errs.push("must not begin or end with a hyphen");
    }
    errs
}

/// A port: a number in 1..=65535 or a port name.
pub(crate) fn validate_port(v: &Value, field: &str, causes: &mut Vec<Cause>) {
    match v {
        Value::Number(n) if !n.as_i64().is_some_and(|n| (1..=65535).contains(&n)) => {
            causes.push(Cause::invalid(
                field,
                v,
                "must be between 1 and 65535, inclusive",
            ));
        }
        Value::String(name) => {
            for e in port_name_errors(name) {
                causes.push(Cause::invalid(field, v, e));
            }
        }
        _ => {}
    }
}

/// A DNS name for a host rule or TLS host: a subdomain, optionally
/// wildcarded in its first label (`*.example.com`), never an IP address.
pub(crate) fn validate_host(host: &str, field: &str, causes: &mut Vec<Cause>) {
    let v = Value::from(host);
    if host.parse::<std::net::IpAddr>().is_ok() {
        causes.push(Cause::invalid(
            field,
            &v,
            "must be a DNS name, not an IP address",
        ));
        return;
    }
    let errs = match host.strip_prefix("*.") {
        Some(rest) => tapestry_apimachinery::validation::dns1123_subdomain_errors(rest)
            .into_iter()
            .map(|_| "a wildcard DNS-1123 subdomain must start with '*.', followed by a valid DNS subdomain, which must consist of lower case alphanumeric characters, '-' or '.' and end with an alphanumeric character (e.g. '*.example.com', regex used for validation is '\\*\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".to_string())
            .take(1)
            .collect(),
        None => tapestry_apimachinery::validation::dns1123_subdomain_errors(host),
    };
    for e in errs {
        causes.push(Cause::invalid(field, &v, e));
    }
}
