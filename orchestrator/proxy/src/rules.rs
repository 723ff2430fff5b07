//! The proxy's nftables tables as data: what `table ip tapestry-proxy` and
//! its Service tables must hold for a set of Service ports, the full
//! transaction (libnftables JSON) that takes tables in any state there, and
//! the incremental one ([`Command`]s) that touches only the chains and map
//! elements that changed.
//!
//! The layout follows kube-proxy's nftables mode: verdict maps keyed by
//! `daddr . l4proto . dport` (ClusterIPs) and `l4proto . dport` (NodePorts)
//! jump to a chain per Service port, which picks an endpoint chain by
//! `numgen random mod N`; the endpoint chain DNATs. Service ports without
//! endpoints are answered by `reject` from the filter hooks, so a client is
//! refused at once instead of timing out.
//!
//! A Service port's map elements depend only on its spec, never on its
//! endpoints: readiness changes rewrite chains only. Removing an element or
//! a chain makes nft list the whole table first (a tenth of a second at
//! 10,000 Services), so what a change leaves unused is emptied at once and
//! deleted later, in a [`Garbage`] collection off the change's path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde_json::{json, Value};

/// The main table; the Service tables are named after it (`TABLE-N`).
pub const TABLE: &str = "tapestry-proxy";
/// The most Service tables there are. On every change that adds a jump,
/// goto or NAT rule the kernel validates the whole table it is in, walking
/// every chain its base chains reach: in one table of 10,000 Services that
/// costs tens of milliseconds per change, in one of sixteen a sixteenth.
/// But each table's NAT hooks cost every new connection of the node, a
/// Service's or not (16 tables: about 5 µs), so a table is added per
/// [`SERVICES_PER_TABLE`] Services only.
pub const MAX_SERVICE_TABLES: u8 = 16;
/// Services one table holds before another pays for itself (a change in a
/// table of 1,000 Services takes about 2 ms).
pub const SERVICES_PER_TABLE: usize = 1000;

/// How many Service tables suit `services` Services: a power of two, so
/// that growing doubles the count (1, 2, 4, … 16).
pub fn service_tables_for(services: usize) -> u8 {
    let wanted = services
        .div_ceil(SERVICES_PER_TABLE)
        .max(1)
        .next_power_of_two();
    wanted.min(usize::from(MAX_SERVICE_TABLES)) as u8
}
const FAMILY: &str = "ip";
/// The packet mark asking `masquerading` to SNAT (kube-proxy's bit).
pub const MASQUERADE_MARK: u32 = 0x4000;

const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const REJECT_CHAIN: &str = "reject-chain";
const SERVICE_KEY: &[&str] = &["ipv4_addr", "inet_proto", "inet_service"];
const NODEPORT_KEY: &[&str] = &["inet_proto", "inet_service"];
/// The verdict maps of each kind of table and the types of their keys.
const MAIN_MAPS: [(&str, &[&str]); 2] = [
    (NO_ENDPOINT_SERVICES, SERVICE_KEY),
    (NO_ENDPOINT_NODEPORTS, NODEPORT_KEY),
];
const SERVICE_MAPS: [(&str, &[&str]); 2] = [
    (SERVICE_IPS, SERVICE_KEY),
    (SERVICE_NODEPORTS, NODEPORT_KEY),
];

/// One of the proxy's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// The filter hooks (refusals of Services without endpoints) with their
    /// maps and per-Service checks, and masquerading.
    Main,
    /// The NAT hooks, with the maps and chains of the Services hashed here.
    Services(u8),
}

impl Table {
    pub fn name(self) -> String {
        match self {
            Table::Main => TABLE.to_string(),
            Table::Services(n) => format!("{TABLE}-{n}"),
        }
    }

    /// The table a name of [`Table::name`] stands for.
    pub fn parse(name: &str) -> Option<Table> {
        match name.strip_prefix(TABLE)? {
            "" => Some(Table::Main),
            n => n.strip_prefix('-')?.parse().ok().map(Table::Services),
        }
    }

    /// The main table and `services` Service tables.
    pub fn all(services: u8) -> impl Iterator<Item = Table> {
        std::iter::once(Table::Main).chain((0..services.max(1)).map(Table::Services))
    }

    /// The Service table of a Service, of `tables`: FNV-1a of
    /// `namespace/name`, stable across restarts and builds.
    pub(crate) fn of_service(namespace: &str, name: &str, tables: u8) -> Table {
        let hash = namespace
            .bytes()
            .chain(std::iter::once(b'/'))
            .chain(name.bytes())
            .fold(0x811c_9dc5u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            });
        Table::Services((hash % u32::from(tables.max(1))) as u8)
    }

    fn maps(self) -> &'static [(&'static str, &'static [&'static str])] {
        match self {
            Table::Main => &MAIN_MAPS,
            Table::Services(_) => &SERVICE_MAPS,
        }
    }
}
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this node (for the `Local` traffic policies).
    pub local: bool,
}

/// One port of one Service, with its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name ("" for a single unnamed port).
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// `sessionAffinity: ClientIP` with this timeout.
    pub affinity_seconds: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.namespace,
            self.name,
            self.protocol.nft(),
            self.port_name
        )
    }
}

/// What the node contributes to the rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Pods' addresses (the cluster CIDR): ClusterIP traffic from outside
    /// it (the host, other machines) is masqueraded so replies come back
    /// through this node.
    pub cluster_cidr: Option<(Ipv4Addr, u8)>,
    /// This node's pod addresses. A pod reaching a pod of the same bridge
    /// through a Service is masqueraded: the answer would otherwise cross
    /// the bridge straight back, never un-NATed by the host.
    pub pod_cidr: Option<(Ipv4Addr, u8)>,
    /// How many Service tables the Services are spread over
    /// ([`service_tables_for`]; 0 counts as 1).
    pub service_tables: u8,
}

/// A chain or set: its table and name.
pub type Name = (Table, String);
type MapName = (Table, &'static str);
type Elements = BTreeMap<String, (Value, Value)>;

/// The tables' content apart from their fixed skeletons.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Per-service and per-endpoint chains and their rules.
    chains: BTreeMap<Name, Vec<Value>>,
    /// Verdict map elements: map -> key's JSON text -> (key, verdict).
    maps: BTreeMap<MapName, Elements>,
    /// Client-affinity sets (dynamic, with a timeout).
    affinity_sets: BTreeMap<Name, u32>,
}

impl Ruleset {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
            && self.affinity_sets.is_empty()
            && self.maps.values().all(BTreeMap::is_empty)
    }

    /// Add `other`'s chains, map elements and sets (the per-Service
    /// rulesets are disjoint).
    pub fn merge(&mut self, other: &Ruleset) {
        self.chains
            .extend(other.chains.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (map, elements) in &other.maps {
            self.maps
                .entry(*map)
                .or_default()
                .extend(elements.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        self.affinity_sets
            .extend(other.affinity_sets.iter().map(|(k, v)| (k.clone(), *v)));
    }

    pub fn chains(&self) -> usize {
        self.chains.len()
    }

    pub fn rules(&self) -> usize {
        self.chains.values().map(Vec::len).sum()
    }
}

fn ip_daddr() -> Value {
    json!({"payload": {"protocol": "ip", "field": "daddr"}})
}

fn ip_saddr() -> Value {
    json!({"payload": {"protocol": "ip", "field": "saddr"}})
}

fn l4proto() -> Value {
    json!({"meta": {"key": "l4proto"}})
}

fn th_dport() -> Value {
    json!({"payload": {"protocol": "th", "field": "dport"}})
}

fn mark() -> Value {
    json!({"meta": {"key": "mark"}})
}

fn goto(chain: &str) -> Value {
    json!({"goto": {"target": chain}})
}

fn jump(chain: &str) -> Value {
    json!({"jump": {"target": chain}})
}

fn matches(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn prefix(addr: Ipv4Addr, len: u8) -> Value {
    json!({"prefix": {"addr": addr.to_string(), "len": len}})
}

fn local_destination() -> Value {
    matches(
        "==",
        json!({"fib": {"result": "type", "flags": ["daddr"]}}),
        json!("local"),
    )
}

fn service_chain(key: &str) -> String {
    format!("svc-{key}")
}

fn local_service_chain(key: &str) -> String {
    format!("svl-{key}")
}

fn external_chain(key: &str) -> String {
    format!("ext-{key}")
}

/// Filter-hook check of a ClusterIP: refuses while there is no endpoint.
fn service_check_chain(key: &str) -> String {
    format!("chk-{key}")
}

/// Filter-hook check of a NodePort: refuses (or drops, for
/// `externalTrafficPolicy: Local` without local endpoints) while there is
/// no endpoint to send the client to.
fn nodeport_check_chain(key: &str) -> String {
    format!("npc-{key}")
}

fn endpoint_chain(key: &str, ep: &Endpoint) -> String {
    format!("ep-{key}__{}/{}", ep.ip, ep.port)
}

fn affinity_set(endpoint_chain: &str) -> String {
    format!("aff-{endpoint_chain}")
}

/// The desired content for these Service ports.
pub fn desired(node: &NodeConfig, services: &[ServicePort]) -> Ruleset {
    let mut out = Ruleset::default();
    for sp in services {
        add_service(&mut out, node, sp);
    }
    out
}

fn add_service(out: &mut Ruleset, node: &NodeConfig, sp: &ServicePort) {
    let key = sp.key();
    let table = Table::of_service(&sp.namespace, &sp.name, node.service_tables);
    let main = Table::Main;
    let proto = sp.protocol.nft();
    let mut endpoints: Vec<&Endpoint> = sp.endpoints.iter().collect();
    endpoints.sort();
    endpoints.dedup();
    let local: Vec<&Endpoint> = endpoints.iter().copied().filter(|e| e.local).collect();
    let internal: &[&Endpoint] = if sp.internal_local {
        &local
    } else {
        &endpoints
    };

    for ep in &endpoints {
        let chain = endpoint_chain(&key, ep);
        let mut rules = vec![
            // Hairpin: a pod reaching itself through the Service.
            vec![
                matches("==", ip_saddr(), json!(ep.ip.to_string())),
                jump(MARK_FOR_MASQUERADE),
            ],
        ];
        if let (true, Some((net, len))) = (ep.local, node.pod_cidr) {
            rules.push(vec![
                matches("==", ip_saddr(), prefix(net, len)),
                jump(MARK_FOR_MASQUERADE),
            ]);
        }
        if let Some(timeout) = sp.affinity_seconds {
            let set = affinity_set(&chain);
            rules.push(vec![
                json!({"set": {"op": "update", "elem": ip_saddr(), "set": format!("@{set}")}}),
            ]);
            out.affinity_sets.insert((table, set), timeout);
        }
        rules.push(vec![
            matches("==", l4proto(), json!(proto)),
            json!({"dnat": {"addr": ep.ip.to_string(), "port": ep.port}}),
        ]);
        insert_chain(out, table, &chain, rules);
    }

    let cluster_ips: Vec<String> = sp.cluster_ips.iter().map(Ipv4Addr::to_string).collect();
    let chain = service_chain(&key);
    let check = service_check_chain(&key);
    let mut rules = Vec::new();
    let mut refusal = Vec::new();
    if internal.is_empty() {
        refusal.push(vec![goto(REJECT_CHAIN)]);
    } else {
        if let Some((net, len)) = node.cluster_cidr {
            for ip in &cluster_ips {
                rules.push(vec![
                    matches("==", ip_daddr(), json!(ip)),
                    matches("!=", ip_saddr(), prefix(net, len)),
                    jump(MARK_FOR_MASQUERADE),
                ]);
            }
        }
        rules.extend(pick_endpoint(&key, internal, sp.affinity_seconds.is_some()));
    }
    insert_chain(out, table, &chain, rules);
    insert_chain(out, main, &check, refusal);
    for ip in &cluster_ips {
        let element = json!({"concat": [ip, proto, sp.port]});
        insert(out, (table, SERVICE_IPS), element.clone(), goto(&chain));
        insert(out, (main, NO_ENDPOINT_SERVICES), element, goto(&check));
    }

    let Some(node_port) = sp.node_port else {
        return;
    };
    let external: &[&Endpoint] = if sp.external_local {
        &local
    } else {
        &endpoints
    };
    let ext = external_chain(&key);
    let check = nodeport_check_chain(&key);
    let element = json!({"concat": [proto, node_port]});
    insert(out, (table, SERVICE_NODEPORTS), element.clone(), goto(&ext));
    insert(out, (main, NO_ENDPOINT_NODEPORTS), element, goto(&check));
    if external.is_empty() {
        // With `externalTrafficPolicy: Local` and endpoints elsewhere only,
        // the node is not a way in: drop (the load balancer's health check
        // steers clients to other nodes), as kube-proxy does.
        let verdict = if endpoints.is_empty() {
            goto(REJECT_CHAIN)
        } else {
            json!({"drop": null})
        };
        insert_chain(out, table, &ext, Vec::new());
        insert_chain(out, main, &check, vec![vec![verdict]]);
        return;
    }
    insert_chain(out, main, &check, Vec::new());
    let rules = if sp.external_local {
        // The client's address is kept: no masquerade, local endpoints only.
        let svl = local_service_chain(&key);
        let picks = pick_endpoint(&key, &local, sp.affinity_seconds.is_some());
        insert_chain(out, table, &svl, picks);
        vec![vec![goto(&svl)]]
    } else {
        vec![
            vec![jump(MARK_FOR_MASQUERADE)],
            if internal.len() == endpoints.len() {
                vec![goto(&service_chain(&key))]
            } else {
                // `internalTrafficPolicy: Local` narrowed the service chain;
                // external clients may use every endpoint.
                let all = format!("sva-{key}");
                let picks = pick_endpoint(&key, &endpoints, sp.affinity_seconds.is_some());
                insert_chain(out, table, &all, picks);
                vec![goto(&all)]
            },
        ]
    };
    insert_chain(out, table, &ext, rules);
}

fn insert_chain(out: &mut Ruleset, table: Table, chain: &str, rules: Vec<Vec<Value>>) {
    out.chains.insert(
        (table, chain.to_string()),
        rules.into_iter().map(Value::Array).collect(),
    );
}

/// Rules choosing one of `endpoints`: a client with affinity returns to
/// its endpoint, any other is spread at random.
fn pick_endpoint(key: &str, endpoints: &[&Endpoint], affinity: bool) -> Vec<Vec<Value>> {
    let mut rules = Vec::new();
    if affinity {
        for ep in endpoints {
            let chain = endpoint_chain(key, ep);
            rules.push(vec![
                matches(
                    "==",
                    ip_saddr(),
                    json!(format!("@{}", affinity_set(&chain))),
                ),
                goto(&chain),
            ]);
        }
    }
    let choices: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| json!([i, goto(&endpoint_chain(key, ep))]))
        .collect();
    rules.push(vec![json!({"vmap": {
        "key": {"numgen": {"mode": "random", "mod": endpoints.len(), "offset": 0}},
        "data": {"set": choices},
    }})]);
    rules
}

fn insert(out: &mut Ruleset, map: MapName, key: Value, verdict: Value) {
    out.maps
        .entry(map)
        .or_default()
        .insert(key.to_string(), (key, verdict));
}

/// The fixed part: the tables, base chains hooked into netfilter, helper
/// chains and the maps' declarations. Every command is `add`, which is a
/// no-op for what exists, so it is safe in every transaction.
fn skeleton(service_tables: u8) -> Vec<Value> {
    let mut cmds = Vec::new();
    for table in Table::all(service_tables) {
        let t = table.name();
        cmds.push(json!({"add": {"table": {"family": FAMILY, "name": t}}}));
        let base = |name: &str, kind: &str, hook: &str, prio: i32| {
            json!({"add": {"chain": {"family": FAMILY, "table": t, "name": name,
                "type": kind, "hook": hook, "prio": prio, "policy": "accept"}}})
        };
        let helpers: &[&str] = match table {
            Table::Main => {
                cmds.push(base("nat-postrouting", "nat", "postrouting", 100));
                // Before the filter tables of other programs (priority 0),
                // as kube-proxy.
                cmds.push(base("filter-input", "filter", "input", -110));
                cmds.push(base("filter-forward", "filter", "forward", -110));
                cmds.push(base("filter-output", "filter", "output", -110));
                &[
                    "masquerading",
                    REJECT_CHAIN,
                    "service-endpoints-check",
                    "nodeport-endpoints-check",
                ]
            }
            Table::Services(_) => {
                cmds.push(base("nat-prerouting", "nat", "prerouting", -100));
                cmds.push(base("nat-output", "nat", "output", -100));
                &["services", MARK_FOR_MASQUERADE]
            }
        };
        for name in helpers {
            cmds.push(add_chain(table, name));
        }
        for (name, key) in table.maps() {
            cmds.push(
                json!({"add": {"map": {"family": FAMILY, "table": t, "name": name,
                "type": key, "map": "verdict"}}}),
            );
        }
    }
    cmds
}

/// The helper chains' rules (flushed and written on a full sync only).
fn skeleton_rules(table: Table) -> Vec<(&'static str, Vec<Value>)> {
    let new_connection = matches("in", json!({"ct": {"key": "state"}}), json!("new"));
    let service_key = json!({"concat": [ip_daddr(), l4proto(), th_dport()]});
    let nodeport_key = json!({"concat": [l4proto(), th_dport()]});
    if let Table::Services(_) = table {
        return vec![
            ("nat-prerouting", vec![json!([jump("services")])]),
            ("nat-output", vec![json!([jump("services")])]),
            (
                "services",
                vec![
                    json!([{"vmap": {"key": service_key, "data": format!("@{SERVICE_IPS}")}}]),
                    json!([local_destination(), {"vmap": {"key": nodeport_key, "data": format!("@{SERVICE_NODEPORTS}")}}]),
                ],
            ),
            (
                MARK_FOR_MASQUERADE,
                vec![
                    json!([{"mangle": {"key": mark(), "value": {"|": [mark(), MASQUERADE_MARK]}}}]),
                ],
            ),
        ];
    }
    vec![
        ("nat-postrouting", vec![json!([jump("masquerading")])]),
        (
            "filter-input",
            vec![
                json!([new_connection.clone(), jump("service-endpoints-check")]),
                json!([new_connection.clone(), jump("nodeport-endpoints-check")]),
            ],
        ),
        (
            "filter-forward",
            vec![json!([
                new_connection.clone(),
                jump("service-endpoints-check")
            ])],
        ),
        (
            "filter-output",
            vec![
                json!([new_connection.clone(), jump("service-endpoints-check")]),
                json!([new_connection, jump("nodeport-endpoints-check")]),
            ],
        ),
        (
            "masquerading",
            vec![
                json!([
                    matches("==", json!({"&": [mark(), MASQUERADE_MARK]}), json!(0)),
                    {"return": null}
                ]),
                json!([{"mangle": {"key": mark(), "value": {"^": [mark(), MASQUERADE_MARK]}}}]),
                json!([{"masquerade": {"flags": ["fully-random"]}}]),
            ],
        ),
        (REJECT_CHAIN, vec![json!([{"reject": null}])]),
        (
            "service-endpoints-check",
            vec![
                json!([{"vmap": {"key": service_key, "data": format!("@{NO_ENDPOINT_SERVICES}")}}]),
            ],
        ),
        (
            "nodeport-endpoints-check",
            vec![
                json!([local_destination(), {"vmap": {"key": nodeport_key, "data": format!("@{NO_ENDPOINT_NODEPORTS}")}}]),
            ],
        ),
    ]
}

/// `{"family": "ip", "table": ..., "name": ...}`, the address of an object.
fn object(table: Table, name: &str) -> Value {
    json!({"family": FAMILY, "table": table.name(), "name": name})
}

fn add_chain(table: Table, name: &str) -> Value {
    json!({"add": {"chain": object(table, name)}})
}

fn flush_chain(table: Table, name: &str) -> Value {
    json!({"flush": {"chain": object(table, name)}})
}

fn delete_chain(table: Table, name: &str) -> Value {
    json!({"delete": {"chain": object(table, name)}})
}

fn add_rule(table: Table, chain: &str, expr: &Value) -> Value {
    json!({"add": {"rule": {"family": FAMILY, "table": table.name(), "chain": chain, "expr": expr}}})
}

/// nft's JSON takes no `dynamic` flag; the kernel sets it itself once the
/// endpoint chain's `update` names the set, in the same transaction.
fn add_affinity_set(table: Table, name: &str, timeout: u32) -> Value {
    json!({"add": {"set": {"family": FAMILY, "table": table.name(), "name": name,
        "type": "ipv4_addr", "flags": ["timeout"], "timeout": timeout}}})
}

fn chain_rules(table: Table, chain: &str, rules: &[Value], cmds: &mut Vec<Value>) {
    cmds.push(flush_chain(table, chain));
    cmds.extend(rules.iter().map(|r| add_rule(table, chain, r)));
}

/// What the kernel holds in the proxy's tables, as listed before a full
/// sync: the tables, and the chains, sets and maps in them.
#[derive(Debug, Default)]
pub struct Existing {
    pub tables: BTreeSet<Table>,
    pub chains: BTreeSet<Name>,
    pub sets: BTreeSet<Name>,
    pub maps: BTreeSet<Name>,
}

/// Everything, for tables in an unknown state (at start): skeleton, every
/// chain flushed and written, maps flushed and refilled, leftovers deleted,
/// for `next` computed with `node`. Established connections keep flowing:
/// their NAT lives in conntrack.
pub fn full_sync(next: &Ruleset, existing: &Existing, node: &NodeConfig) -> Vec<Value> {
    let tables: BTreeSet<Table> = Table::all(node.service_tables).collect();
    let mut cmds = skeleton(node.service_tables);
    // An existing set is kept with the clients it remembers (and `add`
    // would fail: the kernel marks sets updated from the packet path
    // dynamic).
    for ((table, set), timeout) in &next.affinity_sets {
        if !existing.sets.contains(&(*table, set.clone())) {
            cmds.push(add_affinity_set(*table, set, *timeout));
        }
    }
    for (table, chain) in next.chains.keys() {
        cmds.push(add_chain(*table, chain));
    }
    let mut skeleton_chains = BTreeSet::new();
    for &table in &tables {
        for (chain, rules) in skeleton_rules(table) {
            chain_rules(table, chain, &rules, &mut cmds);
            skeleton_chains.insert((table, chain.to_string()));
        }
    }
    for ((table, chain), rules) in &next.chains {
        chain_rules(*table, chain, rules, &mut cmds);
    }
    let mut maps = BTreeSet::new();
    for &table in &tables {
        for (map, _) in table.maps() {
            cmds.push(json!({"flush": {"map": object(table, map)}}));
            maps.insert((table, map.to_string()));
        }
    }
    for ((table, map), elements) in &next.maps {
        if elements.is_empty() {
            continue;
        }
        let elem: Vec<Value> = elements.values().map(|(k, v)| json!([k, v])).collect();
        let mut element = object(*table, map);
        element["elem"] = Value::Array(elem);
        cmds.push(json!({"add": {"element": element}}));
    }
    // Leftovers (of earlier runs, or of another layout): tables no longer
    // used go whole; in the others, chains are emptied first, then maps
    // naming them, then the chains themselves.
    for table in existing.tables.difference(&tables) {
        cmds.push(json!({"delete": {"table": {"family": FAMILY, "name": table.name()}}}));
    }
    let kept = |(table, _): &&Name| tables.contains(table);
    let stale: Vec<&Name> = existing
        .chains
        .iter()
        .filter(kept)
        .filter(|c| !next.chains.contains_key(*c) && !skeleton_chains.contains(*c))
        .collect();
    cmds.extend(stale.iter().map(|(t, c)| flush_chain(*t, c)));
    for (table, map) in existing.maps.difference(&maps).filter(kept) {
        cmds.push(json!({"flush": {"map": object(*table, map)}}));
        cmds.push(json!({"delete": {"map": object(*table, map)}}));
    }
    cmds.extend(stale.iter().map(|(t, c)| delete_chain(*t, c)));
    for (table, set) in existing.sets.iter().filter(kept).filter(|(t, s)| {
        s.starts_with("aff-") && !next.affinity_sets.contains_key(&(*t, s.clone()))
    }) {
        cmds.push(json!({"delete": {"set": object(*table, set)}}));
    }
    cmds
}

/// One step of an incremental sync, in the order of its transaction.
/// Each is written so that nft needs no listing of the tables
/// ([`crate::script`] renders them as nft's text).
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub table: Table,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A client-affinity set (dynamic, entries expiring after `timeout` s).
    AddAffinitySet {
        name: String,
        timeout: u32,
    },
    DeleteSet(String),
    /// An empty chain, so that rules later in the transaction may name it.
    AddChain(String),
    FlushChain(String),
    /// Rules appended to a chain (emptied earlier in the transaction).
    AppendRules {
        chain: String,
        rules: Vec<Value>,
    },
    AddElements {
        map: &'static str,
        elements: Vec<(Value, Value)>,
    },
    DeleteElements {
        map: &'static str,
        keys: Vec<Value>,
    },
    DeleteChain(String),
}

impl Command {
    fn new(table: Table, op: Op) -> Command {
        Command { table, op }
    }
}

/// The types of a verdict map's key, as nft's text declares them.
pub fn map_key_type(map: &str) -> Option<&'static [&'static str]> {
    MAIN_MAPS
        .iter()
        .chain(&SERVICE_MAPS)
        .find(|(name, _)| *name == map)
        .map(|(_, key)| *key)
}

/// What incremental syncs left unused in the kernel: chains already
/// emptied, sets and map elements, deleted together later. A sync that
/// needs one of them again takes it back as it is.
#[derive(Debug, Default)]
pub struct Garbage {
    chains: BTreeSet<Name>,
    /// Affinity sets with their timeouts.
    sets: BTreeMap<Name, u32>,
    elements: BTreeMap<MapName, Elements>,
}

impl Garbage {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty() && self.elements.is_empty()
    }

    /// The transaction deleting everything collected (elements first: they
    /// name the chains), leaving nothing collected.
    pub fn collect(&mut self) -> Vec<Command> {
        let mut cmds = Vec::new();
        for ((table, map), elements) in std::mem::take(&mut self.elements) {
            let keys = elements.into_values().map(|(key, _)| key).collect();
            cmds.push(Command::new(table, Op::DeleteElements { map, keys }));
        }
        for (table, chain) in std::mem::take(&mut self.chains) {
            cmds.push(Command::new(table, Op::DeleteChain(chain)));
        }
        for (table, set) in std::mem::take(&mut self.sets).into_keys() {
            cmds.push(Command::new(table, Op::DeleteSet(set)));
        }
        cmds
    }

    /// Forget everything (a full sync deleted it).
    pub fn clear(&mut self) {
        *self = Garbage::default();
    }
}

/// Only the difference between two states the proxy wrote itself. What
/// `prev` had and `next` lacks is emptied now and handed to `garbage`.
pub fn incremental(prev: &Ruleset, next: &Ruleset, garbage: &mut Garbage) -> Vec<Command> {
    let mut cmds = Vec::new();
    // nft (1.0.6) resolves a set named in a `chain { ... }` block only if
    // the transaction declares it: a chain rewritten to name a set from an
    // earlier transaction is refused (ENOENT). Declaring an existing set
    // again with the kernel's own flags changes nothing and keeps its
    // clients.
    let rewrites_chains = next
        .chains
        .iter()
        .any(|(chain, rules)| !rules.is_empty() && prev.chains.get(chain) != Some(rules));
    for (set, &timeout) in &next.affinity_sets {
        let existing = prev
            .affinity_sets
            .get(set)
            .or_else(|| garbage.sets.get(set))
            .copied();
        garbage.sets.remove(set);
        if existing == Some(timeout) {
            if rewrites_chains {
                let (table, name) = set.clone();
                cmds.push(Command::new(table, Op::AddAffinitySet { name, timeout }));
            }
            continue;
        }
        let (table, name) = set.clone();
        if existing.is_some() {
            cmds.push(Command::new(table, Op::DeleteSet(name.clone())));
        }
        cmds.push(Command::new(table, Op::AddAffinitySet { name, timeout }));
    }
    for chain in next.chains.keys().filter(|c| !prev.chains.contains_key(*c)) {
        // A collected chain is still there, empty.
        if !garbage.chains.remove(chain) {
            cmds.push(Command::new(chain.0, Op::AddChain(chain.1.clone())));
        }
    }
    for ((table, chain), rules) in &next.chains {
        let before = prev.chains.get(&(*table, chain.clone()));
        if before == Some(rules) {
            continue;
        }
        if before.is_some() {
            cmds.push(Command::new(*table, Op::FlushChain(chain.clone())));
        }
        if !rules.is_empty() {
            cmds.push(Command::new(
                *table,
                Op::AppendRules {
                    chain: chain.clone(),
                    rules: rules.clone(),
                },
            ));
        }
    }
    let empty = BTreeMap::new();
    let maps: BTreeSet<MapName> = prev.maps.keys().chain(next.maps.keys()).copied().collect();
    for map in maps {
        let before = prev.maps.get(&map).unwrap_or(&empty);
        let elements = next.maps.get(&map).unwrap_or(&empty);
        let collected = garbage.elements.entry(map).or_default();
        let mut deleted = Vec::new();
        let mut added = Vec::new();
        for (text, new) in elements {
            let old = before.get(text).or_else(|| collected.get(text));
            if old == Some(new) {
                collected.remove(text);
                continue;
            }
            if let Some(old) = old {
                // The same key with another verdict (a ClusterIP given to
                // another Service): the kernel replaces no element.
                deleted.push(old.0.clone());
                collected.remove(text);
            }
            added.push(new.clone());
        }
        for (text, old) in before {
            if !elements.contains_key(text) {
                collected.insert(text.clone(), old.clone());
            }
        }
        let (table, map) = map;
        if !deleted.is_empty() {
            cmds.push(Command::new(
                table,
                Op::DeleteElements { map, keys: deleted },
            ));
        }
        if !added.is_empty() {
            cmds.push(Command::new(
                table,
                Op::AddElements {
                    map,
                    elements: added,
                },
            ));
        }
    }
    garbage.elements.retain(|_, elements| !elements.is_empty());
    for chain in prev.chains.keys().filter(|c| !next.chains.contains_key(*c)) {
        cmds.push(Command::new(chain.0, Op::FlushChain(chain.1.clone())));
        garbage.chains.insert(chain.clone());
    }
    for (set, &timeout) in &prev.affinity_sets {
        if !next.affinity_sets.contains_key(set) {
            garbage.sets.insert(set.clone(), timeout);
        }
    }
    cmds
}

/// The JSON document `nft -j -f -` takes.
pub fn document(cmds: Vec<Value>) -> Value {
    json!({"nftables": cmds})
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A one-port Service of namespace `shop`, endpoints on port 8080.
    pub(crate) fn service(name: &str, ip: [u8; 4], endpoints: &[[u8; 4]]) -> ServicePort {
        ServicePort {
            namespace: "shop".into(),
            name: name.into(),
            port_name: String::new(),
            protocol: Protocol::Tcp,
            cluster_ips: vec![Ipv4Addr::from(ip)],
            port: 80,
            node_port: None,
            affinity_seconds: None,
            internal_local: false,
            external_local: false,
            endpoints: endpoints
                .iter()
                .map(|&ip| Endpoint {
                    ip: Ipv4Addr::from(ip),
                    port: 8080,
                    local: false,
                })
                .collect(),
        }
    }

    fn touched(cmds: &[Command]) -> BTreeSet<String> {
        cmds.iter()
            .map(|c| match &c.op {
                Op::AddAffinitySet { name, .. }
                | Op::DeleteSet(name)
                | Op::AddChain(name)
                | Op::FlushChain(name)
                | Op::DeleteChain(name)
                | Op::AppendRules { chain: name, .. } => name.clone(),
                Op::AddElements { map, .. } | Op::DeleteElements { map, .. } => map.to_string(),
            })
            .collect()
    }

    #[test]
    fn services_spread_over_the_tables() {
        let used: BTreeSet<Table> = (0..200)
            .map(|i| Table::of_service("shop", &format!("web{i}"), 16))
            .collect();
        assert_eq!(used.len(), 16);
        assert_eq!(
            Table::of_service("shop", "web", 16),
            Table::of_service("shop", "web", 16)
        );
    }

    #[test]
    fn tables_grow_with_the_services_in_powers_of_two() {
        let counts: Vec<u8> = [0, 1, 1000, 1001, 2500, 4000, 5000, 10_000, 100_000]
            .into_iter()
            .map(service_tables_for)
            .collect();
        assert_eq!(counts, [1, 1, 1, 2, 4, 4, 8, 16, 16]);
        assert_eq!(Table::parse("tapestry-proxy"), Some(Table::Main));
        assert_eq!(Table::parse("tapestry-proxy-12"), Some(Table::Services(12)));
        assert_eq!(Table::parse("tapestry-proxyx"), None);
        assert_eq!(Table::parse("other"), None);
    }

    #[test]
    fn nothing_changed_is_no_command() {
        let node = NodeConfig::default();
        let services: Vec<ServicePort> = (0..50)
            .map(|i| service(&format!("s{i}"), [10, 96, 0, i], &[[10, 244, 0, i]]))
            .collect();
        let a = desired(&node, &services);
        let mut garbage = Garbage::default();
        assert!(incremental(&a, &desired(&node, &services), &mut garbage).is_empty());
        assert!(garbage.is_empty());
    }

    #[test]
    fn one_endpoint_change_touches_one_service() {
        let node = NodeConfig::default();
        let mut services: Vec<ServicePort> = (0..50)
            .map(|i| service(&format!("s{i}"), [10, 96, 0, i], &[[10, 244, 0, i]]))
            .collect();
        let before = desired(&node, &services);
        services[7].endpoints.push(Endpoint {
            ip: Ipv4Addr::new(10, 244, 1, 7),
            port: 8080,
            local: false,
        });
        let mut garbage = Garbage::default();
        let cmds = incremental(&before, &desired(&node, &services), &mut garbage);
        assert_eq!(
            touched(&cmds),
            BTreeSet::from([
                "svc-shop/s7/tcp/".to_string(),
                "ep-shop/s7/tcp/__10.244.1.7/8080".to_string(),
            ]),
            "{cmds:#?}"
        );
        assert!(garbage.is_empty());
    }

    #[test]
    fn a_service_losing_its_endpoints_is_rejected_without_touching_maps() {
        let node = NodeConfig::default();
        let before = desired(&node, &[service("web", [10, 96, 0, 9], &[[10, 244, 0, 2]])]);
        let after = desired(&node, &[service("web", [10, 96, 0, 9], &[])]);
        let mut garbage = Garbage::default();
        let cmds = incremental(&before, &after, &mut garbage);
        let endpoint = "ep-shop/web/tcp/__10.244.0.2/8080".to_string();
        let main = Table::Main;
        let svc = Table::of_service("shop", "web", 0);
        assert_eq!(
            cmds,
            vec![
                Command::new(main, Op::FlushChain("chk-shop/web/tcp/".into())),
                Command::new(
                    main,
                    Op::AppendRules {
                        chain: "chk-shop/web/tcp/".into(),
                        rules: vec![json!([goto(REJECT_CHAIN)])],
                    }
                ),
                Command::new(svc, Op::FlushChain("svc-shop/web/tcp/".into())),
                Command::new(svc, Op::FlushChain(endpoint.clone())),
            ]
        );
        // The endpoint chain is deleted later; back again, it is reused.
        assert_eq!(
            garbage.collect(),
            vec![Command::new(svc, Op::DeleteChain(endpoint.clone()))]
        );
        let cmds = incremental(&after, &before, &mut garbage);
        assert!(cmds.contains(&Command::new(svc, Op::AddChain(endpoint))));
    }

    #[test]
    fn a_removed_service_is_collected_and_can_come_back() {
        let node = NodeConfig::default();
        let web = desired(&node, &[service("web", [10, 96, 0, 9], &[[10, 244, 0, 2]])]);
        let gone = desired(&node, &[]);
        let mut garbage = Garbage::default();
        let cmds = incremental(&web, &gone, &mut garbage);
        assert!(
            cmds.iter().all(|c| matches!(c.op, Op::FlushChain(_))),
            "{cmds:#?}"
        );
        // Back before collection: nothing to add, the kernel still has it.
        let cmds = incremental(&gone, &web, &mut garbage);
        assert!(garbage.is_empty(), "{garbage:?}");
        assert!(
            cmds.iter().all(|c| matches!(c.op, Op::AppendRules { .. })),
            "{cmds:#?}"
        );
        // Gone again and collected: elements, then chains.
        incremental(&web, &gone, &mut garbage);
        let collected = garbage.collect();
        assert!(matches!(collected[0].op, Op::DeleteElements { .. }));
        assert_eq!(collected.len(), 2 + 3, "{collected:#?}");
        assert!(garbage.is_empty());
    }

    #[test]
    fn a_cluster_ip_given_to_another_service_replaces_its_element() {
        let node = NodeConfig::default();
        let old = desired(&node, &[service("old", [10, 96, 0, 9], &[[10, 244, 0, 2]])]);
        // Another Service of the same Service table (one elsewhere has its
        // own map; the old entry leads to an emptied chain until collected).
        let name = (0..)
            .map(|i| format!("new{i}"))
            .find(|n| Table::of_service("shop", n, 0) == Table::of_service("shop", "old", 0))
            .unwrap();
        let new = desired(&node, &[service(&name, [10, 96, 0, 9], &[[10, 244, 0, 3]])]);
        let mut garbage = Garbage::default();
        incremental(&old, &Ruleset::default(), &mut garbage);
        let cmds = incremental(&Ruleset::default(), &new, &mut garbage);
        let deletes: Vec<&Command> = cmds
            .iter()
            .filter(|c| matches!(c.op, Op::DeleteElements { .. }))
            .collect();
        assert_eq!(deletes.len(), 2, "{cmds:#?}");
        assert!(garbage.elements.is_empty(), "{garbage:?}");
    }
}
