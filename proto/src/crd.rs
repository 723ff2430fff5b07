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

use crate::policy::{Cidr, LabelSelector, PortRange, Protocol};

/// The API group of Tapestry's resources.
pub const GROUP: &str = "tapestry.io";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// Which pods' traffic to mirror, what to keep of it and where it goes.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PodDirection {
    ToPod,
    FromPod,
    #[default]
    Both,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dedup {
    /// A copy arriving within this many microseconds of the first is a
    /// duplicate.
    #[serde(default = "dedup_window")]
    #[schemars(default = "dedup_window", range(min = 1, max = 10_000_000))]
    pub window_us: u64,
}

fn dedup_window() -> u64 {
    1000
}

/// Keep the first `snaplen` bytes of each packet, or its headers plus
/// `payload` bytes of payload (one of the two).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.snaplen) != has(self.payload)", "message": "set exactly one of snaplen and payload"}
]))]
pub struct Slice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 262144))]
    pub snaplen: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 262144))]
    pub payload: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolGroup {
    pub name: String,
    /// TapTool names sharing the group's flows.
    pub tools: Vec<String>,
}

/// Limits that end a capture.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaptureLimits {
    /// How long the capture runs, e.g. `10m`, `1h30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// Packets and bytes the taps mirrored for this policy.
    #[serde(default)]
    pub captured_packets: u64,
    #[serde(default)]
    pub captured_bytes: u64,
    /// Packets delivered to each tool.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub delivered: BTreeMap<String, u64>,
    /// Packets lost on the way (kernel ring, tap queues, aggregator and
    /// tool queues), counted where they were lost.
    #[serde(default)]
    pub dropped: u64,
    /// Why the capture ended, once a limit was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<Stopped>,
}

/// A capture that ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stopped {
    /// `Duration`, `MaxPackets` or `MaxBytes`.
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub at: String,
}

/// A Kubernetes-style condition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
}

/// How a tool receives packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
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
