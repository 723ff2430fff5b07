//! Events for what users look for (`kubectl describe`, `kubectl get
//! events`). Recording never blocks a controller: events go through a
//! bounded channel to one writer task; when it is full they are dropped and
//! counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;

const QUEUE: usize = 4096;
const WRITERS: usize = 8;

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Event>,
    component: &'static str,
    /// As Kubernetes' components report it: which process acted.
    instance: String,
    pub dropped: Arc<AtomicU64>,
}

impl Recorder {
    pub fn new(client: Client, component: &'static str) -> Self {
        let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
        tokio::spawn(async move {
            // A few writes in flight so bursts (a scale-up, a scheduling
            // wave) drain quickly.
            let slots = Arc::new(tokio::sync::Semaphore::new(WRITERS));
            while let Some(ev) = rx.recv().await {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let ns = ev.metadata.namespace.as_deref().unwrap_or("default");
                let url = Event::url_path(&(), Some(ns));
                let client = client.clone();
                tokio::spawn(async move {
                    // Sent as text: the stored Event is never read back.
                    let send = async {
                        let body = serde_json::to_vec(&ev).map_err(kube::Error::SerdeError)?;
                        let request = kube::core::Request::new(url)
                            .create(&PostParams::default(), body)
                            .map_err(kube::Error::BuildRequest)?;
                        client.request_text(request).await.map(drop)
                    };
                    if let Err(e) = send.await {
                        tracing::debug!("recording event: {e}");
                    }
                    drop(permit);
                });
            }
        });
        Recorder {
            tx,
            component,
            instance: format!("{component}-{}", crate::leader::identity()),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Record a Normal or Warning event about `obj`.
    pub fn record<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        message: String,
    ) {
        let reference = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: Some(obj.name_any()),
            namespace: obj.namespace(),
            uid: obj.uid(),
            resource_version: obj.resource_version(),
            ..Default::default()
        };
        self.record_ref(reference, warning, reason, message);
    }

    pub fn record_ref(
        &self,
        reference: ObjectReference,
        warning: bool,
        reason: &str,
        message: String,
    ) {
        let now = Timestamp::now();
        let name = format!(
            "{}.{:x}",
            reference.name.clone().unwrap_or_default(),
            now.as_nanosecond()
        );
        // Events of cluster-scoped objects (nodes) live in "default".
        let ns = reference
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(ns),
                ..Default::default()
            },
            involved_object: reference,
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some(self.component.into()),
                host: None,
            }),
            reporting_component: Some(self.component.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        if self.tx.try_send(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
