//! `TapPolicy`: which pods to tap and which of their packets to keep.
//!
//! A policy selects pods (namespace + Kubernetes-style label selector) and
//! carries pre-filter rules that the tap evaluates in the kernel, so packets
//! no policy wants never leave it. The same type is read by tap-agent (from
//! a file or the command line) and served by the fleet manager's REST API.
//!
//! ```json
//! {
//!   "name": "web-http",
//!   "namespace": "shop",
//!   "selector": { "matchLabels": { "app": "web" } },
//!   "rules": [ { "protocol": "tcp", "ports": ["80", "8000-8080"], "cidrs": ["10.0.0.0/8"], "direction": "both" } ],
//!   "snaplen": 128
//! }
//! ```
//!
//! Rule semantics: a packet is wanted by a policy when it matches **any** of
//! its rules (no rules = every packet). A rule matches when **every** field
//! it sets matches: `protocol` (the L4 protocol), `ports` (source or
//! destination port in one of the ranges), `cidrs` (source or destination
//! address in one of the networks), `direction` (as seen by the tapped
//! interface).

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tapestry_apimachinery::validation;

/// Largest snaplen accepted (same as tcpdump's default).
pub const MAX_SNAPLEN: u32 = 262_144;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TapPolicy {
    /// Unique name of the policy (DNS-1123 subdomain).
    pub name: String,
    /// Namespace whose pods are selected; absent = every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pods selected by their labels; empty = every pod of the namespace.
    #[serde(default)]
    pub selector: LabelSelector,
    /// Pre-filter rules (any of them); empty = every packet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<FilterRule>,
    /// Bytes kept of each packet; absent = the whole packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snaplen: Option<u32>,
}

/// A Kubernetes `LabelSelector` (matchLabels AND matchExpressions).
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    utoipa::ToSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    utoipa::ToSchema,
)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One pre-filter rule; every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Source or destination port in any of these ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    /// Source or destination address in any of these networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<Cidr>,
    #[serde(default)]
    pub direction: Direction,
}

/// Which way the packet crossed the tapped interface (on a pod's host-side
/// veth, `ingress` is traffic leaving the pod).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
    #[default]
    Both,
}

/// An IP protocol number; (de)serialized as `tcp`, `udp`, `icmp`, `icmpv6`,
/// `sctp` or a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const ICMP: Protocol = Protocol(1);
    pub const TCP: Protocol = Protocol(6);
    pub const UDP: Protocol = Protocol(17);
    pub const ICMPV6: Protocol = Protocol(58);
    pub const SCTP: Protocol = Protocol(132);

    /// Whether packets of this protocol carry ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::TCP | Protocol::UDP | Protocol::SCTP)
    }
}

/// An inclusive port range; `"80"` or `"8000-8080"` (or a bare number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

/// An IPv4 or IPv6 network, `"10.0.0.0/8"`; a bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A validation failure, naming the offending field by its path
/// (`rules[0].ports[1]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// All validation failures of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        write!(f, "{}", parts.join("; "))
    }
}

impl std::error::Error for ValidationErrors {}

impl TapPolicy {
    /// Checks every field; the error lists all problems, each naming its field.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = Vec::new();
        let mut err = |field: String, reason: String| errs.push(FieldError { field, reason });
        if let Err(r) = check_dns_subdomain(&self.name) {
            err("name".into(), r);
        }
        if let Some(ns) = &self.namespace {
            if let Err(r) = check_dns_label(ns) {
                err("namespace".into(), r);
            }
        }
        for e in self.selector.check() {
            err(format!("selector.{}", e.field), e.reason);
        }
        for (i, rule) in self.rules.iter().enumerate() {
            for e in rule.check() {
                err(format!("rules[{i}].{}", e.field), e.reason);
            }
        }
        if let Some(s) = self.snaplen {
            if s == 0 || s > MAX_SNAPLEN {
                err(
                    "snaplen".into(),
                    format!("must be between 1 and {MAX_SNAPLEN}, got {s}"),
                );
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errs))
        }
    }

    /// Whether a pod with these namespace and labels is selected.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace) && self.selector.matches(labels)
    }
}

impl LabelSelector {
    /// Problems of this selector, with field paths relative to it.
    pub fn check(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut err = |field: String, reason: String| errs.push(FieldError { field, reason });
        for (k, v) in &self.match_labels {
            if let Err(r) = check_label_key(k) {
                err(format!("matchLabels[{k}]"), r);
            }
            if let Err(r) = check_label_value(v) {
                err(format!("matchLabels[{k}]"), r);
            }
        }
        for (i, req) in self.match_expressions.iter().enumerate() {
            let path = format!("matchExpressions[{i}]");
            if let Err(r) = check_label_key(&req.key) {
                err(format!("{path}.key"), r);
            }
            match req.operator {
                SelectorOperator::In | SelectorOperator::NotIn if req.values.is_empty() => err(
                    format!("{path}.values"),
                    "must be non-empty for operator In or NotIn".into(),
                ),
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !req.values.is_empty() =>
                {
                    err(
                        format!("{path}.values"),
                        "must be empty for operator Exists or DoesNotExist".into(),
                    )
                }
                _ => {}
            }
            for (j, v) in req.values.iter().enumerate() {
                if let Err(r) = check_label_value(v) {
                    err(format!("{path}.values[{j}]"), r);
                }
            }
        }
        errs
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                    SelectorOperator::Exists => got.is_some(),
                    SelectorOperator::DoesNotExist => got.is_none(),
                }
            })
    }
}

impl FilterRule {
    /// Problems of this rule, with field paths relative to the rule.
    pub fn check(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        for (j, p) in self.ports.iter().enumerate() {
            if p.start > p.end {
                errs.push(FieldError {
                    field: format!("ports[{j}]"),
                    reason: format!("range start {} is above its end {}", p.start, p.end),
                });
            }
        }
        if !self.ports.is_empty() {
            if let Some(proto) = self.protocol {
                if !proto.has_ports() {
                    errs.push(FieldError {
                        field: "ports".into(),
                        reason: format!("protocol {proto} has no ports (use tcp, udp or sctp)"),
                    });
                }
            }
        }
        for (j, c) in self.cidrs.iter().enumerate() {
            if let Err(reason) = c.check() {
                errs.push(FieldError {
                    field: format!("cidrs[{j}]"),
                    reason,
                });
            }
        }
        errs
    }

    /// True when the rule sets nothing but a direction (matches every packet
    /// going that way).
    pub fn is_wildcard(&self) -> bool {
        self.protocol.is_none() && self.ports.is_empty() && self.cidrs.is_empty()
    }
}

/// Parses the command-line form `proto=tcp,port=80,cidr=10.0.0.0/8,dir=both`.
/// `port` and `cidr` may repeat; every key is optional.
impl FromStr for FilterRule {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut rule = FilterRule::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(FieldError {
                    field: part.into(),
                    reason: "expected key=value (keys: proto, port, cidr, dir)".into(),
                });
            };
            let bad = |reason: String| FieldError {
                field: key.trim().into(),
                reason,
            };
            let value = value.trim();
            match key.trim() {
                "proto" | "protocol" => {
                    if rule.protocol.is_some() {
                        return Err(bad("given twice".into()));
                    }
                    rule.protocol = Some(value.parse().map_err(bad)?)
                }
                "port" | "ports" => rule.ports.push(value.parse().map_err(bad)?),
                "cidr" | "net" => rule.cidrs.push(value.parse().map_err(bad)?),
                "dir" | "direction" => {
                    rule.direction = match value {
                        "in" | "ingress" => Direction::Ingress,
                        "out" | "egress" => Direction::Egress,
                        "both" | "any" => Direction::Both,
                        other => {
                            return Err(bad(format!(
                                "unknown direction `{other}` (expected ingress, egress or both)"
                            )))
                        }
                    }
                }
                other => {
                    return Err(FieldError {
                        field: other.into(),
                        reason: "unknown key (expected proto, port, cidr or dir)".into(),
                    })
                }
            }
        }
        if let Some(e) = rule.check().into_iter().next() {
            return Err(e);
        }
        Ok(rule)
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::TCP,
            "udp" => Protocol::UDP,
            "icmp" => Protocol::ICMP,
            "icmpv6" | "icmp6" => Protocol::ICMPV6,
            "sctp" => Protocol::SCTP,
            other => Protocol(other.parse().map_err(|_| {
                format!("unknown protocol `{s}` (expected tcp, udp, icmp, icmpv6, sctp or a number 0-255)")
            })?),
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Protocol::TCP => f.write_str("tcp"),
            Protocol::UDP => f.write_str("udp"),
            Protocol::ICMP => f.write_str("icmp"),
            Protocol::ICMPV6 => f.write_str("icmpv6"),
            Protocol::SCTP => f.write_str("sctp"),
            Protocol(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("`{p}` is not a port number 0-65535"))
        };
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if start > end {
            return Err(format!("range `{s}`: start is above end"));
        }
        Ok(PortRange { start, end })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Cidr {
    pub fn max_prefix(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.prefix_len > self.max_prefix() {
            return Err(format!(
                "prefix length {} is longer than {}",
                self.prefix_len,
                self.max_prefix()
            ));
        }
        if self.network_bytes() != addr16(self.addr) {
            return Err(format!("{self} has host bits set"));
        }
        Ok(())
    }

    /// The address as 16 bytes (IPv4 as `::ffff:a.b.c.d`) with host bits cleared.
    pub fn network_bytes(&self) -> [u8; 16] {
        let mut b = addr16(self.addr);
        let bits = self.mapped_prefix_len() as usize;
        for (i, byte) in b.iter_mut().enumerate() {
            let keep = bits.saturating_sub(i * 8).min(8);
            *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
        }
        b
    }

    /// The prefix length over the 16-byte (IPv4-mapped) form.
    pub fn mapped_prefix_len(&self) -> u8 {
        if self.addr.is_ipv4() {
            96 + self.prefix_len.min(32)
        } else {
            self.prefix_len.min(128)
        }
    }
}

fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match p {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("prefix length `{p}` must be a number 0-{max}")),
            },
        };
        let c = Cidr { addr, prefix_len };
        c.check()?;
        Ok(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

macro_rules! serde_as_string {
    ($t:ty, $expecting:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Numbers are accepted too (`80`, `6`).
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    S(String),
                    N(u64),
                }
                let s = match Raw::deserialize(d)
                    .map_err(|_| serde::de::Error::custom(concat!("expected ", $expecting)))?
                {
                    Raw::S(s) => s,
                    Raw::N(n) => n.to_string(),
                };
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(Protocol, "a protocol name or number");
serde_as_string!(PortRange, "a port or a port range");
serde_as_string!(Cidr, "a CIDR such as 10.0.0.0/8");

/// Kubernetes' name and label rules (one copy, in tapestry-apimachinery),
/// as one message per value.
fn first_error(errors: Vec<String>, what: &str, value: &str) -> Result<(), String> {
    match errors.first() {
        None => Ok(()),
        Some(e) => Err(format!("{what} `{value}`: {e}")),
    }
}

pub(crate) fn check_dns_label(s: &str) -> Result<(), String> {
    first_error(validation::dns1123_label_errors(s), "name", s)
}

pub(crate) fn check_dns_subdomain(s: &str) -> Result<(), String> {
    first_error(validation::dns1123_subdomain_errors(s), "name", s)
}

pub(crate) fn check_label_value(v: &str) -> Result<(), String> {
    first_error(validation::label_value_errors(v), "label value", v)
}

pub(crate) fn check_label_key(k: &str) -> Result<(), String> {
    first_error(validation::qualified_name_errors(k), "label key", k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: serde_json::Value) -> TapPolicy {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn round_trips_through_json() {
        let p = policy(serde_json::json!({
            "name": "web-http",
            "namespace": "shop",
            "selector": {"matchLabels": {"app": "web"},
                         "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]},
            "rules": [{"protocol": "tcp", "ports": ["80", 443, "8000-8080"], "cidrs": ["10.0.0.0/8", "fd00::/8"], "direction": "ingress"}],
            "snaplen": 128
        }));
        p.validate().unwrap();
        assert_eq!(p.rules[0].protocol, Some(Protocol::TCP));
        assert_eq!(
            p.rules[0].ports[1],
            PortRange {
                start: 443,
                end: 443
            }
        );
        assert_eq!(
            p.rules[0].ports[2],
            PortRange {
                start: 8000,
                end: 8080
            }
        );
        let back: TapPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn validation_names_fields() {
        let p = TapPolicy {
            name: "Bad_Name".into(),
            namespace: Some("-x".into()),
            selector: LabelSelector {
                match_labels: [("app".to_string(), "we b".to_string())].into(),
                match_expressions: vec![LabelSelectorRequirement {
                    key: "k".into(),
                    operator: SelectorOperator::In,
                    values: vec![],
                }],
            },
            rules: vec![FilterRule {
                protocol: Some(Protocol::ICMP),
                ports: vec![PortRange { start: 9, end: 3 }],
                ..Default::default()
            }],
            snaplen: Some(0),
        };
        let errs = p.validate().unwrap_err();
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "name",
                "namespace",
                "selector.matchLabels[app]",
                "selector.matchExpressions[0].values",
                "rules[0].ports[0]",
                "rules[0].ports",
                "snaplen"
            ]
        );
    }

    #[test]
    fn bad_json_is_refused() {
        assert!(serde_json::from_value::<TapPolicy>(
            serde_json::json!({"name": "a", "rules": [{"cidrs": ["10.0.0.1/8"]}]})
        )
        .unwrap_err()
        .to_string()
        .contains("host bits"));
        assert!(serde_json::from_value::<TapPolicy>(
            serde_json::json!({"name": "a", "rules": [{"protocol": "tcpx"}]})
        )
        .is_err());
        assert!(
            serde_json::from_value::<TapPolicy>(serde_json::json!({"name": "a", "snap": 1}))
                .is_err()
        );
    }

    #[test]
    fn parses_cli_rules() {
        let r: FilterRule = "proto=tcp,port=80,cidr=10.0.0.0/8,dir=both"
            .parse()
            .unwrap();
        assert_eq!(r.protocol, Some(Protocol::TCP));
        assert_eq!(r.ports, vec![PortRange { start: 80, end: 80 }]);
        assert_eq!(r.cidrs[0].to_string(), "10.0.0.0/8");
        assert_eq!(r.direction, Direction::Both);
        let r: FilterRule = "dir=egress,port=1-1024,port=8080".parse().unwrap();
        assert_eq!(r.ports.len(), 2);
        assert!(!r.is_wildcard());
        assert!("".parse::<FilterRule>().unwrap().is_wildcard());
        for (bad, field) in [
            ("proto=tcq", "proto"),
            ("port=70000", "port"),
            ("cidr=10.0.0.0/33", "cidr"),
            ("cidr=10.1.0.0/8", "cidr"),
            ("dir=up", "dir"),
            ("colour=red", "colour"),
            ("tcp", "tcp"),
            ("proto=icmp,port=80", "ports"),
        ] {
            let e = bad.parse::<FilterRule>().unwrap_err();
            assert_eq!(e.field, field, "{bad}: {e}");
        }
    }

    #[test]
    fn cidr_bytes() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(c.mapped_prefix_len(), 112);
        assert_eq!(&c.network_bytes()[10..14], &[0xff, 0xff, 10, 1]);
        let c: Cidr = "fd00::/8".parse().unwrap();
        assert_eq!(c.mapped_prefix_len(), 8);
        assert_eq!(c.network_bytes()[0], 0xfd);
    }

    #[test]
    fn selectors_match() {
        let p = policy(serde_json::json!({
            "name": "p", "namespace": "shop",
            "selector": {"matchLabels": {"app": "web"},
                         "matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}
        }));
        let labels = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(p.selects("shop", &labels(&[("app", "web"), ("x", "y")])));
        assert!(!p.selects("other", &labels(&[("app", "web")])));
        assert!(!p.selects("shop", &labels(&[("app", "db")])));
        assert!(!p.selects("shop", &labels(&[("app", "web"), ("canary", "1")])));
    }
}
