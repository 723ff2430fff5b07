//! A local multi-node cluster on one machine (`tapestry up --nodes N`).
//!
//! Node 1 runs inside the `up` process, in the host's network namespace.
//! Nodes 2..N are `tapestry node` processes, each in a network namespace of
//! its own, joined to the host and to each other by an underlay bridge:
//!
//! ```text
//!  host: API server, node 1 and its pod bridge
//!   └─ tapestry-ul 10.243.0.1/24 ─┬─ tapestry-ul2 ══ eth0 10.243.0.2  netns tapestry-node-NAME
//!                                 └─ tapestry-ul3 ══ eth0 10.243.0.3  netns tapestry-node-NAME
//! ```
//!
//! Every node's pod CIDR (from node IPAM) is routed via the node's underlay
//! address, in the host and in every node namespace, so pod traffic crosses
//! nodes over real interfaces that taps see. The `up` process owns all of
//! it: `tapestry node add|remove` ask it through a Unix socket, `tapestry
//! down` sends it SIGTERM. Whatever it makes is recorded in
//! `DATA_DIR/local/state.json` before it is made, so that `down` after a
//! crash still removes it.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::Api;
use serde::{Deserialize, Serialize};
use tapestry_runtime::{lock, Informer};
use tokio_util::sync::CancellationToken;

use crate::node::AgentArgs;

mod control;
mod net;

pub use control::{down, node_action, serve, DownArgs, NodeAction};
use net::{delete_nat_table, in_namespace, ip, ip_in, masquerade, remove_namespace, write_sysctl};
pub use net::{relay, remove_link};

/// How long a node gets to stop its pods and exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long a new node gets to register and turn Ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// `tapestry up`'s options for the nodes beyond the first.
#[derive(clap::Args, Clone)]
pub struct LocalArgs {
    /// Nodes of the local cluster: node 1 in this host's network namespace,
    /// every other one in a network namespace of its own (on an underlay
    /// bridge). With 1, no underlay is made and nodes cannot be added.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=250))]
    pub nodes: u32,
    /// Addresses of the underlay joining the nodes (--nodes 2 or more): the
    /// host takes the first, node K the K-th.
    #[arg(long, default_value = "10.243.0.0/24", value_parser = parse_underlay_cidr)]
    pub underlay_cidr: (Ipv4Addr, u8),
    /// The underlay bridge; the host ends of the nodes' veths are named
    /// after it (NAME2, NAME3, ...).
    #[arg(long, default_value = "tapestry-ul", value_parser = parse_bridge_name)]
    pub underlay_bridge: String,
}

fn parse_underlay_cidr(arg: &str) -> Result<(Ipv4Addr, u8), String> {
    match tapestry_proxy::sync::parse_cidr(arg) {
        Some((net, len)) if (16..=29).contains(&len) => Ok((net, len)),
        Some(_) => Err(format!("{arg:?}: the prefix must be between /16 and /29")),
        None => Err(format!("{arg:?}: not an IPv4 CIDR such as 10.243.0.0/24")),
    }
}

/// Interface names have at most 15 bytes; the veths add up to 3 digits.
fn parse_bridge_name(arg: &str) -> Result<String, String> {
    let ok = !arg.is_empty()
        && arg.len() <= 12
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(arg.to_string())
    } else {
        Err(format!(
            "{arg:?}: an interface name of 1 to 12 letters, digits, '-' or '_'"
        ))
    }
}

/// The bridge and address range joining a local cluster's nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Underlay {
    pub bridge: String,
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Underlay {
    pub fn new(args: &LocalArgs) -> Underlay {
        Underlay {
            bridge: args.underlay_bridge.clone(),
            network: args.underlay_cidr.0,
            prefix: args.underlay_cidr.1,
        }
    }

    fn size(&self) -> u32 {
        1 << (32 - u32::from(self.prefix))
    }

    /// The host's address: node 1's, and where the API server answers.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Node `number`'s address (2 and up; the last address is broadcast).
    fn node_ip(&self, number: u32) -> Option<Ipv4Addr> {
        (number >= 2 && number < self.size() - 1)
            .then(|| Ipv4Addr::from(u32::from(self.network) + number))
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip).wrapping_sub(u32::from(self.network)) < self.size()
    }

    /// The host's table masquerading the nodes' own traffic.
    fn nat_table(&self) -> String {
        format!("{}-nat", self.bridge)
    }

    fn veth(&self, number: u32) -> String {
        format!("{}{number}", self.bridge)
    }
}

/// A node in a network namespace of its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NsNode {
    name: String,
    number: u32,
    netns: String,
    veth: String,
    ip: Ipv4Addr,
    /// Its `tapestry node` process, once started.
    pid: Option<u32>,
}

/// What a running `up` made, on disk so that `down` finds it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The `up` process.
    pid: u32,
    /// Node 1, in the host's network namespace.
    host_node: String,
    underlay: Option<Underlay>,
    nodes: Vec<NsNode>,
}

fn local_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("local")
}

fn state_path(data_dir: &Path) -> PathBuf {
    local_dir(data_dir).join("state.json")
}

fn socket_path(data_dir: &Path) -> PathBuf {
    local_dir(data_dir).join("control.sock")
}

impl State {
    fn load(data_dir: &Path) -> Result<Option<State>> {
        let path = state_path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, data_dir: &Path) -> Result<()> {
        let path = state_path(data_dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Whether `pid` is a live `tapestry` process running `command` (a
/// recorded pid may have been reused since).
fn is_ours(pid: u32, command: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    let exe = args.next().unwrap_or_default();
    String::from_utf8_lossy(exe).contains("tapestry") && args.next() == Some(command.as_bytes())
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Remove what a stopped `up` left: its nodes' processes (after they had
/// their grace period), namespaces and veths, the underlay bridge (with its
/// routes) and the state file. Returns what was removed, for the user.
async fn remove_leftovers(data_dir: &Path, state: &State) -> Vec<String> {
    let mut removed = Vec::new();
    for node in &state.nodes {
        if let Some(pid) = node.pid.filter(|p| is_ours(*p, "node")) {
            signal(pid, libc::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while is_ours(pid, "node") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            signal(pid, libc::SIGKILL);
            removed.push(format!("node {} (pid {pid})", node.name));
        }
        if Path::new("/run/netns").join(&node.netns).exists() {
            removed.push(format!("network namespace {}", node.netns));
        }
        remove_namespace(node).await;
    }
    if let Some(u) = &state.underlay {
        if ip(&["link", "del", &u.bridge]).await.is_ok() {
            removed.push(format!("bridge {}", u.bridge));
        }
        if delete_nat_table(u) {
            removed.push(format!("nftables table ip {}", u.nat_table()));
        }
    }
    let _ = std::fs::remove_file(socket_path(data_dir));
    let _ = std::fs::remove_file(state_path(data_dir));
    removed
}

/// Claim `data_dir` for a new `up`: refuse while another one runs there,
/// and clean up after one that died.
pub async fn claim(data_dir: &Path, host_node: &str) -> Result<()> {
    let dir = local_dir(data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // The control socket changes the cluster: root only.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    if let Some(old) = State::load(data_dir)? {
        if old.pid != std::process::id() && is_ours(old.pid, "up") {
            bail!(
                "a local cluster already runs in {} (tapestry up, pid {}); stop it with \
                 tapestry down --data-dir {0}",
                data_dir.display(),
                old.pid
            );
        }
        let removed = remove_leftovers(data_dir, &old).await;
        if !removed.is_empty() {
            tracing::info!(
                "removed what an earlier local cluster left: {}",
                removed.join(", ")
            );
        }
    }
    State {
        pid: std::process::id(),
        host_node: host_node.to_string(),
        ..State::default()
    }
    .save(data_dir)
}

/// Forget the claim of a stopped `up` (the state file and the socket).
pub fn release(data_dir: &Path) {
    if let Ok(Some(state)) = State::load(data_dir) {
        if state.pid == std::process::id() {
            let _ = std::fs::remove_file(socket_path(data_dir));
            let _ = std::fs::remove_file(state_path(data_dir));
        }
    }
}

/// The nodes beyond the first, as the `up` process runs them.
pub struct Local {
    data_dir: PathBuf,
    underlay: Underlay,
    /// The API server as the nodes reach it.
    server: String,
    cluster_cidr: String,
    agent: AgentArgs,
    client: kube::Client,
    state: Mutex<State>,
    children: Mutex<HashMap<String, tokio::process::Child>>,
    /// Membership or addresses changed: routes are looked at again.
    routes: tokio::sync::Notify,
    started: Instant,
}

/// What `tapestry up` tells [`Local::start`].
pub struct LocalConfig {
    pub data_dir: PathBuf,
    pub underlay: Underlay,
    pub server: String,
    pub cluster_cidr: String,
    pub agent: AgentArgs,
    pub started: Instant,
}

impl Local {
    /// Make the underlay bridge (the host's address on it) and start
    /// following Nodes for routes.
    pub async fn start(
        config: LocalConfig,
        client: kube::Client,
        shutdown: CancellationToken,
    ) -> Result<Arc<Local>> {
        let mut state = State::load(&config.data_dir)?.unwrap_or_default();
        state.underlay = Some(config.underlay.clone());
        state.save(&config.data_dir)?;
        let u = &config.underlay;
        if Path::new("/sys/class/net").join(&u.bridge).exists() {
            bail!(
                "interface {} exists already (another local cluster?); choose another \
                 --underlay-bridge",
                u.bridge
            );
        }
        let host = format!("{}/{}", u.host_ip(), u.prefix);
        ip(&["link", "add", &u.bridge, "type", "bridge"]).await?;
        ip(&["addr", "add", &host, "dev", &u.bridge]).await?;
        ip(&["link", "set", &u.bridge, "up"]).await?;
        // The host forwards between node 1's pods and the underlay.
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        masquerade(u)?;
        let local = Arc::new(Local {
            data_dir: config.data_dir,
            underlay: config.underlay,
            server: config.server,
            cluster_cidr: config.cluster_cidr,
            agent: config.agent,
            client,
            state: Mutex::new(state),
            children: Mutex::default(),
            routes: tokio::sync::Notify::new(),
            started: config.started,
        });
        tokio::spawn(local.clone().follow_routes(shutdown));
        Ok(local)
    }

    fn save(&self, state: &State) {
        if let Err(e) = state.save(&self.data_dir) {
            tracing::error!("{e:#}");
        }
    }

    /// Join one more node: a namespace, its veth on the underlay, and a
    /// `tapestry node` in it; returns once the Node is Ready.
    pub async fn add(
        &self,
        name: Option<String>,
        progress: &(dyn Fn(String) + Sync),
    ) -> Result<()> {
        let node = self.reserve(name).await?;
        let begun = Instant::now();
        match self.bring_up(&node, progress).await {
            Ok(cidr) => {
                progress(format!(
                    "node {}: Ready in {} ms ({}, pods {cidr}; {} ms since start)",
                    node.name,
                    begun.elapsed().as_millis(),
                    node.ip,
                    self.started.elapsed().as_millis(),
                ));
                Ok(())
            }
            Err(e) => {
                self.stop_process(&node.name).await;
                remove_namespace(&node).await;
                let mut state = lock(&self.state);
                state.nodes.retain(|n| n.name != node.name);
                self.save(&state);
                self.routes.notify_one();
                Err(e)
            }
        }
    }

    /// A name and number for a new node, recorded before anything is made.
    async fn reserve(&self, name: Option<String>) -> Result<NsNode> {
        if let Some(name) = &name {
            validate_name(name)?;
            let nodes: Api<Node> = Api::all(self.client.clone());
            if nodes.get_opt(name).await?.as_ref().is_some_and(ready) {
                let st = lock(&self.state);
                if !st.nodes.iter().any(|n| n.name == *name) {
                    bail!("a Ready node named {name} is already in the cluster");
                }
            }
        }
        let mut state = lock(&self.state);
        if let Some(name) = &name {
            if *name == state.host_node || state.nodes.iter().any(|n| n.name == *name) {
                bail!("the local cluster has a node named {name} already");
            }
        }
        let taken = |st: &State, number: u32, candidate: &str| {
            st.nodes
                .iter()
                .any(|n| n.number == number || n.name == candidate)
                || st.host_node == candidate
        };
        let (number, ip) = (2..self.underlay.size())
            .filter_map(|k| self.underlay.node_ip(k).map(|ip| (k, ip)))
            .find(|(k, _)| {
                let candidate = name
                    .clone()
                    .unwrap_or_else(|| format!("{}-{k}", state.host_node));
                !taken(&state, *k, &candidate)
            })
            .with_context(|| {
                format!(
                    "the underlay {}/{} has no address left for another node",
                    self.underlay.network, self.underlay.prefix
                )
            })?;
        let name = name.unwrap_or_else(|| format!("{}-{number}", state.host_node));
        validate_name(&name)?;
        let node = NsNode {
            netns: format!("tapestry-node-{name}"),
            veth: self.underlay.veth(number),
            name,
            number,
            ip,
            pid: None,
        };
        state.nodes.push(node.clone());
        self.save(&state);
        Ok(node)
    }

    /// Namespace, veth, addresses, then the node agent; its pod CIDR once
    /// Ready.
    async fn bring_up(&self, node: &NsNode, progress: &(dyn Fn(String) + Sync)) -> Result<String> {
        let ns = node.netns.as_str();
        let u = &self.underlay;
        if Path::new("/sys/class/net").join(&node.veth).exists() {
            bail!("interface {} exists already", node.veth);
        }
        ip(&["netns", "add", ns]).await?;
        ip(&[
            "link", "add", &node.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])
        .await?;
        ip(&["link", "set", &node.veth, "master", &u.bridge, "up"]).await?;
        let addr = format!("{}/{}", node.ip, u.prefix);
        let host = u.host_ip().to_string();
        ip_in(Some(ns), &["addr", "add", &addr, "dev", "eth0"]).await?;
        ip_in(Some(ns), &["link", "set", "eth0", "up"]).await?;
        ip_in(Some(ns), &["link", "set", "lo", "up"]).await?;
        // Beyond the pod CIDRs (routed directly to each node), everything
        // goes through the host: the API server, node 1, ClusterIPs before
        // they are translated.
        ip_in(Some(ns), &["route", "add", "default", "via", &host]).await?;
        // The node forwards between its pods and the underlay.
        in_namespace(ns, || write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")).await?;
        self.routes.notify_one();
        let child = self.spawn_node(node)?;
        let pid = child.id();
        {
            let mut state = lock(&self.state);
            if let Some(n) = state.nodes.iter_mut().find(|n| n.name == node.name) {
                n.pid = pid;
            }
            self.save(&state);
        }
        lock(&self.children).insert(node.name.clone(), child);
        progress(format!(
            "node {}: started in network namespace {ns} ({})",
            node.name, node.ip
        ));
        self.wait_ready(node).await
    }

    fn spawn_node(&self, node: &NsNode) -> Result<tokio::process::Child> {
        let dir = self.data_dir.join("nodes").join(&node.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // One image store for every node: what `tapestry image build|import
        // --data-dir DATA_DIR` adds is there for all of them.
        let images = dir.join("images");
        if std::fs::symlink_metadata(&images).is_err() {
            std::os::unix::fs::symlink("../../images", &images)
                .with_context(|| format!("linking {}", images.display()))?;
        }
        let log_path = dir.join("node.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let netns = Path::new("/run/netns").join(&node.netns);
        let ns =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        let exe = std::env::current_exe().context("locating the tapestry program")?;
        let a = &self.agent;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("node")
            .args(["--server", &self.server])
            .arg("--token-file")
            .arg(self.data_dir.join("node-token"))
            .arg("--ca-file")
            .arg(self.data_dir.join("pki/ca.crt"))
            .arg("--data-dir")
            .arg(&dir)
            .args(["--name", &node.name, "--node-ip", &node.ip.to_string()])
            .args(["--bridge", &format!("tapestry{}", node.number)])
            .args(["--cluster-cidr", &self.cluster_cidr])
            .arg("--runtime")
            .arg(&a.runtime)
            .arg("--cni-bin-dir")
            .arg(&a.cni_bin_dir)
            .args(["--max-pods", &a.max_pods.to_string()])
            .args(["--stop-pods-on-exit", "--shared-image-store"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(n) = a.parallel_pod_starts {
            cmd.args(["--parallel-pod-starts", &n.to_string()]);
        }
        if a.no_service_proxy {
            cmd.arg("--no-service-proxy");
        }
        if let Some(dns) = a.cluster_dns {
            cmd.args(["--cluster-dns", &dns.to_string()]);
        }
        cmd.args(["--cluster-domain", &a.cluster_domain])
            .arg("--resolv-conf")
            .arg(&a.resolv_conf);
        if a.no_cluster_dns {
            cmd.arg("--no-cluster-dns");
        }
        let fd = ns.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls:
        // setns into the node's namespace (only the network: the node keeps
        // the host's mounts and cgroups, as pods need), and a SIGTERM should
        // `up` die, so its nodes stop their pods and go too.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting node {}", node.name))?;
        drop(ns);
        Ok(child)
    }

    /// Until the Node reports Ready from this run of its agent; its pod CIDR.
    async fn wait_ready(&self, node: &NsNode) -> Result<String> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        // Heartbeats carry whole seconds; an older one is a previous run's.
        let since = unix_seconds() - 1;
        let deadline = Instant::now() + READY_WITHIN;
        let log = self
            .data_dir
            .join("nodes")
            .join(&node.name)
            .join("node.log");
        loop {
            if let Some(status) = lock(&self.children)
                .get_mut(&node.name)
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "node {} exited ({status}) before it was Ready:\n{}",
                    node.name,
                    log_tail(&log)
                );
            }
            if let Some(n) = nodes.get_opt(&node.name).await? {
                let fresh = ready_since(&n).is_some_and(|t| t >= since);
                let cidr = n.spec.as_ref().and_then(|s| s.pod_cidr.clone());
                if let (true, Some(cidr)) = (fresh, cidr) {
                    self.routes.notify_one();
                    return Ok(cidr);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} was not Ready within {READY_WITHIN:?}; its log:\n{}",
                    node.name,
                    log_tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drain a node (cordon, evict its pods), stop its agent, delete the
    /// Node, and remove its namespace and veth.
    pub async fn remove(&self, name: &str, progress: &(dyn Fn(String) + Sync)) -> Result<()> {
        let node = {
            let state = lock(&self.state);
            if name == state.host_node {
                bail!(
                    "{name} is node 1, in the host's network namespace: it stops with the \
                     cluster (tapestry down)"
                );
            }
            match state.nodes.iter().find(|n| n.name == name) {
                Some(n) => n.clone(),
                None => {
                    let names: Vec<&str> = std::iter::once(state.host_node.as_str())
                        .chain(state.nodes.iter().map(|n| n.name.as_str()))
                        .collect();
                    bail!(
                        "the local cluster has no node {name} (its nodes: {})",
                        names.join(", ")
                    );
                }
            }
        };
        let nodes: Api<Node> = Api::all(self.client.clone());
        let pods: Api<Pod> = Api::all(self.client.clone());
        let on_node = ListParams::default().fields(&format!("spec.nodeName={name}"));
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
            )
            .await
            .with_context(|| format!("cordoning {name}"))?;
        progress(format!("node {name}: cordoned"));
        // DaemonSet pods stay until the agent stops (their controller would
        // put them back on the node anyway).
        let evictable = |p: &Pod| {
            !p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "DaemonSet")
        };
        let list = pods.list(&on_node).await?;
        let mut evicted = 0;
        for p in list.items.iter().filter(|p| evictable(p)) {
            let (Some(ns), Some(pod)) = (&p.metadata.namespace, &p.metadata.name) else {
                continue;
            };
            match Api::<Pod>::namespaced(self.client.clone(), ns)
                .evict(pod, &EvictParams::default())
                .await
            {
                Ok(_) => evicted += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("evicting {ns}/{pod}")),
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline && pods.list(&on_node).await?.items.iter().any(&evictable) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress(format!(
            "node {name}: drained ({evicted} pod{} evicted)",
            if evicted == 1 { "" } else { "s" }
        ));
        self.stop_process(name).await;
        match nodes.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("deleting Node {name}")),
        }
        // Nothing runs them any more.
        for p in pods.list(&on_node).await?.items {
            if let (Some(ns), Some(pod)) = (&p.metadata.namespace, &p.metadata.name) {
                let _ = Api::<Pod>::namespaced(self.client.clone(), ns)
                    .delete(pod, &DeleteParams::default().grace_period(0))
                    .await;
            }
        }
        remove_namespace(&node).await;
        {
            let mut state = lock(&self.state);
            state.nodes.retain(|n| n.name != name);
            self.save(&state);
        }
        self.routes.notify_one();
        progress(format!(
            "node {name}: removed (Node deleted, namespace {} gone)",
            node.netns
        ));
        Ok(())
    }

    /// SIGTERM a node's agent (it stops its pods and its proxy table), then
    /// SIGKILL after the grace period.
    async fn stop_process(&self, name: &str) {
        let Some(mut child) = lock(&self.children).remove(name) else {
            return;
        };
        if let Some(pid) = child.id() {
            signal(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                node = name,
                "did not stop within {STOP_GRACE:?}; killing it"
            );
            let _ = child.kill().await;
        }
    }

    /// Stop every node of the namespaces (together) and remove what was made.
    pub async fn stop(&self) {
        let names: Vec<String> = lock(&self.children).keys().cloned().collect();
        futures::future::join_all(names.iter().map(|n| self.stop_process(n))).await;
        let state = std::mem::take(&mut *lock(&self.state));
        let removed = remove_leftovers(&self.data_dir, &state).await;
        tracing::info!("local cluster removed: {}", removed.join(", "));
    }

    /// Keep every node's pod CIDR routed via its underlay address, in the
    /// host and in every node namespace.
    async fn follow_routes(self: Arc<Self>, shutdown: CancellationToken) {
        let nodes = Informer::new(
            Api::<Node>::all(self.client.clone()),
            watcher::Config::default(),
        );
        let me = Arc::downgrade(&self);
        nodes.on_change(move |_, _| {
            if let Some(local) = me.upgrade() {
                local.routes.notify_one();
            }
        });
        nodes.start(shutdown.clone());
        // Namespace (None: the host) → pod CIDR → via, as installed.
        let mut applied: HashMap<Option<String>, BTreeMap<String, Ipv4Addr>> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.routes.notified() => {}
            }
            let routes: Vec<(String, Ipv4Addr)> = nodes
                .store
                .state()
                .iter()
                .filter_map(|n| {
                    let cidr = n.spec.as_ref()?.pod_cidr.clone()?;
                    let ip = internal_ip(n)?;
                    self.underlay.contains(ip).then_some((cidr, ip))
                })
                .collect();
            let members: Vec<(Option<String>, Ipv4Addr)> = {
                let state = lock(&self.state);
                std::iter::once((None, self.underlay.host_ip()))
                    .chain(
                        state
                            .nodes
                            .iter()
                            // Its network is set up once its agent runs.
                            .filter(|n| n.pid.is_some())
                            .map(|n| (Some(n.netns.clone()), n.ip)),
                    )
                    .collect()
            };
            applied.retain(|ns, _| members.iter().any(|(m, _)| m == ns));
            for (ns, own) in members {
                let want: BTreeMap<String, Ipv4Addr> = routes
                    .iter()
                    .filter(|(_, via)| *via != own)
                    .cloned()
                    .collect();
                let have = applied.entry(ns.clone()).or_default();
                for (cidr, via) in have.clone() {
                    if want.get(&cidr) != Some(&via) {
                        let via = via.to_string();
                        let _ = ip_in(ns.as_deref(), &["route", "del", &cidr, "via", &via]).await;
                        have.remove(&cidr);
                    }
                }
                for (cidr, via) in want {
                    if have.get(&cidr) == Some(&via) {
                        continue;
                    }
                    let v = via.to_string();
                    match ip_in(ns.as_deref(), &["route", "replace", &cidr, "via", &v]).await {
                        Ok(()) => {
                            have.insert(cidr, via);
                        }
                        Err(e) => tracing::warn!("{e:#}"),
                    }
                }
            }
        }
    }
}

fn internal_ip(n: &Node) -> Option<Ipv4Addr> {
    n.status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse()
        .ok()
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When the Node last said it was Ready (Unix seconds), if it is.
fn ready_since(n: &Node) -> Option<i64> {
    let c = n
        .status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    c.last_heartbeat_time.as_ref().map(|t| t.0.as_second())
}

fn ready(n: &Node) -> bool {
    ready_since(n).is_some()
}

/// A node name that is also a usable namespace and file name.
fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "{name:?} is not a node name: at most 63 lower-case letters, digits and '-', \
             starting and ending with a letter or digit"
        );
    }
    Ok(())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underlay_addresses() {
        let u = Underlay {
            bridge: "tapestry-ul".into(),
            network: "10.243.0.0".parse().unwrap(),
            prefix: 24,
        };
        assert_eq!(u.host_ip(), Ipv4Addr::new(10, 243, 0, 1));
        assert_eq!(u.node_ip(1), None);
        assert_eq!(u.node_ip(2), Some(Ipv4Addr::new(10, 243, 0, 2)));
        assert_eq!(u.node_ip(254), Some(Ipv4Addr::new(10, 243, 0, 254)));
        assert_eq!(u.node_ip(255), None);
        assert!(u.contains(Ipv4Addr::new(10, 243, 0, 9)));
        assert!(!u.contains(Ipv4Addr::new(10, 244, 0, 9)));
        assert_eq!(u.veth(12), "tapestry-ul12");
    }

    #[test]
    fn arguments_are_checked() {
        assert!(parse_underlay_cidr("10.243.0.0/24").is_ok());
        assert!(parse_underlay_cidr("10.243.0.0/30").is_err());
        assert!(parse_underlay_cidr("nonsense").is_err());
        assert!(parse_bridge_name("tapestry-ul").is_ok());
        assert!(parse_bridge_name("a-name-too-long").is_err());
        assert!(parse_bridge_name("bad name").is_err());
        assert!(validate_name("node-2").is_ok());
        assert!(validate_name("Node_2").is_err());
        assert!(validate_name("-x").is_err());
    }
}
