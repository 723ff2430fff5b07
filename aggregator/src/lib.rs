//! Tapestry's aggregator: receives the packet streams of all taps and
//! delivers, per policy, exactly the traffic each security tool wants.
//!
//! Layout follows a source → transforms → sinks topology: `sources` (gRPC
//! ingest), `transforms` (filter, dedup, slice, mask), `sinks/<name>` (one
//! module per tool protocol), wired in `topology` by bounded channels.

pub mod bpf;
pub mod capture;
pub mod config;
pub mod event;
pub mod metrics;
pub mod parse;
pub mod replay;
pub mod serve;
pub mod sinks;
pub mod sources;
pub mod synth;
pub mod synthtap;
pub mod topology;
pub mod transforms;
