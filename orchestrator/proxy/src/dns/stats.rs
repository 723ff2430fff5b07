//! What the DNS server has done, as Prometheus metrics.

use hickory_proto::op::ResponseCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The response codes counted apart; the rest count as `OTHER`.
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "OTHER",
];

#[derive(Debug)]
pub struct DnsStats {
    /// Answers sent, by response code.
    responses: Family<RcodeLabels, Counter>,
    /// The family's counters, fetched once: counting an answer is then one
    /// atomic add, not a lookup under the family's lock.
    by_rcode: [Counter; RCODES.len()],
    /// Queries relayed to the node's resolvers.
    pub forwarded: Counter,
    /// Relayed queries no resolver answered (the client got SERVFAIL).
    pub forward_failures: Counter,
    /// Queries and connections refused over the bounds on relays in flight
    /// and TCP connections.
    pub dropped: Counter,
    /// Packets that were not DNS queries.
    pub malformed: Counter,
    /// Services in the zone.
    pub services: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RcodeLabels {
    rcode: &'static str,
}

impl Default for DnsStats {
    fn default() -> Self {
        let responses: Family<RcodeLabels, Counter> = Family::default();
        let by_rcode = RCODES.map(|rcode| responses.get_or_create(&RcodeLabels { rcode }).clone());
        DnsStats {
            responses,
            by_rcode,
            forwarded: Counter::default(),
            forward_failures: Counter::default(),
            dropped: Counter::default(),
            malformed: Counter::default(),
            services: Gauge::default(),
        }
    }
}

impl DnsStats {
    /// Register under `tapestry_dns`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tapestry_dns");
        r.register(
            "responses",
            "DNS answers sent, by response code",
            self.responses.clone(),
        );
        r.register(
            "forwarded",
            "Queries relayed to the node's resolvers",
            self.forwarded.clone(),
        );
        r.register(
            "forward_failures",
            "Relayed queries no resolver answered",
            self.forward_failures.clone(),
        );
        r.register(
            "dropped",
            "Queries and TCP connections refused over the server's bounds",
            self.dropped.clone(),
        );
        r.register(
            "malformed",
            "Packets that were not DNS queries",
            self.malformed.clone(),
        );
        r.register(
            "services",
            "Services in the cluster zone",
            self.services.clone(),
        );
    }

    pub fn answered(&self, rcode: ResponseCode) {
        let index = match rcode {
            ResponseCode::NoError => 0,
            ResponseCode::FormErr => 1,
            ResponseCode::ServFail => 2,
            ResponseCode::NXDomain => 3,
            ResponseCode::NotImp => 4,
            ResponseCode::Refused => 5,
            _ => 6,
        };
        self.by_rcode[index].inc();
    }

    /// Count an encoded answer by the code in its header.
    pub fn answered_raw(&self, answer: &[u8]) {
        if let Some(flags) = answer.get(3) {
            self.answered(ResponseCode::from(0, flags & 0x0f));
        }
    }

    /// The count of answers with `rcode` (`NOERROR`, `NXDOMAIN`, ...).
    pub fn responses(&self, rcode: &'static str) -> u64 {
        self.responses.get_or_create(&RcodeLabels { rcode }).get()
    }
}
