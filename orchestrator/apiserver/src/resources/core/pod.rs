//! core/v1 Pods: defaults and validation of the pod spec, graceful
//! deletion, and the binding and eviction subresources.

mod binding;
mod eviction;
pub mod serviceaccount;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use tapestry_store::Store;

use crate::error::{ApiResult, Cause};
use crate::objects::is_terminating;
use crate::registry::{names, selectable, Behaviour, Generation, ResourceDef, WriteHook};
use crate::resources::podspec::{default_pod_spec, qos_class, validate_pod_spec};
use crate::rest::status::StatusRest;
use crate::tables::{age, col, i, name, or_none, s, wide, TableDef, AGE, NAME};

pub fn definition(store: Arc<dyn Store>) -> ResourceDef {
    ResourceDef {
        short_names: names(&["po"]),
        hook: Some(Arc::new(PodAdmission {
            accounts: serviceaccount::ServiceAccountAdmission {
                store: store.clone(),
            },
            store,
        })),
        categories: names(&["all"]),
        subresources: vec![StatusRest::def(), binding::def(), eviction::def()],
        generation: Generation::Spec,
        behaviour: Arc::new(PodBehaviour),
        table: Arc::new(TableDef {
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
        }),
        field_selectors: selectable(&[
            ("spec.nodeName", "/spec/nodeName"),
            ("spec.restartPolicy", "/spec/restartPolicy"),
            ("spec.schedulerName", "/spec/schedulerName"),
            ("spec.serviceAccountName", "/spec/serviceAccountName"),
            ("spec.hostNetwork", "/spec/hostNetwork"),
            ("status.phase", "/status/phase"),
            ("status.podIP", "/status/podIP"),
            ("status.nominatedNodeName", "/status/nominatedNodeName"),
        ]),
        ..ResourceDef::of::<Pod>()
    }
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

/// The admission of pods, in Kubernetes' order: the service account
/// (token volume), then the namespace's LimitRanges (default requests and
/// limits, bounds), then the priority of its PriorityClass. Quota is charged after every admission, for every kind.
struct PodAdmission {
    accounts: serviceaccount::ServiceAccountAdmission,
    store: Arc<dyn Store>,
}

#[async_trait::async_trait]
impl WriteHook for PodAdmission {
    async fn on_create(&self, pod: &mut Value, dry_run: bool) -> ApiResult<()> {
        self.accounts.on_create(pod, dry_run).await?;
        super::limitrange::admit_pod(&*self.store, pod).await?;
        crate::resources::scheduling::priorityclass::admit_pod(&*self.store, pod).await?;
        // Defaults a LimitRange filled in change the pod's class.
        let qos = pod.get("spec").map(qos_class).unwrap_or("BestEffort");
        if pod.get("status").is_some_and(Value::is_object) {
            pod["status"]["qosClass"] = json!(qos);
        }
        Ok(())
    }

    async fn on_update(&self, new: &mut Value, old: &Value, dry_run: bool) -> ApiResult<()> {
        self.accounts.on_update(new, old, dry_run).await
    }

    async fn release(&self, obj: &Value, keep: Option<&Value>) {
        self.accounts.release(obj, keep).await
    }
}

struct PodBehaviour;

impl Behaviour for PodBehaviour {
    fn status_takes_labels_and_annotations(&self) -> bool {
        true
    }

    /// Pods bound to a node terminate gracefully: the kubelet stops them and
    /// then deletes them for good with grace period 0.
    fn deletion_grace_period(&self, obj: &Value, requested: Option<i64>) -> Option<i64> {
        let scheduled = !s(obj, "/spec/nodeName").is_empty();
        let phase = s(obj, "/status/phase");
        if !scheduled || matches!(phase, "Succeeded" | "Failed") {
            return None;
        }
        let grace = requested
            .or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30);
        if grace <= 0 {
            // An explicit zero asks for immediate removal; only a terminating
            // pod's kubelet (or a forced delete) does that.
            return if is_terminating(obj) || requested == Some(0) {
                None
            } else {
                Some(0)
            };
        }
        Some(grace)
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
