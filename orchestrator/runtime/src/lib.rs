//! The runtime every watcher in Tapestry is built from, in the shape of
//! kube-runtime: shared informers (one watch per resource feeding a store
//! and change handlers), a deduplicating bounded work queue driving
//! idempotent reconciles, Lease-based leader election, and an event
//! recorder. The controller manager, hollow nodes, the kubelet, the
//! tap-agent and the fleet manager watch through it; the scheduler keeps
//! its own watch loop (see `tapestry_scheduler::run`) and records events
//! with it.

pub mod certificate;
pub mod cron;
pub mod csr;
pub mod disruption;
pub mod events;
pub mod http;
pub mod identity;
pub mod informer;
pub mod leader;
pub mod queue;
pub mod selector;
pub mod shutdown;
pub mod storage;
pub mod x509;

/// The common name of the client certificate the API server presents to
/// kubelets; a kubelet serves no other client.
pub const KUBELET_CLIENT_CN: &str = "kube-apiserver-kubelet-client";

use std::sync::Mutex;

pub use informer::{key_of, split_key, trim_metadata, Informer};
pub use queue::{run_worker, run_workers, Queue, Requeue};

/// A mutex guard even if a panicking holder poisoned it (the data is still
/// consistent: every critical section here is a few plain assignments).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a kube error is an HTTP status with this code.
pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

pub fn not_found(e: &kube::Error) -> bool {
    is_status(e, 404)
}

/// Treat NotFound (already gone) as success.
pub fn ignore_not_found<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}
