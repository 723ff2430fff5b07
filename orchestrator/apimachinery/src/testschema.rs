//! A hand-made schema for a Deployment/Pod subset, used by the unit tests.

use std::borrow::Cow;

use serde_json::{json, Value};

use crate::schema::{FieldKind, FieldSchema, ListType, PatchSchema, PatchStrategy};

pub(crate) struct TestSchema;

fn obj(t: &str) -> FieldKind {
    FieldKind::Object {
        type_name: t.to_string(),
    }
}

fn plain(kind: FieldKind) -> Option<FieldSchema> {
    Some(FieldSchema {
        kind,
        patch_strategies: vec![],
        patch_merge_key: None,
        atomic: false,
    })
}

fn scalar() -> Option<FieldSchema> {
    plain(FieldKind::Scalar)
}

fn string_map() -> Option<FieldSchema> {
    plain(FieldKind::Map {
        value: Box::new(FieldKind::Scalar),
    })
}

/// A list merged by `merge_key` (SMP) and keyed by `keys` (SSA).
fn keyed(item: &str, merge_key: &str, keys: &[&str], retain: bool) -> Option<FieldSchema> {
    let mut patch_strategies = vec![PatchStrategy::Merge];
    if retain {
        patch_strategies.push(PatchStrategy::RetainKeys);
    }
    Some(FieldSchema {
        kind: FieldKind::List {
            item: Box::new(obj(item)),
            list_type: ListType::Map {
                keys: keys.iter().map(|k| k.to_string()).collect(),
            },
        },
        patch_strategies,
        patch_merge_key: Some(merge_key.to_string()),
        atomic: false,
    })
}

fn atomic_list(item: FieldKind) -> Option<FieldSchema> {
    plain(FieldKind::List {
        item: Box::new(item),
        list_type: ListType::Atomic,
    })
}

const CORE: &str = "io.k8s.api.core.v1.";
const APPS: &str = "io.k8s.api.apps.v1.";
const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.";

impl TestSchema {
    fn owned_field(&self, type_name: &str, field: &str) -> Option<FieldSchema> {
        let c = |t: &str| obj(&format!("{CORE}{t}"));
        let short = type_name
            .strip_prefix(CORE)
            .or_else(|| type_name.strip_prefix(APPS))
            .or_else(|| type_name.strip_prefix(META))?;
        match (short, field) {
            ("Deployment" | "Pod" | "ConfigMap", "metadata") => {
                plain(obj(&format!("{META}ObjectMeta")))
            }
            ("Deployment", "spec") => plain(obj(&format!("{APPS}DeploymentSpec"))),
            ("Deployment", "status") => plain(obj(&format!("{APPS}DeploymentStatus"))),
            ("Pod", "spec") => plain(c("PodSpec")),
            ("Pod", "status") => plain(c("PodStatus")),
            ("ConfigMap", "data") => string_map(),
            ("DeploymentSpec", "replicas" | "paused") => scalar(),
            ("DeploymentSpec", "selector") => plain(obj(&format!("{META}LabelSelector"))),
            ("DeploymentSpec", "template") => plain(c("PodTemplateSpec")),
            ("DeploymentSpec", "strategy") => Some(FieldSchema {
                kind: obj(&format!("{APPS}DeploymentStrategy")),
                patch_strategies: vec![PatchStrategy::RetainKeys],
                patch_merge_key: None,
                atomic: false,
            }),
            ("DeploymentStrategy", "type") => scalar(),
            ("DeploymentStrategy", "rollingUpdate") => {
                plain(obj(&format!("{APPS}RollingUpdateDeployment")))
            }
            ("DeploymentStatus" | "PodStatus", "conditions") => keyed(
                &format!("{APPS}DeploymentCondition"),
                "type",
                &["type"],
                false,
            ),
            ("LabelSelector", "matchLabels") => string_map(),
            ("PodTemplateSpec", "metadata") => plain(obj(&format!("{META}ObjectMeta"))),
            ("PodTemplateSpec", "spec") => plain(c("PodSpec")),
            ("ObjectMeta", "labels" | "annotations") => string_map(),
            ("ObjectMeta", "name" | "namespace" | "resourceVersion" | "uid") => scalar(),
            ("ObjectMeta", "finalizers") => Some(FieldSchema {
                kind: FieldKind::List {
                    item: Box::new(FieldKind::Scalar),
                    list_type: ListType::Set,
                },
                patch_strategies: vec![PatchStrategy::Merge],
                patch_merge_key: None,
                atomic: false,
            }),
            ("ObjectMeta", "ownerReferences") => {
                keyed(&format!("{META}OwnerReference"), "uid", &["uid"], false)
            }
            ("PodSpec", "containers" | "initContainers") => {
                keyed(&format!("{CORE}Container"), "name", &["name"], false)
            }
            ("PodSpec", "volumes") => keyed(&format!("{CORE}Volume"), "name", &["name"], true),
            ("PodSpec", "tolerations") => atomic_list(c("Toleration")),
            // `x-kubernetes-map-type: atomic` on the field.
            ("PodSpec", "nodeSelector") => Some(FieldSchema {
                atomic: true,
                ..string_map()?
            }),
            ("Container", "name" | "image" | "imagePullPolicy") => scalar(),
            ("Container", "args" | "command") => atomic_list(FieldKind::Scalar),
            ("Container", "ports") => keyed(
                &format!("{CORE}ContainerPort"),
                "containerPort",
                &["containerPort", "protocol"],
                false,
            ),
            ("Container", "env") => keyed(&format!("{CORE}EnvVar"), "name", &["name"], false),
            ("Container", "resources") => plain(c("ResourceRequirements")),
            ("ResourceRequirements", "limits" | "requests") => string_map(),
            ("EnvVar", "valueFrom") => plain(c("EnvVarSource")),
            ("Volume", "emptyDir") => plain(c("EmptyDirVolumeSource")),
            ("Volume", "configMap") => plain(c("ConfigMapVolumeSource")),
            _ => None,
        }
    }
}

impl PatchSchema for TestSchema {
    fn field(&self, type_name: &str, field: &str) -> Option<Cow<'_, FieldSchema>> {
        self.owned_field(type_name, field).map(Cow::Owned)
    }
    fn field_default(&self, type_name: &str, field: &str) -> Option<Value> {
        (type_name == "io.k8s.api.core.v1.ContainerPort" && field == "protocol")
            .then(|| json!("TCP"))
    }

    fn atomic_type(&self, type_name: &str) -> bool {
        type_name == "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
    }
}
