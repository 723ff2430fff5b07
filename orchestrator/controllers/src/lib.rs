//! Tapestry's controller manager. Each controller is a small module with a
//! `setup` (which changes wake which keys) and an idempotent `reconcile`
//! (make the world match the spec for one key); they share one informer per
//! resource and talk to the API server through kube-rs like any client.

pub mod util;

mod certificates;
mod clock;
mod cronjob;
mod daemonset;
mod deployment;
mod disruption;
mod endpoints;
mod gc;
mod history;
mod hpa;
mod ipam;
mod job;
mod namespace;
mod nodelifecycle;
mod persistentvolume;
mod replicaset;
mod resourcequota;
mod serviceaccount;
mod statefulset;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Endpoints, Namespace, Node, Pod, ReplicationController, ResourceQuota, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

pub use certificates::Signer;
pub use clock::Clock;
pub use ipam::ClusterCidr;

use tapestry_runtime::{key_of, Informer, Queue, Requeue};

/// Distinct keys a controller's queue holds at most.
const QUEUE_CAPACITY: usize = 100_000;
/// How often every object is reconciled again regardless of events.
const RESYNC: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Config {
    pub cluster_cidr: ClusterCidr,
    /// A node silent for this long turns Ready=Unknown.
    pub node_monitor_grace_period: Duration,
    /// How often node health is checked.
    pub node_monitor_period: Duration,
    /// The cluster CA (PEM), published in every namespace as the
    /// `kube-root-ca.crt` ConfigMap pods' in-cluster clients trust.
    pub root_ca: Option<String>,
    /// The cluster CA's certificate and key: approved certificate signing
    /// requests are signed with it. None: nothing is signed here.
    pub signer: Option<Signer>,
    /// The time controllers act on (the system's but in tests).
    pub clock: Clock,
    /// How often each HorizontalPodAutoscaler is evaluated.
    pub hpa_sync_period: Duration,
    /// How long an autoscaler without its own scale-down behaviour looks
    /// back before scaling down (the highest recent recommendation holds).
    pub hpa_downscale_stabilization: Duration,
}

/// Shared state of all controllers.
pub struct Ctx {
    pub client: Client,
    pub config: Config,
    pub recorder: tapestry_runtime::events::Recorder,
    pub pods: Arc<Informer<Pod>>,
    pub nodes: Arc<Informer<Node>>,
    pub replicasets: Arc<Informer<ReplicaSet>>,
    pub replicationcontrollers: Arc<Informer<ReplicationController>>,
    pub deployments: Arc<Informer<Deployment>>,
    pub namespaces: Arc<Informer<Namespace>>,
    pub serviceaccounts: Arc<Informer<ServiceAccount>>,
    pub leases: Arc<Informer<Lease>>,
    pub daemonsets: Arc<Informer<DaemonSet>>,
    pub statefulsets: Arc<Informer<StatefulSet>>,
    pub controllerrevisions: Arc<Informer<ControllerRevision>>,
    pub jobs: Arc<Informer<Job>>,
    pub cronjobs: Arc<Informer<CronJob>>,
    pub services: Arc<Informer<Service>>,
    pub endpoints: Arc<Informer<Endpoints>>,
    pub endpointslices: Arc<Informer<EndpointSlice>>,
    pub csrs: Arc<Informer<CertificateSigningRequest>>,
    pub budgets: Arc<Informer<PodDisruptionBudget>>,
    pub quotas: Arc<Informer<ResourceQuota>>,
    pub hpas: Arc<Informer<HorizontalPodAutoscaler>>,
    pub volumes: persistentvolume::Informers,
    rs_expectations: replicaset::Expectations,
    job_released: job::Released,
    hpa_states: hpa::States,
    ipam: ipam::Allocations,
    gc_kinds: gc::Kinds,
    discovery: std::sync::Mutex<Option<(std::time::Instant, Vec<kube::api::ApiResource>)>>,
}

fn keys<K: kube::Resource<DynamicType = ()> + Clone + 'static>(i: &Informer<K>) -> Vec<String> {
    i.store.state().iter().map(|o| key_of(o.as_ref())).collect()
}

/// Run every controller until `shutdown`.
pub async fn run(client: Client, config: Config, shutdown: CancellationToken) {
    let all = watcher::Config::default();
    let pods = Informer::new(Api::all(client.clone()), all.clone());
    let nodes = Informer::new(Api::all(client.clone()), all.clone());
    let replicasets = Informer::new(Api::all(client.clone()), all.clone());
    let replicationcontrollers = Informer::new(Api::all(client.clone()), all.clone());
    let deployments = Informer::new(Api::all(client.clone()), all.clone());
    let namespaces = Informer::new(Api::all(client.clone()), all.clone());
    let serviceaccounts = Informer::new(Api::all(client.clone()), all.clone());
    let leases = Informer::new(
        Api::namespaced(client.clone(), "kube-node-lease"),
        all.clone(),
    );
    let daemonsets = Informer::new(Api::all(client.clone()), all.clone());
    let statefulsets = Informer::new(Api::all(client.clone()), all.clone());
    let controllerrevisions = Informer::new(Api::all(client.clone()), all.clone());
    let jobs = Informer::new(Api::all(client.clone()), all.clone());
    let cronjobs = Informer::new(Api::all(client.clone()), all.clone());
    let services = Informer::new(Api::all(client.clone()), all.clone());
    let endpoints = Informer::new(Api::all(client.clone()), all.clone());
    let endpointslices = Informer::new(Api::all(client.clone()), all.clone());
    let csrs = Informer::new(Api::all(client.clone()), all.clone());
    let budgets = Informer::new(Api::all(client.clone()), all.clone());
    let quotas = Informer::new(Api::all(client.clone()), all.clone());
    let hpas = Informer::new(Api::all(client.clone()), all.clone());
    let volumes = persistentvolume::Informers::new(&client);
    let gc_kinds = gc::Kinds::new(vec![
        gc::Tracked::new(&daemonsets, true),
        gc::Tracked::new(&statefulsets, true),
        gc::Tracked::new(&volumes.claims, true),
        gc::Tracked::new(&controllerrevisions, true),
        gc::Tracked::new(&jobs, true),
        gc::Tracked::new(&cronjobs, true),
        gc::Tracked::new(&services, true),
        gc::Tracked::new(&endpointslices, true),
        gc::Tracked::new(&pods, true),
        gc::Tracked::new(&replicasets, true),
        gc::Tracked::new(&replicationcontrollers, true),
        gc::Tracked::new(&deployments, true),
        gc::Tracked::new(&nodes, false),
    ]);
    let ctx = Arc::new(Ctx {
        recorder: tapestry_runtime::events::Recorder::new(client.clone(), "controller-manager"),
        pods,
        nodes,
        replicasets,
        replicationcontrollers,
        deployments,
        namespaces,
        serviceaccounts,
        leases,
        daemonsets,
        statefulsets,
        controllerrevisions,
        jobs,
        cronjobs,
        services,
        endpoints,
        endpointslices,
        csrs,
        budgets,
        quotas,
        hpas,
        volumes,
        rs_expectations: Default::default(),
        job_released: Default::default(),
        hpa_states: Default::default(),
        ipam: Default::default(),
        gc_kinds,
        discovery: Default::default(),
        client,
        config,
    });
    let mut tasks = tokio::task::JoinSet::new();
    {
        let mut spawn = |name: &'static str,
                         setup: fn(&Arc<Ctx>, &Arc<Queue>),
                         keys: fn(&Ctx) -> Vec<String>,
                         reconcile: fn(Arc<Ctx>, String) -> Reconcile| {
            let queue = Queue::new(QUEUE_CAPACITY);
            setup(&ctx, &queue);
            let c = ctx.clone();
            let c2 = ctx.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move {
                c.pods.ready().await;
                tapestry_runtime::run_worker(
                    name,
                    queue,
                    stop,
                    RESYNC,
                    move || keys(&c2),
                    move |k| reconcile(c.clone(), k),
                )
                .await
            });
        };
        spawn(
            "replicaset",
            replicaset::setup::<ReplicaSet>,
            |c| keys(&c.replicasets),
            |c, k| Box::pin(replicaset::reconcile::<ReplicaSet>(c, k)),
        );
        spawn(
            "replicationcontroller",
            replicaset::setup::<ReplicationController>,
            |c| keys(&c.replicationcontrollers),
            |c, k| Box::pin(replicaset::reconcile::<ReplicationController>(c, k)),
        );
        spawn(
            "deployment",
            deployment::setup,
            |c| keys(&c.deployments),
            |c, k| Box::pin(deployment::reconcile(c, k)),
        );
        spawn(
            "nodeipam",
            ipam::setup,
            |c| keys(&c.nodes),
            |c, k| Box::pin(ipam::reconcile(c, k)),
        );
        spawn("garbagecollector", gc_setup, gc::all_keys, |c, k| {
            Box::pin(gc::reconcile(c, k))
        });
        spawn(
            "namespace",
            namespace::setup,
            |c| keys(&c.namespaces),
            |c, k| Box::pin(namespace::reconcile(c, k)),
        );
        spawn(
            "daemonset",
            daemonset::setup,
            |c| keys(&c.daemonsets),
            |c, k| Box::pin(daemonset::reconcile(c, k)),
        );
        spawn(
            "statefulset",
            statefulset::setup,
            |c| keys(&c.statefulsets),
            |c, k| Box::pin(statefulset::reconcile(c, k)),
        );
        spawn(
            "job",
            job::setup,
            |c| keys(&c.jobs),
            |c, k| Box::pin(job::reconcile(c, k)),
        );
        spawn(
            "cronjob",
            cronjob::setup,
            |c| keys(&c.cronjobs),
            |c, k| Box::pin(cronjob::reconcile(c, k)),
        );
        spawn(
            "disruption",
            disruption::setup,
            |c| keys(&c.budgets),
            |c, k| Box::pin(disruption::reconcile(c, k)),
        );
        spawn(
            "resourcequota",
            resourcequota::setup,
            |c| keys(&c.quotas),
            |c, k| Box::pin(resourcequota::reconcile(c, k)),
        );
        spawn(
            "horizontalpodautoscaling",
            hpa::setup,
            |c| keys(&c.hpas),
            |c, k| Box::pin(hpa::reconcile(c, k)),
        );
        spawn(
            "endpoints",
            endpoints::setup,
            |c| keys(&c.services),
            |c, k| Box::pin(endpoints::reconcile(c, k)),
        );
        spawn(
            "certificates",
            certificates::setup,
            |c| keys(&c.csrs),
            |c, k| Box::pin(certificates::reconcile(c, k)),
        );
        spawn(
            "serviceaccount",
            serviceaccount::setup,
            |c| keys(&c.namespaces),
            |c, k| Box::pin(serviceaccount::reconcile(c, k)),
        );
        spawn(
            "persistentvolume",
            persistentvolume::setup,
            persistentvolume::keys,
            |c, k| Box::pin(persistentvolume::reconcile(c, k)),
        );
    }
    ctx.pods.start(shutdown.clone());
    ctx.nodes.start(shutdown.clone());
    ctx.replicasets.start(shutdown.clone());
    ctx.replicationcontrollers.start(shutdown.clone());
    ctx.deployments.start(shutdown.clone());
    ctx.namespaces.start(shutdown.clone());
    ctx.serviceaccounts.start(shutdown.clone());
    ctx.leases.start(shutdown.clone());
    ctx.daemonsets.start(shutdown.clone());
    ctx.statefulsets.start(shutdown.clone());
    ctx.controllerrevisions.start(shutdown.clone());
    ctx.jobs.start(shutdown.clone());
    ctx.cronjobs.start(shutdown.clone());
    ctx.services.start(shutdown.clone());
    ctx.endpoints.start(shutdown.clone());
    ctx.endpointslices.start(shutdown.clone());
    ctx.csrs.start(shutdown.clone());
    ctx.budgets.start(shutdown.clone());
    ctx.quotas.start(shutdown.clone());
    ctx.hpas.start(shutdown.clone());
    ctx.volumes.start(shutdown.clone());
    // Controllers act only on a complete view of the cluster.
    tokio::join!(
        ctx.pods.ready(),
        ctx.nodes.ready(),
        ctx.replicasets.ready(),
        ctx.replicationcontrollers.ready(),
        ctx.deployments.ready(),
        ctx.namespaces.ready(),
        ctx.serviceaccounts.ready(),
        ctx.leases.ready(),
        ctx.daemonsets.ready(),
        ctx.statefulsets.ready(),
        ctx.controllerrevisions.ready(),
        ctx.jobs.ready(),
        ctx.cronjobs.ready(),
        ctx.services.ready(),
        ctx.endpoints.ready(),
        ctx.endpointslices.ready(),
        ctx.csrs.ready(),
        ctx.budgets.ready(),
        ctx.quotas.ready(),
        ctx.hpas.ready(),
        ctx.volumes.ready(),
    );
    tasks.spawn(nodelifecycle::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(certificates::clean_tokens(ctx.clone(), shutdown.clone()));
    tasks.spawn(gc::follow_kinds(
        ctx.clone(),
        Informer::new(Api::all(ctx.client.clone()), watcher::Config::default()),
        shutdown.clone(),
    ));
    tracing::info!("controllers running");
    while tasks.join_next().await.is_some() {}
}

fn gc_setup(ctx: &Arc<Ctx>, queue: &Arc<Queue>) {
    gc::set_queue(ctx, queue);
    gc::watch(&ctx.pods, queue);
    gc::watch(&ctx.replicasets, queue);
    gc::watch(&ctx.replicationcontrollers, queue);
    gc::watch(&ctx.deployments, queue);
    gc::watch(&ctx.nodes, queue);
    gc::watch(&ctx.daemonsets, queue);
    gc::watch(&ctx.statefulsets, queue);
    gc::watch(&ctx.volumes.claims, queue);
    gc::watch(&ctx.controllerrevisions, queue);
    gc::watch(&ctx.jobs, queue);
    gc::watch(&ctx.cronjobs, queue);
    gc::watch(&ctx.services, queue);
    gc::watch(&ctx.endpointslices, queue);
}

type Reconcile = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<Requeue>> + Send>>;
