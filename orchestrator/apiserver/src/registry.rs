//! The resource registry: what each served resource is and how it behaves.
//!
//! Like kube-apiserver's generic registry, one REST implementation
//! ([`crate::rest`]) serves every resource; what differs per resource
//! (defaults, validation, status handling, printing, selectable fields,
//! subresources) lives in its [`ResourceDef`], written once per resource in
//! [`crate::resources`]. Built-in resources are registered at start; custom
//! resources are added and removed at run time as their CRDs come and go.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use axum::response::Response;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tapestry_apimachinery::PatchSchema;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult, Cause};
use crate::rest::{Api, Request};
use crate::tables::{TableDef, TablePrinter};
use crate::validation::NameRule;

/// The subresources the server knows, each served by a [`SubresourceRest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Subresource {
    Status,
    Scale,
    Binding,
    /// pods/eviction: a policy/v1 Eviction deletes the pod (`kubectl drain`).
    Eviction,
    /// namespaces/finalize: the namespace controller removes spec.finalizers.
    Finalize,
    /// serviceaccounts/token: an authentication.k8s.io/v1 TokenRequest.
    Token,
    /// certificatesigningrequests/approval: the Approved/Denied conditions.
    Approval,
}

impl Subresource {
    pub fn name(self) -> &'static str {
        match self {
            Subresource::Status => "status",
            Subresource::Scale => "scale",
            Subresource::Binding => "binding",
            Subresource::Eviction => "eviction",
            Subresource::Finalize => "finalize",
            Subresource::Token => "token",
            Subresource::Approval => "approval",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Subresource::Status,
            Subresource::Scale,
            Subresource::Binding,
            Subresource::Eviction,
            Subresource::Finalize,
            Subresource::Token,
            Subresource::Approval,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// How a subresource appears in discovery.
pub struct SubresourceDiscovery {
    /// The kind its requests and responses carry.
    pub kind: String,
    /// Group and version of that kind when they differ from the parent's
    /// (Scale is autoscaling/v1, Eviction policy/v1).
    pub group_version: Option<(&'static str, &'static str)>,
    pub verbs: &'static [&'static str],
}

/// The REST handler of one subresource, as kube-apiserver's StatusREST,
/// ScaleREST, BindingREST, EvictionREST and FinalizeREST. A verb it does
/// not serve answers 405.
#[async_trait]
pub trait SubresourceRest: Send + Sync {
    fn discovery(&self, def: &ResourceDef) -> SubresourceDiscovery;

    async fn get(&self, _api: &Api, req: &Request) -> ApiResult<Response> {
        Err(not_supported(req, "get"))
    }

    async fn create(&self, _api: &Api, req: &Request) -> ApiResult<Response> {
        Err(not_supported(req, "create"))
    }

    async fn update(&self, _api: &Api, req: &Request) -> ApiResult<Response> {
        Err(not_supported(req, "update"))
    }

    async fn patch(&self, _api: &Api, req: &Request) -> ApiResult<Response> {
        Err(not_supported(req, "patch"))
    }
}

fn not_supported(req: &Request, verb: &str) -> ApiError {
    let mut target = req.target();
    if let Some(sub) = req.sub {
        target.resource = format!("{}/{}", target.resource, sub.name());
    }
    ApiError::MethodNotSupported {
        target,
        verb: verb.to_string(),
    }
}

/// A subresource of a resource and the handler serving it.
#[derive(Clone)]
pub struct SubresourceDef {
    pub kind: Subresource,
    pub rest: Arc<dyn SubresourceRest>,
}

/// Per-resource behaviour (kube-apiserver's strategies). Every method has a
/// neutral default.
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

    /// Record who creates the object, in objects that carry it (a
    /// CertificateSigningRequest's requester): the server's word, never
    /// the client's.
    fn record_requester(
        &self,
        _obj: &mut Value,
        _user: Option<&tapestry_apimachinery::tokens::User>,
    ) {
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

    /// Validation of a status write (the object as it will be stored).
    fn validate_status_update(&self, _new: &Value, _old: &Value) -> Vec<Cause> {
        Vec::new()
    }

    /// Convert an object of this resource's version into its storage form
    /// (only resources that share storage with another version override this).
    fn to_storage(&self, obj: Value) -> Value {
        obj
    }

    /// The stored form as this version serves it (conversion, defaults
    /// applied on read).
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

    /// Graceful deletion: the seconds an object is given to terminate
    /// before it is removed for good, or None to remove it at once
    /// (`requested` is the client's gracePeriodSeconds).
    fn deletion_grace_period(&self, _obj: &Value, _requested: Option<i64>) -> Option<i64> {
        None
    }

    /// Whether an object marked for deletion, its finalizers all gone, must
    /// still wait (a namespace until its spec.finalizers are done).
    fn deletion_held(&self, _obj: &Value) -> bool {
        false
    }

    /// Finalizers a deletion adds before marking the object (a CRD's
    /// cleanup of its objects), as kube-apiserver's CRD registry does.
    fn deletion_finalizers(&self) -> &'static [&'static str] {
        &[]
    }

    /// Changes that come with marking an object for deletion (a namespace's
    /// phase turns Terminating).
    fn begin_deletion(&self, _obj: &mut Value) {}
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

/// How a client-sent object becomes its canonical form: decoded into the
/// typed Kubernetes object and encoded again for built-ins (unknown fields
/// dropped, types checked), pruned by the schema for custom resources. An
/// error names the field.
pub type Codec = Arc<dyn Fn(&Value) -> Result<Decoded, String> + Send + Sync>;

/// A codec's output.
pub struct Decoded {
    pub obj: Value,
    /// The paths of the fields it dropped, when it knows them (pruning
    /// does); None: they are found by comparing input and output.
    pub dropped: Option<Vec<String>>,
}

/// The codec of a k8s-openapi type.
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

/// When `metadata.generation` moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// Not tracked.
    Untracked,
    /// On changes outside metadata and status (resources with a status
    /// subresource).
    Spec,
    /// On changes outside metadata (custom resources without a status
    /// subresource, whose status is part of the object).
    AllButMetadata,
}

/// One served resource in one version.
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub name_rule: NameRule,
    pub subresources: Vec<SubresourceDef>,
    /// OpenAPI definition name, e.g. `io.k8s.api.apps.v1.Deployment`.
    pub definition: String,
    /// Storage key segment; two versions of one resource share it.
    pub storage: String,
    pub generation: Generation,
    pub codec: Codec,
    pub behaviour: Arc<dyn Behaviour>,
    pub hook: Option<Arc<dyn WriteHook>>,
    pub table: Arc<dyn TablePrinter>,
    /// Field selector labels beyond metadata.name/namespace, with the JSON
    /// pointer they read.
    pub field_selectors: Vec<(String, String)>,
    /// Field types for patches and managed fields; None: the served
    /// OpenAPI definitions (built-in kinds).
    pub patch_schema: Option<Arc<dyn PatchSchema>>,
    /// Whether strategic merge patches apply (built-ins); custom resources
    /// refuse them with 415, as Kubernetes does.
    pub strategic_merge: bool,
    /// Refuse creates: the resource is going away (its CRD is being
    /// deleted) and only its remaining objects are served.
    pub terminating: bool,
    /// Cancelled when this definition stops being served (its CRD changed
    /// or went away): its watches end, and clients list again.
    pub retired: CancellationToken,
}

impl ResourceDef {
    /// A built-in resource of the k8s-openapi type `T`, with neutral
    /// behaviour and NAME/AGE columns; modules override what differs.
    pub fn of<T>() -> ResourceDef
    where
        T: k8s_openapi::Resource
            + k8s_openapi::schemars::JsonSchema
            + DeserializeOwned
            + Serialize
            + 'static,
        T::Scope: 'static,
    {
        let namespaced = std::any::TypeId::of::<T::Scope>()
            == std::any::TypeId::of::<k8s_openapi::NamespaceResourceScope>();
        let plural = T::URL_PATH_SEGMENT.to_string();
        ResourceDef {
            group: T::GROUP.to_string(),
            version: T::VERSION.to_string(),
            kind: T::KIND.to_string(),
            list_kind: format!("{}List", T::KIND),
            singular: T::KIND.to_lowercase(),
            short_names: Vec::new(),
            categories: Vec::new(),
            namespaced,
            name_rule: NameRule::Dns1123Subdomain,
            subresources: Vec::new(),
            definition: T::schema_name().into_owned(),
            storage: plural.clone(),
            plural,
            generation: Generation::Untracked,
            codec: Arc::new(|v: &Value| {
                typed_codec::<T>(v).map(|obj| Decoded { obj, dropped: None })
            }),
            behaviour: Arc::new(Plain),
            hook: None,
            table: Arc::new(TableDef::name_age()),
            field_selectors: Vec::new(),
            patch_schema: None,
            strategic_merge: true,
            terminating: false,
            retired: CancellationToken::new(),
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn has(&self, sub: Subresource) -> bool {
        self.subresources.iter().any(|s| s.kind == sub)
    }

    pub fn subresource(&self, sub: Subresource) -> Option<&Arc<dyn SubresourceRest>> {
        self.subresources
            .iter()
            .find(|s| s.kind == sub)
            .map(|s| &s.rest)
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
            _ => self
                .field_selectors
                .iter()
                .find(|(label, _)| label == field)?
                .1
                .as_str(),
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
            || self.field_selectors.iter().any(|(l, _)| l == field)
    }
}

/// Behaviour for resources with nothing special.
pub struct Plain;

impl Behaviour for Plain {
    fn prepare_for_create(&self, _obj: &mut Value) {}
}

/// Field selector labels and the pointers they read, from static pairs.
pub fn selectable(fields: &[(&str, &str)]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|(label, pointer)| (label.to_string(), pointer.to_string()))
        .collect()
}

/// Owned names from static ones (short names, categories).
pub fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// What the server serves at one moment; replaced whole when custom
/// resources change, so a request sees one consistent set.
#[derive(Default)]
pub struct Served {
    defs: Vec<Arc<ResourceDef>>,
    by_path: HashMap<String, Arc<ResourceDef>>,
    /// Aggregated discovery documents of this set, built on first request:
    /// `[core v2, core v2beta1, groups v2, groups v2beta1]`.
    pub(crate) aggregated: [std::sync::OnceLock<Vec<u8>>; 4],
}

fn path_key(group: &str, version: &str, plural: &str) -> String {
    format!("{group}/{version}/{plural}")
}

impl Served {
    fn new(defs: Vec<Arc<ResourceDef>>) -> Self {
        let by_path = defs
            .iter()
            .map(|d| (path_key(&d.group, &d.version, &d.plural), d.clone()))
            .collect();
        Served {
            defs,
            by_path,
            aggregated: Default::default(),
        }
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<&Arc<ResourceDef>> {
        self.by_path.get(&path_key(group, version, plural))
    }

    pub fn all(&self) -> &[Arc<ResourceDef>] {
        &self.defs
    }

    /// Group → versions served, built-ins first, in the order definitions
    /// were registered (discovery sorts each group's versions).
    pub fn groups(&self) -> Vec<(&str, Vec<&str>)> {
        let mut out: Vec<(&str, Vec<&str>)> = Vec::new();
        for d in &self.defs {
            match out.iter_mut().find(|(g, _)| *g == d.group) {
                Some((_, versions)) => {
                    if !versions.contains(&d.version.as_str()) {
                        versions.push(&d.version)
                    }
                }
                None => out.push((&d.group, vec![&d.version])),
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

/// All served resources: the built-ins, and the custom resources of each
/// established CRD (by CRD name).
pub struct Registry {
    builtin: Vec<Arc<ResourceDef>>,
    custom: RwLock<CustomSet>,
    served: RwLock<Arc<Served>>,
}

#[derive(Default)]
struct CustomSet {
    /// CRD name → its served versions, in version priority order.
    by_crd: std::collections::BTreeMap<String, Vec<Arc<ResourceDef>>>,
}

impl Registry {
    pub fn new(defs: Vec<ResourceDef>) -> Self {
        let builtin: Vec<Arc<ResourceDef>> = defs.into_iter().map(Arc::new).collect();
        Registry {
            served: RwLock::new(Arc::new(Served::new(builtin.clone()))),
            builtin,
            custom: RwLock::new(CustomSet::default()),
        }
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.served().get(group, version, plural).cloned()
    }

    /// What is served now.
    pub fn served(&self) -> Arc<Served> {
        self.served
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn builtin(&self) -> &[Arc<ResourceDef>] {
        &self.builtin
    }

    /// Serve `defs` for the CRD `crd` (replacing what it served before);
    /// an empty list stops serving it.
    pub fn set_custom(&self, crd: &str, defs: Vec<Arc<ResourceDef>>) {
        let mut custom = self
            .custom
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let replaced = if defs.is_empty() {
            custom.by_crd.remove(crd)
        } else {
            custom.by_crd.insert(crd.to_string(), defs)
        };
        let mut all = self.builtin.clone();
        all.extend(custom.by_crd.values().flatten().cloned());
        *self
            .served
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(Served::new(all));
        for old in replaced.into_iter().flatten() {
            old.retired.cancel();
        }
    }

    /// The definitions a CRD is served with now.
    pub fn custom(&self, crd: &str) -> Vec<Arc<ResourceDef>> {
        self.custom
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .by_crd
            .get(crd)
            .cloned()
            .unwrap_or_default()
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
