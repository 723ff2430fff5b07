//! The network pieces of a local cluster: `ip` (iproute2) in the host
//! or a node's namespace, the underlay's NAT table, and the relay that
//! puts the API server on the underlay.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;

use super::{NsNode, Underlay};

/// Runs `ip` (iproute2) with these arguments.
pub(super) async fn ip(args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip` inside a node's namespace (`-n NS`), or in the host's.
pub(super) async fn ip_in(netns: Option<&str>, args: &[&str]) -> Result<()> {
    match netns {
        Some(ns) => ip(&[&["-n", ns][..], args].concat()).await,
        None => ip(args).await,
    }
}

pub(super) fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))
}

/// The nodes' own traffic (an agent's DNS relay to the host's resolvers,
/// say) leaves the host with the host's address: answers find their way
/// back, as they do to node 1. Pods' addresses are left as they are, on
/// every node alike.
pub(super) fn masquerade(u: &Underlay) -> Result<()> {
    let table = u.nat_table();
    let t = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"family": "ip", "table": table});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    };
    let source = serde_json::json!({"match": {"op": "==",
        "left": {"payload": {"protocol": "ip", "field": "saddr"}},
        "right": {"prefix": {"addr": u.network.to_string(), "len": u.prefix}}}});
    let elsewhere = serde_json::json!({"match": {"op": "!=",
        "left": {"meta": {"key": "oifname"}}, "right": u.bridge}});
    tapestry_proxy::nft::apply(vec![
        serde_json::json!({"add": {"table": {"family": "ip", "name": table}}}),
        serde_json::json!({"add": {"chain": t(serde_json::json!({"name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}))}}),
        serde_json::json!({"add": {"rule": t(serde_json::json!({"chain": "postrouting",
            "expr": [source, elsewhere, {"masquerade": null}]}))}}),
    ])
    .with_context(|| format!("adding nftables table ip {table}"))
}

/// Whether the underlay's NAT table was there (and is removed now).
pub(super) fn delete_nat_table(u: &Underlay) -> bool {
    std::process::Command::new("nft")
        .args(["delete", "table", "ip", &u.nat_table()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Delete an interface if it exists.
pub async fn remove_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        if let Err(e) = ip(&["link", "del", name]).await {
            tracing::warn!("{e:#}");
        }
    }
}

/// Remove one node's namespace and veth (its routes go with them).
pub(super) async fn remove_namespace(node: &NsNode) {
    // Deleting either end of a veth pair removes both.
    let _ = ip(&["link", "del", &node.veth]).await;
    if Path::new("/run/netns").join(&node.netns).exists() {
        if let Err(e) = ip(&["netns", "del", &node.netns]).await {
            tracing::warn!(netns = %node.netns, "{e:#}");
        }
    }
}

/// The API server on the underlay's host address too, when it listens on
/// one address only (loopback by default): connections are relayed as they
/// are, TLS and all. The underlay is local to this host.
pub async fn relay(
    listen: std::net::SocketAddr,
    to: std::net::SocketAddr,
    shutdown: CancellationToken,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen} (the API server on the underlay)"))?;
    let listener = Arc::new(listener);
    let accept = move || {
        let l = listener.clone();
        async move { l.accept().await.map(|(s, _)| s) }
    };
    let forward = move |mut inbound: tokio::net::TcpStream| async move {
        if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        }
    };
    accept_until(format!("API relay on {listen}"), accept, forward, shutdown);
    Ok(())
}

/// Accept connections until `shutdown`, each handled in a task of its own.
pub(super) fn accept_until<C, A, AF, H, HF>(
    what: String,
    accept: A,
    handle: H,
    shutdown: CancellationToken,
) where
    C: Send + 'static,
    A: Fn() -> AF + Send + 'static,
    AF: std::future::Future<Output = std::io::Result<C>> + Send,
    H: Fn(C) -> HF + Send + 'static,
    HF: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = accept() => c,
            };
            match conn {
                Ok(conn) => {
                    tokio::spawn(handle(conn));
                }
                Err(e) => tracing::warn!("{what}: {e}"),
            }
        }
    });
}

/// Run `f` on a thread inside network namespace `netns`.
pub(super) async fn in_namespace(
    netns: &str,
    f: impl FnOnce() -> Result<()> + Send + 'static,
) -> Result<()> {
    let path = Path::new("/run/netns").join(netns);
    tokio::task::spawn_blocking(move || {
        // A thread of its own, so no pooled thread stays in the namespace.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: a valid namespace descriptor; only this thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering {}", path.display()));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("namespace thread panicked")))
    })
    .await?
}
