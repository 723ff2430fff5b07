//! The cluster's zone (`cluster.local` unless configured otherwise): every
//! Service's records as the Kubernetes DNS specification defines them,
//! rebuilt one Service at a time from the watch caches and looked up by
//! exact name.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// What the zone says about a name and type.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Records of the asked type, or the name's CNAME.
    Records(Vec<Record>),
    /// The name exists, without records of that type.
    NoData,
    /// No such name in the zone.
    NxDomain,
    /// A name the zone does not hold: the node's resolvers answer it.
    Elsewhere,
}

pub struct Zone {
    origin: LowerName,
    /// `svc.ORIGIN` and `pod.ORIGIN`, which exist even when empty.
    fixed: [LowerName; 2],
    /// The suffix of pod names (`.pod.cluster.local.`).
    pod_suffix: String,
    origin_text: String,
    ttl: u32,
    soa: Record,
    records: HashMap<LowerName, Vec<Record>>,
    /// Names that exist inside the zone (holding records, or between such
    /// a name and the origin), with how many records keep each.
    names: HashMap<LowerName, usize>,
    /// What each Service (`namespace/name`) put into `records`.
    by_service: HashMap<String, Vec<Record>>,
}

impl Zone {
    /// An empty zone for `domain` (e.g. `cluster.local`) whose answers live
    /// `ttl` seconds in caches.
    pub fn new(domain: &str, ttl: u32) -> Result<Zone, String> {
        let domain = domain.trim_end_matches('.');
        let name = |text: &str| {
            Name::from_ascii(text).map_err(|e| format!("cluster domain {domain:?}: {e}"))
        };
        let origin = name(&format!("{domain}."))?;
        let soa = Record::from_rdata(
            origin.clone(),
            ttl,
            RData::SOA(SOA::new(
                name(&format!("ns.dns.{domain}."))?,
                name(&format!("hostmaster.{domain}."))?,
                1,
                7200,
                1800,
                86400,
                ttl,
            )),
        );
        Ok(Zone {
            fixed: [
                LowerName::new(&name(&format!("svc.{domain}."))?),
                LowerName::new(&name(&format!("pod.{domain}."))?),
            ],
            pod_suffix: format!(".pod.{domain}."),
            origin_text: format!("{domain}."),
            origin: LowerName::new(&origin),
            ttl,
            soa,
            records: HashMap::new(),
            names: HashMap::new(),
            by_service: HashMap::new(),
        })
    }

    /// The zone's SOA record, for the authority section of negative answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    pub fn services(&self) -> usize {
        self.by_service.len()
    }

    /// Whether `name` is inside the zone (authoritative answers).
    pub fn holds(&self, name: &LowerName) -> bool {
        self.origin.zone_of(name)
    }

    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Answer {
        if let Some(records) = self.records.get(name) {
            let matching: Vec<Record> = records
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .cloned()
                .collect();
            if !matching.is_empty() {
                return Answer::Records(matching);
            }
            if let Some(cname) = records
                .iter()
                .find(|r| r.record_type() == RecordType::CNAME)
            {
                return Answer::Records(vec![cname.clone()]);
            }
            return Answer::NoData;
        }
        if !self.holds(name) {
            return Answer::Elsewhere;
        }
        if *name == self.origin {
            return match qtype {
                RecordType::SOA | RecordType::ANY => Answer::Records(vec![self.soa.clone()]),
                _ => Answer::NoData,
            };
        }
        if let Some(ip) = self.pod_address(name) {
            return match qtype {
                RecordType::A | RecordType::ANY => {
                    Answer::Records(vec![Record::from_rdata(name.into(), self.ttl, address(ip))])
                }
                _ => Answer::NoData,
            };
        }
        if self.names.contains_key(name) || self.fixed.contains(name) {
            Answer::NoData
        } else {
            Answer::NxDomain
        }
    }

    /// `10-244-1-5.NAMESPACE.pod.ORIGIN` → 10.244.1.5, answered for any
    /// address as CoreDNS's `pods insecure` mode does.
    fn pod_address(&self, name: &LowerName) -> Option<Ipv4Addr> {
        let text = name.to_string();
        let rest = text.strip_suffix(&self.pod_suffix)?;
        let (dashed, namespace) = rest.split_once('.')?;
        if namespace.is_empty() || namespace.contains('.') {
            return None;
        }
        dashed.replace('-', ".").parse().ok()
    }

    /// Replace what the Service `key` (`namespace/name`) holds in the zone.
    pub fn set_service(&mut self, key: &str, records: Vec<Record>) {
        if let Some(old) = self.by_service.remove(key) {
            for r in &old {
                self.remove(r);
            }
        }
        for r in &records {
            self.insert(r);
        }
        if !records.is_empty() {
            self.by_service.insert(key.to_string(), records);
        }
    }

    fn insert(&mut self, record: &Record) {
        let name = LowerName::new(&record.name);
        for n in self.existing(&name) {
            *self.names.entry(n).or_default() += 1;
        }
        self.records.entry(name).or_default().push(record.clone());
    }

    fn remove(&mut self, record: &Record) {
        let name = LowerName::new(&record.name);
        for n in self.existing(&name) {
            if let Some(count) = self.names.get_mut(&n) {
                *count -= 1;
                if *count == 0 {
                    self.names.remove(&n);
                }
            }
        }
        if let Some(records) = self.records.get_mut(&name) {
            if let Some(i) = records.iter().position(|r| r == record) {
                records.swap_remove(i);
            }
            if records.is_empty() {
                self.records.remove(&name);
            }
        }
    }

    /// The names a record at `name` makes exist: itself and every name
    /// between it and the origin (`_tcp.web.shop.svc.ORIGIN` makes
    /// `web.shop.svc.ORIGIN` and `shop.svc.ORIGIN` exist).
    fn existing(&self, name: &LowerName) -> Vec<LowerName> {
        let mut out = Vec::new();
        let mut n = name.clone();
        while self.origin.zone_of(&n) && n != self.origin {
            let parent = n.base_name();
            out.push(n);
            n = parent;
        }
        out
    }

    /// Every record of one Service:
    /// - a ClusterIP Service: `A`/`AAAA` for its ClusterIPs, `PTR` back, and
    ///   an `SRV` per named port;
    /// - a headless Service: `A`/`AAAA` for its ready endpoints, a name per
    ///   endpoint (its `hostname`, or its address with dashes), `PTR` back,
    ///   and per named port an `SRV` per endpoint;
    /// - an ExternalName Service: a `CNAME`.
    pub fn service_records(&self, service: &Service, slices: &[&EndpointSlice]) -> Vec<Record> {
        let (Some(spec), Some(ns), Some(name)) = (
            service.spec.as_ref(),
            service.metadata.namespace.as_deref(),
            service.metadata.name.as_deref(),
        ) else {
            return Vec::new();
        };
        let Ok(base) = Name::from_ascii(format!("{name}.{ns}.svc.{}", self.origin_text)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if spec.type_.as_deref() == Some("ExternalName") {
            let target = spec.external_name.as_deref().unwrap_or_default();
            if let Ok(target) = Name::from_ascii(format!("{}.", target.trim_end_matches('.'))) {
                out.push(self.record(&base, RData::CNAME(CNAME(target))));
            }
            return out;
        }
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let headless = spec.cluster_ip.as_deref() == Some("None");
        if !headless {
            for ip in dedup(cluster_ips) {
                out.push(self.record(&base, address(ip)));
                out.push(self.record(&reverse(ip), RData::PTR(PTR(base.clone()))));
            }
            for port in spec.ports.iter().flatten() {
                let (Some(port_name), Ok(number)) = (&port.name, u16::try_from(port.port)) else {
                    continue;
                };
                let protocol = port.protocol.as_deref().unwrap_or("TCP");
                if let Some(srv) = srv_name(port_name, protocol, &base) {
                    let target = SRV::new(0, 100, number, base.clone());
                    out.push(self.record(&srv, RData::SRV(target)));
                }
            }
            return out;
        }
        let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
        // An address in two slices (one per port set) is one endpoint.
        let mut seen: HashSet<IpAddr> = HashSet::new();
        for slice in slices {
            let ports: Vec<(Name, u16)> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    let srv = srv_name(
                        p.name.as_deref().filter(|n| !n.is_empty())?,
                        p.protocol.as_deref().unwrap_or("TCP"),
                        &base,
                    )?;
                    Some((srv, u16::try_from(p.port?).ok()?))
                })
                .collect();
            for endpoint in &slice.endpoints {
                let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false);
                if !ready && !publish_not_ready {
                    continue;
                }
                let addresses = endpoint.addresses.iter().filter_map(|a| a.parse().ok());
                for ip in addresses.filter(|ip| seen.insert(*ip)) {
                    let label = endpoint.hostname.clone().unwrap_or_else(|| dashed(ip));
                    let Ok(own) = base.prepend_label(label.as_str()) else {
                        continue;
                    };
                    out.push(self.record(&base, address(ip)));
                    out.push(self.record(&own, address(ip)));
                    out.push(self.record(&reverse(ip), RData::PTR(PTR(own.clone()))));
                    for (srv, port) in &ports {
                        let target = SRV::new(0, 100, *port, own.clone());
                        out.push(self.record(srv, RData::SRV(target)));
                    }
                }
            }
        }
        out
    }

    fn record(&self, name: &Name, rdata: RData) -> Record {
        Record::from_rdata(name.clone(), self.ttl, rdata)
    }
}

fn address(ip: impl Into<IpAddr>) -> RData {
    match ip.into() {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// `10.244.1.5` → `10-244-1-5`; `fd00::5` → `fd00--5`.
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// `_http._tcp.BASE`.
fn srv_name(port: &str, protocol: &str, base: &Name) -> Option<Name> {
    base.prepend_label(format!("_{}", protocol.to_ascii_lowercase()).as_str())
        .and_then(|n| n.prepend_label(format!("_{port}").as_str()))
        .ok()
}

/// The `in-addr.arpa.` / `ip6.arpa.` name of an address.
fn reverse(ip: IpAddr) -> Name {
    let text = match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for byte in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    };
    Name::from_ascii(text).expect("a reverse name is always valid")
}

fn dedup<T: Eq + std::hash::Hash + Clone>(items: Vec<T>) -> Vec<T> {
    let mut seen = HashSet::with_capacity(items.len());
    items
        .into_iter()
        .filter(|i| seen.insert(i.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn zone() -> Zone {
        Zone::new("cluster.local", 30).unwrap()
    }

    fn name(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).unwrap())
    }

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn rdata(answer: Answer) -> Vec<String> {
        match answer {
            Answer::Records(r) => r.iter().map(|r| r.data.to_string()).collect(),
            other => panic!("expected records, got {other:?}"),
        }
    }

    fn web() -> Service {
        service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.3.4", "clusterIPs": ["10.96.3.4"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                               {"port": 81}]}
        }))
    }

    #[test]
    fn a_cluster_ip_service_has_its_address_srv_per_named_port_and_ptr() {
        let mut z = zone();
        let records = z.service_records(&web(), &[]);
        z.set_service("shop/web", records);
        let a = z.lookup(&name("web.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(rdata(a), ["10.96.3.4"]);
        // Names are case-insensitive.
        let upper = z.lookup(&name("WEB.Shop.svc.cluster.local."), RecordType::A);
        assert_eq!(rdata(upper), ["10.96.3.4"]);
        let srv = z.lookup(
            &name("_http._tcp.web.shop.svc.cluster.local."),
            RecordType::SRV,
        );
        assert_eq!(rdata(srv), ["0 100 80 web.shop.svc.cluster.local."]);
        let ptr = z.lookup(&name("4.3.96.10.in-addr.arpa."), RecordType::PTR);
        assert_eq!(rdata(ptr), ["web.shop.svc.cluster.local."]);
        // The name exists without AAAA; names between it and the zone exist.
        for n in [
            "web.shop.svc.cluster.local.",
            "_tcp.web.shop.svc.cluster.local.",
            "shop.svc.cluster.local.",
            "svc.cluster.local.",
        ] {
            assert_eq!(z.lookup(&name(n), RecordType::AAAA), Answer::NoData, "{n}");
        }
        for n in [
            "api.shop.svc.cluster.local.",
            "web.other.svc.cluster.local.",
        ] {
            assert_eq!(z.lookup(&name(n), RecordType::A), Answer::NxDomain, "{n}");
        }
        assert_eq!(
            z.lookup(&name("example.com."), RecordType::A),
            Answer::Elsewhere
        );
        assert_eq!(
            z.lookup(&name("9.9.9.9.in-addr.arpa."), RecordType::PTR),
            Answer::Elsewhere
        );
        // Deleted: gone, with every name it made exist.
        z.set_service("shop/web", Vec::new());
        assert_eq!(
            z.lookup(&name("web.shop.svc.cluster.local."), RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(
            z.lookup(&name("shop.svc.cluster.local."), RecordType::A),
            Answer::NxDomain
        );
        assert!(z.records.is_empty() && z.names.is_empty());
    }

    #[test]
    fn a_headless_service_names_its_ready_endpoints() {
        let mut z = zone();
        let db = service(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
        }));
        let s = slice(json!({
            "metadata": {"name": "db-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.0.5"], "conditions": {"ready": true}, "hostname": "db-0"},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.7"], "conditions": {"ready": false}}
            ]
        }));
        let records = z.service_records(&db, &[&s]);
        z.set_service("shop/db", records);
        let mut a = rdata(z.lookup(&name("db.shop.svc.cluster.local."), RecordType::A));
        a.sort();
        assert_eq!(a, ["10.244.0.5", "10.244.1.6"]);
        let host = z.lookup(&name("db-0.db.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(rdata(host), ["10.244.0.5"]);
        let dashed = z.lookup(
            &name("10-244-1-6.db.shop.svc.cluster.local."),
            RecordType::A,
        );
        assert_eq!(rdata(dashed), ["10.244.1.6"]);
        let mut srv = rdata(z.lookup(
            &name("_pg._tcp.db.shop.svc.cluster.local."),
            RecordType::SRV,
        ));
        srv.sort();
        assert_eq!(
            srv,
            [
                "0 100 5432 10-244-1-6.db.shop.svc.cluster.local.",
                "0 100 5432 db-0.db.shop.svc.cluster.local."
            ]
        );
        let ptr = z.lookup(&name("5.0.244.10.in-addr.arpa."), RecordType::PTR);
        assert_eq!(rdata(ptr), ["db-0.db.shop.svc.cluster.local."]);
    }

    #[test]
    fn external_names_pods_and_the_apex() {
        let mut z = zone();
        let ext = service(json!({
            "metadata": {"name": "mail", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "mail.example.com"}
        }));
        let records = z.service_records(&ext, &[]);
        z.set_service("shop/mail", records);
        let cname = z.lookup(&name("mail.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(rdata(cname), ["mail.example.com."]);
        let pod = z.lookup(&name("10-244-0-9.shop.pod.cluster.local."), RecordType::A);
        assert_eq!(rdata(pod), ["10.244.0.9"]);
        assert_eq!(
            z.lookup(&name("bogus.shop.pod.cluster.local."), RecordType::A),
            Answer::NxDomain
        );
        let soa = z.lookup(&name("cluster.local."), RecordType::SOA);
        assert_eq!(rdata(soa).len(), 1);
        assert_eq!(
            z.lookup(&name("pod.cluster.local."), RecordType::A),
            Answer::NoData
        );
    }

    #[test]
    fn a_service_changing_address_loses_the_old_one() {
        let mut z = zone();
        let records = z.service_records(&web(), &[]);
        z.set_service("shop/web", records);
        let mut moved = web();
        moved.spec.as_mut().unwrap().cluster_ip = Some("10.96.9.9".into());
        moved.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.9.9".into()]);
        let records = z.service_records(&moved, &[]);
        z.set_service("shop/web", records);
        let a = z.lookup(&name("web.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(rdata(a), ["10.96.9.9"]);
        assert_eq!(
            z.lookup(&name("4.3.96.10.in-addr.arpa."), RecordType::PTR),
            Answer::Elsewhere
        );
    }
}
