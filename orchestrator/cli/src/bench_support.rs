//! What the benchmark programs share: the `tapestry` binary next to them,
//! free ports, API clients and memory readings.

// Each program uses part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The `tapestry` binary built next to the running benchmark.
pub fn tapestry_binary() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("tapestry");
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p tapestry`",
            path.display()
        );
    }
    Ok(path)
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Milliseconds in one clock tick of [`cpu_ticks`] (Linux's USER_HZ is
/// 100 on every architecture).
pub fn ticks_to_ms(ticks: u64) -> f64 {
    ticks as f64 * 10.0
}

/// CPU time of a process in clock ticks (1/100 s): (its own threads, its
/// reaped children). Zero when the process is gone.
pub fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may itself hold spaces.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0u64);
    (field(11) + field(12), field(13) + field(14))
}

/// The whole machine's CPU time so far, from `/proc/stat`, in clock ticks.
#[derive(Clone, Copy)]
pub struct HostTicks {
    /// Spent running anything (user, nice, system, irq, softirq).
    pub busy: u64,
    /// Taken by the hypervisor for other guests while this one wanted to run.
    pub stolen: u64,
    /// Idle while some task waited for the disk.
    pub iowait: u64,
    /// Everything, idle and iowait included.
    pub total: u64,
}

pub fn host_ticks() -> HostTicks {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .unwrap_or("")
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already
    // inside user).
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    let stolen = field(7);
    HostTicks {
        busy,
        stolen,
        iowait: field(4),
        total: busy + stolen + field(3) + field(4),
    }
}
