//! gRPC subscribe: tools call `tapestry.tool.v1.ToolSubscribe/Subscribe`
//! on the aggregator's gRPC port and receive this sink's packets.
pub mod config;
pub mod service;
