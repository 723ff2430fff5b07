use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::capture::{pcap_stream_header, pcap_stream_record};
use crate::event::{now_ns, Batch};
use crate::metrics::SinkStats;
use crate::sinks::Hub;

/// Accepts clients; each gets the pcap header, then the shared stream.
pub async fn accept(listener: TcpListener, hub: Arc<Hub<Bytes>>, snaplen: u32, name: String) {
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(sink = %name, "accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let mut sub = hub.subscribe();
        tracing::info!(sink = %name, %peer, "PCAP-over-IP client connected");
        let name = name.clone();
        tokio::spawn(async move {
            if sock.write_all(&pcap_stream_header(snaplen)).await.is_err() {
                return;
            }
            while let Some(chunk) = sub.rx.recv().await {
                if let Err(e) = sock.write_all(&chunk).await {
                    tracing::info!(sink = %name, %peer, "client gone: {e}");
                    break;
                }
            }
        });
    }
}

/// Encodes each batch once and offers the bytes to every client.
pub async fn run(mut rx: mpsc::Receiver<Batch>, hub: Arc<Hub<Bytes>>, stats: Arc<SinkStats>) {
    while let Some(batch) = rx.recv().await {
        let bytes = encode(&batch);
        if hub.broadcast(&bytes, batch.len() as u64) > 0 {
            stats.packets.add(batch.len() as u64);
            stats.bytes.add(bytes.len() as u64);
            stats.record_latency(now_ns(), batch.iter().map(|p| p.ts_ns));
        }
    }
}

pub fn encode(batch: &Batch) -> Bytes {
    let mut buf = Vec::with_capacity(batch.iter().map(|p| p.data.len() + 16).sum());
    for p in batch.iter() {
        pcap_stream_record(&mut buf, p.ts_ns, p.wire_len, &p.data);
    }
    Bytes::from(buf)
}
