//! A second machine on this one: a network namespace with a route from the
//! host, and `tapestry node` joined from it.

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::api::node_ready;
use crate::{
    build_busybox_image, free_port, ipv4_addresses, program_path, wait_for, Capture, Cluster,
};

/// A second machine: a network namespace joined to the host by a veth pair
/// (host 10.250.77.1, node 10.250.77.2), with a route to its pod range.
pub struct Machine {
    pub ns: &'static str,
    pub pod_cidr: &'static str,
}

pub const MACHINE_HOST_IP: &str = "10.250.77.1";

impl Machine {
    pub fn new(ns: &'static str, pod_cidr: &'static str) -> Machine {
        let m = Machine { ns, pod_cidr };
        m.remove();
        let script = format!(
            "ip netns add {ns} && ip link add tpe2e-h type veth peer name eth0 netns {ns} && \
             ip addr add {MACHINE_HOST_IP}/30 dev tpe2e-h && ip link set tpe2e-h up && \
             ip -n {ns} addr add 10.250.77.2/30 dev eth0 && ip -n {ns} link set eth0 up && \
             ip -n {ns} link set lo up && ip -n {ns} route add default via {MACHINE_HOST_IP} && \
             ip route add {pod_cidr} via 10.250.77.2"
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        m
    }

    fn remove(&self) {
        for args in [
            vec!["route", "del", self.pod_cidr],
            vec!["link", "del", "tpe2e-h"],
            vec!["netns", "del", self.ns],
        ] {
            let _ = Command::new("ip")
                .args(&args)
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `tapestry node` on that machine, stopped with SIGTERM.
pub struct JoinedNode(Child);

impl JoinedNode {
    pub fn start(c: &Cluster, machine: &Machine, name: &str, bridge: &str) -> JoinedNode {
        let data = c.dir.path().join(name);
        build_busybox_image(c.dir.path(), &data);
        let log = std::fs::File::create(c.dir.path().join(format!("{name}.log"))).unwrap();
        // nsenter changes only the network namespace: the node keeps the
        // host's cgroup mounts, as a second machine has its own.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", machine.ns))
            .arg(program_path("tapestry").unwrap())
            .arg("node")
            .args(["--server", &format!("https://{}", c.api)])
            .arg("--token-file")
            .arg(c.data().join("node-token"))
            .arg("--ca-file")
            .arg(c.data().join("pki/ca.crt"))
            .arg("--data-dir")
            .arg(&data)
            .args(["--name", name, "--kubelet-port", &free_port().to_string()])
            .args(["--pod-cidr", machine.pod_cidr, "--bridge", bridge])
            .arg("--stop-pods-on-exit")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tapestry node");
        JoinedNode(child)
    }
}

impl Drop for JoinedNode {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node's join as a user sees it.
pub struct Join {
    /// Running until dropped.
    pub node: JoinedNode,
    pub pod_ip: String,
    /// From the node's Ready to its pod running with an address.
    pub pod_running: Duration,
    /// From the node's Ready to the pod's first packet at the tool, by the
    /// tap's capture timestamp.
    pub tapped: Duration,
}

/// Binds a pod `late-NAME` (namespace `shop`, label `app=late`) to node
/// NAME before the node exists, joins the node from `machine`, sends the
/// pod UDP datagrams to port 5555 once it has an address, and times the
/// pod's first packet at `capture` from the node's Ready condition (seen
/// through the API, polled).
pub fn join_and_time(
    c: &Cluster,
    machine: &Machine,
    name: &str,
    bridge: &str,
    capture: &Capture,
) -> Join {
    let pod = format!("late-{name}");
    // Earlier joins' pods may have had the same address.
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    c.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": "shop", "labels": {"app": "late"}},
                "spec": {"nodeName": name, "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "c", "image": "busybox:local",
                                         "imagePullPolicy": "Never",
                                         "command": ["sleep", "3600"]}]}})
        .to_string(),
    );
    let node = JoinedNode::start(c, machine, name, bridge);
    let ready_at = wait_for(
        &format!("node {name} Ready"),
        Duration::from_secs(60),
        || node_ready(c, name).then(SystemTime::now),
    );
    let pod_ip = c.running("shop", &pod);
    let pod_running = ready_at.elapsed().unwrap_or_default();
    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (sending, ip) = (sending.clone(), pod_ip.clone());
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            while sending.load(Ordering::Relaxed) {
                let _ = sock.send_to(b"late", (ip.as_str(), 5555));
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let first = wait_for(
        &format!("{pod}'s first packet"),
        Duration::from_secs(30),
        || {
            capture
                .packets()
                .iter()
                .find(|p| {
                    p.ts >= since && ipv4_addresses(&p.data).is_some_and(|(_, d)| d == pod_ip)
                })
                .map(|p| p.ts)
        },
    );
    sending.store(false, Ordering::Relaxed);
    sender.join().unwrap();
    let ready = ready_at.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    Join {
        node,
        pod_ip,
        pod_running,
        tapped: first.saturating_sub(ready),
    }
}
