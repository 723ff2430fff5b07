//! The resource registry: what each served resource is and how it behaves.
//!
//! Like kube-apiserver's generic registry, one REST implementation serves
//! every resource; what differs per resource (defaults, validation, status
//! handling, printing, selectable fields) lives in a [`ResourceDef`].

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{ApiResult, Cause};
use crate::tables::TableDef;
use crate::validation::NameRule;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Subresource {
    Status,
    Scale,
    Binding,
    /// pods/eviction: a policy/v1 Eviction deletes the pod (`kubectl drain`).
    Eviction,
    /// namespaces/finalize: the namespace controller removes spec.finalizers.
    Finalize,
}

impl Subresource {
    pub fn name(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
            Subresource::Binding => "binding",
            Subresource::Eviction => "eviction",
            Subresource::Finalize => "finalize",
        }
    }
}

/// Per-resource behaviour. Every method has a neutral default.
pub trait Behaviour: Send + Sync {
    /// Fill in defaulted fields (runs on every write, as decoding does in
    /// Kubernetes).
    fn default(&self, _obj: &mut Value) {}

    /// Reset what clients may not set on create (usually status).
    fn prepare_for_create(&self, obj: &mut Value) {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }

    /// Adjust an update of the main resource (status is preserved by the
    /// caller for resources with a status subresource).
    fn prepare_for_update(&self, _new: &mut Value, _old: &Value) {}

    fn validate(&self, _obj: &Value) -> Vec<Cause> {
        Vec::new()
    }

    fn validate_update(&self, new: &Value, _old: &Value) -> Vec<Cause> {
        self.validate(new)
    }

    /// Convert an object of this resource's version into its storage form
    /// (only resources that share storage with another version override this).
    fn to_storage(&self, obj: Value) -> Value {
        obj
    }

    fn to_served(&self, obj: Value) -> Value {
        obj
    }

    /// Whether `to_served` leaves stored objects as they are, so reads may
    /// serve the stored bytes without decoding them.
    fn serves_stored_form(&self) -> bool {
        true
    }

    /// Whether the status subresource also takes label and annotation
    /// changes (pods, as in Kubernetes: a kubelet reports status and its
    /// annotations in one write).
    fn status_takes_labels_and_annotations(&self) -> bool {
        false
    }
}

/// Work a write does outside the object itself (e.g. allocating a Service's
/// ClusterIP). `on_create`/`on_update` run before the store write; if the
/// write then fails, `on_delete`-style release is the hook's job via
/// `rollback`.
#[async_trait]
pub trait WriteHook: Send + Sync {
    async fn on_create(&self, obj: &mut Value, dry_run: bool) -> ApiResult<()>;
    async fn on_update(&self, new: &mut Value, old: &Value, dry_run: bool) -> ApiResult<()>;
    /// Release what `obj` holds; called after it is removed from the store,
    /// and to undo `on_create`/`on_update` work when the write failed.
    async fn release(&self, obj: &Value, keep: Option<&Value>);
}

/// Decode into the typed Kubernetes object and encode again, so unknown
/// fields are dropped, types are checked and the stored form is canonical.
pub type Codec = fn(&Value) -> Result<Value, String>;

pub fn typed_codec<T: DeserializeOwned + Serialize>(v: &Value) -> Result<Value, String> {
    // Tracking the path costs on every field; only a failure needs it, so
    // a failed decode is repeated with tracking to name the field.
    let typed = T::deserialize(v).or_else(|_| {
        serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
            let path = e.path().to_string();
            if path == "." || path.is_empty() {
                e.into_inner().to_string()
            } else {
                format!("{path}: {}", e.into_inner())
            }
        })
    })?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

pub struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub namespaced: bool,
    pub name_rule: NameRule,
    pub subresources: &'static [Subresource],
    /// OpenAPI definition name, e.g. `io.k8s.api.apps.v1.Deployment`.
    pub definition: &'static str,
    /// Storage key segment; two versions of one resource share it.
    pub storage: &'static str,
    /// Bump metadata.generation when anything outside metadata/status changes.
    pub tracks_generation: bool,
    pub codec: Codec,
    pub behaviour: Arc<dyn Behaviour>,
    pub hook: Option<Arc<dyn WriteHook>>,
    pub table: TableDef,
    /// Field selector labels beyond metadata.name/namespace, with the JSON
    /// pointer they read.
    pub field_selectors: &'static [(&'static str, &'static str)],
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn has(&self, sub: Subresource) -> bool {
        self.subresources.contains(&sub)
    }

    /// `/registry/{storage}/` for cluster-scoped, `/registry/{storage}/{ns}/`
    /// for a namespace.
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("/registry/{}/{ns}/", self.storage),
            _ => format!("/registry/{}/", self.storage),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.key_prefix(namespace))
    }

    /// The value a field selector compares for `field`, or None if the field
    /// is not selectable on this resource.
    pub fn field_value(&self, obj: &Value, field: &str) -> Option<String> {
        let pointer = match field {
            "metadata.name" => "/metadata/name",
            "metadata.namespace" => "/metadata/namespace",
            _ => {
                self.field_selectors
                    .iter()
                    .find(|(label, _)| *label == field)?
                    .1
            }
        };
        Some(match obj.pointer(pointer) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        })
    }

    pub fn supports_field(&self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace")
            || self.field_selectors.iter().any(|(l, _)| *l == field)
    }
}

/// All served resources, looked up by group/version/plural.
pub struct Registry {
    defs: Vec<Arc<ResourceDef>>,
    by_path: HashMap<(String, String, String), Arc<ResourceDef>>,
}

impl Registry {
    pub fn new(defs: Vec<ResourceDef>) -> Self {
        let defs: Vec<Arc<ResourceDef>> = defs.into_iter().map(Arc::new).collect();
        let by_path = defs
            .iter()
            .map(|d| {
                (
                    (
                        d.group.to_string(),
                        d.version.to_string(),
                        d.plural.to_string(),
                    ),
                    d.clone(),
                )
            })
            .collect();
        Registry { defs, by_path }
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.by_path
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    pub fn all(&self) -> &[Arc<ResourceDef>] {
        &self.defs
    }

    /// Group → versions served, in registration order.
    pub fn groups(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
        for d in &self.defs {
            match out.iter_mut().find(|(g, _)| *g == d.group) {
                Some((_, versions)) => {
                    if !versions.contains(&d.version) {
                        versions.push(d.version)
                    }
                }
                None => out.push((d.group, vec![d.version])),
            }
        }
        out
    }

    pub fn in_group_version(&self, group: &str, version: &str) -> Vec<Arc<ResourceDef>> {
        self.defs
            .iter()
            .filter(|d| d.group == group && d.version == version)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::typed_codec;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    #[test]
    fn a_wrong_type_is_reported_with_its_field_path() {
        let pod = json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": 5}]},
        });
        let err = typed_codec::<Pod>(&pod).unwrap_err();
        assert!(
            err.starts_with("spec.containers[0].image: invalid type: integer `5`"),
            "{err}"
        );
    }

    #[test]
    fn a_valid_object_comes_back_canonical_without_unknown_fields() {
        let pod = json!({
            "metadata": {"name": "p", "bogus": 1},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        });
        let out = typed_codec::<Pod>(&pod).unwrap();
        assert_eq!(out["spec"]["containers"][0]["image"], "busybox");
        assert!(out["metadata"].get("bogus").is_none());
    }
}
