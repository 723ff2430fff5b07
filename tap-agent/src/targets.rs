//! What to tap: a *target source* publishes the complete desired set of
//! interfaces (level-triggered, like a reflector's store), and the
//! [`Reconciler`] makes the attachments match it. The command line's
//! `--iface` list is a static source; a pod watcher (following the
//! `tapestry.io/host-veth` annotation) publishes the same type.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use tapestry_proto::tap::v1::{Hello, PodIdentity, Source};
use tokio::sync::watch;
use tracing::warn;

use crate::{bpf::Tap, metrics::Metrics};

/// One interface to tap.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub interface: String,
    pub pod: Option<PodIdentity>,
    /// Bit i: policy i (of the agent's policy list) selects this interface.
    pub policy_mask: u64,
}

/// The whole desired state, keyed by interface name.
pub type TargetSet = BTreeMap<String, Target>;

/// Static identity of this tap, for the Hello.
#[derive(Clone, Debug)]
pub struct TapIdentity {
    pub tap_id: String,
    pub node: String,
    pub policy_names: Vec<String>,
}

pub struct Reconciler {
    pub tap: Tap,
    pub identity: TapIdentity,
    pub hello: watch::Sender<Hello>,
    pub metrics: Arc<Metrics>,
    /// ifindex -> target currently attached.
    current: BTreeMap<u32, Target>,
}

impl Reconciler {
    pub fn new(
        tap: Tap,
        identity: TapIdentity,
        hello: watch::Sender<Hello>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reconciler {
            tap,
            identity,
            hello,
            metrics,
            current: BTreeMap::new(),
        }
    }

    /// Makes attachments match `desired`; returns the errors of targets
    /// that could not be attached (they are retried on the next call).
    pub fn reconcile(&mut self, desired: &TargetSet) -> Vec<(String, anyhow::Error)> {
        let mut errors = Vec::new();
        // Detach what is no longer wanted, or whose interface changed index
        // (a pod's veth recreated under the same name).
        let stale: Vec<u32> = self
            .current
            .iter()
            .filter(|(idx, t)| match desired.get(&t.interface) {
                None => true,
                Some(_) => crate::bpf::ifindex(&t.interface).ok() != Some(**idx),
            })
            .map(|(i, _)| *i)
            .collect();
        for idx in stale {
            self.tap.detach(idx);
            self.current.remove(&idx);
        }
        for t in desired.values() {
            let known = self
                .current
                .iter()
                .find(|(_, c)| c.interface == t.interface);
            match known {
                Some((idx, c)) if c == t => {
                    let _ = idx;
                }
                Some((&idx, _)) => {
                    if let Err(e) = self.tap.set_interface_policies(idx, t.policy_mask) {
                        errors.push((t.interface.clone(), e));
                        continue;
                    }
                    self.current.insert(idx, t.clone());
                }
                None => match self.tap.attach(&t.interface, t.policy_mask) {
                    Ok(idx) => {
                        self.current.insert(idx, t.clone());
                    }
                    Err(e) => {
                        warn!(interface = t.interface, "cannot tap: {e:#}");
                        errors.push((t.interface.clone(), e));
                    }
                },
            }
        }
        self.metrics
            .attached_interfaces
            .store(self.current.len() as u64, Relaxed);
        self.publish_hello();
        errors
    }

    fn publish_hello(&self) {
        let hello = Hello {
            tap_id: self.identity.tap_id.clone(),
            node: self.identity.node.clone(),
            sources: self
                .current
                .iter()
                .map(|(idx, t)| Source {
                    id: *idx,
                    interface: t.interface.clone(),
                    ifindex: *idx,
                    pod: t.pod.clone(),
                })
                .collect(),
            policy_names: self.identity.policy_names.clone(),
        };
        self.hello.send_if_modified(|h| {
            if *h != hello {
                *h = hello;
                true
            } else {
                false
            }
        });
    }

    pub fn detach_all(&mut self) {
        self.tap.detach_all();
        self.current.clear();
        self.metrics.attached_interfaces.store(0, Relaxed);
    }
}
