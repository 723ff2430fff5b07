//! The incremental sync's [`Command`]s in nft's text syntax. nft's JSON
//! front end adds rules one by one, and for each `add rule` (and each
//! `add element`) it first lists every chain of every table: a tenth of a
//! second at 10,000 Services. The text syntax can write a chain together
//! with its rules (`add chain T C { rule; rule; }`) and map elements with
//! the map's declaration, and then nft lists nothing.
//!
//! Only the forms [`crate::rules`] builds for Service chains are rendered,
//! from the same libnftables-JSON values the full sync sends; anything
//! else, and any name or value outside nft's plain tokens, is an error
//! rather than text nft might read differently.

use std::fmt::Write;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::rules::{map_key_type, Command, Op};

/// One transaction: the commands, one per line.
pub fn render(cmds: &[Command]) -> Result<String> {
    let mut out = String::new();
    for cmd in cmds {
        render_command(cmd, &mut out).with_context(|| format!("rendering {cmd:?}"))?;
        out.push('\n');
    }
    Ok(out)
}

fn render_command(cmd: &Command, out: &mut String) -> Result<()> {
    let table = format!("ip {}", token(&cmd.table.name())?);
    match &cmd.op {
        Op::AddAffinitySet { name, timeout } => write!(
            out,
            "add set {table} {} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}",
            token(name)?
        )?,
        Op::DeleteSet(name) => write!(out, "delete set {table} {}", token(name)?)?,
        Op::AddChain(name) => write!(out, "add chain {table} {}", token(name)?)?,
        Op::FlushChain(name) => write!(out, "flush chain {table} {}", token(name)?)?,
        Op::DeleteChain(name) => write!(out, "delete chain {table} {}", token(name)?)?,
        Op::AppendRules { chain, rules } => {
            write!(out, "add chain {table} {} {{ ", token(chain)?)?;
            for rule in rules {
                let Value::Array(exprs) = rule else {
                    bail!("a rule is a list of expressions: {rule}");
                };
                let exprs: Vec<String> = exprs.iter().map(statement).collect::<Result<_>>()?;
                write!(out, "{}; ", exprs.join(" "))?;
            }
            out.push('}');
        }
        Op::AddElements { map, elements } => {
            let key_type = map_key_type(map).with_context(|| format!("no map {map}"))?;
            let elements: Vec<String> = elements
                .iter()
                .map(|(key, verdict)| Ok(format!("{} : {}", value(key)?, statement(verdict)?)))
                .collect::<Result<_>>()?;
            write!(
                out,
                "add map {table} {} {{ type {} : verdict; elements = {{ {} }}; }}",
                token(map)?,
                key_type.join(" . "),
                elements.join(", ")
            )?;
        }
        Op::DeleteElements { map, keys } => {
            let keys: Vec<String> = keys.iter().map(value).collect::<Result<_>>()?;
            write!(
                out,
                "delete element {table} {} {{ {} }}",
                token(map)?,
                keys.join(", ")
            )?;
        }
    }
    Ok(())
}

/// A statement or verdict of a rule.
fn statement(expr: &Value) -> Result<String> {
    let Some((kind, body)) = expr.as_object().and_then(|o| o.iter().next()) else {
        bail!("not an expression: {expr}");
    };
    Ok(match kind.as_str() {
        "match" => {
            let op = match body["op"].as_str() {
                Some("==") => "",
                Some("!=") => "!= ",
                other => bail!("match operator {other:?}"),
            };
            format!("{} {op}{}", value(&body["left"])?, value(&body["right"])?)
        }
        "jump" | "goto" => format!("{kind} {}", token(str_of(&body["target"])?)?),
        "reject" | "drop" | "accept" | "return" if body.is_null() => kind.clone(),
        "dnat" => {
            let addr: Ipv4Addr = str_of(&body["addr"])?.parse().context("dnat address")?;
            match body["port"].as_u64() {
                Some(port) if port <= u64::from(u16::MAX) => format!("dnat to {addr}:{port}"),
                _ => bail!("dnat port {}", body["port"]),
            }
        }
        "set" if body["op"] == "update" => format!(
            "update {} {{ {} }}",
            set_reference(str_of(&body["set"])?)?,
            value(&body["elem"])?
        ),
        "vmap" => {
            let Some(choices) = body["data"]["set"].as_array() else {
                bail!("vmap without an inline map: {body}");
            };
            let choices: Vec<String> = choices
                .iter()
                .map(|pair| match pair.as_array().map(Vec::as_slice) {
                    Some([key, verdict]) => {
                        Ok(format!("{} : {}", value(key)?, statement(verdict)?))
                    }
                    _ => bail!("vmap element {pair}"),
                })
                .collect::<Result<_>>()?;
            format!("{} vmap {{ {} }}", value(&body["key"])?, choices.join(", "))
        }
        _ => bail!("no text form for {expr}"),
    })
}

/// An operand: a packet field, a number, an address, a prefix, a protocol,
/// a named set or a concatenation of these.
fn value(v: &Value) -> Result<String> {
    if let Some(n) = v.as_u64() {
        return Ok(n.to_string());
    }
    if let Some(s) = v.as_str() {
        if s.starts_with('@') {
            return set_reference(s);
        }
        if matches!(s, "tcp" | "udp" | "sctp") || s.parse::<Ipv4Addr>().is_ok() {
            return Ok(s.to_string());
        }
        bail!("value {s:?}");
    }
    let Some((kind, body)) = v.as_object().and_then(|o| o.iter().next()) else {
        bail!("value {v}");
    };
    Ok(match kind.as_str() {
        "payload" => match (str_of(&body["protocol"])?, str_of(&body["field"])?) {
            (p @ ("ip" | "th"), f @ ("saddr" | "daddr" | "sport" | "dport")) => format!("{p} {f}"),
            other => bail!("payload field {other:?}"),
        },
        "meta" => match str_of(&body["key"])? {
            k @ ("l4proto" | "mark") => format!("meta {k}"),
            k => bail!("meta key {k:?}"),
        },
        "prefix" => {
            let addr: Ipv4Addr = str_of(&body["addr"])?.parse().context("prefix address")?;
            match body["len"].as_u64() {
                Some(len) if len <= 32 => format!("{addr}/{len}"),
                _ => bail!("prefix length {}", body["len"]),
            }
        }
        "numgen" if body["mode"] == "random" && body["offset"].as_u64() == Some(0) => {
            match body["mod"].as_u64() {
                Some(m) if m > 0 => format!("numgen random mod {m}"),
                _ => bail!("numgen modulus {}", body["mod"]),
            }
        }
        "concat" => {
            let Some(parts) = body.as_array() else {
                bail!("concat of {body}");
            };
            let parts: Vec<String> = parts.iter().map(value).collect::<Result<_>>()?;
            parts.join(" . ")
        }
        _ => bail!("no text form for {v}"),
    })
}

fn str_of(v: &Value) -> Result<&str> {
    v.as_str().with_context(|| format!("{v}: not a string"))
}

fn set_reference(s: &str) -> Result<String> {
    match s.strip_prefix('@') {
        Some(name) => Ok(format!("@{}", token(name)?)),
        None => bail!("set reference {s:?}"),
    }
}

/// A chain, set or map name as nft's plain string token: a letter, then
/// letters, digits and `/ - _ .` (Kubernetes names, IPs and ports fit).
fn token(name: &str) -> Result<&str> {
    let mut chars = name.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c));
    if !plain || name.len() > 255 {
        bail!("{name:?} is not a name nft reads as written");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{desired, Garbage, NodeConfig, Ruleset, ServicePort, Table};
    use serde_json::json;

    fn web(endpoints: &[[u8; 4]], affinity: Option<u32>, node_port: Option<u16>) -> ServicePort {
        let mut web = crate::rules::tests::service("web", [10, 96, 0, 9], endpoints);
        web.port_name = "http".into();
        web.node_port = node_port;
        web.affinity_seconds = affinity;
        for ep in &mut web.endpoints {
            ep.local = true;
        }
        web
    }

    #[test]
    fn a_new_service_renders_as_nft_text() {
        let node = NodeConfig {
            cluster_cidr: Some((Ipv4Addr::new(10, 244, 0, 0), 16)),
            pod_cidr: Some((Ipv4Addr::new(10, 244, 1, 0), 24)),
            service_tables: 1,
        };
        let next = desired(
            &node,
            &[web(&[[10, 244, 1, 2], [10, 244, 1, 3]], Some(10800), None)],
        );
        let cmds = crate::rules::incremental(&Ruleset::default(), &next, &mut Garbage::default());
        let text = render(&cmds).unwrap();
        let ep = "ep-shop/web/tcp/http__10.244.1.2/8080";
        let t = Table::of_service("shop", "web", 1).name();
        for line in [
            format!("add set ip {t} aff-{ep} {{ type ipv4_addr; flags dynamic,timeout; timeout 10800s; }}"),
            format!("add chain ip {t} {ep}"),
            format!("add chain ip {t} {ep} {{ ip saddr 10.244.1.2 jump mark-for-masquerade; ip saddr 10.244.1.0/24 jump mark-for-masquerade; update @aff-{ep} {{ ip saddr }}; meta l4proto tcp dnat to 10.244.1.2:8080; }}"),
            format!("add chain ip {t} svc-shop/web/tcp/http {{ ip daddr 10.96.0.9 ip saddr != 10.244.0.0/16 jump mark-for-masquerade; ip saddr @aff-ep-shop/web/tcp/http__10.244.1.2/8080 goto ep-shop/web/tcp/http__10.244.1.2/8080; ip saddr @aff-ep-shop/web/tcp/http__10.244.1.3/8080 goto ep-shop/web/tcp/http__10.244.1.3/8080; numgen random mod 2 vmap {{ 0 : goto ep-shop/web/tcp/http__10.244.1.2/8080, 1 : goto ep-shop/web/tcp/http__10.244.1.3/8080 }}; }}"),
            format!("add map ip {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; elements = {{ 10.96.0.9 . tcp . 80 : goto svc-shop/web/tcp/http }}; }}"),
        ] {
            assert!(text.lines().any(|l| l == line), "no line\n{line}\nin\n{text}");
        }
    }

    #[test]
    fn collection_renders_deletes() {
        let mut garbage = Garbage::default();
        let before = desired(
            &NodeConfig::default(),
            &[web(&[[10, 244, 1, 2]], None, Some(30080))],
        );
        crate::rules::incremental(&before, &Ruleset::default(), &mut garbage);
        let text = render(&garbage.collect()).unwrap();
        let t = Table::of_service("shop", "web", 1).name();
        assert!(
            text.contains(&format!(
                "delete element ip {t} service-nodeports {{ tcp . 30080 }}\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("delete chain ip tapestry-proxy npc-shop/web/tcp/http\n"),
            "{text}"
        );
    }

    #[test]
    fn what_nft_could_misread_is_refused() {
        for name in ["", "9lives", "a b", "a;flush ruleset", "a\"b", "a{b"] {
            assert!(token(name).is_err(), "{name:?}");
        }
        assert!(value(&json!("10.0.0.1; flush ruleset")).is_err());
        assert!(statement(&json!({"counter": null})).is_err());
        let cmd = Command {
            table: Table::Main,
            op: Op::AppendRules {
                chain: "svc-x".into(),
                rules: vec![json!([{"dnat": {"addr": "10.0.0.1", "port": 70000}}])],
            },
        };
        assert!(render(&[cmd]).is_err());
    }
}
