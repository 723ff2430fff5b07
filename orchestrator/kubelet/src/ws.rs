//! The server side of RFC 6455 WebSocket framing, as much as the Kubernetes
//! streaming protocols (`v4`/`v5.channel.k8s.io`) need: binary and text
//! messages, fragmentation, ping/pong and close.

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest message accepted from a client (stdin chunks, resize events).
const MAX_MESSAGE: usize = 1 << 20;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

pub enum Message {
    Data(Vec<u8>),
    Close,
}

/// Read the next data message (answering pings through `pong`).
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(Message, Option<Vec<u8>>)> {
    let mut message = Vec::new();
    loop {
        let mut head = [0u8; 2];
        r.read_exact(&mut head).await?;
        let fin = head[0] & 0x80 != 0;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let mut len = (head[1] & 0x7f) as u64;
        if len == 126 {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await?;
            len = u16::from_be_bytes(b) as u64;
        } else if len == 127 {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).await?;
            len = u64::from_be_bytes(b);
        }
        if len as usize > MAX_MESSAGE || message.len() + len as usize > MAX_MESSAGE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "websocket message too large",
            ));
        }
        let mut mask = [0u8; 4];
        if masked {
            r.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload).await?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        match opcode {
            0x8 => return Ok((Message::Close, None)),
            0x9 => return Ok((Message::Data(Vec::new()), Some(payload))),
            0xA => continue,
            _ => {
                message.extend_from_slice(&payload);
                if fin {
                    return Ok((Message::Data(message), None));
                }
            }
        }
    }
}

fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

pub async fn write_binary<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&frame(0x2, payload)).await?;
    w.flush().await
}

pub async fn write_pong<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&frame(0xA, payload)).await?;
    w.flush().await
}

/// Send a close frame and end our side of the stream (over TLS, with
/// close_notify): a peer or proxy that sees the connection cut without it
/// takes that for an error and may drop what it had not yet passed on.
pub async fn write_close<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(&frame(0x8, &1000u16.to_be_bytes())).await?;
    w.flush().await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn close_frame_then_end_of_stream() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        write_close(&mut ours).await.unwrap();
        let mut got = Vec::new();
        // `ours` is still alive: only a shutdown ends the stream.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            theirs.read_to_end(&mut got),
        )
        .await
        .expect("end of stream after the close frame")
        .unwrap();
        assert_eq!(got, frame(0x8, &1000u16.to_be_bytes()));
        drop(ours);
    }

    #[tokio::test]
    async fn masked_roundtrip() {
        let payload = b"\x00hello";
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x82, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        let mut r = &f[..];
        match read_message(&mut r).await.unwrap().0 {
            Message::Data(d) => assert_eq!(d, payload),
            Message::Close => panic!("close"),
        }
    }
}
