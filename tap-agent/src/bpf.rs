//! Loading the TC programs, attaching them to interfaces and removing what
//! an earlier run left behind.
//!
//! Attachments are not pinned: TCX links live as long as this process holds
//! their file descriptors, so even a SIGKILL detaches them. The netlink
//! (clsact) fallback does survive a SIGKILL, which is why [`sweep_stale`]
//! runs before anything is attached: it removes every `tapestry_*` program
//! from every interface of the network namespace, whoever attached it.

use std::{collections::BTreeMap, io, os::fd::AsRawFd};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        links::LinkType,
        loaded_links, loaded_programs,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use tracing::{debug, info, warn};

use crate::{
    abi::{self, IfaceCfg, Rules},
    filter::Compiled,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tap.bpf.o"));

/// How programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX links where the kernel has them (≥ 6.6), clsact otherwise.
    Auto,
    /// TCX links only.
    Tcx,
    /// A clsact qdisc with direct-action filters (netlink).
    Clsact,
}

pub struct LoadOptions {
    pub ring_bytes: u32,
    pub wakeup_bytes: u32,
    pub mode: AttachMode,
}

/// Handles the agent keeps apart from the attach state: the ring buffer (for
/// the reader) and the counters (for /metrics).
pub struct Outputs {
    pub ring: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, u64>,
}

struct Attachment {
    name: String,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
    tcx: bool,
}

/// The loaded programs and their attachments.
pub struct Tap {
    ebpf: Ebpf,
    ifaces: HashMap<MapData, u32, IfaceCfg>,
    mode: AttachMode,
    attached: BTreeMap<u32, Attachment>,
}

impl Tap {
    /// Loads the object and its programs (nothing is attached yet).
    pub fn load(opts: &LoadOptions) -> Result<(Tap, Outputs)> {
        let ring = opts.ring_bytes.next_power_of_two().max(4096);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(abi::MAP_RING, ring)
            .override_global(abi::GLOBAL_WAKEUP_BYTES, &opts.wakeup_bytes, true)
            .load(OBJECT)
            .context("loading the eBPF object (are you root, with bpffs and BTF available?)")?;
        for name in [abi::PROG_INGRESS, abi::PROG_EGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        };
        let ifaces = HashMap::try_from(take(&mut ebpf, abi::MAP_IFACES)?)?;
        let ring_map = RingBuf::try_from(take(&mut ebpf, abi::MAP_RING)?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, abi::MAP_COUNTERS)?)?;
        let tap = Tap {
            ebpf,
            ifaces,
            mode: opts.mode,
            attached: BTreeMap::new(),
        };
        Ok((
            tap,
            Outputs {
                ring: ring_map,
                counters,
            },
        ))
    }

    /// Writes the rule table and the CIDR trie. Interfaces keep their
    /// configuration: callers order table and interface writes so that
    /// every interface always refers to valid rules (see `filter`).
    pub fn write_tables(&mut self, compiled: &Compiled) -> Result<()> {
        {
            let mut rules: Array<&mut MapData, Rules> = Array::try_from(
                self.ebpf
                    .map_mut(abi::MAP_RULES)
                    .ok_or_else(|| anyhow!("map {} missing", abi::MAP_RULES))?,
            )?;
            rules
                .set(0, compiled.rules, 0)
                .context("writing the rule table")?;
        }
        let mut cidrs: LpmTrie<&mut MapData, [u8; 16], u64> = LpmTrie::try_from(
            self.ebpf
                .map_mut(abi::MAP_CIDRS)
                .ok_or_else(|| anyhow!("map {} missing", abi::MAP_CIDRS))?,
        )?;
        let old: Vec<Key<[u8; 16]>> = cidrs.keys().filter_map(|k| k.ok()).collect();
        let new: Vec<(u32, [u8; 16])> = compiled.cidrs.iter().map(|c| (c.0, c.1)).collect();
        for (plen, addr, bits) in &compiled.cidrs {
            cidrs
                .insert(&Key::new(*plen, *addr), bits, 0)
                .context("writing the CIDR trie")?;
        }
        for k in old {
            if !new.contains(&(k.prefix_len(), k.data())) {
                let _ = cidrs.remove(&k);
            }
        }
        Ok(())
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attached.contains_key(&ifindex)
    }

    pub fn attached(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached.iter().map(|(i, a)| (*i, a.name.as_str()))
    }

    /// Sets what the programs do on an interface (one atomic map update:
    /// packets see the old or the new configuration, never a mix).
    pub fn configure(&mut self, ifindex: u32, cfg: IfaceCfg) -> Result<()> {
        self.ifaces
            .insert(ifindex, cfg, 0)
            .with_context(|| format!("configuring interface {ifindex}"))?;
        Ok(())
    }

    /// Attaches both programs to `ifname`, configured by `cfg`. Returns the
    /// interface index.
    pub fn attach(&mut self, ifname: &str, cfg: IfaceCfg) -> Result<u32> {
        let ifindex = ifindex(ifname)?;
        // Configure first: the programs pass unknown interfaces through.
        self.configure(ifindex, cfg)?;
        if self.attached.contains_key(&ifindex) {
            return Ok(ifindex);
        }
        let res = self.attach_programs(ifname);
        match res {
            Ok((ingress, egress, tcx)) => {
                info!(interface = ifname, ifindex, tcx, "attached");
                self.attached.insert(
                    ifindex,
                    Attachment {
                        name: ifname.to_string(),
                        ingress,
                        egress,
                        tcx,
                    },
                );
                Ok(ifindex)
            }
            Err(e) => {
                let _ = self.ifaces.remove(&ifindex);
                Err(e)
            }
        }
    }

    fn attach_programs(
        &mut self,
        ifname: &str,
    ) -> Result<(SchedClassifierLinkId, SchedClassifierLinkId, bool)> {
        let use_tcx = match self.mode {
            AttachMode::Tcx => true,
            AttachMode::Clsact => false,
            AttachMode::Auto => kernel_has_tcx(),
        };
        if !use_tcx {
            add_clsact(ifname)?;
        }
        let mut links = Vec::new();
        for (name, kind) in [
            (abi::PROG_INGRESS, TcAttachType::Ingress),
            (abi::PROG_EGRESS, TcAttachType::Egress),
        ] {
            let opts = if use_tcx {
                TcAttachOptions::TcxOrder(LinkOrder::default())
            } else {
                TcAttachOptions::Netlink(NlOptions::default())
            };
            let prog = self.program(name)?;
            match prog.attach_with_options(ifname, kind, opts) {
                Ok(id) => links.push((name, id)),
                Err(e) => {
                    for (n, id) in links {
                        let _ = self.program(n).map(|p| p.detach(id));
                    }
                    return Err(
                        anyhow::Error::new(e).context(format!("attaching {name} to {ifname}"))
                    );
                }
            }
        }
        let mut it = links.into_iter().map(|(_, id)| id);
        match (it.next(), it.next()) {
            (Some(ingress), Some(egress)) => Ok((ingress, egress, use_tcx)),
            _ => bail!("attaching to {ifname}: a program did not attach"),
        }
    }

    fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Detaches from an interface (which may already be gone).
    pub fn detach(&mut self, ifindex: u32) {
        let _ = self.ifaces.remove(&ifindex);
        let Some(a) = self.attached.remove(&ifindex) else {
            return;
        };
        for (name, id) in [(abi::PROG_INGRESS, a.ingress), (abi::PROG_EGRESS, a.egress)] {
            match self.program(name).map(|p| p.detach(id)) {
                Ok(Ok(())) => {}
                // A vanished interface took its filters with it.
                Ok(Err(e)) => debug!(interface = a.name, "detach {name}: {e}"),
                Err(e) => warn!(interface = a.name, "detach {name}: {e}"),
            }
        }
        info!(interface = a.name, ifindex, tcx = a.tcx, "detached");
    }

    pub fn detach_all(&mut self) {
        let all: Vec<u32> = self.attached.keys().copied().collect();
        for i in all {
            self.detach(i);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.detach_all();
    }
}

pub fn ifindex(ifname: &str) -> Result<u32> {
    let c = std::ffi::CString::new(ifname).context("interface name contains a NUL byte")?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!(
            "interface `{ifname}` not found in this network namespace: {}",
            io::Error::last_os_error()
        );
    }
    Ok(i)
}

fn add_clsact(ifname: &str) -> Result<()> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => Ok(()),
        Err(tc::TcError::NetlinkError(e)) if e.to_string().contains("exists") => Ok(()),
        Err(e) => {
            // Most likely it already exists; the attach will tell otherwise.
            debug!(interface = ifname, "adding clsact: {e}");
            Ok(())
        }
    }
}

fn kernel_has_tcx() -> bool {
    aya::util::KernelVersion::current()
        .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
        .unwrap_or(false)
}

/// What [`sweep_stale`] removed.
#[derive(Debug, Default)]
pub struct Swept {
    pub tcx_links: usize,
    pub clsact_filters: usize,
}

/// Removes every `tapestry_*` TC program from every interface of this
/// network namespace: TCX links held by another (or a stuck) agent and
/// clsact filters left by a killed one. Safe to run at any time before
/// this process attaches its own.
pub fn sweep_stale() -> Result<Swept> {
    let mut swept = Swept::default();
    let ifnames: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // TCX: programs named tapestry_* attached to an interface of *this*
    // namespace (other namespaces may run their own agents).
    let ours: Vec<u32> = loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| n.starts_with(abi::PROG_PREFIX))
        })
        .map(|p| p.id())
        .collect();
    let mut here: Vec<u32> = Vec::new();
    if !ours.is_empty() {
        for ifname in &ifnames {
            for kind in [TcAttachType::Ingress, TcAttachType::Egress] {
                if let Ok((_, progs)) = SchedClassifier::query_tcx(ifname, kind) {
                    here.extend(progs.iter().map(|p| p.id()).filter(|id| ours.contains(id)));
                }
            }
        }
    }
    if !here.is_empty() {
        for link in loaded_links().filter_map(|l| l.ok()) {
            if link.link_type().ok() == Some(LinkType::Tcx) && here.contains(&link.program_id()) {
                match detach_link_by_id(link.id()) {
                    Ok(()) => {
                        warn!(
                            link = link.id(),
                            program = link.program_id(),
                            "detached a stale tapestry TCX link"
                        );
                        swept.tcx_links += 1;
                    }
                    Err(e) => warn!(link = link.id(), "could not detach stale TCX link: {e}"),
                }
            }
        }
    }
    // clsact filters (what a killed agent leaves behind).
    for ifname in &ifnames {
        for (kind, name) in [
            (TcAttachType::Ingress, abi::PROG_INGRESS),
            (TcAttachType::Egress, abi::PROG_EGRESS),
        ] {
            match tc::qdisc_detach_program(ifname, kind, name) {
                Ok(()) => {
                    warn!(
                        interface = ifname,
                        program = name,
                        "removed a stale clsact filter"
                    );
                    swept.clsact_filters += 1;
                }
                Err(e) => debug!(interface = ifname, program = name, "no stale filter: {e}"),
            }
        }
    }
    Ok(swept)
}

/// BPF_LINK_GET_FD_BY_ID + BPF_LINK_DETACH (aya has no API for links it did
/// not create).
fn detach_link_by_id(id: u32) -> io::Result<()> {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let mut attr = [0u64; 16];
    attr[0] = id as u64; // link_id (u32) at offset 0, open_flags 0
                         // SAFETY: attr is a zeroed, 128-byte union bpf_attr as the kernel expects.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u32 as u64; // link_detach.link_fd
                                            // SAFETY: as above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sums the per-CPU kernel counters, in `abi::COUNTERS` order.
pub fn read_counters(counters: &PerCpuArray<MapData, u64>) -> Vec<u64> {
    (0..abi::COUNTER_MAX)
        .map(|i| counters.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
        .collect()
}
