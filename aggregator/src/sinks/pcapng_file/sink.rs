use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::config::PcapngFileConfig;
use crate::capture::PcapNgOut;
use crate::event::{now_ns, Batch, Iface, Packet};
use crate::metrics::SinkStats;

/// Bytes staged in memory before one write to the file.
const WRITE_AT: usize = 256 << 10;

/// After a failed write (a full disk), packets are counted as not written
/// for this long before a new file is tried.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A capture file written whole blocks at a time: blocks are staged in
/// memory and written out in large writes, so the file is known good up
/// to `durable` bytes, and its packets count as delivered only once they
/// are there.
struct Staged {
    file: File,
    buf: Vec<u8>,
}

impl Write for Staged {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Current {
    out: PcapNgOut<Staged>,
    path: PathBuf,
    opened: Instant,
    /// Interface → interface id in this file (ids restart per file).
    ifaces: HashMap<Arc<Iface>, u32>,
    /// Bytes of the file written out whole.
    durable: u64,
    /// Packets (and their captured bytes) staged but not yet written.
    staged_packets: u64,
    staged_bytes: u64,
}

struct Writer {
    cfg: PcapngFileConfig,
    current: Option<Current>,
    /// Closed files, oldest first (with those an earlier run left).
    done: VecDeque<PathBuf>,
    seq: u64,
    stats: Arc<SinkStats>,
    remover: Remover,
    /// Until when packets are counted as failed without trying the disk.
    failing_until: Option<Instant>,
}

/// Deletes files past retention on a thread of its own: unlinking a
/// 200 MB capture keeps the kernel busy for 20–130 ms, which would stall
/// the writer and every packet queued behind it.
struct Remover {
    /// The queue to the deleting thread and the thread; `None` if it could
    /// not be started, and then the writer deletes inline.
    worker: Option<(
        std::sync::mpsc::SyncSender<PathBuf>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Remover {
    /// Deletions waiting for the thread; past that, the writer deletes the
    /// file itself and stalls as before, rather than let old files pile up.
    /// While deletions are queued, the directory briefly holds up to this
    /// many files more than `max_files`.
    const QUEUE: usize = 16;

    fn spawn(name: &str) -> Remover {
        let (tx, rx) = std::sync::mpsc::sync_channel::<PathBuf>(Self::QUEUE);
        let thread = std::thread::Builder::new()
            .name(format!("retention-{name}"))
            .spawn(move || rx.into_iter().for_each(|p| delete_file(&p)));
        let worker = thread
            .map_err(|e| tracing::warn!("retention thread: {e}; deleting old files inline"))
            .ok()
            .map(|thread| (tx, thread));
        Remover { worker }
    }

    fn remove(&self, path: PathBuf) {
        let Some((tx, _)) = &self.worker else {
            return delete_file(&path);
        };
        if let Err(
            std::sync::mpsc::TrySendError::Full(path)
            | std::sync::mpsc::TrySendError::Disconnected(path),
        ) = tx.try_send(path)
        {
            delete_file(&path);
        }
    }

    /// Waits for the queued deletions.
    fn finish(&mut self) {
        if let Some((tx, thread)) = self.worker.take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

fn delete_file(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), "retention: {e}");
    }
}

impl Writer {
    fn new(cfg: PcapngFileConfig, stats: Arc<SinkStats>) -> Writer {
        let remover = Remover::spawn(&cfg.name);
        let mut w = Writer {
            done: earlier_files(&cfg).into(),
            cfg,
            current: None,
            seq: 0,
            stats,
            remover,
            failing_until: None,
        };
        // Retention counts what an earlier run left, and the file to come.
        w.retain(w.cfg.max_files.saturating_sub(1));
        w
    }

    fn open(&mut self) -> std::io::Result<&mut Current> {
        if self.current.is_none() {
            let secs = now_ns() / 1_000_000_000;
            // Never overwrite: a replaced sink may still be closing its
            // last file under the same name, and two sinks may share a
            // directory and prefix.
            let (file, path) = loop {
                let path = self
                    .cfg
                    .directory
                    .join(format!("{}-{secs}-{:06}.pcapng", self.cfg.prefix, self.seq));
                self.seq += 1;
                match File::options().write(true).create_new(true).open(&path) {
                    Ok(f) => break (f, path),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            };
            let staged = Staged {
                file,
                buf: Vec::with_capacity(WRITE_AT + (64 << 10)),
            };
            let out = PcapNgOut::new(staged)?;
            tracing::debug!(path = %path.display(), "opened capture file");
            self.current = Some(Current {
                out,
                path,
                opened: Instant::now(),
                ifaces: HashMap::new(),
                durable: 0,
                staged_packets: 0,
                staged_bytes: 0,
            });
        }
        Ok(self.current.as_mut().expect("just opened"))
    }

    /// Writes out what is staged; on failure the file is cut back to its
    /// last whole block and closed, and the staged packets are counted as
    /// not written.
    fn write_out(&mut self) {
        let Some(c) = self.current.as_mut() else {
            return;
        };
        let staged = c.out.get_mut();
        if staged.buf.is_empty() {
            return;
        }
        match staged.file.write_all(&staged.buf) {
            Ok(()) => {
                c.durable += staged.buf.len() as u64;
                staged.buf.clear();
                self.stats.packets.add(c.staged_packets);
                self.stats.bytes.add(c.staged_bytes);
                c.staged_packets = 0;
                c.staged_bytes = 0;
            }
            Err(e) => {
                let Some(mut c) = self.current.take() else {
                    return;
                };
                tracing::warn!(
                    sink = %self.cfg.name,
                    path = %c.path.display(),
                    packets = c.staged_packets,
                    "writing capture file: {e}; its packets are counted as not written, and the file is closed at its last whole block"
                );
                self.stats.errors.add(1);
                self.stats.write_failed.add(c.staged_packets);
                self.failing_until = Some(Instant::now() + RETRY_AFTER);
                let staged = c.out.get_mut();
                if let Err(e) = staged.file.set_len(c.durable) {
                    tracing::warn!(path = %c.path.display(), "cutting back the capture file: {e}");
                }
                if c.durable == 0 {
                    delete_file(&c.path);
                } else {
                    self.done.push_back(c.path);
                    self.retain(self.cfg.max_files.saturating_sub(1));
                }
            }
        }
    }

    fn close(&mut self, last: bool) {
        self.write_out();
        if let Some(c) = self.current.take() {
            self.done.push_back(c.path);
            // While running, the next file counts towards the limit.
            let keep = if last {
                self.cfg.max_files
            } else {
                self.cfg.max_files.saturating_sub(1)
            };
            self.retain(keep);
        }
    }

    /// Deletes the oldest closed files past `keep` (none without a limit).
    fn retain(&mut self, keep: usize) {
        if self.cfg.max_files == 0 {
            return;
        }
        while self.done.len() > keep {
            let Some(old) = self.done.pop_front() else {
                break;
            };
            self.remover.remove(old);
        }
    }

    fn due(&self) -> bool {
        let Some(c) = &self.current else { return false };
        (self.cfg.rotate_bytes > 0 && c.out.bytes_written() >= self.cfg.rotate_bytes)
            || (self.cfg.rotate_seconds > 0
                && c.opened.elapsed() >= Duration::from_secs(self.cfg.rotate_seconds))
    }

    /// Stages one packet, writing out when enough is staged.
    fn write(&mut self, p: &Packet) {
        if let Some(until) = self.failing_until {
            if Instant::now() < until {
                self.stats.write_failed.add(1);
                return;
            }
            self.failing_until = None;
        }
        if self.due() {
            self.close(false);
            // Writing out the full file may just have failed.
            if self.failing_until.is_some() {
                self.stats.write_failed.add(1);
                return;
            }
        }
        match self.stage(p) {
            Ok(()) => {
                if self
                    .current
                    .as_mut()
                    .is_some_and(|c| c.out.get_mut().buf.len() >= WRITE_AT)
                {
                    self.write_out();
                }
            }
            Err(e) => {
                tracing::warn!(sink = %self.cfg.name, "capture file: {e}");
                self.stats.errors.add(1);
                self.stats.write_failed.add(1);
                self.failing_until = Some(Instant::now() + RETRY_AFTER);
            }
        }
    }

    fn stage(&mut self, p: &Packet) -> std::io::Result<()> {
        let snaplen = self.cfg.snaplen;
        let c = self.open()?;
        let id = match c.ifaces.get(&p.iface) {
            Some(&id) => id,
            None => {
                let descr = format!("tap {} interface {}", p.iface.tap_id, p.iface.interface);
                let id = c.out.add_interface(
                    crate::bpf::LINKTYPE_ETHERNET,
                    snaplen,
                    Some(&p.iface.name),
                    Some(&descr),
                )?;
                c.ifaces.insert(p.iface.clone(), id);
                id
            }
        };
        let data = crate::sinks::snap(&p.data, snaplen);
        c.out.write_packet(
            id,
            p.ts_ns,
            p.wire_len,
            data,
            p.iface.epb_flags(p.direction),
        )?;
        c.staged_packets += 1;
        c.staged_bytes += data.len() as u64;
        Ok(())
    }
}

/// The files an earlier run of this sink left in its directory, oldest
/// first: `{prefix}-{seconds}-{sequence}.pcapng`.
fn earlier_files(cfg: &PcapngFileConfig) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(&cfg.directory) else {
        return Vec::new();
    };
    let mut found: Vec<((u64, u64), PathBuf)> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let rest = name
                .strip_prefix(cfg.prefix.as_str())?
                .strip_prefix('-')?
                .strip_suffix(".pcapng")?;
            let (secs, seq) = rest.split_once('-')?;
            Some(((secs.parse().ok()?, seq.parse().ok()?), path))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, path)| path).collect()
}

/// Writes batches until every sender has let go of the queue, then
/// closes the file: everything queued before then is in it.
pub fn run(cfg: PcapngFileConfig, mut rx: mpsc::Receiver<Batch>, stats: Arc<SinkStats>) {
    let mut w = Writer::new(cfg, stats.clone());
    while let Some(batch) = rx.blocking_recv() {
        if batch.is_empty() {
            // The once-a-second tick.
            if w.due() {
                w.close(false);
            } else {
                w.write_out();
            }
            continue;
        }
        for p in batch.iter() {
            w.write(p);
        }
        stats.record_latency(now_ns(), batch.iter().map(|p| p.ts_ns));
    }
    w.close(true);
    w.remover.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_deletions_are_done_when_the_remover_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let mut remover = Remover::spawn("test");
        // More than the queue holds: whether the thread or the caller
        // deletes each one, none may be left.
        let paths: Vec<PathBuf> = (0..Remover::QUEUE * 2)
            .map(|i| {
                let p = dir.path().join(format!("old-{i}.pcapng"));
                std::fs::write(&p, b"x").unwrap();
                p
            })
            .collect();
        for p in &paths {
            remover.remove(p.clone());
        }
        remover.finish();
        let left: Vec<_> = paths.iter().filter(|p| p.exists()).collect();
        assert!(left.is_empty(), "not deleted: {left:?}");
    }
}
