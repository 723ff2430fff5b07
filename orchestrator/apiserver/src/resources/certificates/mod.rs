//! certificates.k8s.io/v1 CertificateSigningRequests: a client asks for a
//! certificate for a key it keeps; an approver (a person with `kubectl
//! certificate approve`, or the controller manager's auto-approver for
//! nodes) adds an `Approved` condition through the `approval`
//! subresource, and the signer named by `spec.signerName` writes
//! `status.certificate`. The server records who asked (`spec.username`,
//! `groups`, `uid`), which approvers and signers rely on; the request
//! itself never changes after create.

use std::sync::Arc;

use base64::Engine;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use serde_json::{json, Value};
use tapestry_apimachinery::tokens::User;

use crate::error::Cause;
use crate::registry::{Behaviour, Generation, ResourceDef};
use crate::rest::status::StatusRest;
use crate::tables::{age, col, name, s, TableDef, AGE, NAME};

/// The key usages Kubernetes accepts in `spec.usages`.
pub const USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

/// The shortest lifetime a request may ask for.
const MIN_EXPIRATION_SECONDS: i64 = 600;

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: vec!["csr".into()],
        subresources: vec![StatusRest::def(), StatusRest::approval_def()],
        generation: Generation::Spec,
        behaviour: Arc::new(CsrBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                AGE,
                col("SignerName", "The signer the request is for."),
                col("Requestor", "Who made the request."),
                col("RequestedDuration", "The lifetime the request asks for."),
                col("Condition", "Where the request stands."),
            ],
            cells: |o, now| {
                let duration = o
                    .pointer("/spec/expirationSeconds")
                    .and_then(Value::as_i64)
                    .map(crate::tables::human_duration)
                    .unwrap_or_else(|| "<none>".into());
                vec![
                    name(o),
                    age(o, now),
                    json!(s(o, "/spec/signerName")),
                    json!(s(o, "/spec/username")),
                    json!(duration),
                    json!(condition(o)),
                ]
            },
        }),
        ..ResourceDef::of::<CertificateSigningRequest>()
    }
}

/// kubectl's CONDITION column: `Pending`, `Approved,Issued`, `Denied`, ...
fn condition(o: &Value) -> String {
    let mut states: Vec<String> = conditions(o)
        .filter(|c| c["status"] != "False")
        .filter_map(|c| c["type"].as_str().map(str::to_string))
        .collect();
    if o.pointer("/status/certificate")
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty())
    {
        states.push("Issued".into());
    }
    if states.is_empty() {
        "Pending".into()
    } else {
        states.join(",")
    }
}

fn conditions(o: &Value) -> impl Iterator<Item = &Value> {
    o.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// Whether a condition of type `kind` holds.
pub fn has_condition(o: &Value, kind: &str) -> bool {
    conditions(o).any(|c| c["type"] == kind && c["status"] != "False")
}

/// The PEM text of `spec.request` (base64 in JSON).
pub fn request_pem(o: &Value) -> Result<String, String> {
    let encoded = o
        .pointer("/spec/request")
        .and_then(Value::as_str)
        .ok_or("no request")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("not base64: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "not PEM text".into())
}

struct CsrBehaviour;

impl Behaviour for CsrBehaviour {
    fn record_requester(&self, obj: &mut Value, user: Option<&User>) {
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        for f in ["username", "uid", "groups", "extra"] {
            spec.remove(f);
        }
        if let Some(user) = user {
            spec.insert("username".into(), json!(user.name));
            if !user.uid.is_empty() {
                spec.insert("uid".into(), json!(user.uid));
            }
            spec.insert("groups".into(), json!(user.groups));
            if !user.extra.is_empty() {
                spec.insert("extra".into(), json!(user.extra));
            }
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        match request_pem(obj) {
            Err(_) if obj.pointer("/spec/request").is_none() => {
                causes.push(Cause::required("spec.request"))
            }
            Err(e) => causes.push(Cause::invalid("spec.request", &json!("<request>"), e)),
            Ok(pem) => {
                if let Err(e) = tapestry_runtime::csr::parse(&pem) {
                    causes.push(Cause::invalid("spec.request", &json!("<request>"), e));
                }
            }
        }
        match obj.pointer("/spec/signerName").and_then(Value::as_str) {
            None | Some("") => causes.push(Cause::required("spec.signerName")),
            Some(signer) => {
                let valid = signer.split_once('/').is_some_and(|(domain, path)| {
                    domain.contains('.') && !path.is_empty() && !path.contains('/')
                });
                if !valid {
                    causes.push(Cause::invalid(
                        "spec.signerName",
                        &json!(signer),
                        "must be a fully qualified domain and path of the form 'example.com/signer-name'",
                    ));
                }
            }
        }
        let usages = obj.pointer("/spec/usages").and_then(Value::as_array);
        if usages.is_none_or(|u| u.is_empty()) {
            causes.push(Cause::required("spec.usages"));
        }
        for (i, usage) in usages.into_iter().flatten().enumerate() {
            if !usage.as_str().is_some_and(|u| USAGES.contains(&u)) {
                causes.push(Cause::unsupported(
                    format!("spec.usages[{i}]"),
                    usage,
                    USAGES,
                ));
            }
        }
        if let Some(seconds) = obj.pointer("/spec/expirationSeconds") {
            if seconds.as_i64().is_none_or(|s| s < MIN_EXPIRATION_SECONDS) {
                causes.push(Cause::invalid(
                    "spec.expirationSeconds",
                    seconds,
                    format!(
                        "may not specify a duration less than {MIN_EXPIRATION_SECONDS} seconds"
                    ),
                ));
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        if new.get("spec") != old.get("spec") {
            return vec![Cause::invalid(
                "spec",
                &json!("<spec>"),
                "field is immutable",
            )];
        }
        Vec::new()
    }

    fn validate_status_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        for (i, c) in conditions(new).enumerate() {
            if c["type"].as_str().is_none_or(str::is_empty) {
                causes.push(Cause::required(format!("status.conditions[{i}].type")));
            }
        }
        if has_condition(new, "Approved") && has_condition(new, "Denied") {
            causes.push(Cause::invalid(
                "status.conditions",
                &json!("Approved,Denied"),
                "Approved and Denied conditions are mutually exclusive",
            ));
        }
        for kept in ["Approved", "Denied"] {
            if has_condition(old, kept) && !has_condition(new, kept) {
                causes.push(Cause::forbidden(
                    "status.conditions",
                    format!("updates may not remove a condition of type {kept:?}"),
                ));
            }
        }
        let cert = |o: &Value| {
            o.pointer("/status/certificate")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (new_cert, old_cert) = (cert(new), cert(old));
        if !new_cert.is_empty() {
            if !old_cert.is_empty() && new_cert != old_cert {
                causes.push(Cause::forbidden(
                    "status.certificate",
                    "updates may not modify existing certificate content",
                ));
            }
            if !has_condition(new, "Approved") || has_condition(new, "Failed") {
                causes.push(Cause::forbidden(
                    "status.certificate",
                    "certificate may only be set on an approved request that has not failed",
                ));
            }
        }
        causes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapestry_runtime::csr::KUBELET_CLIENT_SIGNER;

    fn request() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:a");
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        base64::engine::general_purpose::STANDARD.encode(pem)
    }

    fn csr() -> Value {
        json!({"spec": {"request": request(), "signerName": KUBELET_CLIENT_SIGNER,
                        "usages": ["digital signature", "client auth"]}})
    }

    #[test]
    fn requests_are_checked() {
        assert!(CsrBehaviour.validate(&csr()).is_empty());
        let mut bad = csr();
        bad["spec"]["request"] = json!(base64::engine::general_purpose::STANDARD.encode("junk"));
        bad["spec"]["signerName"] = json!("nodomain");
        bad["spec"]["usages"] = json!(["flying"]);
        bad["spec"]["expirationSeconds"] = json!(60);
        let fields: Vec<String> = CsrBehaviour
            .validate(&bad)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.request",
                "spec.signerName",
                "spec.usages[0]",
                "spec.expirationSeconds"
            ]
        );
    }

    #[test]
    fn the_requester_is_the_server_s_word() {
        let mut o = csr();
        o["spec"]["username"] = json!("someone-else");
        let user = User {
            name: "system:bootstrap:abcdef".into(),
            uid: String::new(),
            groups: vec!["system:bootstrappers".into()],
            ..Default::default()
        };
        CsrBehaviour.record_requester(&mut o, Some(&user));
        assert_eq!(o["spec"]["username"], "system:bootstrap:abcdef");
        assert_eq!(o["spec"]["groups"], json!(["system:bootstrappers"]));
    }

    #[test]
    fn approval_is_final_and_certificates_need_it() {
        let pending = csr();
        let mut approved = csr();
        approved["status"] = json!({"conditions": [{"type": "Approved", "status": "True"}]});
        assert!(CsrBehaviour
            .validate_status_update(&approved, &pending)
            .is_empty());
        assert!(!CsrBehaviour
            .validate_status_update(&pending, &approved)
            .is_empty());
        let mut both = approved.clone();
        both["status"]["conditions"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "Denied", "status": "True"}));
        assert!(!CsrBehaviour
            .validate_status_update(&both, &approved)
            .is_empty());
        let mut issued_unapproved = csr();
        issued_unapproved["status"] = json!({"certificate": "Y2VydA=="});
        assert!(!CsrBehaviour
            .validate_status_update(&issued_unapproved, &pending)
            .is_empty());
        let mut issued = approved.clone();
        issued["status"]["certificate"] = json!("Y2VydA==");
        assert!(CsrBehaviour
            .validate_status_update(&issued, &approved)
            .is_empty());
        assert_eq!(condition(&issued), "Approved,Issued");
        assert_eq!(condition(&pending), "Pending");
    }
}
