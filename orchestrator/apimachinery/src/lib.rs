//! Kubernetes object machinery on JSON values: JSON merge patch, JSON patch,
//! strategic merge patch and server-side apply with managed fields.
//!
//! The algorithms are type-aware through [`PatchSchema`], which the OpenAPI
//! crate implements from the served resources' definitions (so list merge
//! keys, list types and patch strategies come from one place).

pub mod schema;

pub use schema::{FieldKind, FieldSchema, ListType, PatchSchema, PatchStrategy};
