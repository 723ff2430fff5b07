use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::PcapOverIpConfig;
use crate::capture::{pcap_stream_header, pcap_stream_record};
use crate::event::{now_ns, Batch};
use crate::metrics::SinkStats;
use crate::sinks::{snap, Hub};

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS handshakes under way at once per sink; more clients are refused.
const MAX_HANDSHAKES: usize = 64;

/// Accepts clients until stopped; each admitted client (over TLS when
/// `tls`) gets the pcap header, then the shared stream. Returning closes
/// the listener.
pub async fn accept(
    listener: TcpListener,
    hub: Arc<Hub<Bytes>>,
    cfg: PcapOverIpConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let name = cfg.name.as_str();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(sink = %name, "accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if !cfg.admits(peer.ip()) {
            hub.stats.refused_not_allowed.add(1);
            tracing::warn!(sink = %name, %peer, "PCAP-over-IP client refused: not loopback and not in the allow list");
            continue;
        }
        let _ = sock.set_nodelay(true);
        let permit = match &tls {
            None => None,
            Some(_) => match handshakes.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    hub.stats.refused_handshake.add(1);
                    tracing::warn!(sink = %name, %peer, "PCAP-over-IP client refused: {MAX_HANDSHAKES} TLS handshakes already under way");
                    continue;
                }
            },
        };
        let name = cfg.name.clone();
        let snaplen = cfg.snaplen;
        let (stop, hub, tls) = (stop.clone(), hub.clone(), tls.clone());
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                let (reader, writer) = sock.into_split();
                return serve_client(reader, writer, &hub, &name, peer, snaplen, &stop).await;
            };
            let handshake = tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(sock)).await;
            drop(permit);
            match handshake {
                Ok(Ok(tls)) => {
                    let (reader, writer) = tokio::io::split(tls);
                    serve_client(reader, writer, &hub, &name, peer, snaplen, &stop).await
                }
                Ok(Err(e)) => {
                    hub.stats.refused_handshake.add(1);
                    tracing::warn!(sink = %name, %peer, "PCAP-over-IP client refused: TLS handshake failed: {e}");
                }
                Err(_) => {
                    hub.stats.refused_handshake.add(1);
                    tracing::warn!(sink = %name, %peer, "PCAP-over-IP client refused: no TLS handshake within {HANDSHAKE_WITHIN:?}");
                }
            }
        });
    }
}

/// One client, once admitted: the pcap header, then the shared stream
/// until the client goes, its queue ends or the sink stops.
async fn serve_client<R, W>(
    mut reader: R,
    mut writer: W,
    hub: &Arc<Hub<Bytes>>,
    name: &str,
    peer: std::net::SocketAddr,
    snaplen: u32,
    stop: &CancellationToken,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut sub = match hub.subscribe() {
        Ok(sub) => sub,
        Err(e) => {
            tracing::warn!(sink = %name, %peer, "PCAP-over-IP client refused: {e}");
            return;
        }
    };
    tracing::info!(sink = %name, %peer, "PCAP-over-IP client connected");
    let serve = async {
        writer.write_all(&pcap_stream_header(snaplen)).await?;
        while let Some(chunk) = sub.rx.recv().await {
            writer.write_all(&chunk).await?;
            // TLS holds what the socket did not take yet (plain TCP: no-op).
            writer.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    // Clients send nothing: the read side ending is the client going
    // away, noticed at once even when no packets flow.
    let gone = async {
        let mut discard = [0u8; 512];
        while let Ok(1..) = reader.read(&mut discard).await {}
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = gone => tracing::info!(sink = %name, %peer, "client disconnected"),
        r = serve => if let Err(e) = r {
            tracing::info!(sink = %name, %peer, "client gone: {e}");
        },
    }
}

/// Encodes each batch once and offers the bytes to every client, until
/// stopped or the last policy lets go of the queue.
pub async fn run(
    mut rx: mpsc::Receiver<Batch>,
    hub: Arc<Hub<Bytes>>,
    stats: Arc<SinkStats>,
    snaplen: u32,
    stop: CancellationToken,
) {
    loop {
        let Some(batch) = crate::sinks::next_batch(&mut rx, &stop).await else {
            return;
        };
        let bytes = encode(&batch, snaplen);
        if hub.broadcast(&bytes, batch.len() as u64) > 0 {
            stats.packets.add(batch.len() as u64);
            stats.bytes.add(bytes.len() as u64);
            stats.record_latency(now_ns(), batch.iter().map(|p| p.ts_ns));
        }
    }
}

/// Classic pcap records of a batch, each cut to `snaplen`.
pub fn encode(batch: &Batch, snaplen: u32) -> Bytes {
    let mut buf = Vec::with_capacity(batch.iter().map(|p| p.data.len() + 16).sum());
    for p in batch.iter() {
        pcap_stream_record(&mut buf, p.ts_ns, p.wire_len, snap(&p.data, snaplen));
    }
    Bytes::from(buf)
}
