use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::config::PcapngFileConfig;
use crate::capture::PcapNgOut;
use crate::event::{now_ns, Batch, Iface, Packet};
use crate::metrics::SinkStats;

struct Current {
    out: PcapNgOut<BufWriter<File>>,
    path: PathBuf,
    opened: Instant,
    /// Interface → interface id in this file (ids restart per file).
    ifaces: HashMap<Arc<Iface>, u32>,
}

struct Writer {
    cfg: PcapngFileConfig,
    current: Option<Current>,
    done: VecDeque<PathBuf>,
    seq: u64,
    stats: Arc<SinkStats>,
    remover: Remover,
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
            let out = PcapNgOut::new(BufWriter::with_capacity(256 << 10, file))?;
            tracing::debug!(path = %path.display(), "opened capture file");
            self.current = Some(Current {
                out,
                path,
                opened: Instant::now(),
                ifaces: HashMap::new(),
            });
        }
        Ok(self.current.as_mut().expect("just opened"))
    }

    fn close(&mut self, last: bool) {
        if let Some(mut c) = self.current.take() {
            if let Err(e) = c.out.get_mut().flush() {
                tracing::warn!(path = %c.path.display(), "flush: {e}");
                self.stats.errors.add(1);
            }
            self.done.push_back(c.path);
            if self.cfg.max_files > 0 {
                // While running, the next file counts towards the limit.
                let keep = if last {
                    self.cfg.max_files
                } else {
                    self.cfg.max_files - 1
                };
                while self.done.len() > keep {
                    let Some(old) = self.done.pop_front() else {
                        break;
                    };
                    self.remover.remove(old);
                }
            }
        }
    }

    fn due(&self) -> bool {
        let Some(c) = &self.current else { return false };
        (self.cfg.rotate_bytes > 0 && c.out.bytes_written() >= self.cfg.rotate_bytes)
            || (self.cfg.rotate_seconds > 0
                && c.opened.elapsed() >= Duration::from_secs(self.cfg.rotate_seconds))
    }

    fn write(&mut self, p: &Packet) -> std::io::Result<usize> {
        if self.due() {
            self.close(false);
        }
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
        Ok(data.len())
    }
}

pub fn run(cfg: PcapngFileConfig, mut rx: mpsc::Receiver<Batch>, stats: Arc<SinkStats>) {
    let name = cfg.name.clone();
    let mut w = Writer {
        cfg,
        current: None,
        done: VecDeque::new(),
        seq: 0,
        stats: stats.clone(),
        remover: Remover::spawn(&name),
    };
    while let Some(batch) = rx.blocking_recv() {
        if batch.is_empty() {
            // The once-a-second tick.
            if w.due() {
                w.close(false);
            } else if let Some(c) = w.current.as_mut() {
                let _ = c.out.get_mut().flush();
            }
            continue;
        }
        let mut bytes = 0;
        for p in batch.iter() {
            match w.write(p) {
                Ok(n) => bytes += n as u64,
                Err(e) => {
                    tracing::warn!("pcapng sink: {e}");
                    stats.errors.add(1);
                    w.current = None;
                }
            }
        }
        stats.packets.add(batch.len() as u64);
        stats.bytes.add(bytes);
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
