//! Reading CRI-format container logs (`TIMESTAMP STREAM F|P MESSAGE`) the
//! way `kubectl logs` asks: tail, since, timestamps, limitBytes, follow.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    pub follow: bool,
    pub tail_lines: Option<usize>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub timestamps: bool,
    pub limit_bytes: Option<usize>,
}

/// One parsed record.
struct Record<'a> {
    time: &'a str,
    partial: bool,
    message: &'a [u8],
}

fn parse(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let _stream = parts.next()?;
    let tag = parts.next()?;
    let message = parts.next().unwrap_or(b"");
    Some(Record {
        time,
        partial: tag == b"P",
        message,
    })
}

/// One log line as (is stderr, is partial, message).
pub fn split_record(line: &[u8]) -> Option<(bool, bool, &[u8])> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let _time = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    Some((
        stream == b"stderr",
        tag == b"P",
        parts.next().unwrap_or(b""),
    ))
}

fn render(rec: &Record<'_>, opts: &LogOptions, out: &mut Vec<u8>) {
    if opts.timestamps {
        out.extend_from_slice(rec.time.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(rec.message);
    if !rec.partial {
        out.push(b'\n');
    }
}

fn wanted(rec: &Record<'_>, opts: &LogOptions) -> bool {
    match opts.since {
        Some(since) => chrono::DateTime::parse_from_rfc3339(rec.time).is_ok_and(|t| t >= since),
        None => true,
    }
}

/// Render complete lines of `data`; returns the rendered bytes and how
/// many input bytes were consumed (a trailing unfinished line is kept).
fn render_chunk(data: &[u8], opts: &LogOptions) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut consumed = 0;
    for line in data.split_inclusive(|b| *b == b'\n') {
        if line.last() != Some(&b'\n') {
            break;
        }
        consumed += line.len();
        if let Some(rec) = parse(&line[..line.len() - 1]) {
            if wanted(&rec, opts) {
                render(&rec, opts, &mut out);
            }
        }
    }
    (out, consumed)
}

/// The initial contents (after tail/since), and the file offset where
/// following continues.
pub async fn initial(path: &PathBuf, opts: &LogOptions) -> std::io::Result<(Vec<u8>, u64)> {
    let data = tokio::fs::read(path).await?;
    let mut lines: Vec<&[u8]> = data
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.last() == Some(&b'\n'))
        .collect();
    let consumed: usize = lines.iter().map(|l| l.len()).sum();
    lines.retain(|l| parse(&l[..l.len() - 1]).is_some_and(|r| wanted(&r, opts)));
    if let Some(n) = opts.tail_lines {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    let mut out = Vec::new();
    for l in lines {
        if let Some(rec) = parse(&l[..l.len() - 1]) {
            render(&rec, opts, &mut out);
        }
    }
    Ok((out, consumed as u64))
}

/// Follow a log file from `offset` until `done()` says the writer is gone
/// and everything was read. Yields rendered chunks.
pub fn follow(
    path: PathBuf,
    offset: u64,
    opts: LogOptions,
    done: impl Fn() -> bool + Send + 'static,
) -> impl futures::Stream<Item = Bytes> + Send {
    let state = (path, offset, opts, done, Vec::<u8>::new(), false);
    futures::stream::unfold(
        state,
        |(path, mut offset, opts, done, mut pending, finished)| async move {
            if finished {
                return None;
            }
            loop {
                let finishing = done();
                let mut chunk = Vec::new();
                if let Ok(mut f) = tokio::fs::File::open(&path).await {
                    if f.seek(SeekFrom::Start(offset)).await.is_ok() {
                        let _ = f.read_to_end(&mut chunk).await;
                    }
                }
                offset += chunk.len() as u64;
                pending.extend_from_slice(&chunk);
                let (out, consumed) = render_chunk(&pending, &opts);
                pending.drain(..consumed);
                if !out.is_empty() {
                    return Some((Bytes::from(out), (path, offset, opts, done, pending, false)));
                }
                if finishing {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tail_since_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        std::fs::write(
            &p,
            "2026-01-01T00:00:00.000000001Z stdout F one\n2026-01-01T00:00:01Z stderr P tw\n2026-01-01T00:00:01Z stderr F o\n2026-01-01T00:00:02Z stdout F three\nunfinished",
        )
        .unwrap();
        let (all, off) = initial(&p, &LogOptions::default()).await.unwrap();
        assert_eq!(all, b"one\ntwo\nthree\n");
        assert_eq!(
            off,
            std::fs::metadata(&p).unwrap().len() - "unfinished".len() as u64
        );
        let tail = LogOptions {
            tail_lines: Some(1),
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            initial(&p, &tail).await.unwrap().0,
            b"2026-01-01T00:00:02Z three\n"
        );
        let since = LogOptions {
            since: Some(
                chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:01Z")
                    .unwrap()
                    .with_timezone(&chrono::Utc),
            ),
            ..Default::default()
        };
        assert_eq!(initial(&p, &since).await.unwrap().0, b"two\nthree\n");
    }
}
