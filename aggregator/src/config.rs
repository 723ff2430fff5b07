//! The `serve` configuration file (YAML): sinks, and policies that route
//! filtered traffic to them.
//!
//! ```yaml
//! sinks:
//!   - { name: wireshark, type: pcap_over_ip, listen: "0.0.0.0:57012" }
//!   - { name: archive, type: pcapng_file, directory: /var/lib/pcap, rotate_bytes: 100000000 }
//!   - { name: ids-a, type: vxlan, remote: "192.0.2.10:4789", vni: 7 }
//! policies:
//!   - name: web
//!     filter: "tcp port 80 or tcp port 443"
//!     dedup: { window_us: 1000 }
//!     slice: { payload: 128 }
//!     sinks: [wireshark, archive]
//!     groups: [{ name: ids, members: [ids-a] }]
//! ```

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::sinks::SinkConfig;
use crate::transforms::PipelineConfig;

fn default_queue() -> usize {
    1024
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    /// Tap-side policies (names in the taps' Hello) whose packets this
    /// policy takes; empty takes every packet from every tap.
    #[serde(default)]
    pub tap_policies: Vec<String>,
    /// tcpdump (pcap-filter) expression; empty keeps everything.
    #[serde(default)]
    pub filter: String,
    #[serde(default)]
    pub dedup: Option<crate::transforms::dedup::DedupConfig>,
    #[serde(default)]
    pub slice: Option<crate::transforms::slice::SliceConfig>,
    #[serde(default)]
    pub mask: Option<crate::transforms::mask::MaskConfig>,
    /// Sinks that each receive every packet of the policy.
    #[serde(default)]
    pub sinks: Vec<String>,
    /// Tool groups: each packet goes to one member, chosen by a symmetric
    /// flow hash so both directions of a flow land on the same member.
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    /// Batches waiting for this policy's worker; more are dropped and
    /// counted. Fixed when the policy starts.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// What ends the capture (packets, bytes, duration).
    #[serde(default)]
    pub limits: Option<crate::limits::LimitsConfig>,
}

impl PolicyConfig {
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            filter: self.filter.clone(),
            dedup: self.dedup.clone(),
            slice: self.slice,
            mask: self.mask,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub members: Vec<String>,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and validates; errors name the offending field by path
    /// (`policies[1].slice`).
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.into_inner().to_string();
            // The YAML error may already lead with the path.
            if msg.starts_with(&path) || path == "." {
                anyhow::anyhow!("{msg}")
            } else {
                anyhow::anyhow!("{path}: {msg}")
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let mut names = HashSet::new();
        for (i, s) in self.sinks.iter().enumerate() {
            let c = s.common();
            if c.name.is_empty() {
                bail!("sinks[{i}].name: must not be empty");
            }
            if !names.insert(c.name) {
                bail!("sinks[{i}].name: duplicate sink name {:?}", c.name);
            }
            if c.queue == 0 {
                bail!("sinks[{i}].queue: must be at least 1");
            }
            s.validate()
                .map_err(|e| anyhow::anyhow!("sinks[{i}].{e}"))?;
        }
        let mut policies = HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            if p.name.is_empty() {
                bail!("policies[{i}].name: must not be empty");
            }
            if !policies.insert(p.name.as_str()) {
                bail!("policies[{i}].name: duplicate policy name {:?}", p.name);
            }
            if p.queue == 0 {
                bail!("policies[{i}].queue: must be at least 1");
            }
            crate::bpf::Program::compile(&p.filter, crate::bpf::LINKTYPE_ETHERNET, 262_144)
                .map_err(|e| anyhow::anyhow!("policies[{i}].filter: {}", e.message))?;
            for (j, s) in p.sinks.iter().enumerate() {
                if !names.contains(s.as_str()) {
                    bail!("policies[{i}].sinks[{j}]: unknown sink {s:?}");
                }
            }
            for (j, g) in p.groups.iter().enumerate() {
                if g.members.is_empty() {
                    bail!("policies[{i}].groups[{j}].members: a group needs at least one member");
                }
                for (k, m) in g.members.iter().enumerate() {
                    if !names.contains(m.as_str()) {
                        bail!("policies[{i}].groups[{j}].members[{k}]: unknown sink {m:?}");
                    }
                }
            }
            if p.sinks.is_empty() && p.groups.is_empty() {
                bail!("policies[{i}]: needs at least one of `sinks` or `groups`");
            }
            if let Some(crate::transforms::slice::SliceConfig::Bytes(0)) = p.slice {
                bail!("policies[{i}].slice.bytes: must be at least 1");
            }
            if let Some(l) = &p.limits {
                l.validate()
                    .map_err(|e| anyhow::anyhow!("policies[{i}].limits.{e}"))?;
            }
        }
        if self.tap_policy_bits_needed() > 64 {
            bail!("policies: at most 64 policies are supported");
        }
        Ok(())
    }

    fn tap_policy_bits_needed(&self) -> usize {
        self.policies.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse("policies:\n  - name: a\n    slice: { bytes: -3 }\n    sinks: [x]\n")
            .unwrap_err();
        assert!(format!("{e:#}").starts_with("policies[0]"), "{e:#}");
        let e = Config::parse(
            "sinks:\n  - { name: a, type: http }\npolicies:\n  - { name: p, sinks: [b] }\n",
        )
        .unwrap_err();
        assert_eq!(format!("{e:#}"), "policies[0].sinks[0]: unknown sink \"b\"");
        let e = Config::parse("sinks:\n  - { name: a, type: http }\npolicies:\n  - { name: p, filter: 'tcp portt 1', sinks: [a] }\n").unwrap_err();
        assert!(
            format!("{e:#}")
                .starts_with("policies[0].filter: can't parse filter expression: syntax error"),
            "{e:#}"
        );
        let e = Config::parse("sinks:\n  - { name: a, type: http, bogus: 1 }\n").unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
        let e = Config::parse("sinks:\n  - { name: a, type: pcap_over_ip, listen: 'nope' }\n")
            .unwrap_err();
        assert!(format!("{e:#}").starts_with("sinks[0].listen"), "{e:#}");
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            r#"
sinks:
  - { name: ws, type: pcap_over_ip, listen: "127.0.0.1:0" }
  - { name: files, type: pcapng_file, directory: /tmp/x, rotate_bytes: 1000000, max_files: 3 }
  - { name: stream, type: http }
  - { name: sub, type: grpc }
  - { name: ids-a, type: vxlan, remote: "127.0.0.1:4789", vni: 7 }
  - { name: ids-b, type: vxlan, remote: "127.0.0.1:4790" }
policies:
  - name: web
    tap_policies: [web]
    filter: "tcp port 80"
    dedup: { window_us: 500 }
    slice: { payload: 64 }
    mask: { payload_offset: 16 }
    limits: { max_packets: 1000, duration: 1h30m }
    sinks: [ws, files, stream, sub]
    groups: [{ name: ids, members: [ids-a, ids-b] }]
"#,
        )
        .unwrap();
        assert_eq!(c.sinks.len(), 6);
        assert_eq!(c.policies[0].dedup.as_ref().unwrap().window_us, 500);
        let limits = c.policies[0].limits.as_ref().unwrap();
        assert_eq!(limits.max_packets, Some(1000));
        assert_eq!(
            limits.duration.map(|d| d.0),
            Some(std::time::Duration::from_secs(5400))
        );
    }
}
