//! networking.k8s.io/v1 NetworkPolicies: served with Kubernetes' defaults
//! (policyTypes, TCP ports) and validation; nothing enforces them.

use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};

use super::validate_port;
use crate::error::Cause;
use crate::registry::{names, Behaviour, Generation, ResourceDef};
use crate::selectors::validate_selector;
use crate::tables::{age, col, name, selector_string, TableDef, AGE, NAME};

pub fn definition() -> ResourceDef {
    ResourceDef {
        short_names: names(&["netpol"]),
        generation: Generation::Spec,
        behaviour: Arc::new(NetworkPolicyBehaviour),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col(
                    "Pod-Selector",
                    "Selects the pods to which this NetworkPolicy object applies.",
                ),
                AGE,
            ],
            cells: |o, now| {
                vec![
                    name(o),
                    json!(selector_string(o.pointer("/spec/podSelector"))),
                    age(o, now),
                ]
            },
        }),
        ..ResourceDef::of::<NetworkPolicy>()
    }
}

struct NetworkPolicyBehaviour;

const POLICY_TYPES: [&str; 2] = ["Egress", "Ingress"];
const PROTOCOLS: [&str; 3] = ["SCTP", "TCP", "UDP"];

fn rules_of<'a>(spec: &'a Value, dir: &str) -> Vec<&'a Value> {
    spec.get(dir)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect()
}

impl Behaviour for NetworkPolicyBehaviour {
    fn prepare_for_create(&self, _obj: &mut Value) {}

    /// Ports default to TCP; policyTypes to Ingress, plus Egress when
    /// there are egress rules.
    fn default(&self, obj: &mut Value) {
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        for dir in ["ingress", "egress"] {
            let rules = spec.get_mut(dir).and_then(Value::as_array_mut);
            for rule in rules.into_iter().flatten() {
                let ports = rule.get_mut("ports").and_then(Value::as_array_mut);
                for p in ports.into_iter().flatten() {
                    if let Some(p) = p.as_object_mut() {
                        p.entry("protocol").or_insert_with(|| json!("TCP"));
                    }
                }
            }
        }
        if spec
            .get("policyTypes")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            let mut types = vec![json!("Ingress")];
            if spec
                .get("egress")
                .and_then(Value::as_array)
                .is_some_and(|e| !e.is_empty())
            {
                types.push(json!("Egress"));
            }
            spec.insert("policyTypes".into(), Value::Array(types));
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let spec = obj.get("spec").cloned().unwrap_or(json!({}));
        validate_selector(spec.get("podSelector"), "spec.podSelector", &mut causes);
        let types = spec
            .get("policyTypes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (k, t) in types.iter().enumerate() {
            if !t.as_str().is_some_and(|t| POLICY_TYPES.contains(&t)) {
                causes.push(Cause::unsupported(
                    format!("spec.policyTypes[{k}]"),
                    t,
                    &POLICY_TYPES,
                ));
            }
        }
        if types.len() > 2 {
            causes.push(Cause::invalid(
                "spec.policyTypes",
                &json!(types),
                "may not specify more than two policyTypes",
            ));
        }
        for (dir, peers) in [("ingress", "from"), ("egress", "to")] {
            for (i, rule) in rules_of(&spec, dir).into_iter().enumerate() {
                let path = format!("spec.{dir}[{i}]");
                let ports = rule
                    .get("ports")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (j, p) in ports.iter().enumerate() {
                    let field = format!("{path}.ports[{j}]");
                    if let Some(proto) = p.get("protocol").and_then(Value::as_str) {
                        if !PROTOCOLS.contains(&proto) {
                            causes.push(Cause::unsupported(
                                format!("{field}.protocol"),
                                &json!(proto),
                                &PROTOCOLS,
                            ));
                        }
                    }
                    if let Some(port) = p.get("port").filter(|v| !v.is_null()) {
                        validate_port(port, &format!("{field}.port"), &mut causes);
                        if let Some(end) = p.get("endPort").and_then(Value::as_i64) {
                            match port.as_i64() {
                                None => causes.push(Cause::forbidden(
                                    format!("{field}.endPort"),
                                    "may not be specified when `port` is non-numeric",
                                )),
                                Some(start) if end < start => causes.push(Cause::invalid(
                                    format!("{field}.endPort"),
                                    &json!(end),
                                    "must be greater than or equal to `port`",
                                )),
                                Some(_) => {}
                            }
                        }
                    } else if p.get("endPort").is_some_and(|e| !e.is_null()) {
                        causes.push(Cause::required_because(
                            format!("{field}.port"),
                            "must be specified when `endPort` is specified",
                        ));
                    }
                }
                let list = rule
                    .get(peers)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (j, peer) in list.iter().enumerate() {
                    let field = format!("{path}.{peers}[{j}]");
                    let set = ["podSelector", "namespaceSelector", "ipBlock"]
                        .iter()
                        .filter(|k| peer.get(**k).is_some_and(|v| !v.is_null()))
                        .count();
                    if set == 0 {
                        causes.push(Cause::required_because(&field, "must specify a peer"));
                    }
                    validate_selector(
                        peer.get("podSelector"),
                        &format!("{field}.podSelector"),
                        &mut causes,
                    );
                    validate_selector(
                        peer.get("namespaceSelector"),
                        &format!("{field}.namespaceSelector"),
                        &mut causes,
                    );
                    if let Some(block) = peer.get("ipBlock").filter(|v| !v.is_null()) {
                        if set > 1 {
                            causes.push(Cause::forbidden(
                                &field,
                                "may not specify both ipBlock and another peer",
                            ));
                        }
                        validate_ip_block(block, &format!("{field}.ipBlock"), &mut causes);
                    }
                }
            }
        }
        causes
    }
}

/// An address range `a.b.c.d/n` or IPv6 equivalent: (network, prefix).
fn parse_cidr(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let (ip, bits) = text.split_once('/')?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((ip, bits))
}

fn to_bits(ip: std::net::IpAddr) -> (u128, u8) {
    match ip {
        std::net::IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
        std::net::IpAddr::V6(v) => (u128::from(v), 128),
    }
}

/// Whether `inner` is a strict subset of `outer` (same family).
fn within(inner: (std::net::IpAddr, u8), outer: (std::net::IpAddr, u8)) -> bool {
    let ((a, wa), (b, wb)) = (to_bits(inner.0), to_bits(outer.0));
    if wa != wb || inner.1 <= outer.1 {
        return false;
    }
    let host_bits = u32::from(wb - outer.1);
    let mask = if host_bits >= 128 {
        0
    } else {
        !((1u128 << host_bits) - 1)
    };
    a & mask == b & mask
}

fn validate_ip_block(block: &Value, path: &str, causes: &mut Vec<Cause>) {
    let cidr = block.get("cidr").and_then(Value::as_str).unwrap_or("");
    if cidr.is_empty() {
        causes.push(Cause::required(format!("{path}.cidr")));
        return;
    }
    let Some(outer) = parse_cidr(cidr) else {
        causes.push(Cause::invalid(
            format!("{path}.cidr"),
            &json!(cidr),
            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
        ));
        return;
    };
    let except = block
        .get("except")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (k, e) in except.iter().enumerate() {
        let text = e.as_str().unwrap_or("");
        let field = format!("{path}.except[{k}]");
        match parse_cidr(text) {
            None => causes.push(Cause::invalid(
                &field,
                e,
                "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
            )),
            Some(inner) if !within(inner, outer) => causes.push(Cause::invalid(
                &field,
                e,
                "must be a strict subset of `cidr`",
            )),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(spec: Value) -> Vec<String> {
        NetworkPolicyBehaviour
            .validate(&json!({"spec": spec}))
            .into_iter()
            .map(|c| c.field)
            .collect()
    }

    #[test]
    fn policies_are_defaulted_and_validated_as_kubernetes_does() {
        let mut p = json!({"spec": {"podSelector": {}, "egress": [{"ports": [{"port": 53}]}]}});
        NetworkPolicyBehaviour.default(&mut p);
        assert_eq!(p["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(p["spec"]["egress"][0]["ports"][0]["protocol"], "TCP");
        assert!(fields(p["spec"].clone()).is_empty());
        assert_eq!(
            fields(json!({"policyTypes": ["Sideways"]})),
            ["spec.policyTypes[0]"]
        );
        assert_eq!(
            fields(json!({"ingress": [{"ports": [{"port": 0}]}]})),
            ["spec.ingress[0].ports[0].port"]
        );
        assert_eq!(
            fields(
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]})
            ),
            ["spec.ingress[0].from[0].ipBlock.except[0]"]
        );
        assert!(fields(json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]})).is_empty());
        assert_eq!(
            fields(json!({"egress": [{"to": [{"ipBlock": {"cidr": "nope"}}]}]})),
            ["spec.egress[0].to[0].ipBlock.cidr"]
        );
    }
}
