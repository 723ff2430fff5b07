//! Tapestry's Service proxy and cluster DNS: every Service port reachable
//! on its ClusterIPs and NodePorts through nftables tables of its own,
//! and every Service's name answered by the node's DNS server, both kept in
//! step with the Services and EndpointSlices through one watch each.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tapestry_runtime::{key_of, lock, split_key, trim_metadata, Informer};
use tokio_util::sync::CancellationToken;

pub mod dns;
pub mod nft;
pub mod rules;
pub mod script;
pub mod services;
pub mod sync;

/// The node's watches of Services and EndpointSlices, shared by the proxy
/// and the DNS server: each registers its handlers, then [`Watches::start`].
#[derive(Clone)]
pub struct Watches {
    pub services: Arc<Informer<Service>>,
    pub slices: Arc<Informer<EndpointSlice>>,
}

impl Watches {
    pub fn new(client: Client) -> Self {
        Watches {
            services: Informer::trimmed(
                Api::all(client.clone()),
                watcher::Config::default(),
                trim_metadata,
            ),
            slices: Informer::trimmed(Api::all(client), watcher::Config::default(), trim_metadata),
        }
    }

    /// The Services that change from now on, by `namespace/name`: a
    /// Service's own changes and its EndpointSlices'. Call before
    /// [`Watches::start`].
    pub fn changes(&self) -> Arc<Changes> {
        let changes: Arc<Changes> = Arc::default();
        let c = changes.clone();
        self.services.on_change(move |svc, _| c.add(key_of(svc)));
        let c = changes.clone();
        self.slices.on_change(move |slice, _| {
            if let Some(key) = service_of(slice) {
                c.add(key);
            }
        });
        changes
    }

    /// One Service and its EndpointSlices, by `namespace/name`.
    pub fn service(&self, key: &str) -> (Option<Arc<Service>>, Vec<Arc<EndpointSlice>>) {
        let (ns, name) = split_key(key);
        let Some(service) = self.services.get(ns, name) else {
            return (None, Vec::new());
        };
        let slices = self.slices.list_in(ns.unwrap_or_default(), |s| {
            s.labels()
                .get(services::SERVICE_NAME_LABEL)
                .map(String::as_str)
                == Some(name)
        });
        (Some(service), slices)
    }

    /// Every Service with its EndpointSlices. The slices are grouped in
    /// one pass: looking each Service's up among all would be quadratic.
    pub fn all_services(&self) -> Vec<(String, Arc<Service>, Vec<Arc<EndpointSlice>>)> {
        let mut slices: HashMap<String, Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in self.slices.store.state() {
            if let Some(key) = service_of(&slice) {
                slices.entry(key).or_default().push(slice);
            }
        }
        self.services
            .store
            .state()
            .into_iter()
            .map(|service| {
                let key = key_of(service.as_ref());
                let own = slices.remove(&key).unwrap_or_default();
                (key, service, own)
            })
            .collect()
    }

    pub fn start(&self, shutdown: CancellationToken) {
        self.services.start(shutdown.clone());
        self.slices.start(shutdown);
    }

    /// Until both hold a complete list, or `shutdown`; false on shutdown.
    pub async fn ready(&self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = async { self.services.ready().await; self.slices.ready().await } => true,
        }
    }
}

/// `namespace/name` of the Service an EndpointSlice belongs to.
pub fn service_of(slice: &EndpointSlice) -> Option<String> {
    let ns = slice.namespace()?;
    let svc = slice.labels().get(services::SERVICE_NAME_LABEL)?;
    Some(format!("{ns}/{svc}"))
}

/// Services changed since the last [`Changes::take`].
#[derive(Default)]
pub struct Changes {
    keys: Mutex<HashSet<String>>,
    wake: tokio::sync::Notify,
}

impl Changes {
    fn add(&self, key: String) {
        lock(&self.keys).insert(key);
        self.wake.notify_one();
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.keys)).into_iter().collect()
    }

    /// Until something changed since the last call.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}
