//! Kubernetes object machinery on JSON values: JSON merge patch, JSON patch,
//! strategic merge patch and server-side apply with managed fields.
//!
//! The algorithms are type-aware through [`PatchSchema`], which the OpenAPI
//! crate implements from the served resources' definitions (so list merge
//! keys, list types and patch strategies come from one place).
//!
//! | request | function |
//! |---|---|
//! | `application/merge-patch+json` | [`json_merge_patch`] |
//! | `application/json-patch+json` | [`json_patch`](fn@json_patch) |
//! | `application/strategic-merge-patch+json` | [`strategic_merge_patch`] |
//! | `application/apply-patch+yaml` (as JSON) | [`apply`] / [`apply_with_options`] |
//! | any other create/update/patch | [`record_update`] / [`record_update_with_options`] |
//!
//! Errors: [`PatchError`] (a bad patch: HTTP 400/422), [`ApplyError`]
//! (`Conflicts`: HTTP 409 with one `FieldManagerConflict` cause per
//! [`Conflict`]; `Invalid`: HTTP 422).
//!
//! ```
//! use std::borrow::Cow;
//! use serde_json::json;
//! use tapestry_apimachinery::{apply, record_update, FieldSchema, PatchSchema};
//!
//! struct Untyped;
//! impl PatchSchema for Untyped {
//!     fn field(&self, _: &str, _: &str) -> Option<Cow<'_, FieldSchema>> { None }
//! }
//!
//! // Created by an ordinary write of manager "creator"...
//! let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap",
//!                      "metadata": {"name": "c"}, "data": {"a": "1"}});
//! record_update(None, &mut obj, "creator", &Untyped, "ConfigMap", "2026-01-01T00:00:00Z");
//! // ...so an apply changing its field conflicts unless forced.
//! let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap",
//!                  "metadata": {"name": "c"}, "data": {"a": "2"}});
//! let err = apply(Some(&obj), &cfg, "me", false, &Untyped, "ConfigMap", "2026-01-01T00:01:00Z")
//!     .unwrap_err();
//! assert_eq!(err.to_string(),
//!     "Apply failed with 1 conflict: conflict with \"creator\" using v1: .data.a");
//! let obj = apply(Some(&obj), &cfg, "me", true, &Untyped, "ConfigMap", "2026-01-01T00:01:00Z")
//!     .unwrap();
//! assert_eq!(obj["data"]["a"], "2");
//! ```

pub mod cause;
pub mod error;
pub mod fieldpath;
pub mod json;
pub mod managed;
pub mod quantity;
pub mod quota;
pub mod schema;
pub mod strategic;
pub mod tokens;
mod typed;
pub mod validation;

#[cfg(test)]
mod testschema;

pub use cause::Cause;
pub use error::{ApplyError, Conflict, Operation, PatchError};
pub use fieldpath::FieldSet;
pub use json::{json_merge_patch, json_patch};
pub use managed::{
    apply, apply_with_options, decode_managed_fields, encode_managed_fields, owned_paths,
    record_update, record_update_with_options, FieldManagerOptions, ManagedFieldsEntry,
};
pub use schema::{FieldKind, FieldSchema, ListType, PatchSchema, PatchStrategy};
pub use strategic::strategic_merge_patch;
