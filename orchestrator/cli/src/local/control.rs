//! Talking to a running `tapestry up`: its control socket (`tapestry node
//! add|remove`) and `tapestry down`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::net::accept_until;
use super::{is_ours, remove_leftovers, signal, socket_path, Local, State};

/// Requests to a running `up`, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum Request {
    Add { name: Option<String> },
    Remove { name: String },
}

/// Answers: progress lines, then one `done` or `error`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum Reply {
    Progress(String),
    Done(String),
    Error(String),
}

/// Serve `tapestry node add|remove` on `DATA_DIR/local/control.sock`.
/// Without `local` (a one-node cluster) every request is refused.
pub fn serve(
    data_dir: &Path,
    local: Option<Arc<Local>>,
    shutdown: CancellationToken,
) -> Result<()> {
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    let listener = Arc::new(listener);
    let accept = move || {
        let l = listener.clone();
        async move { l.accept().await.map(|(s, _)| s) }
    };
    let handle = move |stream| answer(stream, local.clone());
    accept_until("control socket".into(), accept, handle, shutdown);
    Ok(())
}

pub(super) async fn answer(stream: UnixStream, local: Option<Arc<Local>>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await.is_err() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let mut text = serde_json::to_string(&reply).unwrap_or_default();
            text.push('\n');
            if write.write_all(text.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let progress = {
        let tx = tx.clone();
        move |msg: String| {
            tracing::info!("{msg}");
            let _ = tx.send(Reply::Progress(msg));
        }
    };
    let result = match (serde_json::from_str::<Request>(&line), local) {
        (Err(e), _) => Err(anyhow::anyhow!("bad request: {e}")),
        (Ok(_), None) => Err(anyhow::anyhow!(
            "this local cluster runs one node (tapestry up --nodes 1, no underlay): nodes \
             join a cluster started with --nodes 2 or more"
        )),
        (Ok(Request::Add { name }), Some(l)) => l.add(name, &progress).await.map(|()| "added"),
        (Ok(Request::Remove { name }), Some(l)) => {
            l.remove(&name, &progress).await.map(|()| "removed")
        }
    };
    let _ = tx.send(match result {
        Ok(what) => Reply::Done(what.into()),
        Err(e) => Reply::Error(format!("{e:#}")),
    });
    drop(tx);
    let _ = writer.await;
}

/// `tapestry node add|remove`: a request to the `up` running in DATA_DIR.
#[derive(clap::Subcommand)]
pub enum NodeAction {
    /// Join one more node (in a network namespace of its own) to the local
    /// cluster running in DATA_DIR; returns once it is Ready.
    Add {
        /// The node's name [default: node 1's name and the node's number].
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path)]
        data_dir: PathBuf,
    },
    /// Drain a node of the local cluster (cordon, evict its pods), stop
    /// it, delete the Node and remove its network namespace.
    Remove {
        name: String,
        #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path)]
        data_dir: PathBuf,
    },
}

pub async fn node_action(action: NodeAction) -> Result<()> {
    let (data_dir, request) = match action {
        NodeAction::Add { name, data_dir } => (data_dir, Request::Add { name }),
        NodeAction::Remove { name, data_dir } => (data_dir, Request::Remove { name }),
    };
    let path = socket_path(&data_dir);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "no local cluster runs in {} ({}: {e}); start one with tapestry up --nodes N \
             --data-dir {0}",
            data_dir.display(),
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(&request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<Reply>(&line)
            .with_context(|| format!("unexpected answer from tapestry up: {line}"))?
        {
            Reply::Progress(msg) => println!("{msg}"),
            Reply::Done(_) => return Ok(()),
            Reply::Error(e) => bail!("{e}"),
        }
    }
    bail!("tapestry up closed the connection without an answer (did it stop?)")
}

#[derive(clap::Args)]
pub struct DownArgs {
    /// The data directory of the running `tapestry up`.
    #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path)]
    data_dir: PathBuf,
    /// How long the cluster gets to stop its pods and nodes.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// `tapestry down`: SIGTERM to the `up` of DATA_DIR, which stops its nodes
/// and removes what it made; waits for it. Leftovers of an `up` that died
/// are removed here.
pub async fn down(args: DownArgs) -> Result<()> {
    crate::node::require_root("tapestry down")?;
    let Some(state) = State::load(&args.data_dir)? else {
        bail!("no local cluster runs in {}", args.data_dir.display());
    };
    if is_ours(state.pid, "up") {
        println!(
            "stopping the local cluster (tapestry up, pid {})",
            state.pid
        );
        signal(state.pid, libc::SIGTERM);
        let deadline = Instant::now() + args.timeout;
        while is_ours(state.pid, "up") {
            if Instant::now() > deadline {
                bail!(
                    "tapestry up (pid {}) did not stop within {:?}",
                    state.pid,
                    args.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A clean stop removed the state file; anything else is left over.
        match State::load(&args.data_dir)? {
            None => println!("stopped"),
            Some(left) => {
                let removed = remove_leftovers(&args.data_dir, &left).await;
                println!("stopped; removed what it left: {}", removed.join(", "));
            }
        }
        return Ok(());
    }
    let removed = remove_leftovers(&args.data_dir, &state).await;
    if removed.is_empty() {
        bail!("no local cluster runs in {}", args.data_dir.display());
    }
    println!(
        "no local cluster was running; removed what one left: {}",
        removed.join(", ")
    );
    Ok(())
}
