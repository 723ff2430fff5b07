//! Bodies captured from kubectl v1.32's typed `kubectl create ...` commands
//! (protobuf encoding), checked against the JSON the same kubectl prints for
//! the same command with `--dry-run=client -o json` (Go's JSON form of the
//! object), including key order.

use serde_json::Value;
use tapestry_kubeproto::{decode, CamelCaseNames};

const CASES: &[&str] = &[
    "configmaps",
    "cronjobs",
    "deployments",
    "ingresses",
    "jobs",
    "namespaces",
    "poddisruptionbudgets",
    "priorityclasses",
    "resourcequotas",
    "rolebindings",
    "roles",
    "secrets",
    "serviceaccounts",
    "services",
];

fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn kubectl_bodies_decode_to_kubectl_json() {
    for case in CASES {
        let body = data(&format!("{case}.pb"));
        assert!(body.starts_with(b"k8s\0"), "{case}");
        let got = decode(&body, &CamelCaseNames).unwrap_or_else(|e| panic!("{case}: {e}"));
        let want: Value = serde_json::from_slice(&data(&format!("{case}.json"))).unwrap();
        assert_eq!(
            serde_json::to_string_pretty(&got).unwrap(),
            serde_json::to_string_pretty(&want).unwrap(),
            "{case}"
        );
    }
}

#[test]
fn truncated_kubectl_bodies_fail_cleanly() {
    for case in CASES {
        let body = data(&format!("{case}.pb"));
        for n in 0..body.len() {
            let _ = decode(&body[..n], &CamelCaseNames);
        }
    }
}
