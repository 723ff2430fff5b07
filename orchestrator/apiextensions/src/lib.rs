//! Custom resources as kube-apiserver's apiextensions serve them, on JSON
//! values and independent of the API server:
//!
//! | module | what |
//! |---|---|
//! | [`schema`] | the structural schema of one CRD version (`openAPIV3Schema`), parsed and checked |
//! | [`validate`] | objects checked against a schema, with Kubernetes' field errors |
//! | [`prune`] | unknown fields dropped (`x-kubernetes-preserve-unknown-fields` honoured) |
//! | [`default`] | schema `default`s filled in |
//! | [`cel`] | `x-kubernetes-validations` rules compiled and evaluated (`self`, `oldSelf`) |
//! | [`columns`] | `additionalPrinterColumns`: JSONPath cells for `kubectl get` tables |
//! | [`patch_schema`] | list and map types for server-side apply, from the schema |
//!
//! Errors on objects are [`tapestry_apimachinery::Cause`]s naming the field
//! path, worded as kube-apiserver words them.

pub mod cel;
pub mod columns;
pub mod default;
pub mod patch_schema;
pub mod prune;
pub mod schema;
pub mod validate;
