//! core/v1 resources.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use k8s_openapi::api::core::v1 as corev1;
use serde_json::{json, Value};
use tapestry_store::{KeyValue, Store, StoreError};
use tokio::sync::Mutex;

use super::podspec::{default_pod_spec, qos_class, validate_pod_spec};
use super::Basic;
use crate::error::{ApiError, ApiResult, Cause, Target};
use crate::registry::{typed_codec, Behaviour, ResourceDef, Subresource, WriteHook};
use crate::tables::{self, age, col, i, len, name, or_none, s, wide, TableDef, AGE, NAME};
use crate::validation::{self, NameRule};

pub fn resources(service_hook: Arc<dyn WriteHook>) -> Vec<ResourceDef> {
    vec![
        ResourceDef {
            group: "",
            version: "v1",
            kind: "Namespace",
            plural: "namespaces",
            singular: "namespace",
            short_names: &["ns"],
            categories: &[],
            namespaced: false,
            name_rule: NameRule::Dns1123Label,
            subresources: &[Subresource::Status, Subresource::Finalize],
            definition: "io.k8s.api.core.v1.Namespace",
            storage: "namespaces",
            tracks_generation: false,
            codec: typed_codec::<corev1::Namespace>,
            behaviour: Arc::new(NamespaceBehaviour),
            hook: None,
            table: TableDef {
                columns: vec![
                    NAME,
                    col("Status", "The status of the namespace"),
                    AGE,
                ],
                cells: |o, now| vec![name(o), json!(s(o, "/status/phase")), age(o, now)],
            },
            field_selectors: &[("status.phase", "/status/phase")],
        },
        ResourceDef {
            group: "",
            version: "v1",
            kind: "Node",
            plural: "nodes",
            singular: "node",
            short_names: &["no"],
            categories: &[],
            namespaced: false,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[Subresource::Status],
            definition: "io.k8s.api.core.v1.Node",
            storage: "minions",
            tracks_generation: false,
            codec: typed_codec::<corev1::Node>,
            behaviour: Basic::plain(),
            hook: None,
            table: TableDef {
                columns: vec![
                    NAME,
                    col("Status", "The status of the node"),
                    col("Roles", "The roles of the node"),
                    AGE,
                    col("Version", "Kubelet Version reported by the node."),
                    wide("Internal-IP", "List of internal IPs in the node."),
                    wide("External-IP", "List of external IPs in the node."),
                    wide("OS-Image", "OS image reported by the node from /etc/os-release."),
                    wide("Kernel-Version", "Kernel version reported by the node."),
                    wide("Container-Runtime", "Container runtime version reported by the node."),
                ],
                cells: node_cells,
            },
            field_selectors: &[("spec.unschedulable", "/spec/unschedulable")],
        },
        ResourceDef {
            group: "",
            version: "v1",
            kind: "Pod",
            plural: "pods",
            singular: "pod",
            short_names: &["po"],
            categories: &["all"],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[Subresource::Status, Subresource::Binding, Subresource::Eviction],
            definition: "io.k8s.api.core.v1.Pod",
            storage: "pods",
            tracks_generation: true,
            codec: typed_codec::<corev1::Pod>,
            behaviour: Arc::new(PodBehaviour),
            hook: None,
            table: TableDef {
                columns: vec![
                    NAME,
                    col("Ready", "The aggregate readiness state of this pod for accepting traffic."),
                    col("Status", "The aggregate status of the containers in this pod."),
                    col("Restarts", "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
                    AGE,
                    wide("IP", "IP address allocated to the pod. Routable at least within the cluster."),
                    wide("Node", "The node the pod is scheduled on."),
                    wide("Nominated Node", "The node the pod is nominated to run on."),
                    wide("Readiness Gates", "Readiness gates of the pod."),
                ],
                cells: pod_cells,
            },
            field_selectors: &[
                ("spec.nodeName", "/spec/nodeName"),
                ("spec.restartPolicy", "/spec/restartPolicy"),
                ("spec.schedulerName", "/spec/schedulerName"),
                ("spec.serviceAccountName", "/spec/serviceAccountName"),
                ("spec.hostNetwork", "/spec/hostNetwork"),
                ("status.phase", "/status/phase"),
                ("status.podIP", "/status/podIP"),
                ("status.nominatedNodeName", "/status/nominatedNodeName"),
            ],
        },
        ResourceDef {
            group: "",
            version: "v1",
            kind: "Service",
            plural: "services",
            singular: "service",
            short_names: &["svc"],
            categories: &["all"],
            namespaced: true,
            name_rule: NameRule::Dns1123Label,
            subresources: &[Subresource::Status],
            definition: "io.k8s.api.core.v1.Service",
            storage: "services/specs",
            tracks_generation: false,
            codec: typed_codec::<corev1::Service>,
            behaviour: Arc::new(ServiceBehaviour),
            hook: Some(service_hook),
            table: TableDef {
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
            },
            field_selectors: &[("spec.clusterIP", "/spec/clusterIP"), ("spec.type", "/spec/type")],
        },
        ResourceDef {
            group: "",
            version: "v1",
            kind: "Endpoints",
            plural: "endpoints",
            singular: "endpoints",
            short_names: &["ep"],
            categories: &[],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[],
            definition: "io.k8s.api.core.v1.Endpoints",
            storage: "services/endpoints",
            tracks_generation: false,
            codec: typed_codec::<corev1::Endpoints>,
            behaviour: Basic::plain(),
            hook: None,
            table: TableDef {
                columns: vec![NAME, col("Endpoints", "Endpoints of the service."), AGE],
                cells: endpoints_cells,
            },
            field_selectors: &[],
        },
        ResourceDef {
            group: "",
            version: "v1",
            kind: "ConfigMap",
            plural: "configmaps",
            singular: "configmap",
            short_names: &["cm"],
            categories: &[],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[],
            definition: "io.k8s.api.core.v1.ConfigMap",
            storage: "configmaps",
            tracks_generation: false,
            codec: typed_codec::<corev1::ConfigMap>,
            behaviour: Arc::new(Basic {
                keep_status_on_create: true,
                validate: |o| validate_data_keys(o, &["data", "binaryData"]),
            }),
            hook: None,
            table: TableDef {
                columns: vec![NAME, col("Data", "Number of keys."), AGE],
                cells: |o, now| {
                    vec![
                        name(o),
                        json!(len(o, "/data") + len(o, "/binaryData")),
                        age(o, now),
                    ]
                },
            },
            field_selectors: &[],
        },
        ResourceDef {
            group: "",
            version: "v1",
            kind: "Secret",
            plural: "secrets",
            singular: "secret",
            short_names: &[],
            categories: &[],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[],
            definition: "io.k8s.api.core.v1.Secret",
            storage: "secrets",
            tracks_generation: false,
            codec: typed_codec::<corev1::Secret>,
            behaviour: Arc::new(SecretBehaviour),
            hook: None,
            table: TableDef {
                columns: vec![
                    NAME,
                    col("Type", "The type of the secret."),
                    col("Data", "Number of keys."),
                    AGE,
                ],
                cells: |o, now| {
                    vec![name(o), json!(s(o, "/type")), json!(len(o, "/data")), age(o, now)]
                },
            },
            field_selectors: &[("type", "/type")],
        },
        ResourceDef {
            group: "",
            version: "v1",
            kind: "ServiceAccount",
            plural: "serviceaccounts",
            singular: "serviceaccount",
            short_names: &["sa"],
            categories: &[],
            namespaced: true,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: &[],
            definition: "io.k8s.api.core.v1.ServiceAccount",
            storage: "serviceaccounts",
            tracks_generation: false,
            codec: typed_codec::<corev1::ServiceAccount>,
            behaviour: Basic::plain(),
            hook: None,
            table: TableDef {
                columns: vec![NAME, col("Secrets", "Number of secrets."), AGE],
                cells: |o, now| vec![name(o), json!(len(o, "/secrets")), age(o, now)],
            },
            field_selectors: &[],
        },
        ResourceDef {
            group: "",
            version: "v1",
            kind: "Event",
            plural: "events",
            singular: "event",
            short_names: &["ev"],
            categories: &[],
            namespaced: true,
            name_rule: NameRule::PathSegment,
            subresources: &[],
            definition: "io.k8s.api.core.v1.Event",
            storage: "events",
            tracks_generation: false,
            codec: typed_codec::<corev1::Event>,
            behaviour: Basic::plain(),
            hook: None,
            table: core_event_table(),
            field_selectors: &[
                ("involvedObject.kind", "/involvedObject/kind"),
                ("involvedObject.namespace", "/involvedObject/namespace"),
                ("involvedObject.name", "/involvedObject/name"),
                ("involvedObject.uid", "/involvedObject/uid"),
                ("involvedObject.apiVersion", "/involvedObject/apiVersion"),
                ("involvedObject.resourceVersion", "/involvedObject/resourceVersion"),
                ("involvedObject.fieldPath", "/involvedObject/fieldPath"),
                ("reason", "/reason"),
                ("reportingComponent", "/reportingComponent"),
                ("source", "/source/component"),
                ("type", "/type"),
            ],
        },
    ]
}

pub fn core_event_table() -> TableDef {
    TableDef {
        columns: vec![
            col("Last Seen", "Time of the last occurrence."),
            col("Type", "Type of this event (Normal, Warning)."),
            col("Reason", "Why the action was taken."),
            col("Object", "The object this event is about."),
            col(
                "Message",
                "A human-readable description of the status of this operation.",
            ),
        ],
        cells: |o, now| {
            let last = [
                "/lastTimestamp",
                "/eventTime",
                "/series/lastObservedTime",
                "/metadata/creationTimestamp",
            ]
            .iter()
            .map(|p| s(o, p))
            .find(|t| !t.is_empty())
            .unwrap_or("");
            let kind = s(o, "/involvedObject/kind").to_lowercase();
            vec![
                json!(tables::since(last, now)),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(format!("{kind}/{}", s(o, "/involvedObject/name"))),
                json!(s(o, "/message")),
            ]
        },
    }
}

struct NamespaceBehaviour;

impl Behaviour for NamespaceBehaviour {
    fn default(&self, obj: &mut Value) {
        // Every namespace carries its name as a label so selectors can match
        // namespaces by name.
        let name = s(obj, "/metadata/name").to_string();
        if !name.is_empty() {
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if let Some(labels) = labels.as_object_mut() {
                    labels.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        obj["status"] = json!({"phase": "Active"});
        let finalizers = obj.pointer("/spec/finalizers").cloned();
        if finalizers.is_none() {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
        }
    }

    fn prepare_for_update(&self, new: &mut Value, old: &Value) {
        // spec.finalizers belongs to the finalize subresource.
        new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
    }
}

fn node_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let conditions = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = conditions
        .iter()
        .find(|c| s(c, "/type") == "Ready")
        .map(|c| match s(c, "/status") {
            "True" => "Ready",
            _ => "NotReady",
        })
        .unwrap_or("Unknown");
    let mut status = ready.to_string();
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = tables_labels(o)
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("node-role.kubernetes.io/")
                .map(str::to_string)
                .or_else(|| (k == "kubernetes.io/role").then_some(v))
        })
        .filter(|r| !r.is_empty())
        .collect();
    roles.sort();
    let addresses = o
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let address = |t: &str| {
        addresses
            .iter()
            .find(|a| s(a, "/type") == t)
            .map(|a| s(a, "/address").to_string())
            .unwrap_or_default()
    };
    vec![
        name(o),
        json!(status),
        json!(if roles.is_empty() {
            "<none>".to_string()
        } else {
            roles.join(",")
        }),
        age(o, now),
        json!(s(o, "/status/nodeInfo/kubeletVersion")),
        or_none(&address("InternalIP")),
        or_none(&address("ExternalIP")),
        json!(s(o, "/status/nodeInfo/osImage")),
        json!(s(o, "/status/nodeInfo/kernelVersion")),
        json!(s(o, "/status/nodeInfo/containerRuntimeVersion")),
    ]
}

fn tables_labels(o: &Value) -> Vec<(String, String)> {
    crate::selectors::labels_of(o).into_iter().collect()
}

/// kubectl's pod STATUS column: the most telling reason among phase,
/// container states and deletion.
fn pod_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let containers = o
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let statuses = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let restarts: i64 = statuses.iter().map(|c| i(c, "/restartCount")).sum();
    let mut reason = s(o, "/status/reason").to_string();
    if reason.is_empty() {
        reason = s(o, "/status/phase").to_string();
    }
    if let Some(inits) = o
        .pointer("/status/initContainerStatuses")
        .and_then(Value::as_array)
    {
        let total = inits.len();
        for (idx, c) in inits.iter().enumerate() {
            let terminated_ok =
                i(c, "/state/terminated/exitCode") == 0 && c.pointer("/state/terminated").is_some();
            if terminated_ok {
                continue;
            }
            let waiting = s(c, "/state/waiting/reason");
            reason = if !waiting.is_empty() && waiting != "PodInitializing" {
                format!("Init:{waiting}")
            } else {
                format!("Init:{idx}/{total}")
            };
            break;
        }
    }
    if !reason.starts_with("Init:") {
        for c in statuses.iter().rev() {
            let waiting = s(c, "/state/waiting/reason");
            let terminated = s(c, "/state/terminated/reason");
            if !waiting.is_empty() {
                reason = waiting.to_string();
            } else if !terminated.is_empty() {
                reason = terminated.to_string();
            } else if c.pointer("/state/terminated").is_some() {
                let code = i(c, "/state/terminated/exitCode");
                let signal = i(c, "/state/terminated/signal");
                reason = if signal != 0 {
                    format!("Signal:{signal}")
                } else {
                    format!("ExitCode:{code}")
                };
            }
        }
    }
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        reason = "Terminating".into();
    }
    if reason.is_empty() {
        reason = "Pending".into();
    }
    let gates = o
        .pointer("/spec/readinessGates")
        .and_then(Value::as_array)
        .map(|g| format!("0/{}", g.len()));
    vec![
        name(o),
        json!(format!("{ready}/{containers}")),
        json!(reason),
        json!(restarts),
        age(o, now),
        or_none(s(o, "/status/podIP")),
        or_none(s(o, "/spec/nodeName")),
        or_none(s(o, "/status/nominatedNodeName")),
        or_none(gates.as_deref().unwrap_or("")),
    ]
}

struct PodBehaviour;

impl Behaviour for PodBehaviour {
    fn status_takes_labels_and_annotations(&self) -> bool {
        true
    }

    fn default(&self, obj: &mut Value) {
        if let Some(spec) = obj.get_mut("spec") {
            default_pod_spec(spec);
            let spec = spec.as_object_mut();
            if let Some(spec) = spec {
                if spec.get("serviceAccountName").is_none() {
                    spec.insert("serviceAccountName".into(), json!("default"));
                }
                if spec.get("enableServiceLinks").is_none() {
                    spec.insert("enableServiceLinks".into(), json!(true));
                }
                add_default_tolerations(spec);
            }
        }
    }

    fn prepare_for_create(&self, obj: &mut Value) {
        let qos = obj.get("spec").map(qos_class).unwrap_or("BestEffort");
        obj["status"] = json!({"phase": "Pending", "qosClass": qos});
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        match obj.get("spec") {
            Some(spec) => validate_pod_spec(spec, "spec"),
            None => vec![Cause::required("spec")],
        }
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        // Pods are immutable but for a few fields the kubelet can act on.
        let masked = |v: &Value| {
            let mut spec = v.get("spec").cloned().unwrap_or(Value::Null);
            for list in ["containers", "initContainers"] {
                if let Some(Value::Array(cs)) = spec.get_mut(list) {
                    for c in cs {
                        if let Some(c) = c.as_object_mut() {
                            c.remove("image");
                        }
                    }
                }
            }
            if let Some(m) = spec.as_object_mut() {
                m.remove("activeDeadlineSeconds");
                m.remove("tolerations");
                m.remove("terminationGracePeriodSeconds");
            }
            spec
        };
        if masked(new) != masked(old) {
            causes.push(Cause::forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            ));
        }
        causes
    }
}

/// Pods tolerate not-ready and unreachable nodes for five minutes before the
/// node lifecycle controller evicts them.
fn add_default_tolerations(spec: &mut serde_json::Map<String, Value>) {
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    let Some(list) = tolerations.as_array_mut() else {
        return;
    };
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let present = list
            .iter()
            .any(|t| s(t, "/key") == key && matches!(s(t, "/effect"), "NoExecute" | ""));
        if !present {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
}

fn validate_data_keys(o: &Value, fields: &[&str]) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for field in fields {
        let Some(map) = o.get(*field).and_then(Value::as_object) else {
            continue;
        };
        for (k, v) in map {
            total += v.as_str().map_or(0, str::len);
            let valid = !k.is_empty()
                && k.len() <= 253
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                causes.push(Cause::invalid(
                    field.to_string(),
                    &json!(k),
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                ));
            }
            if !seen.insert(k.clone()) {
                causes.push(Cause::duplicate(format!("{field}[{k}]"), &json!(k)));
            }
        }
    }
    if total > 1024 * 1024 {
        causes.push(Cause {
            reason: "FieldValueTooLong",
            message: "Too long: must have at most 1048576 bytes".into(),
            field: String::new(),
        });
    }
    causes
}

struct SecretBehaviour;

impl Behaviour for SecretBehaviour {
    fn default(&self, obj: &mut Value) {
        if obj.get("type").is_none_or(Value::is_null) {
            obj["type"] = json!("Opaque");
        }
        // stringData is write-only: it lands base64-encoded in data.
        if let Some(Value::Object(strings)) =
            obj.as_object_mut().and_then(|m| m.remove("stringData"))
        {
            use base64::Engine;
            if !obj.get("data").is_some_and(Value::is_object) {
                obj["data"] = json!({});
            }
            for (k, v) in strings {
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""));
                obj["data"][k] = json!(encoded);
            }
        }
    }

    fn validate(&self, obj: &Value) -> Vec<Cause> {
        validate_data_keys(obj, &["data", "stringData"])
    }

    fn validate_update(&self, new: &Value, old: &Value) -> Vec<Cause> {
        let mut causes = self.validate(new);
        if new.get("type") != old.get("type") {
            causes.push(Cause::invalid(
                "type",
                new.get("type").unwrap_or(&Value::Null),
                "field is immutable",
            ));
        }
        if old.get("immutable").and_then(Value::as_bool) == Some(true)
            && new.get("data") != old.get("data")
        {
            causes.push(Cause::forbidden(
                "data",
                "field is immutable when `immutable` is set",
            ));
        }
        causes
    }
}

fn endpoints_cells(o: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let mut eps = Vec::new();
    for subset in o
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ports: Vec<i64> = subset
            .get("ports")
            .and_then(Value::as_array)
            .map(|p| p.iter().map(|p| i(p, "/port")).collect())
            .unwrap_or_default();
        for a in subset
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ip = s(a, "/ip");
            if ports.is_empty() {
                eps.push(ip.to_string());
            }
            for p in &ports {
                eps.push(format!("{ip}:{p}"));
            }
        }
    }
    let shown = if eps.len() > 3 {
        format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
    } else {
        eps.join(",")
    };
    vec![name(o), or_none(&shown), age(o, now)]
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

/// IPv4 range for ClusterIPs.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Range {
    base: u32,
    size: u32,
}

impl Ipv4Range {
    pub fn parse(cidr: &str) -> Result<Self, String> {
        let (ip, bits) = cidr
            .split_once('/')
            .ok_or_else(|| format!("invalid CIDR {cidr:?}: expected ADDRESS/BITS"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|e| format!("invalid CIDR {cidr:?}: {e}"))?;
        let bits: u32 = bits
            .parse()
            .ok()
            .filter(|b| (8..=30).contains(b))
            .ok_or_else(|| format!("invalid CIDR {cidr:?}: prefix length must be 8..30"))?;
        let size = 1u32 << (32 - bits);
        let base = u32::from(ip) & !(size - 1);
        Ok(Ipv4Range { base, size })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v > self.base && v < self.base + self.size - 1
    }

    /// The first usable address (the `kubernetes` Service's ClusterIP).
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }
}

const NODE_PORT_MIN: i64 = 30000;
const NODE_PORT_MAX: i64 = 32767;

/// Hands out ClusterIPs and NodePorts. Each allocation is a store key
/// created if absent, so two API servers sharing one store never hand out
/// the same address, and a restart loses nothing.
pub struct ServiceAllocator {
    store: Arc<dyn Store>,
    range: Ipv4Range,
    next_ip: Mutex<u32>,
    next_port: Mutex<i64>,
}

impl ServiceAllocator {
    pub fn new(store: Arc<dyn Store>, range: Ipv4Range) -> Self {
        ServiceAllocator {
            store,
            range,
            // Skip the network address and the first address (reserved for
            // the `kubernetes` Service).
            next_ip: Mutex::new(2),
            next_port: Mutex::new(NODE_PORT_MIN),
        }
    }

    fn ip_key(ip: Ipv4Addr) -> String {
        format!("/registry/ipallocations/{ip}")
    }

    fn port_key(port: i64) -> String {
        format!("/registry/nodeportallocations/{port}")
    }

    async fn claim(&self, key: String, owner: &str, dry_run: bool) -> Result<bool, ApiError> {
        if dry_run {
            return Ok(self
                .store
                .get(&key)
                .await
                .map_err(ApiError::internal)?
                .is_none());
        }
        match self
            .store
            .create(&key, Bytes::from(owner.to_string()))
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(ApiError::internal(e)),
        }
    }

    async fn release_key(&self, key: String) {
        if let Err(e) = self.store.delete(&key, None).await {
            if !matches!(e, StoreError::NotFound(_)) {
                tracing::warn!(%key, error = %e, "could not release allocation");
            }
        }
    }

    async fn allocate_ip(&self, owner: &str, dry_run: bool) -> ApiResult<Ipv4Addr> {
        let mut next = self.next_ip.lock().await;
        let usable = self.range.size - 2;
        for _ in 0..usable {
            let offset = *next;
            *next = if offset + 1 >= self.range.size - 1 {
                1
            } else {
                offset + 1
            };
            let ip = Ipv4Addr::from(self.range.base + offset);
            if self.claim(Self::ip_key(ip), owner, dry_run).await? {
                return Ok(ip);
            }
        }
        Err(ApiError::Internal(
            "no ClusterIPs left in the service CIDR".into(),
        ))
    }

    async fn allocate_port(&self, owner: &str, dry_run: bool) -> ApiResult<i64> {
        let mut next = self.next_port.lock().await;
        for _ in NODE_PORT_MIN..=NODE_PORT_MAX {
            let port = *next;
            *next = if port >= NODE_PORT_MAX {
                NODE_PORT_MIN
            } else {
                port + 1
            };
            if self.claim(Self::port_key(port), owner, dry_run).await? {
                return Ok(port);
            }
        }
        Err(ApiError::Internal(
            "no NodePorts left in 30000-32767".into(),
        ))
    }

    /// Release allocations no Service holds: left behind when the server
    /// stopped between claiming and storing a Service, or between deleting
    /// one and releasing what it held. A leak found by one pass (`suspects`)
    /// is released by the next pass only if it is unchanged, so a claim whose
    /// Service write is still in flight is never taken away. Returns how
    /// many allocations were released.
    pub async fn repair(&self, suspects: &mut HashMap<String, i64>) -> ApiResult<usize> {
        let mut leaked = HashMap::new();
        let mut released = 0;
        for prefix in ["/registry/ipallocations/", "/registry/nodeportallocations/"] {
            let allocations = self
                .store
                .list(prefix, Default::default())
                .await
                .map_err(ApiError::internal)?;
            for kv in allocations.items {
                if self.allocation_is_held(prefix, &kv).await? {
                    continue;
                }
                if suspects.get(&kv.key) == Some(&kv.mod_revision) {
                    match self.store.delete(&kv.key, Some(kv.mod_revision)).await {
                        Ok(_) => {
                            tracing::info!(key = %kv.key, "released leaked service allocation");
                            released += 1;
                        }
                        // Changed or gone since: the next pass looks again.
                        Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
                        Err(e) => return Err(ApiError::internal(e)),
                    }
                } else {
                    leaked.insert(kv.key, kv.mod_revision);
                }
            }
        }
        *suspects = leaked;
        Ok(released)
    }

    /// Whether the Service named in an allocation still holds it.
    async fn allocation_is_held(&self, prefix: &str, kv: &KeyValue) -> ApiResult<bool> {
        let owner = String::from_utf8_lossy(&kv.value);
        let Some((namespace, name)) = owner.split_once('/') else {
            return Ok(false);
        };
        let Some(service) = self
            .store
            .get(&format!("/registry/services/{namespace}/{name}"))
            .await
            .map_err(ApiError::internal)?
        else {
            return Ok(false);
        };
        let service: Value = serde_json::from_slice(&service.value).unwrap_or(Value::Null);
        let allocated = &kv.key[prefix.len()..];
        Ok(if prefix.contains("nodeport") {
            service
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .is_some_and(|ports| {
                    ports
                        .iter()
                        .any(|p| i(p, "/nodePort").to_string() == allocated)
                })
        } else {
            s(&service, "/spec/clusterIP") == allocated
        })
    }

    fn invalid(obj: &Value, causes: Vec<Cause>) -> ApiError {
        ApiError::Invalid {
            target: Target {
                group: String::new(),
                resource: "services".into(),
                kind: "Service".into(),
                name: s(obj, "/metadata/name").to_string(),
            },
            causes,
        }
    }

    /// Allocate what `obj` needs and does not already hold (`held`).
    async fn allocate(
        &self,
        obj: &mut Value,
        held: Option<&Value>,
        dry_run: bool,
    ) -> ApiResult<()> {
        let owner = format!(
            "{}/{}",
            s(obj, "/metadata/namespace"),
            s(obj, "/metadata/name")
        );
        let kind = s(obj, "/spec/type").to_string();
        let held_ip = held
            .map(|h| s(h, "/spec/clusterIP").to_string())
            .unwrap_or_default();
        if kind == "ExternalName" {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("clusterIP");
                spec.remove("clusterIPs");
            }
        } else {
            let requested = s(obj, "/spec/clusterIP").to_string();
            let ip = match requested.as_str() {
                "None" => "None".to_string(),
                "" if !held_ip.is_empty() && held_ip != "None" => held_ip.clone(),
                "" => self.allocate_ip(&owner, dry_run).await?.to_string(),
                wanted if wanted == held_ip => wanted.to_string(),
                wanted => {
                    let parsed: Option<Ipv4Addr> = wanted.parse().ok();
                    let Some(addr) = parsed.filter(|a| self.range.contains(*a)) else {
                        return Err(Self::invalid(obj, vec![Cause::invalid(
                            "spec.clusterIPs[0]",
                            &json!(wanted),
                            "provided IP is not in the valid range. The range of valid IPs is the service CIDR",
                        )]));
                    };
                    if !self.claim(Self::ip_key(addr), &owner, dry_run).await? {
                        return Err(Self::invalid(
                            obj,
                            vec![Cause::invalid(
                                "spec.clusterIPs",
                                &json!([wanted]),
                                "failed to allocate IP: provided IP is already allocated",
                            )],
                        ));
                    }
                    wanted.to_string()
                }
            };
            obj["spec"]["clusterIP"] = json!(ip);
            obj["spec"]["clusterIPs"] = json!([ip]);
        }
        let held_ports: HashSet<i64> = held
            .and_then(|h| h.pointer("/spec/ports"))
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .map(|p| i(p, "/nodePort"))
                    .filter(|p| *p != 0)
                    .collect()
            })
            .unwrap_or_default();
        if matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
            let count = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            for idx in 0..count {
                let pointer = format!("/spec/ports/{idx}/nodePort");
                let wanted = obj.pointer(&pointer).and_then(Value::as_i64).unwrap_or(0);
                if wanted != 0 && held_ports.contains(&wanted) {
                    continue;
                }
                let port = if wanted == 0 {
                    self.allocate_port(&owner, dry_run).await?
                } else if !(NODE_PORT_MIN..=NODE_PORT_MAX).contains(&wanted) {
                    return Err(Self::invalid(obj, vec![Cause::invalid(
                        format!("spec.ports[{idx}].nodePort"),
                        &json!(wanted),
                        "provided port is not in the valid range. The range of valid ports is 30000-32767",
                    )]));
                } else if !self.claim(Self::port_key(wanted), &owner, dry_run).await? {
                    return Err(Self::invalid(
                        obj,
                        vec![Cause::invalid(
                            format!("spec.ports[{idx}].nodePort"),
                            &json!(wanted),
                            "provided port is already allocated",
                        )],
                    ));
                } else {
                    wanted
                };
                obj["spec"]["ports"][idx]["nodePort"] = json!(port);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl WriteHook for ServiceAllocator {
    async fn on_create(&self, obj: &mut Value, dry_run: bool) -> ApiResult<()> {
        self.allocate(obj, None, dry_run).await
    }

    async fn on_update(&self, new: &mut Value, old: &Value, dry_run: bool) -> ApiResult<()> {
        self.allocate(new, Some(old), dry_run).await
    }

    async fn release(&self, obj: &Value, keep: Option<&Value>) {
        let ip = s(obj, "/spec/clusterIP");
        let keep_ip = keep.map(|k| s(k, "/spec/clusterIP")).unwrap_or("");
        if let Ok(addr) = ip.parse::<Ipv4Addr>() {
            if ip != keep_ip {
                self.release_key(Self::ip_key(addr)).await;
            }
        }
        let kept: HashSet<i64> = keep
            .and_then(|k| k.pointer("/spec/ports"))
            .and_then(Value::as_array)
            .map(|ps| ps.iter().map(|p| i(p, "/nodePort")).collect())
            .unwrap_or_default();
        for p in obj
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let port = i(p, "/nodePort");
            if port != 0 && !kept.contains(&port) {
                self.release_key(Self::port_key(port)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapestry_store::RedbStore;

    /// An allocation whose Service never got stored is released on the
    /// second repair pass; allocations Services hold are kept.
    #[tokio::test]
    async fn repair_releases_only_leaked_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path().join("s.redb")).unwrap());
        let allocator =
            ServiceAllocator::new(store.clone(), Ipv4Range::parse("10.96.0.0/12").unwrap());
        let mut held = json!({
            "metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "NodePort", "ports": [{"port": 80}]},
        });
        allocator.allocate(&mut held, None, false).await.unwrap();
        store
            .create("/registry/services/ns/web", Bytes::from(held.to_string()))
            .await
            .unwrap();
        // A claim whose Service write never happened.
        let mut lost = json!({
            "metadata": {"namespace": "ns", "name": "lost"},
            "spec": {"type": "NodePort", "ports": [{"port": 80}]},
        });
        allocator.allocate(&mut lost, None, false).await.unwrap();

        let count = |prefix: &'static str| {
            let store = store.clone();
            async move {
                store
                    .list(prefix, Default::default())
                    .await
                    .unwrap()
                    .items
                    .len()
            }
        };
        let mut suspects = HashMap::new();
        assert_eq!(allocator.repair(&mut suspects).await.unwrap(), 0);
        assert_eq!(suspects.len(), 2, "the lost IP and NodePort are suspected");
        assert_eq!(allocator.repair(&mut suspects).await.unwrap(), 2);
        assert_eq!(count("/registry/ipallocations/").await, 1);
        assert_eq!(count("/registry/nodeportallocations/").await, 1);
        let ip = s(&held, "/spec/clusterIP").to_string();
        assert!(store
            .get(&ServiceAllocator::ip_key(ip.parse().unwrap()))
            .await
            .unwrap()
            .is_some());
        assert_eq!(allocator.repair(&mut suspects).await.unwrap(), 0);
        assert!(suspects.is_empty());
    }
}
