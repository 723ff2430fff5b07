//! Compiles tap policies into the kernel's pre-filter maps: the rule table
//! (`tap_rules`), the CIDR trie (`tap_cidrs`) and per-interface masks
//! (`tap_ifaces`). Pure functions, so every case is unit-tested.
//!
//! Policies change while interfaces stay tapped, so a policy keeps its place
//! in the kernel's tables (its bit in every policy mask, the slots of its
//! kernel rules) for as long as it exists unchanged: a [`Layout`] places new
//! and edited policies around the others, and never moves one that did not
//! change. An edit is applied make-before-break: the edited rules go into
//! free slots first ([`compile_transition`]), interfaces switch to them, and
//! only then are the old slots cleared.

use std::collections::{BTreeMap, BTreeSet};

use tapestry_proto::policy::{Cidr, Direction, FilterRule, MAX_SNAPLEN};

use crate::abi::{self, IfaceCfg, Rule, Rules};

/// A policy as the kernel needs it: rules and snaplen.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySpec {
    pub name: String,
    pub rules: Vec<FilterRule>,
    pub snaplen: Option<u32>,
}

/// What goes into the maps.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub rules: Rules,
    /// (prefix length over 16 bytes, address, rule bits).
    pub cidrs: Vec<(u32, [u8; 16], u64)>,
    /// Per policy bit: always masks, rule mask and snaplen.
    per_policy: BTreeMap<u8, PolicyMasks>,
}

#[derive(Clone, Copy, Debug, Default)]
struct PolicyMasks {
    always: [u64; 2],
    rules: u64,
    snaplen: u32,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("no free policy slot: the kernel side holds {max} policies", max = abi::MAX_POLICIES)]
    TooManyPolicies,
    #[error("needs {needed} kernel rules (one per port range) but only {free} of {max} are free", max = abi::MAX_RULES)]
    TooManyRules { needed: usize, free: usize },
    #[error("{0}")]
    Invalid(String),
}

fn dir_mask(d: Direction) -> u8 {
    match d {
        Direction::Ingress => 1,
        Direction::Egress => 2,
        Direction::Both => 3,
    }
}

/// One kernel rule before it gets a slot: a rule with several port ranges
/// becomes one kernel rule per range.
#[derive(Clone, Debug, PartialEq)]
struct KernelRule {
    rule: Rule,
    cidrs: Vec<Cidr>,
}

/// The kernel rules of a policy (wildcard rules need none: they are
/// "always" masks) and its masks without slot positions.
fn kernel_rules(p: &PolicySpec) -> Result<(Vec<KernelRule>, PolicyMasks), CompileError> {
    let mut masks = PolicyMasks {
        snaplen: p.snaplen.unwrap_or(MAX_SNAPLEN).min(abi::MAX_CAPTURE),
        ..Default::default()
    };
    if p.rules.is_empty() {
        masks.always = [1, 1];
    }
    let mut out = Vec::new();
    for (ri, r) in p.rules.iter().enumerate() {
        if let Some(e) = r.check().into_iter().next() {
            return Err(CompileError::Invalid(format!("rules[{ri}].{e}")));
        }
        let dm = dir_mask(r.direction);
        if r.is_wildcard() {
            for d in 0..2 {
                if dm & (1 << d) != 0 {
                    masks.always[d] = 1;
                }
            }
            continue;
        }
        let ranges: Vec<Option<(u16, u16)>> = if r.ports.is_empty() {
            vec![None]
        } else {
            r.ports.iter().map(|p| Some((p.start, p.end))).collect()
        };
        for range in ranges {
            let mut k = Rule {
                dir_mask: dm,
                ..Default::default()
            };
            if let Some(proto) = r.protocol {
                k.flags |= abi::RULE_PROTO;
                k.proto = proto.0;
            }
            if let Some((lo, hi)) = range {
                k.flags |= abi::RULE_PORTS;
                k.port_lo = lo;
                k.port_hi = hi;
            }
            if !r.cidrs.is_empty() {
                k.flags |= abi::RULE_CIDR;
            }
            out.push(KernelRule {
                rule: k,
                cidrs: r.cidrs.clone(),
            });
        }
    }
    Ok((out, masks))
}

/// Where one policy sits in the kernel's tables.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    /// Its bit in every policy mask (and in the records' `policy_mask`).
    pub bit: u8,
    pub spec: PolicySpec,
    /// The rule slot of each of its kernel rules, in order.
    slots: Vec<u8>,
}

/// The placement of every policy in the kernel's tables.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layout {
    placed: BTreeMap<String, Placed>,
    /// Allocation cursors: bits and slots are handed out round-robin, so a
    /// freed one is reused last and records still in flight under its old
    /// meaning are rarely attributed to a newcomer.
    next_bit: u8,
    next_slot: u8,
}

/// A policy that could not be placed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub policy: String,
    pub error: CompileError,
}

impl Layout {
    /// The layout for `wanted`: unchanged policies keep their bit and
    /// slots; edited ones keep their bit and get new slots (free ones first,
    /// so the old rules stay intact until interfaces have switched); new
    /// ones are placed in the order given. Policies that do not fit or are
    /// invalid are left out and returned.
    pub fn plan(&self, wanted: &[PolicySpec]) -> (Layout, Vec<Refused>) {
        let mut next = Layout {
            placed: BTreeMap::new(),
            next_bit: self.next_bit,
            next_slot: self.next_slot,
        };
        let mut refused = Vec::new();
        // Unchanged policies first: nothing of theirs may move.
        for p in wanted {
            if let Some(old) = self.placed.get(&p.name).filter(|old| old.spec == *p) {
                next.placed.insert(p.name.clone(), old.clone());
            }
        }
        let old_slots = self.used_slots();
        // Then edited policies, which keep their bit (no newcomer may take
        // it), then new ones in the order given.
        let (edited, added): (Vec<&PolicySpec>, Vec<&PolicySpec>) = wanted
            .iter()
            .filter(|p| !next.placed.contains_key(&p.name))
            .partition(|p| self.placed.contains_key(&p.name));
        // Edits that keep their slots go first, so no other edit takes them.
        let (same_rules, new_rules): (Vec<&PolicySpec>, Vec<&PolicySpec>) =
            edited.into_iter().partition(|p| {
                self.placed
                    .get(&p.name)
                    .is_some_and(|o| o.spec.rules == p.rules)
            });
        for p in same_rules.into_iter().chain(new_rules).chain(added) {
            let old = self.placed.get(&p.name);
            let placed = kernel_rules(p).and_then(|(rules, _)| {
                let bit = match old {
                    Some(old) => old.bit,
                    None => next.free_bit()?,
                };
                let slots = match old {
                    // Same rules (only the snaplen changed): same slots.
                    Some(old) if old.spec.rules == p.rules => old.slots.clone(),
                    _ => next.free_slots(rules.len(), &old_slots)?,
                };
                Ok(Placed {
                    bit,
                    spec: p.clone(),
                    slots,
                })
            });
            match placed {
                Ok(placed) => {
                    next.placed.insert(p.name.clone(), placed);
                }
                Err(error) => refused.push(Refused {
                    policy: p.name.clone(),
                    error,
                }),
            }
        }
        (next, refused)
    }

    fn used_bits(&self) -> BTreeSet<u8> {
        self.placed.values().map(|p| p.bit).collect()
    }

    fn used_slots(&self) -> BTreeSet<u8> {
        self.placed
            .values()
            .flat_map(|p| p.slots.iter().copied())
            .collect()
    }

    fn free_bit(&mut self) -> Result<u8, CompileError> {
        let used = self.used_bits();
        let n = abi::MAX_POLICIES as u8;
        let bit = (0..n)
            .map(|i| (self.next_bit.wrapping_add(i)) % n)
            .find(|b| !used.contains(b))
            .ok_or(CompileError::TooManyPolicies)?;
        self.next_bit = (bit + 1) % n;
        Ok(bit)
    }

    /// `count` slots unused by this layout, preferring ones `avoid` (the
    /// previous layout) does not use either.
    fn free_slots(&mut self, count: usize, avoid: &BTreeSet<u8>) -> Result<Vec<u8>, CompileError> {
        let used = self.used_slots();
        let n = abi::MAX_RULES as u8;
        let order: Vec<u8> = (0..n)
            .map(|i| (self.next_slot.wrapping_add(i)) % n)
            .filter(|s| !used.contains(s))
            .collect();
        if order.len() < count {
            return Err(CompileError::TooManyRules {
                needed: count,
                free: order.len(),
            });
        }
        let mut slots: Vec<u8> = order
            .iter()
            .copied()
            .filter(|s| !avoid.contains(s))
            .take(count)
            .collect();
        if slots.len() < count {
            let more: Vec<u8> = order
                .iter()
                .copied()
                .filter(|s| avoid.contains(s))
                .take(count - slots.len())
                .collect();
            slots.extend(more);
        }
        if let Some(last) = slots.last() {
            self.next_slot = (last + 1) % n;
        }
        Ok(slots)
    }

    /// Each placed policy's bit.
    pub fn bits(&self) -> impl Iterator<Item = (&str, u8)> {
        self.placed.iter().map(|(n, p)| (n.as_str(), p.bit))
    }

    /// The bit of a placed policy.
    pub fn bit(&self, policy: &str) -> Option<u8> {
        self.placed.get(policy).map(|p| p.bit)
    }

    /// The policy mask of a set of policy names (unplaced ones are skipped).
    pub fn mask<'a>(&self, policies: impl IntoIterator<Item = &'a String>) -> u64 {
        policies
            .into_iter()
            .filter_map(|p| self.bit(p))
            .fold(0, |m, b| m | (1u64 << b))
    }

    /// Policy names by bit, `""` where no policy sits (the stream's Hello).
    pub fn names_by_bit(&self) -> Vec<String> {
        let Some(top) = self.placed.values().map(|p| p.bit).max() else {
            return Vec::new();
        };
        let mut names = vec![String::new(); top as usize + 1];
        for (n, p) in &self.placed {
            names[p.bit as usize] = n.clone();
        }
        names
    }

    /// Kernel rules by slot.
    fn slot_table(&self) -> BTreeMap<u8, (u8, KernelRule)> {
        let mut table = BTreeMap::new();
        for p in self.placed.values() {
            // Placed specs were compiled when placed; this cannot fail.
            let Ok((rules, _)) = kernel_rules(&p.spec) else {
                continue;
            };
            for (slot, rule) in p.slots.iter().zip(rules) {
                table.insert(*slot, (p.bit, rule));
            }
        }
        table
    }
}

/// The tables and per-interface configuration of `layout`.
pub fn compile(layout: &Layout) -> Compiled {
    let mut out = tables(&layout.slot_table());
    for p in layout.placed.values() {
        let Ok((_, mut masks)) = kernel_rules(&p.spec) else {
            continue;
        };
        let bit = 1u64 << p.bit;
        masks.always = masks.always.map(|a| if a != 0 { bit } else { 0 });
        masks.rules = p.slots.iter().fold(0, |m, s| m | (1u64 << s));
        out.per_policy.insert(p.bit, masks);
    }
    out
}

/// Tables valid for interfaces configured by either layout: every slot
/// `old` uses keeps its rule, and `new`'s rules fill the slots `old` leaves
/// free (where both want a slot, `old` wins until interfaces have switched).
/// Written before interfaces switch from `old` to `new`; [`compile`] of
/// `new` replaces it afterwards.
pub fn compile_transition(old: &Layout, new: &Layout) -> Compiled {
    let mut table = old.slot_table();
    for (slot, rule) in new.slot_table() {
        table.entry(slot).or_insert(rule);
    }
    tables(&table)
}

fn tables(slots: &BTreeMap<u8, (u8, KernelRule)>) -> Compiled {
    let mut out = Compiled::default();
    // CIDR -> rule bits of the rules listing exactly that CIDR.
    let mut exact: BTreeMap<(u32, [u8; 16]), u64> = BTreeMap::new();
    for (&slot, (bit, k)) in slots {
        let mut rule = k.rule;
        rule.policy = *bit;
        out.rules.rules[slot as usize] = rule;
        for c in &k.cidrs {
            *exact
                .entry((c.mapped_prefix_len() as u32, c.network_bytes()))
                .or_default() |= 1u64 << slot;
        }
    }
    // Each trie entry carries the bits of every CIDR containing it, so the
    // longest match alone is the answer.
    for (&(plen, addr), _) in exact.iter() {
        let mut bits = 0;
        for (&(olen, oaddr), &obits) in exact.iter() {
            if olen <= plen && prefix_eq(&addr, &oaddr, olen) {
                bits |= obits;
            }
        }
        out.cidrs.push((plen, addr, bits));
    }
    out
}

fn prefix_eq(a: &[u8; 16], b: &[u8; 16], bits: u32) -> bool {
    let bits = bits as usize;
    let full = bits / 8;
    if a[..full] != b[..full] {
        return false;
    }
    let rem = bits % 8;
    rem == 0 || (a[full] ^ b[full]) & (0xffu8 << (8 - rem)) == 0
}

impl Compiled {
    /// The `tap_ifaces` value of an interface tapped by `policy_mask`.
    pub fn iface(&self, policy_mask: u64) -> IfaceCfg {
        let mut cfg = IfaceCfg {
            policy_mask,
            ..Default::default()
        };
        for (&bit, m) in &self.per_policy {
            if policy_mask & (1u64 << bit) == 0 {
                continue;
            }
            cfg.always_mask[0] |= m.always[0];
            cfg.always_mask[1] |= m.always[1];
            cfg.rule_mask |= m.rules;
            cfg.snaplen = cfg.snaplen.max(m.snaplen);
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, rules: &[&str], snaplen: Option<u32>) -> PolicySpec {
        PolicySpec {
            name: name.into(),
            rules: rules.iter().map(|r| r.parse().unwrap()).collect(),
            snaplen,
        }
    }

    fn place(specs: &[PolicySpec]) -> Layout {
        let (layout, refused) = Layout::default().plan(specs);
        assert_eq!(refused, []);
        layout
    }

    #[test]
    fn no_rules_means_everything() {
        let c = compile(&place(&[spec("all", &[], None)]));
        let cfg = c.iface(1);
        assert_eq!(cfg.always_mask, [1, 1]);
        assert_eq!(cfg.rule_mask, 0);
        assert_eq!(cfg.snaplen, abi::MAX_CAPTURE);
    }

    #[test]
    fn rules_become_kernel_rules() {
        let c = compile(&place(&[
            spec("a", &["dir=egress"], Some(96)),
            spec(
                "b",
                &["proto=tcp,port=80,port=443-444,cidr=10.0.0.0/8"],
                Some(128),
            ),
        ]));
        let a = c.iface(0b01);
        assert_eq!(a.always_mask, [0, 1]);
        assert_eq!(a.snaplen, 96);
        let b = c.iface(0b10);
        assert_eq!(b.rule_mask, 0b11);
        assert_eq!(b.snaplen, 128);
        let r = c.rules.rules[1];
        assert_eq!((r.policy, r.proto, r.port_lo, r.port_hi), (1, 6, 443, 444));
        assert_eq!(r.flags, abi::RULE_PROTO | abi::RULE_PORTS | abi::RULE_CIDR);
        assert_eq!(r.dir_mask, 3);
        assert_eq!(c.cidrs.len(), 1);
        assert_eq!(c.cidrs[0].0, 104);
        assert_eq!(c.cidrs[0].2, 0b11);
        assert_eq!(c.iface(0b11).snaplen, 128);
    }

    #[test]
    fn nested_cidrs_carry_outer_bits() {
        let c = compile(&place(&[spec(
            "a",
            &["cidr=10.0.0.0/8", "cidr=10.1.0.0/16", "cidr=192.168.0.0/16"],
            None,
        )]));
        let find = |plen| c.cidrs.iter().find(|e| e.0 == plen).unwrap().2;
        assert_eq!(find(104), 0b001);
        assert_eq!(find(112) & 0b011, 0b011); // 10.1/16 is inside 10/8
        let other = c.cidrs.iter().find(|e| e.1[12] == 192).unwrap().2;
        assert_eq!(other, 0b100);
    }

    #[test]
    fn limits_are_refusals_not_failures() {
        let many: Vec<PolicySpec> = (0..65).map(|i| spec(&format!("p{i}"), &[], None)).collect();
        let (layout, refused) = Layout::default().plan(&many);
        assert_eq!(layout.bits().count(), 64);
        assert_eq!(
            refused,
            [Refused {
                policy: "p64".into(),
                error: CompileError::TooManyPolicies
            }]
        );
        let ports: Vec<String> = (1..=65).map(|p| format!("port={p}")).collect();
        let rule = ports.join(",");
        let (_, refused) = Layout::default().plan(&[spec("p", &[rule.as_str()], None)]);
        assert_eq!(
            refused[0].error,
            CompileError::TooManyRules {
                needed: 65,
                free: 64
            }
        );
        let bad = PolicySpec {
            name: "bad".into(),
            rules: vec![FilterRule {
                ports: vec![tapestry_proto::policy::PortRange { start: 9, end: 3 }],
                ..Default::default()
            }],
            snaplen: None,
        };
        let (_, refused) = Layout::default().plan(&[bad]);
        assert!(
            matches!(&refused[0].error, CompileError::Invalid(m) if m.starts_with("rules[0].ports[0]")),
            "{refused:?}"
        );
    }

    #[test]
    fn other_policies_never_move() {
        let web = spec("web", &["proto=tcp,port=80"], None);
        let dns = spec("dns", &["proto=udp,port=53", "cidr=10.0.0.0/8"], Some(200));
        let old = place(&[web.clone(), dns.clone()]);
        let before = compile(&old);
        let (dns_bit, dns_mask) = (old.bit("dns").unwrap(), before.iface(1 << 1));

        // web is edited, a policy is added: dns keeps its bit, slots, rules
        // and CIDR bits.
        let web2 = spec("web", &["proto=tcp,port=8080", "proto=tcp,port=443"], None);
        let (new, refused) = old.plan(&[web2.clone(), dns.clone(), spec("all", &[], None)]);
        assert_eq!(refused, []);
        let after = compile(&new);
        assert_eq!(new.bit("dns"), Some(dns_bit));
        assert_eq!(new.bit("web"), old.bit("web"));
        assert_eq!(after.iface(1 << dns_bit), dns_mask);
        for slot in 0..64 {
            if dns_mask.rule_mask & (1 << slot) != 0 {
                assert_eq!(after.rules.rules[slot], before.rules.rules[slot]);
            }
        }
        let dns_cidr = |c: &Compiled| {
            c.cidrs
                .iter()
                .map(|e| e.2 & dns_mask.rule_mask)
                .sum::<u64>()
        };
        assert_eq!(dns_cidr(&after), dns_cidr(&before));

        // Make-before-break: web's new rules took slots the old layout did
        // not use, and the transition tables hold both versions.
        let old_web = before.iface(1 << old.bit("web").unwrap()).rule_mask;
        let new_web = after.iface(1 << new.bit("web").unwrap()).rule_mask;
        assert_eq!(old_web & new_web, 0);
        let transition = compile_transition(&old, &new);
        for slot in 0..64 {
            let bit = 1u64 << slot;
            if old_web & bit != 0 {
                assert_eq!(transition.rules.rules[slot], before.rules.rules[slot]);
            }
            if new_web & bit != 0 {
                assert_eq!(transition.rules.rules[slot], after.rules.rules[slot]);
            }
        }
        // Removing web leaves dns as it was; a newcomer gets a fresh bit.
        let (gone, _) = new.plan(&[dns.clone(), spec("late", &[], None)]);
        assert_eq!(gone.bit("web"), None);
        assert_eq!(gone.bit("dns"), Some(dns_bit));
        assert_ne!(gone.bit("late"), new.bit("web"));
        assert_eq!(compile(&gone).iface(1 << dns_bit), dns_mask);
    }

    #[test]
    fn an_unchanged_set_is_an_unchanged_layout() {
        let specs = [spec("a", &["port=1"], None), spec("b", &[], Some(64))];
        let layout = place(&specs);
        assert_eq!(layout.plan(&specs).0, layout);
        assert_eq!(layout.names_by_bit(), ["a", "b"]);
        assert_eq!(layout.mask(&["b".to_string(), "zzz".to_string()]), 0b10);
    }

    #[test]
    fn a_full_rule_table_still_takes_an_edit() {
        // 64 slots all used: the edit reuses its own old slots.
        let ports: Vec<String> = (1..=63).map(|p| format!("port={p}")).collect();
        let big = spec("big", &[ports.join(",").as_str()], None);
        let small = spec("small", &["port=9000"], None);
        let old = place(&[big.clone(), small]);
        let (new, refused) = old.plan(&[big, spec("small", &["port=9001"], None)]);
        assert_eq!(refused, []);
        let c = compile(&new);
        let slot = c
            .iface(1 << new.bit("small").unwrap())
            .rule_mask
            .trailing_zeros();
        assert_eq!(c.rules.rules[slot as usize].port_lo, 9001);
        // Where both versions want one slot, the old one holds it until
        // interfaces have switched.
        let t = compile_transition(&old, &new);
        assert_eq!(t.rules.rules[slot as usize].port_lo, 9000);
    }
}
