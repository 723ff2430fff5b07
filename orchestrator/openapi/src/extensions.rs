//! Kubernetes' list, map and patch extensions for the built-in types.
//!
//! k8s-openapi's schemas carry names, types and descriptions but none of the
//! `x-kubernetes-*` markers that drive strategic merge patch and server-side
//! apply, so they are restated here as data. A list field without an entry is
//! atomic (replaced as a whole) and a struct without one is merged field by
//! field, which is also what Kubernetes does for unmarked fields.

use serde_json::{json, Map, Value};

/// The extensions of one field (or of a type itself).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ext {
    /// `x-kubernetes-patch-strategy`
    pub strategy: Option<&'static str>,
    /// `x-kubernetes-patch-merge-key`
    pub merge_key: Option<&'static str>,
    /// `x-kubernetes-list-type`
    pub list_type: Option<&'static str>,
    /// `x-kubernetes-list-map-keys` (with `list_type: map`)
    pub map_keys: &'static [&'static str],
    /// `x-kubernetes-map-type`
    pub map_type: Option<&'static str>,
}

const NONE: Ext = Ext {
    strategy: None,
    merge_key: None,
    list_type: None,
    map_keys: &[],
    map_type: None,
};

/// A list of objects merged by `merge_key`, keyed by `keys` for apply.
const fn merge_map(merge_key: &'static str, keys: &'static [&'static str]) -> Ext {
    Ext {
        strategy: Some("merge"),
        merge_key: Some(merge_key),
        list_type: Some("map"),
        map_keys: keys,
        ..NONE
    }
}

/// Like [`merge_map`], and a patch that changes an item's variant (e.g. the
/// volume source) also clears the fields it did not mention.
const fn merge_retain_map(merge_key: &'static str, keys: &'static [&'static str]) -> Ext {
    Ext {
        strategy: Some("merge,retainKeys"),
        ..merge_map(merge_key, keys)
    }
}

/// Merged by key in strategic merge patch, but atomic for apply.
const fn merge_atomic(merge_key: &'static str) -> Ext {
    Ext {
        strategy: Some("merge"),
        merge_key: Some(merge_key),
        list_type: Some("atomic"),
        ..NONE
    }
}

/// A list keyed for apply only (no strategic merge key).
const fn map_keys(keys: &'static [&'static str]) -> Ext {
    Ext {
        list_type: Some("map"),
        map_keys: keys,
        ..NONE
    }
}

/// A list of scalars merged as a set by both patch flavours.
const MERGE_SET: Ext = Ext {
    strategy: Some("merge"),
    list_type: Some("set"),
    ..NONE
};
/// A list of scalars that apply treats as a set.
const SET: Ext = Ext {
    list_type: Some("set"),
    ..NONE
};
/// A list that is always replaced as a whole.
const ATOMIC: Ext = Ext {
    list_type: Some("atomic"),
    ..NONE
};
/// A struct or map that apply replaces as a whole.
const ATOMIC_MAP: Ext = Ext {
    map_type: Some("atomic"),
    ..NONE
};
/// A one-of struct: setting one variant drops the others.
const RETAIN_KEYS: Ext = Ext {
    strategy: Some("retainKeys"),
    ..NONE
};

/// `(type, field, extensions)`. Types are short names: `meta.v1.X` is
/// `io.k8s.apimachinery.pkg.apis.meta.v1.X`, anything else `io.k8s.api.` + name.
/// An empty field puts the extensions on the type itself.
#[rustfmt::skip]
pub(crate) const TABLE: &[(&str, &str, Ext)] = &[
    // meta/v1
    ("meta.v1.ObjectMeta", "finalizers", MERGE_SET),
    ("meta.v1.ObjectMeta", "ownerReferences", merge_map("uid", &["uid"])),
    ("meta.v1.ObjectMeta", "managedFields", ATOMIC),
    ("meta.v1.OwnerReference", "", ATOMIC_MAP),
    ("meta.v1.LabelSelector", "", ATOMIC_MAP),
    ("meta.v1.LabelSelector", "matchExpressions", ATOMIC),
    ("meta.v1.LabelSelectorRequirement", "values", ATOMIC),
    ("meta.v1.StatusDetails", "causes", ATOMIC),
    ("meta.v1.DeleteOptions", "dryRun", ATOMIC),

    // core/v1 Pod
    ("core.v1.PodSpec", "volumes", merge_retain_map("name", &["name"])),
    ("core.v1.PodSpec", "initContainers", merge_map("name", &["name"])),
    ("core.v1.PodSpec", "containers", merge_map("name", &["name"])),
    ("core.v1.PodSpec", "ephemeralContainers", merge_map("name", &["name"])),
    ("core.v1.PodSpec", "imagePullSecrets", merge_map("name", &["name"])),
    ("core.v1.PodSpec", "hostAliases", merge_map("ip", &["ip"])),
    ("core.v1.PodSpec", "schedulingGates", merge_map("name", &["name"])),
    ("core.v1.PodSpec", "resourceClaims", merge_retain_map("name", &["name"])),
    ("core.v1.PodSpec", "topologySpreadConstraints", merge_map("topologyKey", &["topologyKey", "whenUnsatisfiable"])),
    ("core.v1.PodSpec", "tolerations", ATOMIC),
    ("core.v1.PodSpec", "readinessGates", ATOMIC),
    ("core.v1.PodSpec", "nodeSelector", ATOMIC_MAP),
    ("core.v1.PodStatus", "conditions", merge_map("type", &["type"])),
    ("core.v1.PodStatus", "podIPs", merge_map("ip", &["ip"])),
    ("core.v1.PodStatus", "hostIPs", merge_atomic("ip")),
    ("core.v1.PodStatus", "initContainerStatuses", ATOMIC),
    ("core.v1.PodStatus", "containerStatuses", ATOMIC),
    ("core.v1.PodStatus", "ephemeralContainerStatuses", ATOMIC),
    ("core.v1.PodStatus", "resourceClaimStatuses", merge_retain_map("name", &["name"])),
    ("core.v1.PodSecurityContext", "supplementalGroups", ATOMIC),
    ("core.v1.PodSecurityContext", "sysctls", ATOMIC),
    ("core.v1.PodDNSConfig", "nameservers", ATOMIC),
    ("core.v1.PodDNSConfig", "searches", ATOMIC),
    ("core.v1.PodDNSConfig", "options", ATOMIC),
    ("core.v1.TopologySpreadConstraint", "matchLabelKeys", ATOMIC),

    // core/v1 containers
    ("core.v1.Container", "command", ATOMIC),
    ("core.v1.Container", "args", ATOMIC),
    ("core.v1.Container", "ports", merge_map("containerPort", &["containerPort", "protocol"])),
    ("core.v1.Container", "envFrom", ATOMIC),
    ("core.v1.Container", "env", merge_map("name", &["name"])),
    ("core.v1.Container", "resizePolicy", ATOMIC),
    ("core.v1.Container", "volumeMounts", merge_map("mountPath", &["mountPath"])),
    ("core.v1.Container", "volumeDevices", merge_map("devicePath", &["devicePath"])),
    ("core.v1.EphemeralContainer", "command", ATOMIC),
    ("core.v1.EphemeralContainer", "args", ATOMIC),
    ("core.v1.EphemeralContainer", "ports", merge_map("containerPort", &["containerPort", "protocol"])),
    ("core.v1.EphemeralContainer", "envFrom", ATOMIC),
    ("core.v1.EphemeralContainer", "env", merge_map("name", &["name"])),
    ("core.v1.EphemeralContainer", "resizePolicy", ATOMIC),
    ("core.v1.EphemeralContainer", "volumeMounts", merge_map("mountPath", &["mountPath"])),
    ("core.v1.EphemeralContainer", "volumeDevices", merge_map("devicePath", &["devicePath"])),
    ("core.v1.ContainerStatus", "volumeMounts", merge_map("mountPath", &["mountPath"])),
    ("core.v1.ContainerStatus", "allocatedResourcesStatus", merge_map("name", &["name"])),
    ("core.v1.ResourceStatus", "resources", map_keys(&["resourceID"])),
    ("core.v1.ResourceRequirements", "claims", map_keys(&["name"])),
    ("core.v1.Capabilities", "add", ATOMIC),
    ("core.v1.Capabilities", "drop", ATOMIC),
    ("core.v1.ExecAction", "command", ATOMIC),
    ("core.v1.HTTPGetAction", "httpHeaders", ATOMIC),

    // core/v1 scheduling constraints
    ("core.v1.NodeAffinity", "preferredDuringSchedulingIgnoredDuringExecution", ATOMIC),
    ("core.v1.NodeSelector", "", ATOMIC_MAP),
    ("core.v1.NodeSelector", "nodeSelectorTerms", ATOMIC),
    ("core.v1.NodeSelectorTerm", "", ATOMIC_MAP),
    ("core.v1.NodeSelectorTerm", "matchExpressions", ATOMIC),
    ("core.v1.NodeSelectorTerm", "matchFields", ATOMIC),
    ("core.v1.NodeSelectorRequirement", "values", ATOMIC),
    ("core.v1.PodAffinity", "requiredDuringSchedulingIgnoredDuringExecution", ATOMIC),
    ("core.v1.PodAffinity", "preferredDuringSchedulingIgnoredDuringExecution", ATOMIC),
    ("core.v1.PodAntiAffinity", "requiredDuringSchedulingIgnoredDuringExecution", ATOMIC),
    ("core.v1.PodAntiAffinity", "preferredDuringSchedulingIgnoredDuringExecution", ATOMIC),
    ("core.v1.PodAffinityTerm", "namespaces", ATOMIC),
    ("core.v1.PodAffinityTerm", "matchLabelKeys", ATOMIC),
    ("core.v1.PodAffinityTerm", "mismatchLabelKeys", ATOMIC),

    // core/v1 references (replaced as a whole by apply)
    ("core.v1.LocalObjectReference", "", ATOMIC_MAP),
    ("core.v1.ObjectReference", "", ATOMIC_MAP),
    ("core.v1.TypedLocalObjectReference", "", ATOMIC_MAP),
    ("core.v1.SecretReference", "", ATOMIC_MAP),
    ("core.v1.ConfigMapKeySelector", "", ATOMIC_MAP),
    ("core.v1.SecretKeySelector", "", ATOMIC_MAP),
    ("core.v1.ObjectFieldSelector", "", ATOMIC_MAP),
    ("core.v1.ResourceFieldSelector", "", ATOMIC_MAP),

    // core/v1 volume sources
    ("core.v1.ConfigMapVolumeSource", "items", ATOMIC),
    ("core.v1.SecretVolumeSource", "items", ATOMIC),
    ("core.v1.DownwardAPIVolumeSource", "items", ATOMIC),
    ("core.v1.ProjectedVolumeSource", "sources", ATOMIC),
    ("core.v1.ConfigMapProjection", "items", ATOMIC),
    ("core.v1.SecretProjection", "items", ATOMIC),
    ("core.v1.DownwardAPIProjection", "items", ATOMIC),
    ("core.v1.CephFSVolumeSource", "monitors", ATOMIC),
    ("core.v1.RBDVolumeSource", "monitors", ATOMIC),
    ("core.v1.ISCSIVolumeSource", "portals", ATOMIC),
    ("core.v1.FCVolumeSource", "targetWWNs", ATOMIC),
    ("core.v1.FCVolumeSource", "wwids", ATOMIC),
    ("core.v1.PersistentVolumeClaimSpec", "accessModes", ATOMIC),

    // core/v1 Node, Namespace
    ("core.v1.NodeSpec", "podCIDRs", MERGE_SET),
    ("core.v1.NodeSpec", "taints", ATOMIC),
    ("core.v1.NodeStatus", "conditions", merge_map("type", &["type"])),
    ("core.v1.NodeStatus", "addresses", merge_map("type", &["type"])),
    ("core.v1.NodeStatus", "images", ATOMIC),
    ("core.v1.NodeStatus", "volumesInUse", ATOMIC),
    ("core.v1.NodeStatus", "volumesAttached", ATOMIC),
    ("core.v1.NodeStatus", "runtimeHandlers", ATOMIC),
    ("core.v1.ContainerImage", "names", ATOMIC),
    ("core.v1.NamespaceSpec", "finalizers", ATOMIC),
    ("core.v1.NamespaceStatus", "conditions", merge_map("type", &["type"])),

    // core/v1 Service, Endpoints, ServiceAccount
    ("core.v1.ServiceSpec", "ports", merge_map("port", &["port", "protocol"])),
    ("core.v1.ServiceSpec", "selector", ATOMIC_MAP),
    ("core.v1.ServiceSpec", "clusterIPs", ATOMIC),
    ("core.v1.ServiceSpec", "externalIPs", ATOMIC),
    ("core.v1.ServiceSpec", "loadBalancerSourceRanges", ATOMIC),
    ("core.v1.ServiceSpec", "ipFamilies", ATOMIC),
    ("core.v1.ServiceStatus", "conditions", merge_map("type", &["type"])),
    ("core.v1.LoadBalancerStatus", "ingress", ATOMIC),
    ("core.v1.LoadBalancerIngress", "ports", ATOMIC),
    ("core.v1.Endpoints", "subsets", ATOMIC),
    ("core.v1.EndpointSubset", "addresses", ATOMIC),
    ("core.v1.EndpointSubset", "notReadyAddresses", ATOMIC),
    ("core.v1.EndpointSubset", "ports", ATOMIC),
    ("core.v1.EndpointAddress", "", ATOMIC_MAP),
    ("core.v1.EndpointPort", "", ATOMIC_MAP),
    ("core.v1.ServiceAccount", "secrets", merge_map("name", &["name"])),
    ("core.v1.ServiceAccount", "imagePullSecrets", ATOMIC),

    // apps/v1
    ("apps.v1.DeploymentSpec", "strategy", RETAIN_KEYS),
    ("apps.v1.DeploymentStatus", "conditions", merge_map("type", &["type"])),
    ("apps.v1.ReplicaSetStatus", "conditions", merge_map("type", &["type"])),
    ("apps.v1.DaemonSetStatus", "conditions", merge_map("type", &["type"])),
    ("apps.v1.StatefulSetSpec", "volumeClaimTemplates", ATOMIC),
    ("apps.v1.StatefulSetStatus", "conditions", merge_map("type", &["type"])),

    // autoscaling/v2
    ("autoscaling.v2.HorizontalPodAutoscalerSpec", "metrics", ATOMIC),
    ("autoscaling.v2.HorizontalPodAutoscalerStatus", "currentMetrics", ATOMIC),
    ("autoscaling.v2.HorizontalPodAutoscalerStatus", "conditions", merge_map("type", &["type"])),
    ("autoscaling.v2.HPAScalingRules", "policies", ATOMIC),

    // batch/v1
    ("batch.v1.JobStatus", "conditions", merge_atomic("type")),
    ("batch.v1.CronJobStatus", "active", ATOMIC),
    ("batch.v1.PodFailurePolicy", "rules", ATOMIC),
    ("batch.v1.PodFailurePolicyRule", "onPodConditions", ATOMIC),
    ("batch.v1.PodFailurePolicyOnExitCodesRequirement", "values", SET),
    ("batch.v1.SuccessPolicy", "rules", ATOMIC),

    // discovery.k8s.io/v1
    ("discovery.v1.EndpointSlice", "endpoints", ATOMIC),
    ("discovery.v1.EndpointSlice", "ports", ATOMIC),
    ("discovery.v1.Endpoint", "addresses", SET),
    ("discovery.v1.EndpointHints", "forZones", ATOMIC),
    ("discovery.v1.EndpointHints", "forNodes", ATOMIC),
    ("discovery.v1.EndpointPort", "", ATOMIC_MAP),

    // policy/v1
    ("policy.v1.PodDisruptionBudgetStatus", "conditions", merge_map("type", &["type"])),
];

/// `(type, field, default)`: string `default`s Kubernetes publishes that
/// k8s-openapi's schemas lack. Server-side apply needs those of map-list key
/// fields: a port item without `protocol` must get the same key as the live
/// item the server defaulted to `TCP`, or the next apply adds a duplicate.
#[rustfmt::skip]
pub(crate) const DEFAULTS: &[(&str, &str, &str)] = &[
    ("core.v1.ContainerPort", "protocol", "TCP"),
    ("core.v1.ServicePort", "protocol", "TCP"),
    ("core.v1.EndpointPort", "protocol", "TCP"),
    ("discovery.v1.EndpointPort", "protocol", "TCP"),
];

/// The full definition name of a table type.
pub(crate) fn full_name(short: &str) -> String {
    match short.strip_prefix("meta.") {
        Some(rest) => format!("io.k8s.apimachinery.pkg.apis.meta.{rest}"),
        None => format!("io.k8s.api.{short}"),
    }
}

impl Ext {
    /// Writes the extensions into a schema object.
    pub(crate) fn apply(&self, schema: &mut Map<String, Value>) {
        if let Some(v) = self.strategy {
            schema.insert("x-kubernetes-patch-strategy".into(), v.into());
        }
        if let Some(v) = self.merge_key {
            schema.insert("x-kubernetes-patch-merge-key".into(), v.into());
        }
        if let Some(v) = self.list_type {
            schema.insert("x-kubernetes-list-type".into(), v.into());
        }
        if !self.map_keys.is_empty() {
            schema.insert("x-kubernetes-list-map-keys".into(), json!(self.map_keys));
        }
        if let Some(v) = self.map_type {
            schema.insert("x-kubernetes-map-type".into(), v.into());
        }
    }
}

/// Applies [`TABLE`] and [`DEFAULTS`] to whichever of their types are
/// present in `defs`.
pub(crate) fn apply_table(defs: &mut std::collections::BTreeMap<String, Value>) {
    for (short, field, default) in DEFAULTS {
        if let Some(Value::Object(prop)) = defs
            .get_mut(&full_name(short))
            .and_then(|d| d.get_mut("properties"))
            .and_then(|p| p.get_mut(*field))
        {
            prop.entry("default").or_insert_with(|| (*default).into());
        }
    }
    for (short, field, ext) in TABLE {
        let Some(Value::Object(def)) = defs.get_mut(&full_name(short)) else {
            continue;
        };
        if field.is_empty() {
            ext.apply(def);
        } else if let Some(Value::Object(prop)) =
            def.get_mut("properties").and_then(|p| p.get_mut(*field))
        {
            ext.apply(prop);
        }
    }
}
