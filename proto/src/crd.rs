//! Tapestry's own Kubernetes resources, `tapestry.io/v1alpha1`, stored as
//! custom resources so `kubectl get tappolicies,taptools` and GitOps tools
//! see what the fleet manager's REST API writes, and the other way round:
//!
//! - [`TapPolicy`]: which pods' traffic is mirrored (namespaces, pod, node
//!   and namespace selectors), what the tap keeps in the kernel (rules,
//!   snaplen), what the aggregator does to it (tcpdump filter, dedup,
//!   slicing, masking) and which tools get it;
//! - [`TapTool`]: where mirrored traffic is delivered (PCAP-over-IP, HTTP
//!   pcap streams, rotating pcapng files, gRPC subscriptions, VXLAN).
//!
//! Both are cluster-scoped: a policy selects pods across namespaces, and a
//! tool serves every policy that names it. The fleet manager installs the
//! CRDs ([`crds`]); tap-agents and aggregators watch the objects.

use std::borrow::Cow;
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::policy::{
    check_dns_label, check_dns_subdomain, Cidr, Direction, FieldError, FilterRule, LabelSelector,
    PortRange, Protocol,
};

/// The API group of Tapestry's resources.
pub const GROUP: &str = "tapestry.io";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// Which pods' traffic to mirror, what to keep of it and where it goes.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[kube(
    group = "tapestry.io",
    version = "v1alpha1",
    kind = "TapPolicy",
    doc = "A tap policy: which pods' traffic is mirrored, what is kept of it and which tools receive it.",
    plural = "tappolicies",
    singular = "tappolicy",
    shortname = "tpol",
    category = "tapestry",
    status = "TapPolicyStatus",
    printcolumn = r#"{"name":"Enabled","type":"boolean","jsonPath":".spec.enabled"}"#,
    printcolumn = r#"{"name":"Tools","type":"string","jsonPath":".spec.tools"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.matchedPods"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.matchedNodes"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TapPolicySpec {
    /// Whether the policy taps at all; a disabled policy keeps its settings.
    #[serde(default = "enabled")]
    #[schemars(default = "enabled")]
    #[schema(default = true)]
    pub enabled: bool,
    /// Namespaces whose pods are selected; empty with no namespace selector:
    /// every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces selected by their labels (together with `namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods selected by their labels; empty selects every pod of the
    /// selected namespaces.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// Only pods on nodes with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// In-kernel pre-filter: a packet is mirrored when it matches any rule;
    /// no rules mirror every packet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<TrafficRule>,
    /// Bytes the tap keeps of each packet; absent: whole packets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 262144))]
    #[schema(minimum = 1, maximum = 262144)]
    pub snaplen: Option<u32>,
    /// tcpdump (pcap-filter) expression the aggregator applies; empty keeps
    /// every mirrored packet.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub filter: String,
    /// Drop copies of a packet seen twice (e.g. on both pods of a flow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<Dedup>,
    /// Cut packets short before they reach the tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<Slice>,
    /// Overwrite payload bytes (keep headers, hide content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Mask>,
    /// Tools (TapTool names) that each receive every packet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Groups of tools sharing the load: each flow goes to one member,
    /// both directions to the same one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_groups: Vec<ToolGroup>,
    /// What ends the capture; the policy then stops and says why in its
    /// status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<CaptureLimits>,
}

fn enabled() -> bool {
    true
}

/// One in-kernel rule: every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficRule {
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp` or a protocol number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Source or destination port in any of these: `"80"` or `"8000-8080"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    /// Source or destination address in any of these networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<Cidr>,
    /// Which way, as the pod sees it.
    #[serde(default)]
    pub direction: PodDirection,
}

/// A packet's direction from the tapped pod's point of view.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum PodDirection {
    ToPod,
    FromPod,
    #[default]
    Both,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dedup {
    /// A copy arriving within this many microseconds of the first is a
    /// duplicate.
    #[serde(default = "dedup_window")]
    #[schemars(default = "dedup_window", range(min = 1, max = 10_000_000))]
    #[schema(default = 1000, minimum = 1, maximum = 10_000_000)]
    pub window_us: u64,
}

fn dedup_window() -> u64 {
    1000
}

/// Keep the first `snaplen` bytes of each packet, or its headers plus
/// `payload` bytes of payload (one of the two).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.snaplen) != has(self.payload)", "message": "set exactly one of snaplen and payload"}
]))]
pub struct Slice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 262144))]
    #[schema(minimum = 1, maximum = 262144)]
    pub snaplen: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 262144))]
    #[schema(maximum = 262144)]
    pub payload: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mask {
    /// Bytes of transport payload left as they are; the rest is overwritten.
    #[serde(default)]
    pub payload_offset: u32,
    /// The byte written over masked payload.
    #[serde(default)]
    #[schemars(range(max = 255))]
    pub byte: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolGroup {
    pub name: String,
    /// TapTool names sharing the group's flows.
    pub tools: Vec<String>,
}

/// Limits that end a capture.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaptureLimits {
    /// How long the capture runs, e.g. `10m`, `1h30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[schema(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$")]
    pub duration: Option<String>,
    /// Packets delivered before the capture stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_packets: Option<u64>,
    /// Bytes delivered before the capture stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<u64>,
}

/// What the fleet sees of a policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TapPolicyStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Pods the policy selects now, and the nodes they run on.
    #[serde(default)]
    pub matched_pods: u64,
    #[serde(default)]
    pub matched_nodes: u64,
    /// Packets the taps mirrored for this policy, summed over the nodes
    /// (each tap counts from its start).
    #[serde(default)]
    pub captured_packets: u64,
    /// Packets of this policy lost on the nodes (kernel ring, tap queues,
    /// while the aggregator was unreachable), as the taps report them.
    #[serde(default)]
    pub dropped_on_nodes: u64,
    /// Packets delivered to each tool.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub delivered: BTreeMap<String, u64>,
    /// Packets lost in the aggregator (its queues and the tools' queues).
    #[serde(default)]
    pub dropped: u64,
    /// Why the capture ended, once a limit was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<Stopped>,
}

/// A capture that ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stopped {
    /// `Duration`, `MaxPackets` or `MaxBytes`.
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub at: String,
}

/// A Kubernetes-style condition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition_time: String,
}

/// Where mirrored traffic is delivered.
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[kube(
    group = "tapestry.io",
    version = "v1alpha1",
    kind = "TapTool",
    doc = "A tool mirrored traffic is delivered to.",
    plural = "taptools",
    singular = "taptool",
    shortname = "ttool",
    category = "tapestry",
    status = "TapToolStatus",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".status.address"}"#,
    printcolumn = r#"{"name":"Clients","type":"integer","jsonPath":".status.clients"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'pcapOverIp' || has(self.listen)", "message": "a pcapOverIp tool needs listen (HOST:PORT)"},
    {"rule": "self.type != 'pcapngFiles' || has(self.directory)", "message": "a pcapngFiles tool needs directory"},
    {"rule": "self.type != 'vxlan' || has(self.remote)", "message": "a vxlan tool needs remote (HOST:PORT)"}
]))]
pub struct TapToolSpec {
    #[serde(rename = "type")]
    pub type_: ToolType,
    /// pcapOverIp: where tools connect (`tshark -i TCP@HOST:PORT`); binds
    /// on the aggregator's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// pcapOverIp: client networks allowed besides loopback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,
    /// pcapOverIp: serve the stream over TLS with the aggregator's
    /// certificate (read with `socat OPENSSL:HOST:PORT,cafile=CA -` or
    /// stunnel; tshark speaks plaintext only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// pcapngFiles: the directory files rotate in, on the aggregator's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// pcapngFiles: start a new file after this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rotate_bytes: Option<u64>,
    /// pcapngFiles: start a new file after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rotate_seconds: Option<u64>,
    /// pcapngFiles: files kept; older ones are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_files: Option<u32>,
    /// vxlan: the receiver, `HOST:PORT` (port 4789 by convention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// vxlan: the network identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 16777215))]
    pub vni: Option<u32>,
    /// Bytes of each packet the tool receives at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 262144))]
    pub snaplen: Option<u32>,
    /// http, grpc: a Secret in the aggregator's namespace
    /// (`tapestry-system` as the fleet manager deploys it) whose `token`
    /// key is the bearer token clients present (`Authorization: Bearer
    /// TOKEN`). Without one, only loopback clients on the aggregator's
    /// host are served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
}

/// How a tool receives packets.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ToolType {
    /// Classic pcap over TCP, as `tshark -i TCP@host:port` reads it.
    #[default]
    PcapOverIp,
    /// A pcap stream over HTTP from the aggregator.
    Http,
    /// Rotating pcapng files with pod identity in the interface blocks.
    PcapngFiles,
    /// A gRPC subscription (`tapestry.tool.v1`).
    Grpc,
    /// VXLAN-encapsulated frames to a remote receiver.
    Vxlan,
}

/// What the fleet sees of a tool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TapToolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Where the tool is served, as clients reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Clients connected now (streaming tools).
    #[serde(default)]
    pub clients: u64,
    #[serde(default)]
    pub delivered_packets: u64,
    #[serde(default)]
    pub dropped: u64,
}

impl TrafficRule {
    /// The rule as the tap applies it on a pod's host-side interface.
    pub fn to_filter_rule(&self) -> FilterRule {
        FilterRule {
            protocol: self.protocol,
            ports: self.ports.clone(),
            cidrs: self.cidrs.clone(),
            direction: self.direction.on_host_interface(),
        }
    }
}

impl PodDirection {
    /// The direction on the pod's host-side veth: what leaves the pod
    /// arrives there (ingress), what goes to the pod leaves it (egress).
    pub fn on_host_interface(self) -> Direction {
        match self {
            PodDirection::FromPod => Direction::Ingress,
            PodDirection::ToPod => Direction::Egress,
            PodDirection::Both => Direction::Both,
        }
    }
}

impl TapPolicySpec {
    /// What the schema cannot say: label selectors, namespaces, rules,
    /// slicing and tool references. Field paths are relative to the spec.
    /// (The tcpdump filter is compiled where libpcap is: the fleet manager
    /// and the aggregator.)
    pub fn check(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut push = |field: String, reason: String| errs.push(FieldError { field, reason });
        for (i, ns) in self.namespaces.iter().enumerate() {
            if let Err(r) = check_dns_label(ns) {
                push(format!("namespaces[{i}]"), r);
            }
        }
        for (path, selector) in [
            ("namespaceSelector", self.namespace_selector.as_ref()),
            ("podSelector", Some(&self.pod_selector)),
            ("nodeSelector", self.node_selector.as_ref()),
        ] {
            for e in selector.map(LabelSelector::check).unwrap_or_default() {
                push(format!("{path}.{}", e.field), e.reason);
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            for e in rule.to_filter_rule().check() {
                push(format!("rules[{i}].{}", e.field), e.reason);
            }
        }
        if let Some(slice) = &self.slice {
            if slice.snaplen.is_some() == slice.payload.is_some() {
                push(
                    "slice".into(),
                    "set exactly one of snaplen and payload".into(),
                );
            }
        }
        let mut tools = std::collections::BTreeSet::new();
        for (i, tool) in self.tools.iter().enumerate() {
            if let Err(r) = check_dns_subdomain(tool) {
                push(format!("tools[{i}]"), r);
            }
            if !tools.insert(tool) {
                push(format!("tools[{i}]"), format!("`{tool}` is listed twice"));
            }
        }
        for (i, group) in self.tool_groups.iter().enumerate() {
            if group.tools.is_empty() {
                push(
                    format!("toolGroups[{i}].tools"),
                    "a group needs at least one tool".into(),
                );
            }
            for (j, tool) in group.tools.iter().enumerate() {
                if let Err(r) = check_dns_subdomain(tool) {
                    push(format!("toolGroups[{i}].tools[{j}]"), r);
                }
            }
        }
        if let Some(d) = self.limits.as_ref().and_then(|l| l.duration.as_deref()) {
            if let Err(r) = parse_duration(d) {
                push("limits.duration".into(), r);
            }
        }
        errs
    }

    /// Whether the policy selects the pods of `namespace` (labelled
    /// `namespace_labels`; `None` when the namespace is not known yet, which
    /// no label selector matches): listed in `namespaces` or matched by
    /// `namespaceSelector`, every namespace when neither is set.
    pub fn selects_namespace(
        &self,
        namespace: &str,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> bool {
        let listed = self.namespaces.iter().any(|n| n == namespace);
        match &self.namespace_selector {
            None => self.namespaces.is_empty() || listed,
            Some(selector) => listed || namespace_labels.is_some_and(|l| selector.matches(l)),
        }
    }

    /// Whether the policy selects a pod labelled `pod_labels` in
    /// `namespace`, on a node labelled `node_labels`. (Whether the pod can
    /// be tapped at all — running, with a network of its own — is the
    /// caller's question.)
    pub fn selects_pod(
        &self,
        namespace: &str,
        namespace_labels: Option<&BTreeMap<String, String>>,
        pod_labels: &BTreeMap<String, String>,
        node_labels: &BTreeMap<String, String>,
    ) -> bool {
        self.node_selector
            .as_ref()
            .is_none_or(|s| s.matches(node_labels))
            && self.selects_namespace(namespace, namespace_labels)
            && self.pod_selector.matches(pod_labels)
    }

    /// Every tool the policy delivers to, plain or in a group.
    pub fn tool_names(&self) -> impl Iterator<Item = &str> {
        self.tools
            .iter()
            .chain(self.tool_groups.iter().flat_map(|g| g.tools.iter()))
            .map(String::as_str)
    }
}

/// A Go-style duration (`90s`, `10m`, `1h30m`, `250ms`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("`{text}` is not a duration such as 90s, 10m or 1h30m");
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let (unit, seconds) = [("ms", 0.001), ("h", 3600.0), ("m", 60.0), ("s", 1.0)]
            .into_iter()
            .find(|(unit, _)| rest.starts_with(unit))
            .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
        total += number * seconds;
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
}

impl TapPolicy {
    /// Whether the policy taps now: enabled and its capture not stopped.
    pub fn is_active(&self) -> bool {
        self.spec.enabled && self.status.as_ref().is_none_or(|s| s.stopped.is_none())
    }
}

impl TapToolSpec {
    /// What the schema cannot say: addresses that must parse, settings of
    /// other types. Field paths are relative to the spec.
    pub fn check(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut push = |field: &str, reason: String| {
            errs.push(FieldError {
                field: field.into(),
                reason,
            })
        };
        let address = |value: &Option<String>| {
            value
                .as_deref()
                .map(|a| {
                    a.parse::<std::net::SocketAddr>()
                        .map(|_| ())
                        .map_err(|_| format!("`{a}` is not an address such as 127.0.0.1:57012"))
                })
                .transpose()
        };
        let needs = |field: &str, present: bool, push: &mut dyn FnMut(&str, String)| {
            if !present {
                push(field, format!("required for a {} tool", self.type_.name()));
            }
        };
        match self.type_ {
            ToolType::PcapOverIp => needs("listen", self.listen.is_some(), &mut push),
            ToolType::PcapngFiles => needs("directory", self.directory.is_some(), &mut push),
            ToolType::Vxlan => {
                needs("remote", self.remote.is_some(), &mut push);
                needs("vni", self.vni.is_some(), &mut push);
            }
            ToolType::Http | ToolType::Grpc => {}
        }
        if let Err(r) = address(&self.listen) {
            push("listen", r);
        }
        if let Err(r) = address(&self.remote) {
            push("remote", r);
        }
        for (field, set, applies) in [
            (
                "listen",
                self.listen.is_some(),
                self.type_ == ToolType::PcapOverIp,
            ),
            (
                "allow",
                !self.allow.is_empty(),
                self.type_ == ToolType::PcapOverIp,
            ),
            (
                "tls",
                self.tls.is_some(),
                self.type_ == ToolType::PcapOverIp,
            ),
            (
                "directory",
                self.directory.is_some(),
                self.type_ == ToolType::PcapngFiles,
            ),
            (
                "rotateBytes",
                self.rotate_bytes.is_some(),
                self.type_ == ToolType::PcapngFiles,
            ),
            (
                "rotateSeconds",
                self.rotate_seconds.is_some(),
                self.type_ == ToolType::PcapngFiles,
            ),
            (
                "maxFiles",
                self.max_files.is_some(),
                self.type_ == ToolType::PcapngFiles,
            ),
            (
                "remote",
                self.remote.is_some(),
                self.type_ == ToolType::Vxlan,
            ),
            ("vni", self.vni.is_some(), self.type_ == ToolType::Vxlan),
            (
                "tokenSecret",
                self.token_secret.is_some(),
                matches!(self.type_, ToolType::Http | ToolType::Grpc),
            ),
        ] {
            if set && !applies {
                push(
                    field,
                    format!("does not apply to a {} tool", self.type_.name()),
                );
            }
        }
        if let Some(dir) = &self.directory {
            if !dir.starts_with('/') {
                push("directory", format!("`{dir}` must be an absolute path"));
            }
        }
        if let Some(name) = &self.token_secret {
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !valid {
                push(
                    "tokenSecret",
                    format!(
                        "`{name}` is not a Secret name (lowercase letters, digits, '-' and '.')"
                    ),
                );
            }
        }
        errs
    }
}

impl ToolType {
    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            ToolType::PcapOverIp => "pcapOverIp",
            ToolType::Http => "http",
            ToolType::PcapngFiles => "pcapngFiles",
            ToolType::Grpc => "grpc",
            ToolType::Vxlan => "vxlan",
        }
    }
}

/// Strings in the schema: these types (de)serialize as text.
macro_rules! string_schema {
    ($t:ty, $name:literal, $description:literal) => {
        impl JsonSchema for $t {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({"type": "string", "description": $description})
            }
        }
    };
}

/// The same strings in the REST API's OpenAPI document.
macro_rules! utoipa_string_schema {
    ($t:ty, $description:literal) => {
        impl utoipa::PartialSchema for $t {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some($description))
                    .into()
            }
        }

        impl ToSchema for $t {}
    };
}

utoipa_string_schema!(
    Protocol,
    "tcp, udp, icmp, icmpv6, sctp or an IP protocol number"
);
utoipa_string_schema!(
    PortRange,
    "a port or an inclusive range: \"80\", \"8000-8080\""
);
utoipa_string_schema!(
    Cidr,
    "an IPv4 or IPv6 network, \"10.0.0.0/8\"; an address alone is one host"
);

string_schema!(
    Protocol,
    "Protocol",
    "tcp, udp, icmp, icmpv6, sctp or an IP protocol number"
);
string_schema!(
    PortRange,
    "PortRange",
    "a port or an inclusive range: \"80\", \"8000-8080\""
);
string_schema!(
    Cidr,
    "Cidr",
    "an IPv4 or IPv6 network, \"10.0.0.0/8\"; an address alone is one host"
);

/// The CustomResourceDefinitions of Tapestry's resources, as the fleet
/// manager installs them.
pub fn crds(
) -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![TapPolicy::crd(), TapTool::crd()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The REST API's example policy is a valid spec, and says what it
    /// means field by field.
    #[test]
    fn a_policy_reads_as_written() {
        let spec: TapPolicySpec = serde_json::from_value(json!({
            "namespaces": ["shop"],
            "podSelector": {"matchLabels": {"app": "web"}},
            "rules": [{"protocol": "tcp", "ports": ["80", "8000-8080"], "direction": "toPod"}],
            "filter": "tcp port 80",
            "slice": {"payload": 128},
            "tools": ["wireshark"],
        }))
        .expect("spec");
        assert!(spec.enabled, "policies are enabled unless said otherwise");
        assert_eq!(spec.rules[0].protocol, Some(Protocol::TCP));
        assert_eq!(
            spec.rules[0].ports[1],
            PortRange {
                start: 8000,
                end: 8080
            }
        );
        assert_eq!(spec.rules[0].direction, PodDirection::ToPod);
        assert_eq!(
            spec.slice,
            Some(Slice {
                snaplen: None,
                payload: Some(128)
            })
        );
        let back = serde_json::to_value(&spec).expect("json");
        assert_eq!(back["rules"][0]["ports"], json!(["80", "8000-8080"]));
    }

    #[test]
    fn checks_name_the_field() {
        let spec: TapPolicySpec = serde_json::from_value(json!({
            "namespaces": ["Shop"],
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]},
            "rules": [{"protocol": "icmp", "ports": ["80"]}],
            "slice": {"payload": 1, "snaplen": 64},
            "tools": ["a", "a"],
            "toolGroups": [{"name": "g", "tools": []}],
            "limits": {"duration": "soon"},
        }))
        .expect("spec");
        let fields: Vec<String> = spec.check().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "namespaces[0]",
                "podSelector.matchExpressions[0].values",
                "rules[0].ports",
                "slice",
                "tools[1]",
                "toolGroups[0].tools",
                "limits.duration",
            ]
        );
        let tool: TapToolSpec =
            serde_json::from_value(json!({"type": "pcapOverIp", "listen": "here", "vni": 3}))
                .expect("tool");
        let fields: Vec<String> = tool.check().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["listen", "vni"]);
        let tool: TapToolSpec = serde_json::from_value(
            json!({"type": "pcapOverIp", "listen": "127.0.0.1:1", "tokenSecret": "Bad_Name"}),
        )
        .expect("tool");
        let fields: Vec<String> = tool.check().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["tokenSecret", "tokenSecret"]);
        assert!(
            TapToolSpec {
                type_: ToolType::Vxlan,
                ..Default::default()
            }
            .check()
            .len()
                == 2
        );
    }

    #[test]
    fn durations_read_as_go_writes_them() {
        assert_eq!(
            parse_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert_eq!(
            parse_duration("250ms"),
            Ok(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            parse_duration("1.5s"),
            Ok(std::time::Duration::from_millis(1500))
        );
        for bad in ["", "10", "m", "10x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn directions_are_seen_from_the_pod() {
        assert_eq!(
            PodDirection::FromPod.on_host_interface(),
            Direction::Ingress
        );
        assert_eq!(PodDirection::ToPod.on_host_interface(), Direction::Egress);
        assert_eq!(PodDirection::Both.on_host_interface(), Direction::Both);
    }

    #[test]
    fn the_crds_are_cluster_scoped_with_status_and_columns() {
        let crds = crds();
        let names: Vec<&str> = crds
            .iter()
            .filter_map(|c| c.metadata.name.as_deref())
            .collect();
        assert_eq!(names, ["tappolicies.tapestry.io", "taptools.tapestry.io"]);
        for crd in &crds {
            assert_eq!(crd.spec.scope, "Cluster");
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, VERSION);
            assert!(version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some());
            assert!(version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| !c.is_empty()));
        }
        let tool = serde_json::to_value(&crds[1]).expect("json");
        let rules = &tool["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["x-kubernetes-validations"];
        assert_eq!(rules.as_array().map(Vec::len), Some(3), "{tool}");
    }
}
