//! The `kubernetes` Service's Endpoints and EndpointSlices list every live
//! API server, as kube-apiserver's lease endpoint reconciler keeps them:
//! each server renews a lease of its own under `/registry/masterleases/`
//! naming its advertised address and port, and every server writes the
//! endpoints from the leases that have not expired. A server that stops
//! cleanly removes its lease and itself at once; one that dies drops out
//! once its lease expires.
//!
//! The store has no TTLs (kube-apiserver puts its leases on etcd leases),
//! so expiry is judged by each observer's own clock: a lease has expired
//! when its revision has not changed for its TTL since this server first
//! saw that revision. Servers need not agree on the time of day, and the
//! server that sees a lease expire deletes it (only if it is still that
//! revision), so every server then agrees it is gone.
//!
//! Servers on one address and different ports (several on one machine)
//! each get their own endpoint: Endpoints subsets are grouped by port, and
//! EndpointSlices, which have one port list each, come one per address
//! family and port; the first is the `kubernetes` slice.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tapestry_store::StoreError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};
use crate::objects::{decode, meta_mut, meta_str};
use crate::rest::{Api, Request};

/// How long a lease lasts unrenewed, as in kube-apiserver.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

const LEASES: &str = "/registry/masterleases/";
const NAMESPACE: &str = "default";
const SERVICE: &str = "kubernetes";
const PORT_NAME: &str = "https";
/// Kept off the EndpointSlice mirroring: the slices are written here.
const SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGER: &str = "tapestry-apiserver";
/// Attempts at writing one object when another server writes it too.
const WRITE_ATTEMPTS: usize = 5;

/// One server's lease on the `kubernetes` Service's endpoints.
pub struct EndpointLeases {
    api: Arc<Api>,
    me: SocketAddr,
    ttl: Duration,
    /// Other servers' leases: the revision last seen and when this server
    /// first saw it.
    seen: HashMap<String, (i64, Instant)>,
}

impl EndpointLeases {
    /// `me` is the address and port other members of the cluster reach
    /// this server on; `ttl` how long its lease lasts unrenewed.
    pub fn new(api: Arc<Api>, me: SocketAddr, ttl: Duration) -> Self {
        EndpointLeases {
            api,
            me,
            ttl,
            seen: HashMap::new(),
        }
    }

    fn key(&self) -> String {
        format!("{LEASES}{}", self.me)
    }

    /// Renew this server's lease and write the endpoints every third of
    /// the TTL (so two renewals can be missed before the lease expires);
    /// once `shutdown` fires, remove this server from them. The server
    /// reconciles once itself before it starts serving.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let period = self.ttl / 3;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
            }
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e, "reconciling the kubernetes service endpoints");
            }
        }
        // Bounded: a store that is down must not hold the process.
        match tokio::time::timeout(Duration::from_secs(5), self.remove()).await {
            Ok(Ok(())) => {
                tracing::info!(address = %self.me, "removed from the kubernetes service endpoints")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "removing this server from the kubernetes service endpoints")
            }
            Err(_) => tracing::warn!(
                "removing this server from the kubernetes service endpoints timed out"
            ),
        }
    }

    /// Renew this server's lease, then write the endpoints from every
    /// unexpired lease.
    pub async fn reconcile(&mut self) -> ApiResult<()> {
        self.renew().await?;
        let servers = self.live().await?;
        // This server's own lease was just renewed: listing none means the
        // list is wrong, and the endpoints are left as they are.
        if servers.is_empty() {
            return Err(ApiError::Internal(
                "no API server leases listed in storage, refusing to erase all endpoints for the kubernetes service".into(),
            ));
        }
        self.write(&servers).await
    }

    /// Drop this server's lease and take it out of the endpoints.
    pub async fn remove(&mut self) -> ApiResult<()> {
        match self.api.store.delete(&self.key(), None).await {
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(ApiError::internal(e)),
        }
        let servers = self.live().await?;
        self.write(&servers).await
    }

    async fn renew(&self) -> ApiResult<()> {
        let key = self.key();
        let lease = Bytes::from(
            json!({
                "address": self.me.ip().to_string(),
                "port": self.me.port(),
                "ttlMilliseconds": self.ttl.as_millis() as u64,
                "renewTime": chrono::Utc::now()
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            })
            .to_string(),
        );
        let store = &self.api.store;
        let written = match store.get(&key).await.map_err(ApiError::internal)? {
            Some(kv) => store.update(&key, lease, kv.mod_revision).await,
            None => store.create(&key, lease).await,
        };
        match written {
            Ok(_) => Ok(()),
            // Another server deleted it as expired, or it raced us: the
            // next period renews it.
            Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(ApiError::internal(e)),
        }
    }

    /// The servers whose leases have not expired, deleting those that have.
    async fn live(&mut self) -> ApiResult<Vec<SocketAddr>> {
        let leases = self
            .api
            .store
            .list(LEASES, Default::default())
            .await
            .map_err(ApiError::internal)?;
        let now = Instant::now();
        let mine = self.key();
        let mut live = Vec::new();
        let mut seen = HashMap::new();
        for kv in leases.items {
            let lease: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            let server = lease["address"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .zip(lease["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
                .map(|(ip, port)| SocketAddr::new(ip, port));
            let first_seen = match self.seen.get(&kv.key) {
                Some((revision, at)) if *revision == kv.mod_revision => *at,
                _ => now,
            };
            let ttl = lease["ttlMilliseconds"]
                .as_u64()
                .map_or(self.ttl, Duration::from_millis);
            let expired = kv.key != mine && now.duration_since(first_seen) > ttl;
            match server {
                Some(server) if !expired => {
                    live.push(server);
                    seen.insert(kv.key, (kv.mod_revision, first_seen));
                }
                // Expired, or not a lease at all.
                _ => match self.api.store.delete(&kv.key, Some(kv.mod_revision)).await {
                    Ok(_) => {
                        tracing::info!(key = %kv.key, "removed expired API server lease");
                    }
                    // Renewed or removed since: the next pass looks again.
                    Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
                    Err(e) => return Err(ApiError::internal(e)),
                },
            }
        }
        self.seen = seen;
        Ok(live)
    }

    /// Make the Endpoints and EndpointSlices list exactly `servers`.
    async fn write(&self, servers: &[SocketAddr]) -> ApiResult<()> {
        let subsets = endpoints_subsets(servers);
        self.put("", "v1", "endpoints", SERVICE, |obj| {
            meta_mut(obj).insert("labels".into(), json!({SKIP_MIRROR: "true"}));
            obj["subsets"] = subsets.clone();
        })
        .await?;
        let slices = endpoint_slices(servers);
        for (name, slice) in &slices {
            self.put("discovery.k8s.io", "v1", "endpointslices", name, |obj| {
                meta_mut(obj).insert("labels".into(), json!({SERVICE_NAME: SERVICE}));
                for field in ["addressType", "endpoints", "ports"] {
                    obj[field] = slice[field].clone();
                }
            })
            .await?;
        }
        // Slices for ports no server serves on any more.
        let req = self.api.internal_request(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            Some(NAMESPACE),
            None,
        )?;
        let stored = self
            .api
            .store
            .list(&req.def.key_prefix(Some(NAMESPACE)), Default::default())
            .await
            .map_err(ApiError::internal)?;
        for kv in &stored.items {
            let slice = decode(&req.def, kv)?;
            let name = meta_str(&slice, "name").to_string();
            let ours = slice["metadata"]["labels"][SERVICE_NAME] == SERVICE;
            if !ours || slices.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let one = Request::internal(req.def.clone(), Some(NAMESPACE), Some(&name));
            match self.api.delete_one(&one, name, &json!({})).await {
                Ok(_) | Err(ApiError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Create or update one object of the `kubernetes` Service; `set`
    /// writes the fields this reconciler owns. Nothing is written when
    /// they are already so.
    async fn put(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        name: &str,
        set: impl Fn(&mut Value),
    ) -> ApiResult<()> {
        let req = self
            .api
            .internal_request(group, version, plural, Some(NAMESPACE), Some(name))?;
        for _ in 0..WRITE_ATTEMPTS {
            let updated = self
                .api
                .update_object(&req, |old| {
                    let mut new = old.clone();
                    set(&mut new);
                    if new == *old {
                        return Ok(None);
                    }
                    meta_mut(&mut new).remove("resourceVersion");
                    self.api
                        .fields
                        .record_update(&req.def, Some(old), &mut new, MANAGER, None);
                    Ok(Some(new))
                })
                .await;
            match updated {
                Ok(_) => return Ok(()),
                Err(ApiError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            let kind = req.def.kind.clone();
            let mut obj = json!({
                "apiVersion": req.def.api_version(), "kind": kind,
                "metadata": {"name": name, "namespace": NAMESPACE},
            });
            set(&mut obj);
            match self
                .api
                .create_internal(group, version, plural, Some(NAMESPACE), obj)
                .await
            {
                // Another server created it first: update that one.
                Ok(()) => return Ok(()),
                Err(ApiError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Conflict {
            target: req.target(),
            message: "the object is being written by other API servers; try again".into(),
        })
    }
}

/// Endpoints subsets for `servers`: one subset a port, addresses sorted
/// (kube-apiserver's repacked form; its servers share one port).
fn endpoints_subsets(servers: &[SocketAddr]) -> Value {
    let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
    for s in servers {
        by_port.entry(s.port()).or_default().push(s.ip());
    }
    let subsets: Vec<Value> = by_port
        .into_iter()
        .map(|(port, mut ips)| {
            ips.sort();
            ips.dedup();
            json!({
                "addresses": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
                "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}],
            })
        })
        .collect();
    json!(subsets)
}

/// EndpointSlices for `servers` by name: one an address family and port,
/// IPv4 and lower ports first; the first is `kubernetes`, the others
/// `kubernetes-ipv4-6444` and the like. None without servers: the
/// `kubernetes` slice then lists no endpoints.
fn endpoint_slices(servers: &[SocketAddr]) -> Vec<(String, Value)> {
    let mut groups: BTreeMap<(bool, u16), Vec<IpAddr>> = BTreeMap::new();
    for s in servers {
        groups
            .entry((s.is_ipv6(), s.port()))
            .or_default()
            .push(s.ip());
    }
    if groups.is_empty() {
        return vec![(
            SERVICE.to_string(),
            json!({"addressType": "IPv4", "endpoints": [], "ports": []}),
        )];
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(idx, ((v6, port), mut ips))| {
            ips.sort();
            ips.dedup();
            let family = if v6 { "IPv6" } else { "IPv4" };
            let name = if idx == 0 {
                SERVICE.to_string()
            } else {
                format!("{SERVICE}-{}-{port}", family.to_lowercase())
            };
            let endpoints: Vec<Value> = ips
                .iter()
                .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
                .collect();
            let slice = json!({
                "addressType": family,
                "endpoints": endpoints,
                "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}],
            });
            (name, slice)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// Servers sharing a port share a subset; another port gets its own.
    #[test]
    fn endpoints_group_servers_by_port() {
        let subsets = endpoints_subsets(&addrs(&[
            "10.0.0.2:6443",
            "10.0.0.1:6443",
            "127.0.0.1:7443",
        ]));
        assert_eq!(
            subsets,
            json!([
                {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
                 "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]},
                {"addresses": [{"ip": "127.0.0.1"}],
                 "ports": [{"name": "https", "port": 7443, "protocol": "TCP"}]},
            ])
        );
        assert_eq!(endpoints_subsets(&[]), json!([]));
    }

    /// One slice a family and port, the first named after the Service.
    #[test]
    fn slices_come_one_a_family_and_port() {
        let slices = endpoint_slices(&addrs(&[
            "[fd00::1]:6443",
            "10.0.0.1:6444",
            "10.0.0.2:6443",
        ]));
        let names: Vec<&str> = slices.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["kubernetes", "kubernetes-ipv4-6444", "kubernetes-ipv6-6443"]
        );
        assert_eq!(
            slices[0].1,
            json!({"addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": true}}],
                   "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]})
        );
        assert_eq!(slices[2].1["addressType"], "IPv6");
        let empty = endpoint_slices(&[]);
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].1["endpoints"], json!([]));
    }

    const ENDPOINTS: &str = "/api/v1/namespaces/default/endpoints/kubernetes";

    /// `ADDRESS:PORT` of each member of each group (Endpoints subsets or
    /// EndpointSlices), sorted; `address` points into a member.
    fn members(groups: &Value, members: &str, address: &str) -> Vec<String> {
        let mut listed: Vec<String> = groups
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| {
                let port = g["ports"][0]["port"].clone();
                g[members].as_array().into_iter().flatten().map(move |m| {
                    format!(
                        "{}:{port}",
                        m.pointer(address).and_then(Value::as_str).unwrap_or("")
                    )
                })
            })
            .collect();
        listed.sort();
        listed
    }

    /// Addresses the `kubernetes` Endpoints and its slices list.
    async fn listed(server: &crate::testing::TestServer) -> (Vec<String>, Vec<String>) {
        let eps = server.send("GET", ENDPOINTS, &Value::Null).await;
        let slices = server
            .send(
                "GET",
                "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes",
                &Value::Null,
            )
            .await;
        (
            members(&eps["subsets"], "addresses", "/ip"),
            members(&slices["items"], "endpoints", "/addresses/0"),
        )
    }

    /// Another server's lease adds it to the endpoints; unrenewed, it
    /// drops out after its TTL; removed, it goes at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_follow_the_leases() {
        let ttl = Duration::from_millis(600);
        let server = crate::testing::start_with(|c| c.endpoint_lease_duration = ttl).await;
        let (me, _) = listed(&server).await;
        assert_eq!(me.len(), 1, "{me:?}");
        let eps = server.send("GET", ENDPOINTS, &Value::Null).await;
        assert_eq!(eps["metadata"]["labels"][SKIP_MIRROR], "true");

        let other: SocketAddr = "10.0.0.9:6443".parse().unwrap();
        let mut dead = EndpointLeases::new(server.engine.clone(), other, ttl);
        dead.reconcile().await.unwrap();
        let mut both = vec![me[0].clone(), other.to_string()];
        both.sort();
        assert_eq!(listed(&server).await, (both.clone(), both));

        // Never renewed again: gone within the TTL and two renewal periods
        // of the server that sees it expire.
        let start = std::time::Instant::now();
        loop {
            let now = listed(&server).await;
            if now == (me.clone(), me.clone()) {
                break;
            }
            assert!(start.elapsed() < ttl * 3, "still listed: {now:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(server
            .store
            .get(&format!("{LEASES}{other}"))
            .await
            .unwrap()
            .is_none());

        let mut leaving = EndpointLeases::new(server.engine.clone(), other, ttl);
        leaving.reconcile().await.unwrap();
        assert_eq!(listed(&server).await.0.len(), 2);
        leaving.remove().await.unwrap();
        assert_eq!(listed(&server).await, (me.clone(), me));
    }
}
