//! Node IPAM: every node gets a /24 `spec.podCIDR` (and `podCIDRs`) out of
//! the cluster CIDR, as kube-controller-manager's range allocator does.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::Ctx;
use tapestry_runtime::{key_of, lock, Queue, Requeue};

/// The prefix length of each node's range.
pub const NODE_MASK: u8 = 24;

/// A cluster CIDR carved into /24s.
#[derive(Clone, Copy, Debug)]
pub struct ClusterCidr {
    base: u32,
    prefix: u8,
}

impl ClusterCidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("--cluster-cidr {s:?}: expected ADDRESS/PREFIX"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|e| format!("--cluster-cidr {s:?}: {e}"))?;
        let prefix: u8 = len
            .parse()
            .map_err(|e| format!("--cluster-cidr {s:?}: prefix: {e}"))?;
        if !(8..=NODE_MASK).contains(&prefix) {
            return Err(format!(
                "--cluster-cidr {s:?}: prefix must be between /8 and /{NODE_MASK}"
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(ClusterCidr {
            base: u32::from(ip) & mask,
            prefix,
        })
    }

    pub fn subnets(&self) -> u32 {
        1 << (NODE_MASK - self.prefix)
    }

    fn subnet(&self, i: u32) -> String {
        let ip = Ipv4Addr::from(self.base + (i << (32 - NODE_MASK)));
        format!("{ip}/{NODE_MASK}")
    }

    fn index_of(&self, cidr: &str) -> Option<u32> {
        let ip: Ipv4Addr = cidr.split_once('/')?.0.parse().ok()?;
        let off = u32::from(ip).checked_sub(self.base)? >> (32 - NODE_MASK);
        (off < self.subnets()).then_some(off)
    }
}

/// Which subnets are taken, and where the next search starts.
#[derive(Default)]
pub struct Allocations {
    used: Mutex<(HashSet<u32>, u32)>,
}

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    let c = ctx.clone();
    ctx.nodes.on_change(move |n, deleted| {
        let cidr = n.spec.as_ref().and_then(|s| s.pod_cidr.as_deref());
        match cidr.and_then(|c2| c.config.cluster_cidr.index_of(c2)) {
            Some(i) if deleted => {
                lock(&c.ipam.used).0.remove(&i);
            }
            Some(i) => {
                lock(&c.ipam.used).0.insert(i);
            }
            None if !deleted => q.add(key_of(n)),
            None => {}
        }
    });
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let Some(node) = ctx.nodes.get(None, &key) else {
        return Ok(Requeue::Done);
    };
    if node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_ref())
        .is_some()
    {
        return Ok(Requeue::Done);
    }
    let cidr = ctx.config.cluster_cidr;
    let index = {
        let mut st = lock(&ctx.ipam.used);
        let n = cidr.subnets();
        let start = st.1;
        let free = (0..n).map(|k| (start + k) % n).find(|i| !st.0.contains(i));
        if let Some(i) = free {
            st.0.insert(i);
            st.1 = (i + 1) % n;
        }
        free
    };
    let Some(index) = index else {
        ctx.recorder.record(
            node.as_ref(),
            true,
            "CIDRNotAvailable",
            format!("Node {key} status is now: CIDRNotAvailable"),
        );
        anyhow::bail!("no free /{NODE_MASK} left in the cluster CIDR for node {key}");
    };
    let subnet = cidr.subnet(index);
    let api: Api<Node> = Api::all(ctx.client.clone());
    let patch = json!({"spec": {"podCIDR": subnet, "podCIDRs": [subnet]}});
    if let Err(e) = api
        .patch(&key, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        lock(&ctx.ipam.used).0.remove(&index);
        return Err(e.into());
    }
    ctx.recorder.record(
        node.as_ref(),
        false,
        "CIDRAssignmentSucceeded",
        format!("Node {key} assigned pod CIDR {subnet}"),
    );
    Ok(Requeue::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carves_slash_24s() {
        let c = ClusterCidr::parse("10.244.0.0/16").unwrap();
        assert_eq!(c.subnets(), 256);
        assert_eq!(c.subnet(0), "10.244.0.0/24");
        assert_eq!(c.subnet(3), "10.244.3.0/24");
        assert_eq!(c.index_of("10.244.3.0/24"), Some(3));
        assert_eq!(c.index_of("10.245.0.0/24"), None);
        assert!(ClusterCidr::parse("10.0.0.0/25").is_err());
        assert!(ClusterCidr::parse("nonsense").is_err());
    }
}
