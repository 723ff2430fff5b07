//! Endpoints and EndpointSlices: for every Service with a selector, the
//! addresses of the pods it selects (ready ones as ready, others as not
//! ready), with named target ports resolved per pod. The slice is owned by
//! the Service, so garbage collection removes it with the Service.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::util::{is_ready, is_terminating, owner_ref};
use crate::Ctx;
use tapestry_runtime::{ignore_not_found, key_of, split_key, Queue, Requeue};

/// Ready addresses, not-ready addresses and ports of one Endpoints subset.
type Subset = (Vec<Value>, Vec<Value>, Vec<Value>);

const MANAGER: &str = "endpointslice-controller.k8s.io";
const SERVICE_NAME: &str = "kubernetes.io/service-name";

pub fn setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    let q = queue.clone();
    ctx.services.on_change(move |s, _| q.add(key_of(s)));
    let q = queue.clone();
    let services = ctx.services.clone();
    ctx.pods.on_change(move |p, _| {
        let ns = p.namespace().unwrap_or_default();
        for s in services.list_in(&ns, |s| selects_pod(s, p)) {
            q.add(key_of(s.as_ref()));
        }
    });
}

fn selector(s: &Service) -> Option<&BTreeMap<String, String>> {
    s.spec.as_ref()?.selector.as_ref().filter(|m| !m.is_empty())
}

fn selects_pod(s: &Service, p: &Pod) -> bool {
    selector(s).is_some_and(|sel| sel.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
}

/// The pod's port for a service port: a number, or a named container port.
fn target_port(sp: &ServicePort, pod: &Pod) -> Option<i32> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(i)) => Some(*i),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

fn slice_name(svc: &Service) -> String {
    let d = Sha256::digest(svc.uid().unwrap_or_default().as_bytes());
    let suffix: String = d.iter().take(3).map(|b| format!("{b:02x}")).collect();
    let base: String = svc.name_any().chars().take(56).collect();
    format!("{base}-{suffix}")
}

pub async fn reconcile(ctx: Arc<Ctx>, key: String) -> anyhow::Result<Requeue> {
    let (ns, name) = split_key(&key);
    let ns = ns.unwrap_or_default();
    let ep_api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), ns);
    let Some(svc) = ctx.services.get(Some(ns), name) else {
        // The Service is gone: so is its Endpoints (slices follow by GC).
        if ctx.endpoints.get(Some(ns), name).is_some() {
            ignore_not_found(ep_api.delete(name, &DeleteParams::default()).await)?;
        }
        return Ok(Requeue::Done);
    };
    if selector(&svc).is_none() {
        return Ok(Requeue::Done);
    }
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let pods = ctx.pods.list_in(ns, |p| {
        selects_pod(&svc, p)
            && !is_terminating(p)
            && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
    });
    // Endpoints: pods grouped by their resolved port set.
    let mut subsets: BTreeMap<String, Subset> = BTreeMap::new();
    let mut slice_endpoints = Vec::new();
    let mut slice_ports: Option<Vec<Value>> = None;
    let mut sorted = pods.clone();
    sorted.sort_by_key(|p| p.name_any());
    for p in &sorted {
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        let target = json!({"kind": "Pod", "name": p.name_any(), "namespace": ns, "uid": p.uid()});
        let resolved: Vec<Value> = ports
            .iter()
            .filter_map(|sp| {
                let port = target_port(sp, p)?;
                Some(
                    json!({"name": sp.name.clone().unwrap_or_default(), "port": port,
                            "protocol": sp.protocol.clone().unwrap_or_else(|| "TCP".into())}),
                )
            })
            .collect();
        let mut addr = json!({"ip": ip, "nodeName": node, "targetRef": target});
        // A pod that names this Service as its subdomain (a StatefulSet's
        // pods) is published under its hostname: web-0.web.shop.svc.
        let hostname = p
            .spec
            .as_ref()
            .and_then(|s| (s.subdomain.as_deref() == Some(name)).then(|| s.hostname.clone())?);
        if let Some(h) = &hostname {
            addr["hostname"] = json!(h);
        }
        let entry = subsets
            .entry(
                resolved
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .or_insert_with(|| (Vec::new(), Vec::new(), resolved.clone()));
        let ready = is_ready(p);
        if ready {
            entry.0.push(addr);
        } else {
            entry.1.push(addr);
        }
        slice_ports.get_or_insert(resolved);
        let mut endpoint = json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "nodeName": node,
            "targetRef": target,
        });
        if let Some(h) = hostname {
            endpoint["hostname"] = json!(h);
        }
        slice_endpoints.push(endpoint);
    }
    let subsets: Vec<Value> = subsets
        .into_values()
        .filter(|(r, n, _)| !r.is_empty() || !n.is_empty())
        .map(|(r, n, ports)| {
            let mut s = json!({"ports": ports});
            if !r.is_empty() {
                s["addresses"] = json!(r);
            }
            if !n.is_empty() {
                s["notReadyAddresses"] = json!(n);
            }
            s
        })
        .collect();
    let labels = svc.labels().clone();
    let endpoints = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "subsets": subsets,
    });
    let pp = PatchParams::apply(MANAGER).force();
    let current = ctx.endpoints.get(Some(ns), name);
    let current_subsets = current
        .as_ref()
        .map(|e| serde_json::to_value(e.subsets.clone().unwrap_or_default()).unwrap_or_default())
        .unwrap_or(json!(null));
    if current.is_none() || current_subsets != endpoints["subsets"] {
        ep_api.patch(name, &pp, &Patch::Apply(&endpoints)).await?;
    }

    let slice_name = slice_name(&svc);
    let mut slice_labels = labels;
    slice_labels.insert(SERVICE_NAME.into(), name.into());
    slice_labels.insert(
        "endpointslice.kubernetes.io/managed-by".into(),
        MANAGER.into(),
    );
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice_name, "namespace": ns, "labels": slice_labels,
                     "ownerReferences": [owner_ref(svc.as_ref())]},
        "addressType": "IPv4",
        "endpoints": slice_endpoints,
        "ports": slice_ports.unwrap_or_default(),
    });
    let slice_api: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(ctx.client.clone(), ns);
    let current = ctx.endpointslices.get(Some(ns), &slice_name);
    let same = current.as_ref().is_some_and(|c| {
        serde_json::to_value(&c.endpoints).unwrap_or_default() == slice["endpoints"]
            && serde_json::to_value(c.ports.clone().unwrap_or_default()).unwrap_or_default()
                == slice["ports"]
    });
    if !same {
        slice_api
            .patch(&slice_name, &pp, &Patch::Apply(&slice))
            .await?;
    }
    Ok(Requeue::Done)
}
