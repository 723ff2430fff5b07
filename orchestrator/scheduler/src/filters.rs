//! What a pod asks of a node, and the checks that decide whether a node
//! can take it (the filter plugins of kube-scheduler's default profile that
//! matter here).

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tapestry_runtime::selector::node_selector_matches;

/// Parse a resource quantity ("250m", "1.5", "64Mi", "2Gi", "1e3") into
/// its value in base units.
pub fn quantity(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * mult)
}

/// cpu in millicores, memory in bytes, pods.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Resources {
    pub cpu_milli: i64,
    pub memory: i64,
    pub pods: i64,
}

fn read(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
    let get = |k: &str| map.and_then(|m| m.get(k)).and_then(quantity);
    Resources {
        cpu_milli: get("cpu").map(|c| (c * 1000.0).ceil() as i64).unwrap_or(0),
        memory: get("memory").map(|m| m.ceil() as i64).unwrap_or(0),
        pods: get("pods").map(|p| p as i64).unwrap_or(0),
    }
}

/// A pod's effective request: the sum over its containers, or the largest
/// init container if that is more (init containers run one at a time).
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = pod.spec.as_ref() else {
        return Resources::default();
    };
    let mut sum = Resources::default();
    for c in &spec.containers {
        let r = read(c.resources.as_ref().and_then(|r| r.requests.as_ref()));
        sum.cpu_milli += r.cpu_milli;
        sum.memory += r.memory;
    }
    for c in spec.init_containers.iter().flatten() {
        let r = read(c.resources.as_ref().and_then(|r| r.requests.as_ref()));
        sum.cpu_milli = sum.cpu_milli.max(r.cpu_milli);
        sum.memory = sum.memory.max(r.memory);
    }
    sum.pods = 1;
    sum
}

pub fn allocatable(node: &Node) -> Resources {
    let st = node.status.as_ref();
    read(
        st.and_then(|s| s.allocatable.as_ref())
            .or_else(|| st.and_then(|s| s.capacity.as_ref())),
    )
}

/// (protocol, hostIP, hostPort) a pod claims.
pub fn host_ports(pod: &Pod) -> Vec<(String, String, i32)> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|h| *h > 0)?;
            Some((
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
                port,
            ))
        })
        .collect()
}

pub fn ports_conflict(a: &(String, String, i32), b: &(String, String, i32)) -> bool {
    a.0 == b.0 && a.2 == b.2 && (a.1 == b.1 || a.1 == "0.0.0.0" || b.1 == "0.0.0.0")
}

pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

pub use tapestry_controllers::util::tolerates;

/// The first taint with a scheduling effect the pod does not tolerate.
pub fn untolerated_taint<'a>(pod: &Pod, node: &'a Node) -> Option<&'a Taint> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[]);
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())?
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerates(tolerations, t))
}

/// nodeSelector and required node affinity.
pub fn node_affinity_ok(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    if let Some(sel) = &spec.node_selector {
        let labels = node.metadata.labels.as_ref();
        if sel
            .iter()
            .any(|(k, v)| labels.and_then(|l| l.get(k)) != Some(v))
        {
            return false;
        }
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    match required {
        Some(r) => node_selector_matches(r, node),
        None => true,
    }
}

/// Label selectors of required pod anti-affinity terms on the hostname
/// topology, with the namespaces they apply to.
pub fn hostname_anti_affinity(
    pod: &Pod,
) -> Vec<(
    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    HashSet<String>,
)> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .into_iter()
        .flatten()
        .filter(|t| t.topology_key == "kubernetes.io/hostname")
        .filter_map(|t| {
            let namespaces: HashSet<String> = match t.namespaces.as_ref() {
                Some(n) if !n.is_empty() => n.iter().cloned().collect(),
                _ => [ns.clone()].into(),
            };
            Some((t.label_selector.clone()?, namespaces))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Toleration;

    #[test]
    fn quantities() {
        assert_eq!(quantity(&Quantity("250m".into())), Some(0.25));
        assert_eq!(quantity(&Quantity("2".into())), Some(2.0));
        assert_eq!(
            quantity(&Quantity("64Mi".into())),
            Some(64.0 * 1024.0 * 1024.0)
        );
        assert_eq!(quantity(&Quantity("1e3".into())), Some(1000.0));
        assert_eq!(quantity(&Quantity("1.5G".into())), Some(1.5e9));
        assert_eq!(quantity(&Quantity("bogus".into())), None);
    }

    #[test]
    fn tolerations() {
        let taint = Taint {
            key: "dedicated".into(),
            value: Some("gpu".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let eq = Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("gpu".into()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        };
        assert!(tolerates(std::slice::from_ref(&eq), &taint));
        let other = Toleration {
            value: Some("cpu".into()),
            ..eq.clone()
        };
        assert!(!tolerates(&[other], &taint));
        let all = Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        assert!(tolerates(&[all], &taint));
    }
}
