//! Tapestry's aggregator: receives the packet streams of all taps and
//! delivers, per policy, exactly the traffic each security tool wants.
//!
//! Layout follows a source → transforms → sinks topology: `sources` (gRPC
//! ingest), `transforms` (filter, dedup, slice, mask), `sinks/<name>` (one
//! module per tool protocol), wired in `topology` by bounded channels.
//! `cluster` runs the same topology from TapPolicy and TapTool objects,
//! changing one policy or tool at a time while the rest keep running.

pub mod bpf;
pub mod capture;
pub mod cluster;
pub mod config;
pub mod event;
pub mod limits;
pub mod metrics;
pub mod parse;
pub mod replay;
pub mod serve;
pub mod sinks;
pub mod sources;
pub mod synth;
pub mod synthtap;
pub mod tls;
pub mod topology;
pub mod transforms;
