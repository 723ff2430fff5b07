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

/// A list reads up to a page of keys per etcd response: a page of objects
/// near etcd's largest request (1.5 MiB by default) must still decode. 200
/// of them make a 280 MiB response.
#[tokio::test]
async fn a_page_of_large_objects_lists() {
    use tapestry_store::{ListOptions, Store};
    let Some(store) = etcd_store().await else {
        return;
    };
    let value = bytes::Bytes::from(vec![b'x'; 1400 * 1024]);
    for i in 0..200 {
        store
            .create(&format!("/big/{i:03}"), value.clone())
            .await
            .unwrap_or_else(|e| panic!("create /big/{i:03}: {e}"));
    }
    let listed = store
        .list("/big/", ListOptions::default())
        .await
        .expect("listing 200 objects of 1.4 MiB");
    assert_eq!(listed.items.len(), 200);
    assert!(listed.items.iter().all(|kv| kv.value.len() == value.len()));
}
