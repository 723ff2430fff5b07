//! Tapestry's wire protocols and API resource types.

/// Tap → aggregator packet streaming: what a tap is and taps
/// (`tapestry.tap.v1`), and the ingest stream (`tapestry.tap.v2`).
pub mod tap {
    pub mod v1 {
        tonic::include_proto!("tapestry.tap.v1");
    }
    pub mod v2 {
        tonic::include_proto!("tapestry.tap.v2");
    }
}

/// The packed packet records of an ingest batch.
pub mod records;

/// How taps are named in their client certificates.
pub mod identity;

/// Aggregator → security tool packet subscription (`tapestry.tool.v1`).
pub mod tool {
    pub mod v1 {
        tonic::include_proto!("tapestry.tool.v1");
    }
}

/// Tapestry's own API resource types for tapping.
pub mod policy;

/// Tapestry's custom resources (`tapestry.io/v1alpha1`).
pub mod crd;

/// The taps' heartbeats (a Lease per node with its status).
pub mod heartbeat;
