use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tapestry_proto::policy::Cidr;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::Batch;
use crate::metrics::SinkStats;
use crate::sinks::{
    check_addr, default_client_queue, default_max_clients, default_queue, default_snaplen, Hub,
    SinkContext, Started,
};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PcapOverIpConfig {
    pub name: String,
    /// Address to listen on, e.g. `0.0.0.0:57012`.
    pub listen: String,
    /// Client networks allowed besides loopback (`0.0.0.0/0` for any);
    /// absent, loopback only: PCAP-over-IP has no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<Cidr>>,
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Encoded batches buffered per client before that client loses data.
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
    /// Clients served at once; more are refused.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    #[serde(default = "default_snaplen")]
    pub snaplen: u32,
    /// Serve the stream over TLS with the aggregator's certificate (for
    /// clients such as `socat OPENSSL:…` or stunnel; tshark itself speaks
    /// plaintext only). The allow list still decides who may connect.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

impl PcapOverIpConfig {
    pub fn validate(&self) -> Result<(), String> {
        check_addr("listen", &self.listen)
    }

    /// Whether a client connecting from `peer` may read the stream.
    pub fn admits(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        peer.is_loopback() || self.allow.iter().flatten().any(|c| cidr_contains(c, peer))
    }

    pub async fn build(
        &self,
        cx: &SinkContext,
        rx: mpsc::Receiver<Batch>,
        stats: Arc<SinkStats>,
        stop: CancellationToken,
    ) -> anyhow::Result<Started> {
        let tls = match (self.tls, &cx.tls) {
            (false, _) => None,
            (true, Some(config)) => Some(tokio_rustls::TlsAcceptor::from(config.clone())),
            (true, None) => anyhow::bail!(
                "sink {:?}: tls: the aggregator has no certificate (give --tls-cert and --tls-key, or --tls-from-csr)",
                self.name
            ),
        };
        let listener = tokio::net::TcpListener::bind(&self.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("sink {:?}: listening on {}: {e}", self.name, self.listen)
            })?;
        let address = listener.local_addr()?;
        let hub = Arc::new(Hub::new(stats.clone(), self.client_queue, self.max_clients));
        let accept = tokio::spawn(super::sink::accept(
            listener,
            hub.clone(),
            self.clone(),
            tls,
            stop.clone(),
        ));
        let run = tokio::spawn(super::sink::run(rx, hub, stats, self.snaplen, stop));
        Ok(Started {
            address: Some(address),
            holders: vec![accept],
            drains: vec![run],
        })
    }
}

fn cidr_contains(c: &Cidr, ip: IpAddr) -> bool {
    match (c.addr.to_canonical(), ip) {
        (IpAddr::V4(net), IpAddr::V4(a)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(c.prefix_len.min(32)))
                .unwrap_or(0);
            u32::from(net) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(a)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(c.prefix_len.min(128)))
                .unwrap_or(0);
            u128::from(net) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_allow(allow: Option<&[&str]>) -> PcapOverIpConfig {
        PcapOverIpConfig {
            name: "t".into(),
            listen: "127.0.0.1:0".into(),
            allow: allow.map(|a| a.iter().map(|c| c.parse().unwrap()).collect()),
            queue: 1,
            client_queue: 1,
            max_clients: 2,
            snaplen: 100,
            tls: false,
        }
    }

    #[test]
    fn allow_list_admits_loopback_and_listed_networks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(!with_allow(None).admits(ip("192.0.2.1")));
        assert!(with_allow(None).admits(ip("127.0.0.1")));
        let closed = with_allow(Some(&[]));
        assert!(closed.admits(ip("127.0.0.1")));
        assert!(closed.admits(ip("::1")));
        assert!(closed.admits(ip("::ffff:127.0.0.1")));
        assert!(!closed.admits(ip("192.0.2.1")));
        let some = with_allow(Some(&["10.0.0.0/8", "fd00::/16", "192.0.2.7"]));
        assert!(some.admits(ip("10.1.2.3")));
        assert!(some.admits(ip("::ffff:10.1.2.3")));
        assert!(some.admits(ip("fd00::5")));
        assert!(some.admits(ip("192.0.2.7")));
        assert!(!some.admits(ip("192.0.2.8")));
        assert!(!some.admits(ip("11.0.0.1")));
        let all = with_allow(Some(&["0.0.0.0/0"]));
        assert!(all.admits(ip("203.0.113.9")));
        assert!(!all.admits(ip("2001:db8::1")));
    }
}
