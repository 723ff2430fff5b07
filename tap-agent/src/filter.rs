//! Compiles tap policies into the kernel's pre-filter maps: the rule table
//! (`tap_rules`), the CIDR trie (`tap_cidrs`) and per-interface masks
//! (`tap_ifaces`). Pure functions, so every case is unit-tested.

use std::collections::BTreeMap;

use tapestry_proto::policy::{Direction, FilterRule, MAX_SNAPLEN};

use crate::abi::{self, IfaceCfg, Rule, Rules};

/// A policy as the kernel needs it: rules and snaplen.
#[derive(Clone, Debug)]
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
    /// Per policy: policies bit, always masks, rule mask and snaplen.
    per_policy: Vec<PolicyMasks>,
}

#[derive(Clone, Copy, Debug, Default)]
struct PolicyMasks {
    always: [u64; 2],
    rules: u64,
    snaplen: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("too many policies: {0} (the kernel side holds {max})", max = abi::MAX_POLICIES)]
    TooManyPolicies(usize),
    #[error("too many rules: the policies need {0} kernel rules (one per port range), at most {max}", max = abi::MAX_RULES)]
    TooManyRules(usize),
    #[error("policy {policy}: {reason}")]
    Invalid { policy: String, reason: String },
}

fn dir_mask(d: Direction) -> u8 {
    match d {
        Direction::Ingress => 1,
        Direction::Egress => 2,
        Direction::Both => 3,
    }
}

/// Compiles `policies` (bit i = policies[i]) into map contents.
pub fn compile(policies: &[PolicySpec]) -> Result<Compiled, CompileError> {
    if policies.len() > abi::MAX_POLICIES {
        return Err(CompileError::TooManyPolicies(policies.len()));
    }
    let mut out = Compiled::default();
    let mut n = 0usize;
    // CIDR -> rule bits of the rules listing exactly that CIDR.
    let mut exact: BTreeMap<(u32, [u8; 16]), u64> = BTreeMap::new();
    for (pi, p) in policies.iter().enumerate() {
        let mut masks = PolicyMasks {
            snaplen: p.snaplen.unwrap_or(MAX_SNAPLEN).min(abi::MAX_CAPTURE),
            ..Default::default()
        };
        if p.rules.is_empty() {
            masks.always = [1 << pi, 1 << pi];
        }
        for (ri, r) in p.rules.iter().enumerate() {
            if let Some(e) = r.check().into_iter().next() {
                return Err(CompileError::Invalid {
                    policy: p.name.clone(),
                    reason: format!("rules[{ri}].{e}"),
                });
            }
            let dm = dir_mask(r.direction);
            if r.is_wildcard() {
                for d in 0..2 {
                    if dm & (1 << d) != 0 {
                        masks.always[d] |= 1 << pi;
                    }
                }
                continue;
            }
            // One kernel rule per port range (or one with no ports).
            let ranges: Vec<Option<(u16, u16)>> = if r.ports.is_empty() {
                vec![None]
            } else {
                r.ports.iter().map(|p| Some((p.start, p.end))).collect()
            };
            for range in ranges {
                if n >= abi::MAX_RULES {
                    return Err(CompileError::TooManyRules(
                        n + 1 + count_more(policies, pi, ri),
                    ));
                }
                let mut k = Rule {
                    policy: pi as u8,
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
                    for c in &r.cidrs {
                        *exact
                            .entry((c.mapped_prefix_len() as u32, c.network_bytes()))
                            .or_default() |= 1 << n;
                    }
                }
                out.rules.rules[n] = k;
                masks.rules |= 1 << n;
                n += 1;
            }
        }
        out.per_policy.push(masks);
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
    Ok(out)
}

fn count_more(policies: &[PolicySpec], pi: usize, ri: usize) -> usize {
    let mut extra = 0;
    for (i, p) in policies.iter().enumerate().skip(pi) {
        for (j, r) in p.rules.iter().enumerate() {
            if (i == pi && j <= ri) || r.is_wildcard() {
                continue;
            }
            extra += r.ports.len().max(1);
        }
    }
    extra
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
        for (i, m) in self.per_policy.iter().enumerate() {
            if policy_mask & (1 << i) == 0 {
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

    #[test]
    fn no_rules_means_everything() {
        let c = compile(&[spec("all", &[], None)]).unwrap();
        let cfg = c.iface(1);
        assert_eq!(cfg.always_mask, [1, 1]);
        assert_eq!(cfg.rule_mask, 0);
        assert_eq!(cfg.snaplen, abi::MAX_CAPTURE);
    }

    #[test]
    fn rules_become_kernel_rules() {
        let c = compile(&[
            spec("a", &["dir=egress"], Some(96)),
            spec(
                "b",
                &["proto=tcp,port=80,port=443-444,cidr=10.0.0.0/8"],
                Some(128),
            ),
        ])
        .unwrap();
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
        let c = compile(&[spec(
            "a",
            &["cidr=10.0.0.0/8", "cidr=10.1.0.0/16", "cidr=192.168.0.0/16"],
            None,
        )])
        .unwrap();
        let find = |plen| c.cidrs.iter().find(|e| e.0 == plen).unwrap().2;
        assert_eq!(find(104), 0b001);
        assert_eq!(find(112) & 0b011, 0b011); // 10.1/16 is inside 10/8
        let other = c.cidrs.iter().find(|e| e.1[12] == 192).unwrap().2;
        assert_eq!(other, 0b100);
    }

    #[test]
    fn limits_are_errors() {
        let many: Vec<PolicySpec> = (0..65).map(|i| spec(&format!("p{i}"), &[], None)).collect();
        assert_eq!(
            compile(&many).unwrap_err(),
            CompileError::TooManyPolicies(65)
        );
        let ports: Vec<String> = (1..=65).map(|p| format!("port={p}")).collect();
        let rule = ports.join(",");
        let e = compile(&[spec("p", &[rule.as_str()], None)]).unwrap_err();
        assert!(matches!(e, CompileError::TooManyRules(65)), "{e}");
    }
}
