//! What the patch algorithms need to know about a type's fields.

use std::borrow::Cow;

/// How a list behaves under strategic merge patch and server-side apply
/// (`x-kubernetes-list-type` / `x-kubernetes-list-map-keys`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole.
    Atomic,
    /// A set of scalars, merged by value.
    Set,
    /// A list of objects identified by these key fields.
    Map { keys: Vec<String> },
}

/// `x-kubernetes-patch-strategy` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchStrategy {
    Merge,
    Replace,
    RetainKeys,
}

/// The shape of a field's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// string, number, boolean, or a value with no schema (treated atomically).
    Scalar,
    /// An object of the named definition (e.g. `io.k8s.api.core.v1.PodSpec`).
    Object { type_name: String },
    /// A map with arbitrary keys; values described by `value`.
    Map { value: Box<FieldKind> },
    /// A list whose items are described by `item`.
    List {
        item: Box<FieldKind>,
        list_type: ListType,
    },
}

/// One field of an object type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSchema {
    pub kind: FieldKind,
    /// `x-kubernetes-patch-strategy` (may hold `merge` and `retainKeys` together).
    pub patch_strategies: Vec<PatchStrategy>,
    /// `x-kubernetes-patch-merge-key` for lists of objects merged by key.
    pub patch_merge_key: Option<String>,
    /// `x-kubernetes-map-type: atomic` on the field itself (e.g. a Service's
    /// `spec.selector` map): server-side apply owns and replaces the value as
    /// a whole, like an [`PatchSchema::atomic_type`] object. Strategic merge
    /// patch ignores it, as Kubernetes does.
    pub atomic: bool,
}

/// Type information for the patch algorithms. Unknown types and fields are
/// treated as untyped JSON (maps merge, lists are atomic), as Kubernetes does
/// for unstructured content.
pub trait PatchSchema: Send + Sync {
    /// The schema of `field` in object type `type_name`, if known. Every
    /// walk of an object asks this for each field it visits, so schemas
    /// held in memory are lent rather than copied.
    fn field(&self, type_name: &str, field: &str) -> Option<Cow<'_, FieldSchema>>;

    /// The schema default of `field` in `type_name` (OpenAPI `default`).
    /// Server-side apply uses it for key fields of map lists that an item
    /// omits, e.g. `io.k8s.api.core.v1.ContainerPort` `protocol` = `"TCP"`,
    /// so `{containerPort: 80}` and a defaulted live item share one key.
    fn field_default(&self, _type_name: &str, _field: &str) -> Option<serde_json::Value> {
        None
    }

    /// Whether objects of `type_name` are atomic for server-side apply
    /// (`x-kubernetes-map-type: atomic`, e.g. `LabelSelector`): owned and
    /// replaced as a whole instead of field by field.
    fn atomic_type(&self, _type_name: &str) -> bool {
        false
    }
}
