//! What the fleet manager deploys and keeps deployed: Tapestry's CRDs, the
//! `tapestry-system` namespace, a tap-agent on every node (a DaemonSet
//! that tolerates every taint, so cordoned and NotReady nodes stay tapped)
//! and the aggregator (a Deployment and its Service, which the taps find
//! through its EndpointSlices).
//!
//! Everything is written with server-side apply as `tapestry-fleet-manager`.
//! Informers on the deployed objects notice an object deleted or its spec
//! edited by hand (its generation, or for kinds without one its
//! resourceVersion, differs from what our last apply left) and apply it
//! again. New images in the fleet manager's configuration roll out as the
//! DaemonSet's and Deployment's own rolling updates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};
use tapestry_proto::heartbeat::NAMESPACE;
use tapestry_runtime::Informer;
use tokio_util::sync::CancellationToken;

use crate::api::objects::FIELD_MANAGER;
use crate::metrics::Metrics;

/// The label every deployed object carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", FIELD_MANAGER);
pub const TAP_AGENT: &str = "tap-agent";
pub const AGGREGATOR: &str = "aggregator";
/// The aggregator's ports, as its Service names them.
pub const GRPC_PORT: u16 = 50051;
/// Where taps and the aggregator keep their certificates (in memory).
const TLS_DIR: &str = "/run/tapestry";
/// The cluster CA, as the kubelet mounts it into every pod.
const CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
pub const HTTP_PORT: u16 = 9090;

/// What runs on the cluster.
#[derive(Clone, Debug)]
pub struct Workloads {
    pub tap_agent_image: String,
    pub aggregator_image: String,
    /// `Always`, `IfNotPresent` or `Never` (images built on the node).
    pub image_pull_policy: String,
    /// Kubeconfigs the tap-agents and the aggregator use, stored as
    /// Secrets; `None`: their ServiceAccount's in-cluster credentials.
    pub tap_agent_kubeconfig: Option<String>,
    pub aggregator_kubeconfig: Option<String>,
}

fn labels(name: &str) -> Value {
    json!({
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "tapestry",
        MANAGED_BY.0: MANAGED_BY.1,
    })
}

/// One object to apply: its kind and its body.
struct Desired {
    resource: ApiResource,
    body: Value,
}

impl Desired {
    fn of<K: Resource<DynamicType = ()>>(body: Value) -> Desired {
        Desired {
            resource: ApiResource::erase::<K>(&()),
            body,
        }
    }

    fn name(&self) -> &str {
        self.body["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn key(&self) -> String {
        format!("{}/{}", self.resource.kind, self.name())
    }
}

/// The credentials a workload's pods use: a kubeconfig in a Secret, or
/// their ServiceAccount.
fn credentials(name: &str, kubeconfig: &Option<String>) -> (Vec<Desired>, Value, Value, Value) {
    let mut objects = vec![Desired::of::<ServiceAccount>(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels(name)},
    }))];
    let Some(kubeconfig) = kubeconfig else {
        return (objects, json!(["--in-cluster"]), json!([]), json!([]));
    };
    let secret = format!("{name}-kubeconfig");
    objects.push(Desired::of::<Secret>(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": secret, "namespace": NAMESPACE, "labels": labels(name)},
        "type": "Opaque",
        "stringData": {"kubeconfig": kubeconfig},
    })));
    (
        objects,
        json!(["--kubeconfig", "/etc/tapestry/kubeconfig"]),
        json!([{"name": "credentials", "mountPath": "/etc/tapestry", "readOnly": true}]),
        json!([{"name": "credentials", "secret": {"secretName": secret, "defaultMode": 0o400}}]),
    )
}

/// Everything deployed, in the order it is applied.
fn desired(w: &Workloads) -> Vec<Desired> {
    let mut out = Vec::new();
    let (objects, tap_credentials, tap_mounts, tap_volumes) =
        credentials(TAP_AGENT, &w.tap_agent_kubeconfig);
    out.extend(objects);
    let (objects, agg_credentials, agg_mounts, agg_volumes) =
        credentials(AGGREGATOR, &w.aggregator_kubeconfig);
    out.extend(objects);
    out.push(Desired::of::<Service>(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": AGGREGATOR, "namespace": NAMESPACE, "labels": labels(AGGREGATOR)},
        "spec": {
            "selector": {"app.kubernetes.io/name": AGGREGATOR},
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP"},
                {"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT, "protocol": "TCP"},
            ],
        },
    })));
    let node_name =
        json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}});
    let pod_ip =
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}});
    // With the pods' own service accounts, taps and the aggregator get
    // certificates from the cluster CA through CertificateSigningRequests,
    // which the controller manager approves only for a pod's own node and
    // addresses: ingest is mutual TLS. With kubeconfigs from outside
    // (no pod behind them) there is nobody to vouch for, and ingest stays
    // plaintext, said so loudly by the aggregator.
    let mutual_tls = w.tap_agent_kubeconfig.is_none() && w.aggregator_kubeconfig.is_none();
    let tls_volume = json!({"name": "tls", "emptyDir": {"medium": "Memory"}});
    let tls_mount = json!({"name": "tls", "mountPath": TLS_DIR});
    let with_tls = |mounts: &Value, volumes: &Value| {
        let mut m = mounts.as_array().cloned().unwrap_or_default();
        let mut v = volumes.as_array().cloned().unwrap_or_default();
        if mutual_tls {
            m.push(tls_mount.clone());
            v.push(tls_volume.clone());
        }
        (m, v)
    };
    let (agg_mounts, agg_volumes) = with_tls(&agg_mounts, &agg_volumes);
    let (tap_mounts, tap_volumes) = with_tls(&tap_mounts, &tap_volumes);
    let mut agg_args = vec![json!("serve")];
    agg_args.extend(agg_credentials.as_array().cloned().unwrap_or_default());
    if mutual_tls {
        agg_args.extend([
            json!("--tls-from-csr"),
            json!(format!("{TLS_DIR}/aggregator.pem")),
            json!("--tls-name"),
            json!("$(POD_IP)"),
            json!("--tls-name"),
            json!(format!("{AGGREGATOR}.{NAMESPACE}.svc")),
            json!("--client-ca"),
            json!(CLUSTER_CA),
            // Tools' bearer tokens never cross the network in the clear.
            json!("--http-tls"),
        ]);
    } else {
        agg_args.push(json!("--insecure"));
    }
    agg_args.extend([
        json!("--grpc"),
        json!(format!("$(POD_IP):{GRPC_PORT}")),
        json!("--http"),
        json!(format!("$(POD_IP):{HTTP_PORT}")),
    ]);
    out.push(Desired::of::<Deployment>(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": AGGREGATOR, "namespace": NAMESPACE, "labels": labels(AGGREGATOR)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": AGGREGATOR}},
            // On the host's network two aggregators would fight for the
            // ports: the old one goes first.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": labels(AGGREGATOR)},
                "spec": {
                    "serviceAccountName": AGGREGATOR,
                    // Tools connect to it on the node (PCAP-over-IP, HTTP).
                    "hostNetwork": true,
                    "containers": [{
                        "name": AGGREGATOR,
                        "image": w.aggregator_image,
                        "imagePullPolicy": w.image_pull_policy,
                        "command": ["/bin/aggregator"],
                        "args": agg_args,
                        "env": [pod_ip],
                        "ports": [
                            {"name": "grpc", "containerPort": GRPC_PORT},
                            {"name": "http", "containerPort": HTTP_PORT},
                        ],
                        // Not the gRPC port: a bare TCP connection is a
                        // failed TLS handshake there, counted as refused.
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": HTTP_PORT,
                            "scheme": if mutual_tls { "HTTPS" } else { "HTTP" }}, "periodSeconds": 2},
                        "volumeMounts": agg_mounts,
                    }],
                    "volumes": agg_volumes,
                },
            },
        },
    })));
    let mut tap_args = vec![json!("run")];
    tap_args.extend(tap_credentials.as_array().cloned().unwrap_or_default());
    tap_args.extend([
        json!("--node"),
        json!("$(NODE_NAME)"),
        json!("--aggregator-service"),
        json!(format!("{NAMESPACE}/{AGGREGATOR}:grpc")),
    ]);
    if mutual_tls {
        tap_args.extend([
            json!("--tls-from-csr"),
            json!(format!("{TLS_DIR}/tap.pem")),
            json!("--tls-ca"),
            json!(CLUSTER_CA),
        ]);
    }
    out.push(Desired::of::<DaemonSet>(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": TAP_AGENT, "namespace": NAMESPACE, "labels": labels(TAP_AGENT)},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": TAP_AGENT}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels(TAP_AGENT)},
                "spec": {
                    "serviceAccountName": TAP_AGENT,
                    // It attaches to the host-side ends of pods' veths.
                    "hostNetwork": true,
                    // Every node, whatever its taints: a cordoned or
                    // NotReady node's pods stay tapped.
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": TAP_AGENT,
                        "image": w.tap_agent_image,
                        "imagePullPolicy": w.image_pull_policy,
                        "command": ["/bin/tap-agent"],
                        "args": tap_args,
                        "env": [node_name],
                        // Loading eBPF programs and attaching them to
                        // interfaces.
                        "securityContext": {"privileged": true},
                        "volumeMounts": tap_mounts,
                    }],
                    "volumes": tap_volumes,
                },
            },
        },
    })));
    out
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Apply one object; returns what the server holds afterwards.
async fn apply(client: &Client, d: &Desired) -> Result<DynamicObject, kube::Error> {
    let ns = d.body["metadata"]["namespace"].as_str();
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &d.resource),
        None => Api::all_with(client.clone(), &d.resource),
    };
    api.patch(d.name(), &apply_params(), &Patch::Apply(&d.body))
        .await
}

/// Retry `f` with backoff until it succeeds or `shutdown`.
async fn retry<T, F, Fut>(what: &str, shutdown: &CancellationToken, f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => tracing::warn!("{what}: {e:#}; retrying in {delay:?}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("{what}: shutting down"),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Install (or update) the TapPolicy and TapTool CRDs and wait until they
/// are served.
pub async fn install_crds(client: &Client, shutdown: &CancellationToken) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in tapestry_proto::crd::crds() {
        let name = crd.name_any();
        let body = serde_json::to_value(&crd)?;
        retry(&format!("installing CRD {name}"), shutdown, || async {
            api.patch(&name, &apply_params(), &Patch::Apply(&body))
                .await
                .map(drop)
                .context("apply")
        })
        .await?;
        retry(&format!("waiting for CRD {name}"), shutdown, || async {
            for _ in 0..100 {
                let crd = api.get(&name).await.context("get")?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::bail!("not Established after 5 s")
        })
        .await?;
    }
    Ok(())
}

/// Make sure `tapestry-system` exists (the taps' Leases and the fleet
/// manager's own leader Lease live there).
pub async fn ensure_namespace(client: &Client, shutdown: &CancellationToken) -> Result<()> {
    let body = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "tapestry"}},
    });
    let d = Desired::of::<k8s_openapi::api::core::v1::Namespace>(body);
    retry(
        &format!("creating namespace {NAMESPACE}"),
        shutdown,
        || async { apply(client, &d).await.map(drop).context("apply") },
    )
    .await
}

/// What our last apply left of an object: its uid and generation (or
/// resourceVersion, for kinds without a generation).
fn fingerprint<K: Resource>(o: &K) -> (String, String) {
    let m = o.meta();
    let version = match m.generation {
        Some(g) => format!("g{g}"),
        None => m.resource_version.clone().unwrap_or_default(),
    };
    (m.uid.clone().unwrap_or_default(), version)
}

/// The deployed objects as their informers see them.
struct Observed {
    daemonsets: Arc<Informer<DaemonSet>>,
    deployments: Arc<Informer<Deployment>>,
    services: Arc<Informer<Service>>,
    serviceaccounts: Arc<Informer<ServiceAccount>>,
    secrets: Arc<Informer<Secret>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Observed {
    fn start(client: &Client, shutdown: &CancellationToken) -> Observed {
        let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
        let config = watcher::Config::default().labels(&selector);
        let changed = Arc::new(tokio::sync::Notify::new());
        fn informer<K>(
            client: &Client,
            config: &watcher::Config,
            changed: &Arc<tokio::sync::Notify>,
            shutdown: &CancellationToken,
        ) -> Arc<Informer<K>>
        where
            K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
                + Clone
                + serde::de::DeserializeOwned
                + std::fmt::Debug
                + Send
                + Sync
                + 'static,
        {
            let i = Informer::new(Api::namespaced(client.clone(), NAMESPACE), config.clone());
            let c = changed.clone();
            i.on_change(move |_, _| c.notify_one());
            i.start(shutdown.clone());
            i
        }
        Observed {
            daemonsets: informer(client, &config, &changed, shutdown),
            deployments: informer(client, &config, &changed, shutdown),
            services: informer(client, &config, &changed, shutdown),
            serviceaccounts: informer(client, &config, &changed, shutdown),
            secrets: informer(client, &config, &changed, shutdown),
            changed,
        }
    }

    async fn ready(&self) {
        self.daemonsets.ready().await;
        self.deployments.ready().await;
        self.services.ready().await;
        self.serviceaccounts.ready().await;
        self.secrets.ready().await;
    }

    /// The fingerprint of the object `d` describes, if it exists.
    fn of(&self, d: &Desired) -> Option<(String, String)> {
        let name = d.name();
        let ns = Some(NAMESPACE);
        match d.resource.kind.as_str() {
            "DaemonSet" => self
                .daemonsets
                .get(ns, name)
                .map(|o| fingerprint(o.as_ref())),
            "Deployment" => self
                .deployments
                .get(ns, name)
                .map(|o| fingerprint(o.as_ref())),
            "Service" => self.services.get(ns, name).map(|o| fingerprint(o.as_ref())),
            "ServiceAccount" => self
                .serviceaccounts
                .get(ns, name)
                .map(|o| fingerprint(o.as_ref())),
            "Secret" => self.secrets.get(ns, name).map(|o| fingerprint(o.as_ref())),
            _ => None,
        }
    }
}

/// Keep the workloads deployed until `shutdown`.
pub async fn run(
    client: Client,
    workloads: Workloads,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let observed = Observed::start(&client, &shutdown);
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = observed.ready() => {}
    }
    let desired = desired(&workloads);
    // What each of our applies left; an object that differs was changed by
    // someone else (or deleted) and is applied again.
    let mut applied: HashMap<String, (String, String)> = HashMap::new();
    let mut failing = false;
    loop {
        let mut failed = false;
        for d in &desired {
            let key = d.key();
            let now = observed.of(d);
            if now.is_some() && now == applied.get(&key).cloned() {
                continue;
            }
            match apply(&client, d).await {
                Ok(o) => {
                    if applied.contains_key(&key) {
                        metrics.restored.inc();
                        tracing::info!(object = %key, "restored");
                    }
                    applied.insert(key, fingerprint(&o));
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(object = %key, "applying: {e}");
                }
            }
        }
        if failed != failing {
            failing = failed;
            if !failed {
                tracing::info!("taps and aggregator deployed");
            }
        }
        let wait = if failed {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(30)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = observed.changed.notified() => {
                // Let the informers catch up with our own writes.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
