//! ClusterIP and NodePort allocation for Services: each allocation is a
//! store key created if absent, shared by every API server on the store.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};
use tapestry_store::{KeyValue, Store, StoreError};
use tokio::sync::Mutex;

use crate::error::{ApiError, ApiResult, Cause, Target};
use crate::registry::WriteHook;
use crate::tables::{i, s};

/// IPv4 range for ClusterIPs.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Range {
    base: u32,
    size: u32,
}

impl Ipv4Range {
    pub fn parse(cidr: &str) -> Result<Self, String> {
        let (ip, bits) = cidr
            .split_once('/')
            .ok_or_else(|| format!("invalid CIDR {cidr:?}: expected ADDRESS/BITS"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|e| format!("invalid CIDR {cidr:?}: {e}"))?;
        let bits: u32 = bits
            .parse()
            .ok()
            .filter(|b| (8..=30).contains(b))
            .ok_or_else(|| format!("invalid CIDR {cidr:?}: prefix length must be 8..30"))?;
        let size = 1u32 << (32 - bits);
        let base = u32::from(ip) & !(size - 1);
        Ok(Ipv4Range { base, size })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v > self.base && v < self.base + self.size - 1
    }

    /// The first usable address (the `kubernetes` Service's ClusterIP).
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// The tenth address, the cluster DNS's (`kube-dns`) ClusterIP as in
    /// kubeadm's clusters.
    pub fn dns(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 10)
    }
}

const NODE_PORT_MIN: i64 = 30000;
/// Store prefixes of the allocations; each key's value names its Service
/// as `namespace/name`.
const IP_ALLOCATIONS: &str = "/registry/ipallocations/";
const NODE_PORT_ALLOCATIONS: &str = "/registry/nodeportallocations/";
const NODE_PORT_MAX: i64 = 32767;

/// Hands out ClusterIPs and NodePorts. Each allocation is a store key
/// created if absent, so two API servers sharing one store never hand out
/// the same address, and a restart loses nothing.
pub struct ServiceAllocator {
    store: Arc<dyn Store>,
    range: Ipv4Range,
    next_ip: Mutex<u32>,
    next_port: Mutex<i64>,
}

impl ServiceAllocator {
    pub fn new(store: Arc<dyn Store>, range: Ipv4Range) -> Self {
        ServiceAllocator {
            store,
            range,
            // Skip the network address and the first address (reserved for
            // the `kubernetes` Service).
            next_ip: Mutex::new(2),
            next_port: Mutex::new(NODE_PORT_MIN),
        }
    }

    fn ip_key(ip: Ipv4Addr) -> String {
        format!("{IP_ALLOCATIONS}{ip}")
    }

    fn port_key(port: i64) -> String {
        format!("{NODE_PORT_ALLOCATIONS}{port}")
    }

    async fn claim(&self, key: String, owner: &str, dry_run: bool) -> Result<bool, ApiError> {
        if dry_run {
            return Ok(self
                .store
                .get(&key)
                .await
                .map_err(ApiError::internal)?
                .is_none());
        }
        match self
            .store
            .create(&key, Bytes::from(owner.to_string()))
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(ApiError::internal(e)),
        }
    }

    async fn release_key(&self, key: String) {
        if let Err(e) = self.store.delete(&key, None).await {
            if !matches!(e, StoreError::NotFound(_)) {
                tracing::warn!(%key, error = %e, "could not release allocation");
            }
        }
    }

    async fn allocate_ip(&self, owner: &str, dry_run: bool) -> ApiResult<Ipv4Addr> {
        let mut next = self.next_ip.lock().await;
        let usable = self.range.size - 2;
        for _ in 0..usable {
            let offset = *next;
            *next = if offset + 1 >= self.range.size - 1 {
                1
            } else {
                offset + 1
            };
            let ip = Ipv4Addr::from(self.range.base + offset);
            if self.claim(Self::ip_key(ip), owner, dry_run).await? {
                return Ok(ip);
            }
        }
        Err(ApiError::Internal(
            "no ClusterIPs left in the service CIDR".into(),
        ))
    }

    async fn allocate_port(&self, owner: &str, dry_run: bool) -> ApiResult<i64> {
        let mut next = self.next_port.lock().await;
        for _ in NODE_PORT_MIN..=NODE_PORT_MAX {
            let port = *next;
            *next = if port >= NODE_PORT_MAX {
                NODE_PORT_MIN
            } else {
                port + 1
            };
            if self.claim(Self::port_key(port), owner, dry_run).await? {
                return Ok(port);
            }
        }
        Err(ApiError::Internal(
            "no NodePorts left in 30000-32767".into(),
        ))
    }

    /// Release allocations no Service holds: left behind when the server
    /// stopped between claiming and storing a Service, or between deleting
    /// one and releasing what it held. A leak found by one pass (`suspects`)
    /// is released by the next pass only if it is unchanged, so a claim whose
    /// Service write is still in flight is never taken away. Returns how
    /// many allocations were released.
    pub async fn repair(&self, suspects: &mut HashMap<String, i64>) -> ApiResult<usize> {
        let mut leaked = HashMap::new();
        let mut released = 0;
        for prefix in [IP_ALLOCATIONS, NODE_PORT_ALLOCATIONS] {
            let allocations = self
                .store
                .list(prefix, Default::default())
                .await
                .map_err(ApiError::internal)?;
            for kv in allocations.items {
                if self.allocation_is_held(prefix, &kv).await? {
                    continue;
                }
                if suspects.get(&kv.key) == Some(&kv.mod_revision) {
                    match self.store.delete(&kv.key, Some(kv.mod_revision)).await {
                        Ok(_) => {
                            tracing::info!(key = %kv.key, "released leaked service allocation");
                            released += 1;
                        }
                        // Changed or gone since: the next pass looks again.
                        Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
                        Err(e) => return Err(ApiError::internal(e)),
                    }
                } else {
                    leaked.insert(kv.key, kv.mod_revision);
                }
            }
        }
        *suspects = leaked;
        Ok(released)
    }

    /// Whether the Service named in an allocation still holds it.
    async fn allocation_is_held(&self, prefix: &str, kv: &KeyValue) -> ApiResult<bool> {
        let owner = String::from_utf8_lossy(&kv.value);
        let Some((namespace, name)) = owner.split_once('/') else {
            return Ok(false);
        };
        // The key the Service registry writes: a copy of its layout once
        // went stale and every allocation looked leaked.
        let Some(service) = self
            .store
            .get(&super::storage_key(namespace, name))
            .await
            .map_err(ApiError::internal)?
        else {
            return Ok(false);
        };
        let service: Value = serde_json::from_slice(&service.value).unwrap_or(Value::Null);
        Ok(holds(&service, prefix, &kv.key[prefix.len()..]))
    }

    fn invalid(obj: &Value, causes: Vec<Cause>) -> ApiError {
        ApiError::Invalid {
            target: Target {
                group: String::new(),
                resource: "services".into(),
                kind: "Service".into(),
                name: s(obj, "/metadata/name").to_string(),
            },
            causes,
        }
    }

    /// Allocate what `obj` needs and does not already hold (`held`). A
    /// Service refused on the way (its second NodePort is taken) keeps
    /// nothing it claimed before.
    async fn allocate(
        &self,
        obj: &mut Value,
        held: Option<&Value>,
        dry_run: bool,
    ) -> ApiResult<()> {
        let mut claimed = Vec::new();
        let result = self.claim_all(obj, held, dry_run, &mut claimed).await;
        if result.is_err() && !dry_run {
            for key in claimed {
                self.release_key(key).await;
            }
        }
        result
    }

    /// [`Self::allocate`], recording the keys it claims in `claimed`.
    async fn claim_all(
        &self,
        obj: &mut Value,
        held: Option<&Value>,
        dry_run: bool,
        claimed: &mut Vec<String>,
    ) -> ApiResult<()> {
        let owner = format!(
            "{}/{}",
            s(obj, "/metadata/namespace"),
            s(obj, "/metadata/name")
        );
        let kind = s(obj, "/spec/type").to_string();
        let held_ip = held
            .map(|h| s(h, "/spec/clusterIP").to_string())
            .unwrap_or_default();
        if kind == "ExternalName" {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("clusterIP");
                spec.remove("clusterIPs");
            }
        } else {
            let requested = s(obj, "/spec/clusterIP").to_string();
            let ip = match requested.as_str() {
                "None" => "None".to_string(),
                "" if !held_ip.is_empty() && held_ip != "None" => held_ip.clone(),
                "" => {
                    let ip = self.allocate_ip(&owner, dry_run).await?;
                    claimed.push(Self::ip_key(ip));
                    ip.to_string()
                }
                wanted if wanted == held_ip => wanted.to_string(),
                wanted => {
                    let parsed: Option<Ipv4Addr> = wanted.parse().ok();
                    let Some(addr) = parsed.filter(|a| self.range.contains(*a)) else {
                        return Err(Self::invalid(obj, vec![Cause::invalid(
                            "spec.clusterIPs[0]",
                            &json!(wanted),
                            "provided IP is not in the valid range. The range of valid IPs is the service CIDR",
                        )]));
                    };
                    if !self.claim(Self::ip_key(addr), &owner, dry_run).await? {
                        return Err(Self::invalid(
                            obj,
                            vec![Cause::invalid(
                                "spec.clusterIPs",
                                &json!([wanted]),
                                "failed to allocate IP: provided IP is already allocated",
                            )],
                        ));
                    }
                    claimed.push(Self::ip_key(addr));
                    wanted.to_string()
                }
            };
            obj["spec"]["clusterIP"] = json!(ip);
            obj["spec"]["clusterIPs"] = json!([ip]);
        }
        let held_ports: HashSet<i64> = held
            .and_then(|h| h.pointer("/spec/ports"))
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .map(|p| i(p, "/nodePort"))
                    .filter(|p| *p != 0)
                    .collect()
            })
            .unwrap_or_default();
        if matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
            let count = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            for idx in 0..count {
                let pointer = format!("/spec/ports/{idx}/nodePort");
                let wanted = obj.pointer(&pointer).and_then(Value::as_i64).unwrap_or(0);
                if wanted != 0 && held_ports.contains(&wanted) {
                    continue;
                }
                let port = if wanted == 0 {
                    self.allocate_port(&owner, dry_run).await?
                } else if !(NODE_PORT_MIN..=NODE_PORT_MAX).contains(&wanted) {
                    return Err(Self::invalid(obj, vec![Cause::invalid(
                        format!("spec.ports[{idx}].nodePort"),
                        &json!(wanted),
                        "provided port is not in the valid range. The range of valid ports is 30000-32767",
                    )]));
                } else if !self.claim(Self::port_key(wanted), &owner, dry_run).await? {
                    return Err(Self::invalid(
                        obj,
                        vec![Cause::invalid(
                            format!("spec.ports[{idx}].nodePort"),
                            &json!(wanted),
                            "provided port is already allocated",
                        )],
                    ));
                } else {
                    wanted
                };
                claimed.push(Self::port_key(port));
                obj["spec"]["ports"][idx]["nodePort"] = json!(port);
            }
        }
        Ok(())
    }
}

/// Whether `service` holds the allocation `allocated` (an address or a port
/// number) under `prefix`: an address in `spec.clusterIP` or in any family
/// of `spec.clusterIPs`, a port as any of its ports' `nodePort`.
fn holds(service: &Value, prefix: &str, allocated: &str) -> bool {
    let listed = |pointer: &str, field: &dyn Fn(&Value) -> String| {
        service
            .pointer(pointer)
            .and_then(Value::as_array)
            .is_some_and(|items| items.iter().any(|v| field(v) == allocated))
    };
    if prefix == NODE_PORT_ALLOCATIONS {
        listed("/spec/ports", &|p| i(p, "/nodePort").to_string())
    } else {
        s(service, "/spec/clusterIP") == allocated
            || listed("/spec/clusterIPs", &|ip| {
                ip.as_str().unwrap_or_default().to_string()
            })
    }
}

#[async_trait]
impl WriteHook for ServiceAllocator {
    async fn on_create(&self, obj: &mut Value, dry_run: bool) -> ApiResult<()> {
        self.allocate(obj, None, dry_run).await
    }

    async fn on_update(&self, new: &mut Value, old: &Value, dry_run: bool) -> ApiResult<()> {
        self.allocate(new, Some(old), dry_run).await
    }

    async fn release(&self, obj: &Value, keep: Option<&Value>) {
        let ip = s(obj, "/spec/clusterIP");
        let keep_ip = keep.map(|k| s(k, "/spec/clusterIP")).unwrap_or("");
        if let Ok(addr) = ip.parse::<Ipv4Addr>() {
            if ip != keep_ip {
                self.release_key(Self::ip_key(addr)).await;
            }
        }
        let kept: HashSet<i64> = keep
            .and_then(|k| k.pointer("/spec/ports"))
            .and_then(Value::as_array)
            .map(|ps| ps.iter().map(|p| i(p, "/nodePort")).collect())
            .unwrap_or_default();
        for p in obj
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let port = i(p, "/nodePort");
            if port != 0 && !kept.contains(&port) {
                self.release_key(Self::port_key(port)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapestry_store::RedbStore;

    /// An allocation whose Service never got stored is released on the
    /// second repair pass; allocations Services hold are kept.
    #[tokio::test]
    async fn repair_releases_only_leaked_allocations() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path().join("s.redb")).unwrap());
        let allocator =
            ServiceAllocator::new(store.clone(), Ipv4Range::parse("10.96.0.0/12").unwrap());
        let mut held = json!({
            "metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "NodePort", "ports": [{"port": 80}]},
        });
        allocator.allocate(&mut held, None, false).await.unwrap();
        store
            .create(
                &super::super::storage_key("ns", "web"),
                Bytes::from(held.to_string()),
            )
            .await
            .unwrap();
        // A claim whose Service write never happened.
        let mut lost = json!({
            "metadata": {"namespace": "ns", "name": "lost"},
            "spec": {"type": "NodePort", "ports": [{"port": 80}]},
        });
        allocator.allocate(&mut lost, None, false).await.unwrap();

        let count = |prefix: &'static str| {
            let store = store.clone();
            async move {
                store
                    .list(prefix, Default::default())
                    .await
                    .unwrap()
                    .items
                    .len()
            }
        };
        let mut suspects = HashMap::new();
        assert_eq!(allocator.repair(&mut suspects).await.unwrap(), 0);
        assert_eq!(suspects.len(), 2, "the lost IP and NodePort are suspected");
        assert_eq!(allocator.repair(&mut suspects).await.unwrap(), 2);
        assert_eq!(count(IP_ALLOCATIONS).await, 1);
        assert_eq!(count(NODE_PORT_ALLOCATIONS).await, 1);
        let ip = s(&held, "/spec/clusterIP").to_string();
        assert!(store
            .get(&ServiceAllocator::ip_key(ip.parse().unwrap()))
            .await
            .unwrap()
            .is_some());
        assert_eq!(allocator.repair(&mut suspects).await.unwrap(), 0);
        assert!(suspects.is_empty());
    }

    /// The allocator looks a Service up where the registry stores it.
    #[test]
    fn services_are_looked_up_where_they_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path().join("s.redb")).unwrap());
        let allocator = Arc::new(ServiceAllocator::new(
            store,
            Ipv4Range::parse("10.96.0.0/12").unwrap(),
        ));
        let def = super::super::definition(allocator);
        assert_eq!(
            def.key(Some("ns"), "web"),
            super::super::storage_key("ns", "web")
        );
    }

    /// An address is held in `clusterIP` or in any family of `clusterIPs`;
    /// a port by any of the ports.
    #[test]
    fn a_service_holds_every_address_and_node_port_it_lists() {
        let service = json!({"spec": {
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00::10"],
            "ports": [{"port": 80, "nodePort": 30080}, {"port": 443, "nodePort": 30443}],
        }});
        for ip in ["10.96.0.10", "fd00::10"] {
            assert!(holds(&service, IP_ALLOCATIONS, ip), "{ip}");
        }
        assert!(!holds(&service, IP_ALLOCATIONS, "10.96.0.11"));
        for port in ["30080", "30443"] {
            assert!(holds(&service, NODE_PORT_ALLOCATIONS, port), "{port}");
        }
        assert!(!holds(&service, NODE_PORT_ALLOCATIONS, "30081"));
        assert!(!holds(&service, NODE_PORT_ALLOCATIONS, "10.96.0.10"));
    }

    /// The repair pass keeps what the bootstrap `kubernetes` Service and a
    /// NodePort Service hold while it releases a leak, so their ClusterIPs
    /// and NodePort stay refused to others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repair_passes_keep_what_services_hold() {
        let server = crate::testing::start_with(|c| {
            c.allocation_repair_interval = std::time::Duration::from_millis(50);
        })
        .await;
        let services = "/api/v1/namespaces/default/services";
        let web = server
            .send(
                "POST",
                services,
                &json!({"metadata": {"name": "web"},
                        "spec": {"type": "NodePort", "ports": [{"port": 80}]}}),
            )
            .await;
        let web_ip = s(&web, "/spec/clusterIP").to_string();
        let web_port = i(&web, "/spec/ports/0/nodePort");
        // A leak, released by the second pass that sees it: once it is
        // gone, passes have run over every allocation.
        let ghost = ServiceAllocator::ip_key("10.96.0.77".parse().unwrap());
        server
            .store
            .create(&ghost, Bytes::from("default/ghost"))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while server.store.get(&ghost).await.unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the leak was not released"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Two more passes, each of which would release a held allocation
        // it had suspected on the pass before.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let mut held = server.api_store_keys(IP_ALLOCATIONS).await;
        held.extend(server.api_store_keys(NODE_PORT_ALLOCATIONS).await);
        held.sort();
        // The bootstrap Services' (`kubernetes`, `kube-dns`) and web's.
        let mut expected = vec![
            format!("{IP_ALLOCATIONS}10.96.0.1"),
            format!("{IP_ALLOCATIONS}10.96.0.10"),
            format!("{IP_ALLOCATIONS}{web_ip}"),
            format!("{NODE_PORT_ALLOCATIONS}{web_port}"),
        ];
        expected.sort();
        assert_eq!(held, expected);

        for (name, spec) in [
            (
                "dup-ip",
                json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}),
            ),
            (
                "dup-web-ip",
                json!({"clusterIP": web_ip, "ports": [{"port": 80}]}),
            ),
        ] {
            let (code, answer) = server
                .request(
                    "POST",
                    services,
                    &json!({"metadata": {"name": name}, "spec": spec}),
                )
                .await;
            assert_eq!(code, http::StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
            assert_eq!(
                answer["message"],
                format!(
                    "Service \"{name}\" is invalid: spec.clusterIPs: Invalid value: [\"{}\"]: failed to allocate IP: provided IP is already allocated",
                    s(&spec, "/clusterIP")
                ),
            );
        }
        let (code, answer) = server
            .request(
                "POST",
                services,
                &json!({"metadata": {"name": "dup-port"},
                        "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": web_port}]}}),
            )
            .await;
        assert_eq!(code, http::StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap_or_default()
                .ends_with("provided port is already allocated"),
            "{answer}"
        );
    }

    /// A create naming an existing Service is a 409 AlreadyExists, whatever
    /// it asks for, and allocates nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creating_an_existing_service_allocates_nothing() {
        let server = crate::testing::start().await;
        let services = "/api/v1/namespaces/default/services";
        let before = (
            server.api_store_keys(IP_ALLOCATIONS).await,
            server.api_store_keys(NODE_PORT_ALLOCATIONS).await,
        );
        for spec in [
            // What the bootstrap of a second server asks for.
            json!({"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}),
            json!({"type": "NodePort", "clusterIP": "10.96.0.50",
                   "ports": [{"port": 80, "nodePort": 30050}]}),
            json!({"type": "NodePort", "ports": [{"port": 80}]}),
        ] {
            let (code, answer) = server
                .request(
                    "POST",
                    services,
                    &json!({"metadata": {"name": "kubernetes"}, "spec": spec}),
                )
                .await;
            assert_eq!(code, http::StatusCode::CONFLICT, "{answer}");
            assert_eq!(answer["reason"], "AlreadyExists", "{answer}");
            assert_eq!(
                answer["message"], "services \"kubernetes\" already exists",
                "{answer}"
            );
        }
        let after = (
            server.api_store_keys(IP_ALLOCATIONS).await,
            server.api_store_keys(NODE_PORT_ALLOCATIONS).await,
        );
        assert_eq!(before, after);
    }

    /// A Service refused for its second NodePort keeps neither the
    /// ClusterIP nor the first NodePort it claimed on the way.
    #[tokio::test]
    async fn a_refused_service_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path().join("s.redb")).unwrap());
        let allocator =
            ServiceAllocator::new(store.clone(), Ipv4Range::parse("10.96.0.0/12").unwrap());
        let mut first = json!({
            "metadata": {"namespace": "ns", "name": "first"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30100}]},
        });
        allocator.allocate(&mut first, None, false).await.unwrap();
        let keys = || async {
            let mut keys = Vec::new();
            for prefix in [IP_ALLOCATIONS, NODE_PORT_ALLOCATIONS] {
                let list = store.list(prefix, Default::default()).await.unwrap();
                keys.extend(list.items.into_iter().map(|kv| kv.key));
            }
            keys
        };
        let before = keys().await;
        let mut refused = json!({
            "metadata": {"namespace": "ns", "name": "refused"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.60",
                     "ports": [{"port": 80, "nodePort": 30101}, {"port": 81, "nodePort": 30100}]},
        });
        let err = allocator
            .allocate(&mut refused, None, false)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("provided port is already allocated"),
            "{err}"
        );
        assert_eq!(keys().await, before);
    }
}
