//! Tapestry's Kubernetes-compatible API server.
//!
//! One generic REST implementation ([`rest`]) serves every resource of the
//! [`registry`]; resources differ only by their definitions in
//! [`resources`]. Objects live in a [`tapestry_store::Store`] as JSON, their
//! resourceVersion being the store revision.

pub mod authz;
mod bootstrap;
pub mod bootstraptokens;
pub mod discovery;
pub mod endpoint_leases;
pub mod error;
pub mod metrics;
pub mod nodeproxy;
pub mod objects;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod registry;
pub mod resourcemetrics;
pub mod resources;
pub mod rest;
pub mod satokens;
pub mod selectors;
pub mod server;
pub mod tables;
#[cfg(test)]
mod testing;
pub use tapestry_apimachinery::validation;
mod watch;

pub use server::{start, LocalHandler, Running, ServerConfig};
