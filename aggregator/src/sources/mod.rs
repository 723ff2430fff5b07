//! Sources: where packets enter the aggregator.
pub mod grpc;
