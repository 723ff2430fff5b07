//! What to tap: a *target source* publishes the complete desired state —
//! the policies in force and the interfaces each of them taps —
//! level-triggered, like a reflector's store, and the [`Reconciler`] makes
//! the kernel match it. The command line's `--iface` list is a static
//! source; the cluster watcher (`kube_source`) publishes the same type.
//!
//! Changes are applied without disturbing what did not change: policies
//! keep their place in the kernel's tables (`filter::Layout`), an interface
//! whose policies change is reconfigured with one map update, and only
//! interfaces that appear or go are attached or detached
//! ([`plan_interfaces`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{atomic::Ordering::Relaxed, Arc},
};

use anyhow::anyhow;
use tapestry_proto::tap::v1::{Hello, PodIdentity, Source};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    abi::IfaceCfg,
    bpf::{self, Tap},
    filter::{self, Layout, PolicySpec, Refused},
    metrics::Metrics,
    status::{StatusBoard, Tapped, TappedInterface},
};

/// One interface to tap.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub interface: String,
    pub pod: Option<PodIdentity>,
    /// Names of the policies tapping it.
    pub policies: BTreeSet<String>,
}

/// Interfaces to tap, keyed by name.
pub type TargetSet = BTreeMap<String, Target>;

/// Everything a target source wants.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// The policies in force, new ones placed in this order.
    pub policies: Vec<PolicySpec>,
    pub targets: TargetSet,
}

/// Static identity of this tap, for the Hello.
#[derive(Clone, Debug)]
pub struct TapIdentity {
    pub tap_id: String,
    pub node: String,
}

/// What to do to one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceAction {
    Detach(u32),
    /// Already attached: new configuration, one map update.
    Configure(u32, IfaceCfg),
    Attach(String, IfaceCfg),
}

/// An interface as the plan sees it: attached now, or wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    /// Its index now (`None`: no such interface at the moment).
    pub ifindex: Option<u32>,
    pub cfg: IfaceCfg,
}

/// The actions taking `attached` (ifindex → name and configuration) to
/// `wanted`: interfaces no longer wanted, wanted by no placed policy or
/// recreated under the same name (new index) are detached; attached ones
/// whose configuration changed are reconfigured in place; the rest are
/// left alone; new ones are attached. Detaches come first.
pub fn plan_interfaces(
    attached: &BTreeMap<u32, (String, IfaceCfg)>,
    wanted: &[Wanted],
) -> Vec<InterfaceAction> {
    let by_name: BTreeMap<&str, &Wanted> = wanted
        .iter()
        .filter(|w| w.cfg.policy_mask != 0)
        .map(|w| (w.name.as_str(), w))
        .collect();
    let mut actions = Vec::new();
    for (idx, (name, _)) in attached {
        let keep = by_name
            .get(name.as_str())
            .is_some_and(|w| w.ifindex == Some(*idx));
        if !keep {
            actions.push(InterfaceAction::Detach(*idx));
        }
    }
    for w in by_name.values() {
        match w.ifindex.and_then(|i| attached.get(&i).map(|a| (i, a))) {
            Some((_, (name, cfg))) if *name == w.name && *cfg == w.cfg => {}
            Some((i, (name, _))) if *name == w.name => {
                actions.push(InterfaceAction::Configure(i, w.cfg))
            }
            _ => actions.push(InterfaceAction::Attach(w.name.clone(), w.cfg)),
        }
    }
    actions
}

/// Problems of one reconcile (retried on the next).
#[derive(Debug, Default)]
pub struct Outcome {
    /// Policies that could not be placed in the kernel's tables.
    pub refused: Vec<Refused>,
    /// Interfaces that could not be tapped or reconfigured.
    pub interfaces: Vec<(String, anyhow::Error)>,
    /// The kernel's tables could not be written: nothing was changed.
    pub tables: Option<anyhow::Error>,
}

impl Outcome {
    /// Every problem as one line each.
    pub fn messages(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .refused
            .iter()
            .map(|r| format!("policy {}: not tapped: {}", r.policy, r.error))
            .collect();
        out.extend(
            self.interfaces
                .iter()
                .map(|(i, e)| format!("interface {i}: not tapped: {e:#}")),
        );
        if let Some(e) = &self.tables {
            out.push(format!("{e:#}"));
        }
        out
    }
}

struct Attached {
    target: Target,
    cfg: IfaceCfg,
}

pub struct Reconciler {
    tap: Tap,
    identity: TapIdentity,
    hello: watch::Sender<Hello>,
    metrics: Arc<Metrics>,
    board: Arc<StatusBoard>,
    layout: Layout,
    /// Each placed policy's bit and the bit's counters when it got it.
    placed: BTreeMap<String, (u8, crate::metrics::PolicyCount)>,
    current: BTreeMap<u32, Attached>,
}

impl Reconciler {
    pub fn new(
        tap: Tap,
        identity: TapIdentity,
        hello: watch::Sender<Hello>,
        metrics: Arc<Metrics>,
        board: Arc<StatusBoard>,
    ) -> Self {
        Reconciler {
            tap,
            identity,
            hello,
            metrics,
            board,
            layout: Layout::default(),
            placed: BTreeMap::new(),
            current: BTreeMap::new(),
        }
    }

    /// Makes the kernel match `desired`. Tables and interfaces are written
    /// make-before-break: tables valid for both the old and the new layout
    /// first, then the interfaces, then the new layout's tables.
    pub fn reconcile(&mut self, desired: &Desired) -> Outcome {
        let mut outcome = Outcome::default();
        let (layout, refused) = self.layout.plan(&desired.policies);
        outcome.refused = refused;
        let layout_changed = layout != self.layout;
        if layout_changed {
            let transition = filter::compile_transition(&self.layout, &layout);
            if let Err(e) = self.tap.write_tables(&transition) {
                outcome.tables = Some(e.context("writing the kernel's rule tables"));
                return outcome;
            }
        }
        let compiled = filter::compile(&layout);
        let attached: BTreeMap<u32, (String, IfaceCfg)> = self
            .current
            .iter()
            .map(|(i, a)| (*i, (a.target.interface.clone(), a.cfg)))
            .collect();
        let wanted: Vec<Wanted> = desired
            .targets
            .values()
            .map(|t| Wanted {
                name: t.interface.clone(),
                ifindex: bpf::ifindex(&t.interface).ok(),
                cfg: compiled.iface(layout.mask(&t.policies)),
            })
            .collect();
        for action in plan_interfaces(&attached, &wanted) {
            self.apply(action, desired, &mut outcome);
        }
        // Interfaces whose action failed keep their old target; record the
        // new one where the configuration went through.
        for a in self.current.values_mut() {
            if let Some(t) = desired.targets.get(&a.target.interface) {
                if a.cfg == compiled.iface(layout.mask(&t.policies)) {
                    a.target = t.clone();
                }
            }
        }
        if layout_changed {
            if let Err(e) = self.tap.write_tables(&compiled) {
                outcome.tables = Some(e.context("clearing the kernel's old rules"));
            }
            self.place(&layout);
            self.layout = layout;
        }
        self.metrics
            .attached_interfaces
            .store(self.current.len() as u64, Relaxed);
        self.publish();
        outcome
    }

    fn apply(&mut self, action: InterfaceAction, desired: &Desired, outcome: &mut Outcome) {
        match action {
            InterfaceAction::Detach(idx) => {
                self.tap.detach(idx);
                self.current.remove(&idx);
            }
            InterfaceAction::Configure(idx, cfg) => match self.tap.configure(idx, cfg) {
                Ok(()) => {
                    if let Some(a) = self.current.get_mut(&idx) {
                        a.cfg = cfg;
                    }
                }
                Err(e) => {
                    let name = self.current.get(&idx).map(|a| a.target.interface.clone());
                    outcome
                        .interfaces
                        .push((name.unwrap_or_else(|| idx.to_string()), e));
                }
            },
            InterfaceAction::Attach(name, cfg) => {
                let Some(target) = desired.targets.get(&name) else {
                    outcome
                        .interfaces
                        .push((name, anyhow!("not a desired interface")));
                    return;
                };
                match self.tap.attach(&name, cfg) {
                    Ok(idx) => {
                        self.current.insert(
                            idx,
                            Attached {
                                target: target.clone(),
                                cfg,
                            },
                        );
                    }
                    Err(e) => outcome.interfaces.push((name, e)),
                }
            }
        }
    }

    /// Records when each newly placed policy got its bit.
    fn place(&mut self, layout: &Layout) {
        let bits: BTreeMap<&str, u8> = layout.bits().collect();
        self.placed
            .retain(|name, (bit, _)| bits.get(name.as_str()) == Some(bit));
        for (name, bit) in bits {
            if !self.placed.contains_key(name) {
                info!(policy = name, bit, "policy placed");
                self.placed
                    .insert(name.to_string(), (bit, self.metrics.policy.get(bit)));
            }
        }
    }

    fn publish(&self) {
        let hello = Hello {
            tap_id: self.identity.tap_id.clone(),
            node: self.identity.node.clone(),
            sources: self
                .current
                .iter()
                .map(|(idx, a)| Source {
                    id: *idx,
                    interface: a.target.interface.clone(),
                    ifindex: *idx,
                    pod: a.target.pod.clone(),
                })
                .collect(),
            policy_names: self.layout.names_by_bit(),
        };
        self.hello.send_if_modified(|h| {
            if *h != hello {
                *h = hello;
                true
            } else {
                false
            }
        });
        self.board.set_tapped(Tapped {
            interfaces: self
                .current
                .values()
                .map(|a| TappedInterface {
                    name: a.target.interface.clone(),
                    pod: a
                        .target
                        .pod
                        .as_ref()
                        .map(|p| format!("{}/{}", p.namespace, p.name)),
                    policies: a
                        .target
                        .policies
                        .iter()
                        .filter(|p| self.layout.bit(p).is_some())
                        .cloned()
                        .collect(),
                })
                .collect(),
            policies: self.placed.clone(),
        });
    }

    pub fn detach_all(&mut self) {
        self.tap.detach_all();
        self.current.clear();
        self.metrics.attached_interfaces.store(0, Relaxed);
    }
}

/// Logs a reconcile's problems when they change and reports them.
pub fn report(board: &StatusBoard, outcome: &Outcome) {
    let messages = outcome.messages();
    if board.set_problems("reconcile", messages.clone()) {
        for m in &messages {
            warn!("{m} (will retry)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mask: u64, snaplen: u32) -> IfaceCfg {
        IfaceCfg {
            policy_mask: mask,
            snaplen,
            ..Default::default()
        }
    }

    fn wanted(name: &str, ifindex: Option<u32>, c: IfaceCfg) -> Wanted {
        Wanted {
            name: name.into(),
            ifindex,
            cfg: c,
        }
    }

    #[test]
    fn unchanged_interfaces_are_left_alone() {
        let attached: BTreeMap<u32, (String, IfaceCfg)> = [
            (4, ("veth-a".to_string(), cfg(0b01, 100))),
            (5, ("veth-b".to_string(), cfg(0b11, 100))),
        ]
        .into();
        let plan = plan_interfaces(
            &attached,
            &[
                wanted("veth-a", Some(4), cfg(0b01, 100)),
                wanted("veth-b", Some(5), cfg(0b11, 100)),
            ],
        );
        assert_eq!(plan, []);
    }

    #[test]
    fn changed_policies_reconfigure_in_place() {
        let attached: BTreeMap<u32, (String, IfaceCfg)> = [
            (4, ("veth-a".to_string(), cfg(0b01, 100))),
            (5, ("veth-b".to_string(), cfg(0b01, 100))),
        ]
        .into();
        let plan = plan_interfaces(
            &attached,
            &[
                // A policy joined veth-a; an edit changed veth-b's snaplen.
                wanted("veth-a", Some(4), cfg(0b11, 100)),
                wanted("veth-b", Some(5), cfg(0b01, 200)),
            ],
        );
        assert_eq!(
            plan,
            [
                InterfaceAction::Configure(4, cfg(0b11, 100)),
                InterfaceAction::Configure(5, cfg(0b01, 200)),
            ]
        );
    }

    #[test]
    fn interfaces_come_and_go() {
        let attached: BTreeMap<u32, (String, IfaceCfg)> = [
            (4, ("gone".to_string(), cfg(1, 1))),
            (5, ("recreated".to_string(), cfg(1, 1))),
            (6, ("unplaced".to_string(), cfg(1, 1))),
        ]
        .into();
        let plan = plan_interfaces(
            &attached,
            &[
                wanted("recreated", Some(9), cfg(1, 1)),
                // Its only policy could not be placed: mask 0.
                wanted("unplaced", Some(6), cfg(0, 0)),
                wanted("new", Some(7), cfg(1, 1)),
                // Missing right now: attaching reports the error.
                wanted("missing", None, cfg(1, 1)),
            ],
        );
        assert_eq!(
            plan,
            [
                InterfaceAction::Detach(4),
                InterfaceAction::Detach(5),
                InterfaceAction::Detach(6),
                InterfaceAction::Attach("missing".into(), cfg(1, 1)),
                InterfaceAction::Attach("new".into(), cfg(1, 1)),
                InterfaceAction::Attach("recreated".into(), cfg(1, 1)),
            ]
        );
    }
}
