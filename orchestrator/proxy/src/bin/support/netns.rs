//! A named network namespace for the benchmarks, deleted when dropped.

use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{bail, Result};

pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()?
            .success();
        if !ok {
            bail!("ip netns add {name} failed (root?)");
        }
        Ok(Netns(name))
    }
}

/// Move the calling thread into the named namespace.
pub fn enter(name: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns on a namespace file this thread opened.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
