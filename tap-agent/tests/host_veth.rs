//! The node-local facts behind a pod's host-side interface, read from a
//! real kernel: veths whose peers sit in other network namespaces (as CNI
//! plugins wire pods) or in the same one, with and without addresses.

mod common;

use std::process::{Command, Stdio};

use common::*;
use tapestry_tap_agent::host_veth::{self, Resolution};

/// Network namespaces removed on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: String) -> String {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&format!("ip netns add {name}"));
        self.0.push(name.clone());
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn gathered_facts_find_each_pods_veth() {
    if !require_root("gathered_facts_find_each_pods_veth") {
        return;
    }
    let id = std::process::id() % 100_000;
    let mut spaces = Namespaces(Vec::new());
    let node = spaces.add(format!("hv{id}node"));
    let pod1 = spaces.add(format!("hv{id}pod1"));
    let pod2 = spaces.add(format!("hv{id}pod2"));
    // Pods wired as CNI plugins do: the host end stays, eth0 moves in.
    for (veth, pod, addrs) in [
        ("hvp1", &pod1, &["10.98.0.11/24", "fd98::11/64"][..]),
        ("hvp2", &pod2, &["10.98.0.12/24"][..]),
    ] {
        sh(&format!(
            "ip -n {node} link add {veth} type veth peer name eth0 netns {pod} && ip -n {node} link set {veth} up && ip -n {pod} link set eth0 up"
        ));
        for a in addrs {
            sh(&format!("ip -n {pod} addr add {a} dev eth0 nodad"));
        }
    }
    // A pair inside the node's namespace, one end addressed, and a veth
    // whose peer has no address at all.
    sh(&format!(
        "ip -n {node} link add hvl0 type veth peer name hvl1 && ip -n {node} addr add 10.98.1.1/24 dev hvl1 && \
         ip -n {node} link add hvbare type veth peer name eth1 netns {pod2}"
    ));

    let facts = in_netns(&node, || host_veth::gather().expect("gathering facts"));
    // Peer addresses without IPv6 link-local ones (there whenever a link is up).
    let link_local =
        |a: &std::net::IpAddr| matches!(a, std::net::IpAddr::V6(v6) if v6.segments()[0] == 0xfe80);
    let peer = |name: &str| -> Vec<std::net::IpAddr> {
        facts
            .veths
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("{name} missing from {facts:?}"))
            .peer_addrs
            .iter()
            .filter(|a| !link_local(a))
            .copied()
            .collect()
    };
    let ips = |list: &[&str]| -> Vec<std::net::IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    };
    assert_eq!(peer("hvp1"), ips(&["10.98.0.11", "fd98::11"]));
    assert_eq!(peer("hvp2"), ips(&["10.98.0.12"]));
    assert_eq!(peer("hvl0"), ips(&["10.98.1.1"]));
    assert_eq!(peer("hvbare"), Vec::<std::net::IpAddr>::new());

    assert_eq!(
        host_veth::resolve(&ips(&["10.98.0.12"]), None, &facts),
        Resolution::Interface("hvp2".into())
    );
    assert_eq!(
        host_veth::resolve(&ips(&["fd98::11"]), Some("hvp1"), &facts),
        Resolution::Interface("hvp1".into())
    );
    assert!(matches!(
        host_veth::resolve(&ips(&["10.98.0.12"]), Some("hvp1"), &facts),
        Resolution::Refused(_)
    ));
}
