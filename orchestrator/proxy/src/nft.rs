//! Talking to the kernel through `nft -j`: one JSON transaction per sync
//! (all of it applies or none of it), and the table's current chains and
//! sets before a full sync.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::rules::{document, Existing, TABLE};

/// Apply `cmds` as one transaction.
pub fn apply(cmds: Vec<Value>) -> Result<()> {
    if cmds.is_empty() {
        return Ok(());
    }
    let text = serde_json::to_vec(&document(cmds))?;
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(&text)
        .context("writing the ruleset to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the transaction: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The chains and sets `table ip tapestry-proxy` holds now (none if the
/// table does not exist).
pub fn existing() -> Result<Existing> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "ip", TABLE])
        .output()
        .context("running nft (is nftables installed?)")?;
    let mut found = Existing::default();
    if !out.status.success() {
        // No such table yet.
        return Ok(found);
    }
    let listing: Value = serde_json::from_slice(&out.stdout).context("parsing nft's listing")?;
    for object in listing["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = object["chain"]["name"].as_str() {
            found.chains.insert(name.to_string());
        }
        if let Some(name) = object["set"]["name"].as_str() {
            found.sets.insert(name.to_string());
        }
    }
    Ok(found)
}

/// Remove the table and everything in it (at shutdown of a local node);
/// a table that is not there is already removed.
pub fn delete_table() -> Result<()> {
    let present = Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running nft")?
        .success();
    if !present {
        return Ok(());
    }
    let out = Command::new("nft")
        .args(["delete", "table", "ip", TABLE])
        .output()
        .context("running nft")?;
    if !out.status.success() {
        bail!(
            "nft delete table ip {TABLE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
