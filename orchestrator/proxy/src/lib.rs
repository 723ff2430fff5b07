//! Tapestry's Service proxy: every Service port reachable on its ClusterIPs
//! and NodePorts through an nftables table of its own, kept in step with
//! the EndpointSlices.

pub mod nft;
pub mod rules;
pub mod services;
pub mod sync;
