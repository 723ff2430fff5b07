//! TapPolicy and TapTool specs as the aggregator's own configuration
//! types: the one place CRD fields meet `PolicyConfig` and `SinkConfig`,
//! so cluster mode runs exactly what a `--config` file with the same
//! settings would.

use tapestry_proto::crd::{TapPolicy, TapTool, ToolType};
use tapestry_proto::policy::FieldError;

use crate::config::{GroupConfig, PolicyConfig};
use crate::limits::LimitsConfig;
use crate::sinks::grpc::config::GrpcConfig;
use crate::sinks::http::config::HttpConfig;
use crate::sinks::pcap_over_ip::config::PcapOverIpConfig;
use crate::sinks::pcapng_file::config::PcapngFileConfig;
use crate::sinks::vxlan::config::VxlanConfig;
use crate::sinks::{
    default_client_queue, default_max_clients, default_queue, default_snaplen, SecretRef,
    SinkConfig,
};
use crate::transforms::dedup::DedupConfig;
use crate::transforms::mask::MaskConfig;
use crate::transforms::slice::SliceConfig;

fn default_policy_queue() -> usize {
    1024
}

/// The spec's own checks (those the schema cannot express), as one
/// message naming every offending field.
fn checked(errors: Vec<FieldError>) -> Result<(), String> {
    if errors.is_empty() {
        return Ok(());
    }
    let all: Vec<String> = errors.iter().map(|e| format!("spec.{e}")).collect();
    Err(all.join("; "))
}

/// The pipeline a TapPolicy asks for. It takes the packets taps tagged
/// with the policy's name. Whether it runs at all (`enabled`, a recorded
/// stop) is the reconciler's decision, not part of the mapping.
pub fn policy_config(p: &TapPolicy) -> Result<PolicyConfig, String> {
    let name = p
        .metadata
        .name
        .clone()
        .ok_or("metadata.name: a TapPolicy needs a name")?;
    let s = &p.spec;
    checked(s.check())?;
    let slice = match &s.slice {
        None => None,
        Some(sl) => match (sl.snaplen, sl.payload) {
            (Some(n), None) if n > 0 => Some(SliceConfig::Bytes(n as usize)),
            (None, Some(n)) => Some(SliceConfig::Payload(n as usize)),
            _ => {
                return Err(
                    "spec.slice: set exactly one of snaplen (at least 1) and payload".into(),
                )
            }
        },
    };
    let limits = match &s.limits {
        None => None,
        Some(l) => {
            let limits = LimitsConfig {
                max_packets: l.max_packets,
                max_bytes: l.max_bytes,
                duration: l
                    .duration
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(|e| format!("spec.limits.duration: {e}"))?,
            };
            if limits.max_packets == Some(0) {
                return Err("spec.limits.maxPackets: must be at least 1".into());
            }
            if limits.max_bytes == Some(0) {
                return Err("spec.limits.maxBytes: must be at least 1".into());
            }
            Some(limits)
        }
    };
    crate::bpf::Program::compile(&s.filter, crate::bpf::LINKTYPE_ETHERNET, 262_144)
        .map_err(|e| format!("spec.filter: {}", e.message))?;
    Ok(PolicyConfig {
        tap_policies: vec![name.clone()],
        name,
        filter: s.filter.clone(),
        dedup: s.dedup.as_ref().map(|d| DedupConfig {
            window_us: d.window_us,
            ..DedupConfig::default()
        }),
        slice,
        mask: s.mask.as_ref().map(|m| MaskConfig {
            payload_offset: m.payload_offset as usize,
            byte: m.byte,
        }),
        sinks: s.tools.clone(),
        groups: s
            .tool_groups
            .iter()
            .map(|g| GroupConfig {
                name: g.name.clone(),
                members: g.tools.clone(),
            })
            .collect(),
        queue: default_policy_queue(),
        limits,
    })
}

/// The Secret holding a tool's token (TapTools are cluster-wide; the
/// Secret is in the aggregator's own namespace).
fn token_secret(t: &TapTool) -> Option<SecretRef> {
    Some(SecretRef {
        name: t.spec.token_secret.clone()?,
    })
}

/// The sink a TapTool asks for, named after the tool: the HTTP path
/// segment, the gRPC subscription name and the pcapng file prefix.
pub fn sink_config(t: &TapTool) -> Result<SinkConfig, String> {
    let name = t
        .metadata
        .name
        .clone()
        .ok_or("metadata.name: a TapTool needs a name")?;
    let s = &t.spec;
    checked(s.check())?;
    let snaplen = s.snaplen.unwrap_or_else(default_snaplen);
    let required = |v: &Option<String>, field: &str| {
        v.clone()
            .ok_or_else(|| format!("spec.{field}: required for a {} tool", s.type_.name()))
    };
    let cfg = match s.type_ {
        ToolType::PcapOverIp => SinkConfig::PcapOverIp(PcapOverIpConfig {
            listen: required(&s.listen, "listen")?,
            // Loopback, plus what the tool allows.
            allow: Some(s.allow.clone()),
            tls: s.tls.unwrap_or(false),
            queue: default_queue(),
            client_queue: default_client_queue(),
            max_clients: default_max_clients(),
            snaplen,
            name,
        }),
        ToolType::Http => SinkConfig::Http(HttpConfig {
            name,
            queue: default_queue(),
            client_queue: default_client_queue(),
            max_clients: default_max_clients(),
            snaplen,
            token_file: None,
            token: None,
            token_secret: token_secret(t),
        }),
        ToolType::PcapngFiles => SinkConfig::PcapngFile(PcapngFileConfig {
            directory: required(&s.directory, "directory")?.into(),
            prefix: name.clone(),
            rotate_bytes: s.rotate_bytes.unwrap_or(0),
            rotate_seconds: s.rotate_seconds.unwrap_or(0),
            max_files: s.max_files.unwrap_or(0) as usize,
            queue: default_queue(),
            snaplen,
            name,
        }),
        ToolType::Grpc => SinkConfig::Grpc(GrpcConfig {
            name,
            queue: default_queue(),
            client_queue: default_client_queue(),
            max_clients: default_max_clients(),
            snaplen,
            token_file: None,
            token: None,
            token_secret: token_secret(t),
        }),
        ToolType::Vxlan => SinkConfig::Vxlan(VxlanConfig {
            remote: required(&s.remote, "remote")?,
            vni: s.vni.unwrap_or(1),
            queue: default_queue(),
            snaplen,
            name,
        }),
    };
    cfg.validate().map_err(|e| format!("spec.{e}"))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn policy(spec: serde_json::Value) -> TapPolicy {
        serde_json::from_value(json!({
            "apiVersion": "tapestry.io/v1alpha1",
            "kind": "TapPolicy",
            "metadata": {"name": "web"},
            "spec": spec,
        }))
        .expect("policy")
    }

    fn tool(spec: serde_json::Value) -> TapTool {
        serde_json::from_value(json!({
            "apiVersion": "tapestry.io/v1alpha1",
            "kind": "TapTool",
            "metadata": {"name": "ws"},
            "spec": spec,
        }))
        .expect("tool")
    }

    #[test]
    fn a_full_policy_maps_field_by_field() {
        let c = policy_config(&policy(json!({
            "filter": "tcp port 80",
            "dedup": {"windowUs": 250},
            "slice": {"payload": 64},
            "mask": {"payloadOffset": 16, "byte": 42},
            "tools": ["ws", "files"],
            "toolGroups": [{"name": "ids", "tools": ["ids-a", "ids-b"]}],
            "limits": {"maxPackets": 100, "maxBytes": 5000, "duration": "1h30m"},
        })))
        .unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(
            c.tap_policies,
            ["web"],
            "takes what taps tagged with its name"
        );
        assert_eq!(c.filter, "tcp port 80");
        assert_eq!(c.dedup.as_ref().map(|d| d.window_us), Some(250));
        assert_eq!(c.slice, Some(SliceConfig::Payload(64)));
        assert_eq!(
            c.mask,
            Some(MaskConfig {
                payload_offset: 16,
                byte: 42
            })
        );
        assert_eq!(c.sinks, ["ws", "files"]);
        assert_eq!(
            c.groups,
            [GroupConfig {
                name: "ids".into(),
                members: vec!["ids-a".into(), "ids-b".into()]
            }]
        );
        let l = c.limits.unwrap();
        assert_eq!(l.max_packets, Some(100));
        assert_eq!(l.max_bytes, Some(5000));
        assert_eq!(l.duration.map(|d| d.0), Some(Duration::from_secs(5400)));
    }

    #[test]
    fn a_minimal_policy_keeps_everything() {
        let c = policy_config(&policy(json!({"tools": ["ws"]}))).unwrap();
        assert_eq!(c.filter, "");
        assert!(c.dedup.is_none() && c.slice.is_none() && c.mask.is_none());
        assert!(c.limits.is_none() && c.groups.is_empty());
        let c = policy_config(&policy(json!({"slice": {"snaplen": 96}}))).unwrap();
        assert_eq!(c.slice, Some(SliceConfig::Bytes(96)));
    }

    #[test]
    fn policy_errors_name_the_field() {
        let e = |spec| policy_config(&policy(spec)).unwrap_err();
        assert!(
            e(json!({"filter": "tcp portt 80"})).starts_with("spec.filter: "),
            "{}",
            e(json!({"filter": "tcp portt 80"}))
        );
        assert_eq!(
            e(json!({"slice": {"snaplen": 10, "payload": 5}})),
            "spec.slice: set exactly one of snaplen and payload"
        );
        assert_eq!(
            e(json!({"tools": ["a", "a"], "slice": {}})),
            "spec.slice: set exactly one of snaplen and payload; spec.tools[1]: `a` is listed twice",
            "every problem at once"
        );
        assert!(e(json!({"limits": {"duration": "forever"}})).starts_with("spec.limits.duration: "));
        assert_eq!(
            e(json!({"limits": {"maxPackets": 0}})),
            "spec.limits.maxPackets: must be at least 1"
        );
        assert_eq!(
            e(json!({"toolGroups": [{"name": "g", "tools": []}]})),
            "spec.toolGroups[0].tools: a group needs at least one tool"
        );
        let mut nameless = policy(json!({}));
        nameless.metadata.name = None;
        assert!(policy_config(&nameless)
            .unwrap_err()
            .starts_with("metadata.name"));
    }

    #[test]
    fn every_tool_type_maps_to_its_sink() {
        let c = sink_config(&tool(json!({
            "type": "pcapOverIp", "listen": "127.0.0.1:57012", "allow": ["10.0.0.0/8"], "snaplen": 128
        })))
        .unwrap();
        let SinkConfig::PcapOverIp(p) = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            (p.name.as_str(), p.listen.as_str(), p.snaplen),
            ("ws", "127.0.0.1:57012", 128)
        );
        assert_eq!(p.allow, Some(vec!["10.0.0.0/8".parse().unwrap()]));

        let c = sink_config(&tool(json!({"type": "pcapOverIp", "listen": "0.0.0.0:1"}))).unwrap();
        let SinkConfig::PcapOverIp(p) = c else {
            panic!("{c:?}")
        };
        assert_eq!(p.allow, Some(vec![]), "no allow list: loopback only");
        assert_eq!(p.snaplen, default_snaplen());

        let c = sink_config(&tool(json!({"type": "http"}))).unwrap();
        assert!(
            matches!(c, SinkConfig::Http(ref h) if h.name == "ws"),
            "{c:?}"
        );

        let c = sink_config(&tool(json!({
            "type": "pcapngFiles", "directory": "/var/pcap", "rotateBytes": 1000, "rotateSeconds": 60, "maxFiles": 5
        })))
        .unwrap();
        let SinkConfig::PcapngFile(f) = c else {
            panic!("{c:?}")
        };
        assert_eq!(f.directory, std::path::Path::new("/var/pcap"));
        assert_eq!(f.prefix, "ws", "files are named after the tool");
        assert_eq!(
            (f.rotate_bytes, f.rotate_seconds, f.max_files),
            (1000, 60, 5)
        );

        let c = sink_config(&tool(json!({"type": "grpc"}))).unwrap();
        assert!(
            matches!(c, SinkConfig::Grpc(ref g) if g.name == "ws"),
            "{c:?}"
        );

        let c = sink_config(&tool(
            json!({"type": "vxlan", "remote": "192.0.2.1:4789", "vni": 9}),
        ))
        .unwrap();
        let SinkConfig::Vxlan(v) = c else {
            panic!("{c:?}")
        };
        assert_eq!((v.remote.as_str(), v.vni), ("192.0.2.1:4789", 9));
    }

    #[test]
    fn tool_errors_name_the_field() {
        let e = |spec| sink_config(&tool(spec)).unwrap_err();
        assert_eq!(
            e(json!({"type": "pcapOverIp"})),
            "spec.listen: required for a pcapOverIp tool"
        );
        assert!(
            e(json!({"type": "pcapOverIp", "listen": "somewhere"})).starts_with("spec.listen: ")
        );
        assert_eq!(
            e(json!({"type": "pcapngFiles"})),
            "spec.directory: required for a pcapngFiles tool"
        );
        assert!(
            e(json!({"type": "vxlan"})).starts_with("spec.remote: required for a vxlan tool"),
            "{}",
            e(json!({"type": "vxlan"}))
        );
        assert!(
            e(json!({"type": "vxlan", "remote": "192.0.2.1:4789", "vni": 99999999}))
                .starts_with("spec.vni: ")
        );
    }
}
