use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{now_ns, Batch};
use crate::metrics::SinkStats;
use crate::sinks::snap;

/// The 8-byte VXLAN header (RFC 7348): flags with the I bit, VNI.
pub fn header(vni: u32) -> [u8; 8] {
    let v = vni.to_be_bytes();
    [0x08, 0, 0, 0, v[1], v[2], v[3], 0]
}

pub async fn run(
    mut rx: mpsc::Receiver<Batch>,
    sock: UdpSocket,
    vni: u32,
    snaplen: u32,
    stats: Arc<SinkStats>,
    stop: CancellationToken,
) {
    let hdr = header(vni);
    let mut buf = Vec::with_capacity(65_536);
    loop {
        let Some(batch) = crate::sinks::next_batch(&mut rx, &stop).await else {
            return;
        };
        let mut sent = 0u64;
        let mut bytes = 0u64;
        for p in batch.iter() {
            buf.clear();
            buf.extend_from_slice(&hdr);
            buf.extend_from_slice(snap(&p.data, snaplen));
            // Never wait on the socket: a full send buffer is a drop.
            match sock.try_send(&buf) {
                Ok(n) => {
                    sent += 1;
                    bytes += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stats.client_dropped.add(1),
                // No receiver yet (ICMP unreachable) and the like.
                Err(_) => stats.errors.add(1),
            }
        }
        stats.packets.add(sent);
        stats.bytes.add(bytes);
        stats.record_latency(now_ns(), batch.iter().map(|p| p.ts_ns));
    }
}
