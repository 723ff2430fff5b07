//! Finding a pod's host-side interface from what the node's kernel says,
//! not from what the pod's annotations claim.
//!
//! Every CNI that gives pods a veth (bridge, ptp, Calico, Cilium, …) puts
//! one end in the pod's network namespace with the pod's IP on it and
//! leaves the other end on the host. The kernel tells, for each host-side
//! veth, where its peer is (`IFLA_LINK` + `IFLA_LINK_NETNSID`), and answers
//! address dumps of that namespace by its id (`IFA_TARGET_NETNSID`), so the
//! agent needs neither the namespace's path nor its processes: [`gather`]
//! collects, for every veth of this namespace, the addresses of its peer,
//! and [`resolve`] picks the one veth whose peer holds the pod's IP. The
//! kubelet's `tapestry.io/host-veth` annotation is only a hint: when it
//! names another interface the pod is not tapped and the disagreement is
//! reported.

use std::{collections::BTreeMap, net::IpAddr, os::fd::AsRawFd, time::Duration};

use anyhow::{bail, Context as _, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The annotation in which the kubelet records a pod's host-side veth.
pub const HOST_VETH_ANNOTATION: &str = "tapestry.io/host-veth";

/// A veth of this network namespace and the addresses on its peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Veth {
    pub name: String,
    pub peer_addrs: Vec<IpAddr>,
}

/// What [`gather`] found: every veth of this network namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFacts {
    pub veths: Vec<Veth>,
}

/// The outcome for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Tap this interface.
    Interface(String),
    /// Nothing to tap yet (the pod has no IP).
    Waiting,
    /// Not tapped, for this reason (reported).
    Refused(String),
}

/// The host-side veth of a pod with addresses `pod_ips`, given the node's
/// `facts` and the annotation's `hint`: the one veth whose peer holds a pod
/// IP, provided the hint (if any) names that same veth.
pub fn resolve(pod_ips: &[IpAddr], hint: Option<&str>, facts: &NodeFacts) -> Resolution {
    if pod_ips.is_empty() {
        return Resolution::Waiting;
    }
    let hint = hint.filter(|h| !h.is_empty());
    let ips = list(pod_ips);
    let holders: Vec<&Veth> = facts
        .veths
        .iter()
        .filter(|v| v.peer_addrs.iter().any(|a| pod_ips.contains(a)))
        .collect();
    match holders.as_slice() {
        [one] => match hint {
            Some(h) if h != one.name => Resolution::Refused(format!(
                "annotation {HOST_VETH_ANNOTATION} names {h}, but the veth whose peer holds {ips} is {}",
                one.name
            )),
            _ => Resolution::Interface(one.name.clone()),
        },
        [] => Resolution::Refused(match hint {
            Some(h) => match facts.veths.iter().find(|v| v.name == h) {
                Some(v) => format!(
                    "annotation {HOST_VETH_ANNOTATION} names {h}, whose peer holds {} and not {ips}",
                    if v.peer_addrs.is_empty() {
                        "no address".to_string()
                    } else {
                        list(&v.peer_addrs)
                    }
                ),
                None => format!(
                    "annotation {HOST_VETH_ANNOTATION} names {h}, which is not a veth on this node, and no veth's peer holds {ips}"
                ),
            },
            None => format!("no veth on this node has a peer holding {ips}"),
        }),
        many => Resolution::Refused(format!(
            "{ips} is held behind several veths ({}): cannot tell which is the pod's",
            many.iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads every veth of this network namespace and the addresses of its
/// peer from the kernel (rtnetlink; blocking, a few milliseconds).
pub fn gather() -> Result<NodeFacts> {
    let mut nl = Rtnetlink::open()?;
    struct Raw {
        name: String,
        peer_ifindex: u32,
        /// None: the peer is in this namespace.
        peer_netns: Option<i32>,
    }
    let mut raws = Vec::new();
    for msg in nl.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        let RouteNetlinkMessage::NewLink(link) = msg else {
            continue;
        };
        let (mut name, mut peer_ifindex, mut peer_netns, mut veth) = (None, None, None, false);
        for a in link.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::Link(i) => peer_ifindex = Some(i),
                LinkAttribute::LinkNetNsId(id) => peer_netns = Some(id),
                LinkAttribute::LinkInfo(infos) => {
                    veth = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
                }
                _ => {}
            }
        }
        if let (true, Some(name), Some(peer_ifindex)) = (veth, name, peer_ifindex) {
            raws.push(Raw {
                name,
                peer_ifindex,
                peer_netns,
            });
        }
    }
    // One address dump per namespace holding peers.
    let mut addrs: BTreeMap<(Option<i32>, u32), Vec<IpAddr>> = BTreeMap::new();
    let namespaces: std::collections::BTreeSet<Option<i32>> =
        raws.iter().map(|r| r.peer_netns).collect();
    for netns in namespaces {
        let mut req = AddressMessage::default();
        if let Some(id) = netns {
            req.attributes.push(AddressAttribute::TargetNetNsId(id));
        }
        // A namespace may vanish between the two dumps (a pod going away);
        // its veth then has no peer addresses.
        let Ok(msgs) = nl.dump(RouteNetlinkMessage::GetAddress(req)) else {
            continue;
        };
        for msg in msgs {
            let RouteNetlinkMessage::NewAddress(a) = msg else {
                continue;
            };
            let entry = addrs.entry((netns, a.header.index)).or_default();
            for attr in a.attributes {
                if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = attr {
                    if !entry.contains(&ip) {
                        entry.push(ip);
                    }
                }
            }
        }
    }
    Ok(NodeFacts {
        veths: raws
            .into_iter()
            .map(|r| Veth {
                peer_addrs: addrs
                    .get(&(r.peer_netns, r.peer_ifindex))
                    .cloned()
                    .unwrap_or_default(),
                name: r.name,
            })
            .collect(),
    })
}

/// A route netlink socket with strict request checking, which the kernel
/// requires before it answers dumps of another namespace by id.
struct Rtnetlink {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

impl Rtnetlink {
    fn open() -> Result<Rtnetlink> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening a route netlink socket")?;
        socket.bind_auto().context("binding the netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the netlink socket")?;
        socket.set_netlink_get_strict_chk(true).context(
            "enabling strict netlink checking (Linux 4.20 or later is needed to read pods' addresses)",
        )?;
        set_receive_timeout(&socket, Duration::from_secs(5))?;
        Ok(Rtnetlink {
            socket,
            sequence: 0,
            // Dump replies come in chunks of at most 32 KiB.
            buf: vec![0; 64 << 10],
        })
    }

    fn dump(&mut self, request: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(request));
        msg.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        msg.header.sequence_number = self.sequence;
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.send(&out, 0).context("netlink send")?;
        let mut replies = Vec::new();
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .context("netlink receive")?;
            let mut offset = 0;
            while offset < n {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                        .context("decoding a netlink reply")?;
                let len = reply.header.length as usize;
                if len == 0 {
                    bail!("netlink reply of length 0");
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(e.to_io()).context("netlink dump refused")
                    }
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
            }
        }
    }
}

fn set_receive_timeout(socket: &Socket, t: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket and a timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("setting the netlink receive timeout");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn facts(veths: &[(&str, &[&str])]) -> NodeFacts {
        NodeFacts {
            veths: veths
                .iter()
                .map(|(name, addrs)| Veth {
                    name: name.to_string(),
                    peer_addrs: addrs.iter().map(|a| ip(a)).collect(),
                })
                .collect(),
        }
    }

    fn refused(r: Resolution) -> String {
        match r {
            Resolution::Refused(why) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_veth_whose_peer_holds_the_pod_ip() {
        let f = facts(&[
            ("veth1", &["10.1.0.2"]),
            ("veth2", &["10.1.0.3", "fe80::1"]),
            ("other", &[]),
        ]);
        let pod = [ip("10.1.0.3")];
        assert_eq!(
            resolve(&pod, None, &f),
            Resolution::Interface("veth2".into())
        );
        // A hint that agrees, or an empty one, changes nothing.
        assert_eq!(
            resolve(&pod, Some("veth2"), &f),
            Resolution::Interface("veth2".into())
        );
        assert_eq!(
            resolve(&pod, Some(""), &f),
            Resolution::Interface("veth2".into())
        );
        // Dual stack: either address finds it.
        let f6 = facts(&[("veth9", &["fd00::9"])]);
        assert_eq!(
            resolve(&[ip("10.9.0.9"), ip("fd00::9")], None, &f6),
            Resolution::Interface("veth9".into())
        );
    }

    #[test]
    fn a_hint_that_disagrees_is_refused() {
        let f = facts(&[("veth1", &["10.1.0.2"]), ("veth2", &["10.1.0.3"])]);
        let why = refused(resolve(&[ip("10.1.0.3")], Some("veth1"), &f));
        assert!(
            why.contains("names veth1") && why.contains("is veth2"),
            "{why}"
        );
    }

    #[test]
    fn no_holder_is_refused_naming_what_was_found() {
        let f = facts(&[("veth1", &["10.1.0.2"])]);
        let pod = [ip("10.1.0.7")];
        assert!(refused(resolve(&pod, None, &f)).contains("no veth on this node"));
        let why = refused(resolve(&pod, Some("veth1"), &f));
        assert!(why.contains("holds 10.1.0.2 and not 10.1.0.7"), "{why}");
        let why = refused(resolve(&pod, Some("eth0"), &f));
        assert!(why.contains("not a veth on this node"), "{why}");
    }

    #[test]
    fn an_address_behind_two_veths_is_ambiguous() {
        let f = facts(&[("veth1", &["10.1.0.2"]), ("veth2", &["10.1.0.2"])]);
        let why = refused(resolve(&[ip("10.1.0.2")], Some("veth1"), &f));
        assert!(why.contains("veth1, veth2"), "{why}");
    }

    #[test]
    fn no_pod_ip_yet_is_waiting() {
        let f = facts(&[("veth1", &["10.1.0.2"])]);
        assert_eq!(resolve(&[], Some("veth1"), &f), Resolution::Waiting);
    }
}
