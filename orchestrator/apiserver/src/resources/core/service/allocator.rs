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
}

const NODE_PORT_MIN: i64 = 30000;
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
        format!("/registry/ipallocations/{ip}")
    }

    fn port_key(port: i64) -> String {
        format!("/registry/nodeportallocations/{port}")
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
        for prefix in ["/registry/ipallocations/", "/registry/nodeportallocations/"] {
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
        let Some(service) = self
            .store
            .get(&format!("/registry/services/{namespace}/{name}"))
            .await
            .map_err(ApiError::internal)?
        else {
            return Ok(false);
        };
        let service: Value = serde_json::from_slice(&service.value).unwrap_or(Value::Null);
        let allocated = &kv.key[prefix.len()..];
        Ok(if prefix.contains("nodeport") {
            service
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .is_some_and(|ports| {
                    ports
                        .iter()
                        .any(|p| i(p, "/nodePort").to_string() == allocated)
                })
        } else {
            s(&service, "/spec/clusterIP") == allocated
        })
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

    /// Allocate what `obj` needs and does not already hold (`held`).
    async fn allocate(
        &self,
        obj: &mut Value,
        held: Option<&Value>,
        dry_run: bool,
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
                "" => self.allocate_ip(&owner, dry_run).await?.to_string(),
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
                obj["spec"]["ports"][idx]["nodePort"] = json!(port);
            }
        }
        Ok(())
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
            .create("/registry/services/ns/web", Bytes::from(held.to_string()))
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
        assert_eq!(count("/registry/ipallocations/").await, 1);
        assert_eq!(count("/registry/nodeportallocations/").await, 1);
        let ip = s(&held, "/spec/clusterIP").to_string();
        assert!(store
            .get(&ServiceAllocator::ip_key(ip.parse().unwrap()))
            .await
            .unwrap()
            .is_some());
        assert_eq!(allocator.repair(&mut suspects).await.unwrap(), 0);
        assert!(suspects.is_empty());
    }
}
