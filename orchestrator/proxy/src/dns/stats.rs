//! What the DNS server has done, as Prometheus metrics.

use hickory_proto::op::ResponseCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Default)]
pub struct DnsStats {
    /// Answers sent, by response code.
    responses: Family<RcodeLabels, Counter>,
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
        let rcode = match rcode {
            ResponseCode::NoError => "NOERROR",
            ResponseCode::FormErr => "FORMERR",
            ResponseCode::ServFail => "SERVFAIL",
            ResponseCode::NXDomain => "NXDOMAIN",
            ResponseCode::NotImp => "NOTIMP",
            ResponseCode::Refused => "REFUSED",
            _ => "OTHER",
        };
        self.responses.get_or_create(&RcodeLabels { rcode }).inc();
    }

    /// Count a resolver's answer by the code in its header.
    pub fn answered_by_resolver(&self, answer: &[u8]) {
        if let Some(flags) = answer.get(3) {
            self.answered(ResponseCode::from(0, flags & 0x0f));
        }
    }

    /// The count of answers with `rcode` (`NOERROR`, `NXDOMAIN`, ...).
    pub fn responses(&self, rcode: &'static str) -> u64 {
        self.responses.get_or_create(&RcodeLabels { rcode }).get()
    }
}
