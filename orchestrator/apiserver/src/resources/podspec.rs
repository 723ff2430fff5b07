//! Pod spec defaults and validation, shared by pods and every workload's
//! pod template.

use std::collections::HashSet;

use serde_json::{json, Map, Value};

use crate::error::Cause;
use crate::validation::{dns1123_label_errors, dns1123_subdomain_errors};

fn set_default(obj: &mut Map<String, Value>, key: &str, value: Value) {
    if obj.get(key).is_none_or(Value::is_null) {
        obj.insert(key.to_string(), value);
    }
}

/// Defaults Kubernetes applies to every PodSpec (pods and templates).
pub fn default_pod_spec(spec: &mut Value) {
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    let host_network = spec.get("hostNetwork").and_then(Value::as_bool) == Some(true);
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(containers)) = spec.get_mut(list) {
            for c in containers {
                default_container(c);
                if host_network {
                    claim_host_ports(c);
                }
            }
        }
    }
    if let Some(Value::Array(volumes)) = spec.get_mut("volumes") {
        for v in volumes {
            default_volume(v);
        }
    }
}

/// On the host's network a container port is a host port: saying so lets
/// the scheduler keep two pods that need it apart (a replacement waits
/// until the pod holding the port is gone instead of failing to bind).
fn claim_host_ports(c: &mut Value) {
    let Some(Value::Array(ports)) = c.get_mut("ports") else {
        return;
    };
    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
        let unset = p.get("hostPort").and_then(Value::as_i64).unwrap_or(0) == 0;
        if let (true, Some(port)) = (unset, p.get("containerPort").cloned()) {
            p.insert("hostPort".into(), port);
        }
    }
}

fn default_container(c: &mut Value) {
    let Some(c) = c.as_object_mut() else { return };
    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(c, "terminationMessagePolicy", json!("File"));
    set_default(c, "resources", json!({}));
    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
    set_default(c, "imagePullPolicy", json!(default_pull_policy(image)));
    if let Some(Value::Array(ports)) = c.get_mut("ports") {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(Value::Object(p)) = c.get_mut(probe) {
            set_default(p, "timeoutSeconds", json!(1));
            set_default(p, "periodSeconds", json!(10));
            set_default(p, "successThreshold", json!(1));
            set_default(p, "failureThreshold", json!(3));
            if let Some(Value::Object(h)) = p.get_mut("httpGet") {
                set_default(h, "scheme", json!("HTTP"));
                set_default(h, "path", json!("/"));
            }
        }
    }
    // Requests default to limits when only limits are given.
    if let Some(Value::Object(res)) = c.get_mut("resources") {
        if let Some(limits) = res
            .get("limits")
            .cloned()
            .and_then(|l| l.as_object().cloned())
        {
            let requests = res
                .entry("requests")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            if let Some(requests) = requests {
                for (k, v) in limits {
                    requests.entry(k).or_insert(v);
                }
            }
        }
    }
}

/// `Always` for `:latest` or untagged images, `IfNotPresent` otherwise.
pub fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_volume(v: &mut Value) {
    let Some(v) = v.as_object_mut() else { return };
    let has_source = v.keys().any(|k| k != "name");
    if !has_source {
        v.insert("emptyDir".into(), json!({}));
    }
    for source in ["configMap", "secret"] {
        if let Some(Value::Object(s)) = v.get_mut(source) {
            set_default(s, "defaultMode", json!(420));
        }
    }
}

const RESTART_POLICIES: &[&str] = &["Always", "OnFailure", "Never"];
const DNS_POLICIES: &[&str] = &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];
const PULL_POLICIES: &[&str] = &["Always", "IfNotPresent", "Never"];

/// Validate a PodSpec found at `path` (e.g. `spec` or `spec.template.spec`).
pub fn validate_pod_spec(spec: &Value, path: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut volume_names = HashSet::new();
    if let Some(volumes) = spec.get("volumes").and_then(Value::as_array) {
        for (i, v) in volumes.iter().enumerate() {
            let vpath = format!("{path}.volumes[{i}].name");
            match v.get("name").and_then(Value::as_str) {
                None | Some("") => causes.push(Cause::required(vpath)),
                Some(name) => {
                    for e in dns1123_label_errors(name) {
                        causes.push(Cause::invalid(&vpath, &json!(name), e));
                    }
                    if !volume_names.insert(name.to_string()) {
                        causes.push(Cause::duplicate(&vpath, &json!(name)));
                    }
                }
            }
        }
    }
    let containers = spec.get("containers").and_then(Value::as_array);
    match containers {
        None => causes.push(Cause::required(format!("{path}.containers"))),
        Some(c) if c.is_empty() => causes.push(Cause::required(format!("{path}.containers"))),
        _ => {}
    }
    let mut names = HashSet::new();
    for list in ["initContainers", "containers"] {
        let Some(cs) = spec.get(list).and_then(Value::as_array) else {
            continue;
        };
        for (i, c) in cs.iter().enumerate() {
            let cpath = format!("{path}.{list}[{i}]");
            validate_container(c, &cpath, &volume_names, &mut names, &mut causes);
        }
    }
    let restart = spec
        .get("restartPolicy")
        .and_then(Value::as_str)
        .unwrap_or("Always");
    if !RESTART_POLICIES.contains(&restart) {
        causes.push(Cause::unsupported(
            format!("{path}.restartPolicy"),
            &json!(restart),
            RESTART_POLICIES,
        ));
    }
    if let Some(dns) = spec.get("dnsPolicy").and_then(Value::as_str) {
        if !DNS_POLICIES.contains(&dns) {
            causes.push(Cause::unsupported(
                format!("{path}.dnsPolicy"),
                &json!(dns),
                DNS_POLICIES,
            ));
        }
    }
    if let Some(grace) = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
    {
        if grace < 0 {
            causes.push(Cause::invalid(
                format!("{path}.terminationGracePeriodSeconds"),
                &json!(grace),
                "must be greater than or equal to 0",
            ));
        }
    }
    if let Some(node) = spec.get("nodeName").and_then(Value::as_str) {
        if !node.is_empty() {
            for e in dns1123_subdomain_errors(node) {
                causes.push(Cause::invalid(format!("{path}.nodeName"), &json!(node), e));
            }
        }
    }
    causes
}

fn validate_container(
    c: &Value,
    path: &str,
    volumes: &HashSet<String>,
    names: &mut HashSet<String>,
    causes: &mut Vec<Cause>,
) {
    match c.get("name").and_then(Value::as_str) {
        None | Some("") => causes.push(Cause::required(format!("{path}.name"))),
        Some(name) => {
            for e in dns1123_label_errors(name) {
                causes.push(Cause::invalid(format!("{path}.name"), &json!(name), e));
            }
            if !names.insert(name.to_string()) {
                causes.push(Cause::duplicate(format!("{path}.name"), &json!(name)));
            }
        }
    }
    if c.get("image")
        .and_then(Value::as_str)
        .is_none_or(|i| i.trim().is_empty())
    {
        causes.push(Cause::required(format!("{path}.image")));
    }
    if let Some(policy) = c.get("imagePullPolicy").and_then(Value::as_str) {
        if !PULL_POLICIES.contains(&policy) {
            causes.push(Cause::unsupported(
                format!("{path}.imagePullPolicy"),
                &json!(policy),
                PULL_POLICIES,
            ));
        }
    }
    let mut port_names = HashSet::new();
    if let Some(ports) = c.get("ports").and_then(Value::as_array) {
        for (i, p) in ports.iter().enumerate() {
            let ppath = format!("{path}.ports[{i}]");
            let port = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
            if !(1..=65535).contains(&port) {
                causes.push(Cause::invalid(
                    format!("{ppath}.containerPort"),
                    &json!(port),
                    "must be between 1 and 65535, inclusive",
                ));
            }
            if let Some(hp) = p.get("hostPort").and_then(Value::as_i64) {
                if !(0..=65535).contains(&hp) {
                    causes.push(Cause::invalid(
                        format!("{ppath}.hostPort"),
                        &json!(hp),
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            if !PROTOCOLS.contains(&proto) {
                causes.push(Cause::unsupported(
                    format!("{ppath}.protocol"),
                    &json!(proto),
                    PROTOCOLS,
                ));
            }
            if let Some(n) = p.get("name").and_then(Value::as_str) {
                if !port_names.insert(n.to_string()) {
                    causes.push(Cause::duplicate(format!("{ppath}.name"), &json!(n)));
                }
            }
        }
    }
    if let Some(mounts) = c.get("volumeMounts").and_then(Value::as_array) {
        for (i, m) in mounts.iter().enumerate() {
            let mpath = format!("{path}.volumeMounts[{i}]");
            let name = m.get("name").and_then(Value::as_str).unwrap_or("");
            if name.is_empty() {
                causes.push(Cause::required(format!("{mpath}.name")));
            } else if !volumes.contains(name) {
                causes.push(Cause {
                    reason: "FieldValueNotFound",
                    message: format!("Not found: {name:?}"),
                    field: format!("{mpath}.name"),
                });
            }
            if m.get("mountPath")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(Cause::required(format!("{mpath}.mountPath")));
            }
        }
    }
    if let Some(env) = c.get("env").and_then(Value::as_array) {
        for (i, e) in env.iter().enumerate() {
            let name = e.get("name").and_then(Value::as_str).unwrap_or("");
            if name.is_empty() {
                causes.push(Cause::required(format!("{path}.env[{i}].name")));
            } else if name.contains('=') || name.chars().any(|ch| ch.is_control()) {
                causes.push(Cause::invalid(
                    format!("{path}.env[{i}].name"),
                    &json!(name),
                    "a valid environment variable name must consist only of printable ASCII characters other than '='",
                ));
            }
        }
    }
}

/// Pod QoS class from its containers' requests and limits.
pub fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .filter_map(|l| spec.get(*l).and_then(Value::as_array))
        .flatten()
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        let requests = c.pointer("/resources/requests").and_then(Value::as_object);
        let limits = c.pointer("/resources/limits").and_then(Value::as_object);
        if requests.is_some_and(|r| !r.is_empty()) || limits.is_some_and(|l| !l.is_empty()) {
            any = true;
        }
        for res in ["cpu", "memory"] {
            let l = limits.and_then(|l| l.get(res));
            let r = requests.and_then(|r| r.get(res));
            if l.is_none() || (r.is_some() && r != l) {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed && !containers.is_empty() {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_defaults() {
        assert_eq!(default_pull_policy("busybox"), "Always");
        assert_eq!(default_pull_policy("busybox:latest"), "Always");
        assert_eq!(default_pull_policy("busybox:1.36"), "IfNotPresent");
        assert_eq!(default_pull_policy("localhost:5000/busybox"), "Always");
    }

    #[test]
    fn container_requirements_name_fields() {
        let spec = json!({"containers": [{"name": "Web"}, {"name": "db", "image": "x", "volumeMounts": [{"name": "missing", "mountPath": "/d"}]}]});
        let fields: Vec<String> = validate_pod_spec(&spec, "spec")
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert!(fields.contains(&"spec.containers[0].name".to_string()));
        assert!(fields.contains(&"spec.containers[0].image".to_string()));
        assert!(fields.contains(&"spec.containers[1].volumeMounts[0].name".to_string()));
    }

    #[test]
    fn host_network_ports_are_host_ports() {
        let mut spec = json!({"hostNetwork": true, "containers": [{"name": "a", "image": "x",
            "ports": [{"containerPort": 50051}, {"containerPort": 9090, "hostPort": 9090}]}]});
        default_pod_spec(&mut spec);
        let ports = &spec["containers"][0]["ports"];
        assert_eq!(ports[0]["hostPort"], 50051);
        assert_eq!(ports[1]["hostPort"], 9090);
        let mut pod_network =
            json!({"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]});
        default_pod_spec(&mut pod_network);
        assert!(pod_network["containers"][0]["ports"][0]
            .get("hostPort")
            .is_none());
    }

    #[test]
    fn qos() {
        assert_eq!(
            qos_class(&json!({"containers": [{"name": "a"}]})),
            "BestEffort"
        );
        let g = json!({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}}]});
        assert_eq!(qos_class(&g), "Guaranteed");
        let b = json!({"containers": [{"resources": {"requests": {"cpu": "1"}}}]});
        assert_eq!(qos_class(&b), "Burstable");
    }
}
