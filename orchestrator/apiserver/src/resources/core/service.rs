//! core/v1 Services: defaults, validation and ClusterIP/NodePort
//! allocation (the [`allocator`]).

pub mod allocator;

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use serde_json::{json, Value};

use crate::error::Cause;
use crate::registry::{names, selectable, Behaviour, ResourceDef, WriteHook};
use crate::rest::status::StatusRest;
use crate::tables::{self, age, col, i, name, or_none, s, wide, TableDef, AGE, NAME};
use crate::validation::{self, NameRule};

/// Where Services are stored, below `/registry/` (as kube-apiserver keeps
/// them); the allocator finds an allocation's Service there.
const STORAGE: &str = "services/specs";

/// The store key of a Service, the same as its definition's
/// [`ResourceDef::key`] (pinned by a test).
pub(crate) fn storage_key(namespace: &str, name: &str) -> String {
    format!("/registry/{STORAGE}/{namespace}/{name}")
}

/// `allocator` hands out ClusterIPs and NodePorts.
pub fn definition(allocator: Arc<dyn WriteHook>) -> ResourceDef {
    ResourceDef {
        short_names: names(&["svc"]),
        categories: names(&["all"]),
        name_rule: NameRule::Dns1123Label,
        subresources: vec![StatusRest::def()],
        storage: STORAGE.into(),
        behaviour: Arc::new(ServiceBehaviour),
        hook: Some(allocator),
        table: Arc::new(TableDef {
            columns: vec![
                NAME,
                col("Type", "The type of the service."),
                col("Cluster-IP", "The cluster ip of the service."),
                col("External-IP", "The external ip of the service."),
                col("Port(s)", "The ports of the service."),
                AGE,
                wide("Selector", "The selector of the service."),
            ],
            cells: service_cells,
        }),
        field_selectors: selectable(&[
            ("spec.clusterIP", "/spec/clusterIP"),
            ("spec.type", "/spec/type"),
        ]),
        ..ResourceDef::of::<Service>()
    }
}

fn service_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let kind = s(o, "/spec/type");
    let ports: Vec<String> = o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let proto = s(p, "/protocol");
                    match i(p, "/nodePort") {
                        0 => format!("{}/{proto}", i(p, "/port")),
                        np => format!("{}:{np}/{proto}", i(p, "/port")),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let mut external: Vec<String> = o
        .pointer("/spec/externalIPs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if kind == "LoadBalancer" {
        for ing in o
            .pointer("/status/loadBalancer/ingress")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ip = s(ing, "/ip");
            external.push(
                if ip.is_empty() {
                    s(ing, "/hostname")
                } else {
                    ip
                }
                .to_string(),
            );
        }
        if external.is_empty() {
            external.push("<pending>".into());
        }
    }
    if kind == "ExternalName" {
        external.push(s(o, "/spec/externalName").to_string());
    }
    let cluster_ip = s(o, "/spec/clusterIP");
    vec![
        name(o),
        json!(kind),
        or_none(cluster_ip),
        or_none(&external.join(",")),
        or_none(&ports.join(",")),
        age(o, now),
        json!(tables::selector_string(o.pointer("/spec/selector"))),
    ]
}

const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];

struct ServiceBehaviour;

impl Behaviour for ServiceBehaviour {
    fn default(&self, obj: &mut Value) {
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        if spec.get("type").is_none_or(Value::is_null) {
            spec.insert("type".into(), json!("ClusterIP"));
        }
        let kind = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if kind != "ExternalName" {
            spec.entry("sessionAffinity").or_insert(json!("None"));
            spec.entry("internalTrafficPolicy")
                .or_insert(json!("Cluster"));
            spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
            spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
        }
        if matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
            spec.entry("externalTrafficPolicy")
                .or_insert(json!("Cluster"));
        }
        if let Some(Value::Array(ports)) = spec.get_mut("ports") {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                p.entry("protocol").or_insert(json!("TCP"));
                if let Some(port) = p.get("port").cloned() {
                    p.entry("targetPort").or_insert(port);
                }
            }
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({"loadBalancer": {}});
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes = Vec::new();
        let kind = s(obj, "/spec/type");
        if !SERVICE_TYPES.contains(&kind) {
            causes.push(Cause::unsupported("spec.type", &json!(kind), SERVICE_TYPES));
        }
        let ports = obj
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let headless = s(obj, "/spec/clusterIP") == "None";
        if ports.is_empty() && kind != "ExternalName" && !headless {
            causes.push(Cause::required("spec.ports"));
        }
        if kind == "ExternalName" && s(obj, "/spec/externalName").is_empty() {
            causes.push(Cause::required("spec.externalName"));
        }
        let mut names = HashSet::new();
        for (idx, p) in ports.iter().enumerate() {
            let path = format!("spec.ports[{idx}]");
            let port = i(p, "/port");
            if !(1..=65535).contains(&port) {
                causes.push(Cause::invalid(
                    format!("{path}.port"),
                    &json!(port),
                    "must be between 1 and 65535, inclusive",
                ));
            }
            let pname = s(p, "/name");
            if ports.len() > 1 && pname.is_empty() {
                causes.push(Cause::required(format!("{path}.name")));
            }
            if !pname.is_empty() {
                for e in validation::dns1123_label_errors(pname) {
                    causes.push(Cause::invalid(format!("{path}.name"), &json!(pname), e));
                }
                if !names.insert(pname.to_string()) {
                    causes.push(Cause::duplicate(format!("{path}.name"), &json!(pname)));
                }
            }
            let proto = s(p, "/protocol");
            if !["TCP", "UDP", "SCTP"].contains(&proto) {
                causes.push(Cause::unsupported(
                    format!("{path}.protocol"),
                    &json!(proto),
                    &["TCP", "UDP", "SCTP"],
                ));
            }
            let node_port = i(p, "/nodePort");
            if node_port != 0 && kind == "ClusterIP" {
                causes.push(Cause::forbidden(
                    format!("{path}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            }
        }
        causes
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        let old_ip = s(old, "/spec/clusterIP");
        let new_ip = s(new, "/spec/clusterIP");
        let type_changes_ip =
            s(new, "/spec/type") == "ExternalName" || s(old, "/spec/type") == "ExternalName";
        if !old_ip.is_empty() && old_ip != new_ip && !type_changes_ip {
            causes.push(Cause::invalid(
                "spec.clusterIP",
                &json!(new_ip),
                "field is immutable",
            ));
        }
        causes
    }

    fn prepare_for_update(&self, new: &mut Value, old: &Value) {
        // Clients that omit clusterIP or nodePorts on update keep the
        // allocated ones, as kube-apiserver does.
        let old_ip = old.pointer("/spec/clusterIP").cloned();
        if let (Some(spec), Some(ip)) = (new.get_mut("spec"), old_ip) {
            if spec.get("clusterIP").is_none_or(|v| v.as_str() == Some("")) {
                spec["clusterIP"] = ip.clone();
                if let Some(ips) = old.pointer("/spec/clusterIPs") {
                    spec["clusterIPs"] = ips.clone();
                }
            }
        }
        let old_ports = old
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(Value::Array(ports)) = new.pointer_mut("/spec/ports") {
            for p in ports.iter_mut() {
                if i(p, "/nodePort") != 0 {
                    continue;
                }
                let matching = old_ports.iter().find(|o| {
                    i(o, "/port") == i(p, "/port") && s(o, "/protocol") == s(p, "/protocol")
                });
                if let Some(np) = matching.and_then(|o| o.get("nodePort")) {
                    p["nodePort"] = np.clone();
                }
            }
        }
    }
}
