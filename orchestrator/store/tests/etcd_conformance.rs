//! The shared conformance suite on `EtcdStore`, each check against its own
//! etcd server (the `etcd` binary on loopback ports). Without `etcd` the
//! checks are skipped with a message, except under CI.

use tapestry_store::conformance::{EtcdServer, Guarded};
use tapestry_store::EtcdStore;

async fn etcd_store() -> Option<Guarded<EtcdStore, EtcdServer>> {
    let server = EtcdServer::start()?;
    Some(Guarded {
        store: server.store().await,
        guard: server,
    })
}

tapestry_store::store_conformance_suite!(optional etcd_store());
