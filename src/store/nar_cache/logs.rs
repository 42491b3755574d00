//! Build logs: stored zstd-compressed as the agent sent them (`logs/<build>-<attempt>.log.zst`),
//! checked on upload and served decompressed, both by streaming with bounded memory whatever
//! the compression ratio: a 33 KB log that expands to 10 GB costs the coordinator a zstd window
//! and a few 64 KiB buffers, never the expanded size.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};

use super::{random_suffix, UploadError};

/// Largest zstd window accepted in a log (2^24 = 16 MiB: every standard zstd level up to 19
/// fits; the agent uses level 3). This bounds the memory of one log decompression.
pub const LOG_WINDOW_LOG_MAX: u32 = 24;
/// Size of the pieces a log is decompressed and served in.
const PIECE: usize = 64 << 10;
/// Pieces buffered between the decompressing thread and the HTTP response.
const PIECES_IN_FLIGHT: usize = 4;

/// Limits on one log upload.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// Largest compressed body.
    pub compressed: u64,
    /// Largest decompressed log.
    pub decompressed: u64,
    /// Longest wait for the next bytes of the body.
    pub stall: Duration,
}

/// Receives a compressed log into a temporary file next to `dest` (refusing bodies over
/// `limits.compressed` and bodies that stall), checks that it decompresses within
/// `limits.decompressed`, fsyncs it and renames it to `dest`. Nothing is left behind on error.
pub async fn receive<S, E>(dest: &Path, limits: LogLimits, mut body: S) -> Result<(), UploadError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let tmp = dest.with_extension(format!("tmp-{}", random_suffix()));
    let received = async {
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut size = 0u64;
        loop {
            let chunk = match tokio::time::timeout(limits.stall, body.next()).await {
                Err(_) => {
                    metrics::counter!("kiln_transfer_stalls_total").increment(1);
                    return Err(UploadError::Stalled(limits.stall));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(UploadError::Body(e.to_string())),
                Ok(Some(Ok(c))) => c,
            };
            size += chunk.len() as u64;
            if size > limits.compressed {
                return Err(UploadError::BadRequest(format!(
                    "build log is larger than the limit of {} bytes (limits.log_mb)",
                    limits.compressed
                )));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        let (t, max) = (tmp.clone(), limits.decompressed);
        tokio::task::spawn_blocking(move || check(&t, max))
            .await
            .map_err(|e| UploadError::Commit(format!("the log check stopped: {e}")))??;
        file.sync_all().await?;
        Ok(())
    }
    .await;
    if let Err(e) = received {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    tokio::fs::rename(&tmp, dest).await?;
    Ok(())
}

/// Blocking: decompresses `path` into nothing, counting, and refuses a log that is not zstd or
/// expands past `max` bytes.
fn check(path: &Path, max: u64) -> Result<u64, UploadError> {
    let mut dec = decoder(std::fs::File::open(path)?).map_err(not_zstd)?;
    let mut buf = vec![0u8; PIECE];
    let mut total = 0u64;
    loop {
        let n = dec.read(&mut buf).map_err(not_zstd)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if total > max {
            return Err(UploadError::LogTooLarge(max));
        }
    }
}

fn not_zstd(e: std::io::Error) -> UploadError {
    UploadError::BadRequest(format!(
        "the build log is not zstd-compressed as the protocol requires ({e}): compress it with zstd and upload it again"
    ))
}

fn decoder(
    f: std::fs::File,
) -> std::io::Result<zstd::stream::read::Decoder<'static, std::io::BufReader<std::fs::File>>> {
    let mut dec = zstd::stream::read::Decoder::new(f)?;
    dec.window_log_max(LOG_WINDOW_LOG_MAX)?;
    Ok(dec)
}

/// The decompressed log at `path` as a stream of pieces, decompressed on a blocking thread a
/// few pieces ahead of the reader (so memory stays bounded for any ratio). A log that cannot
/// be opened is an error here; one that breaks later ends the stream with an error.
pub async fn stream(
    path: PathBuf,
) -> std::io::Result<impl Stream<Item = Result<bytes::Bytes, std::io::Error>>> {
    let file = tokio::fs::File::open(&path).await?.into_std().await;
    let (tx, rx) = tokio::sync::mpsc::channel(PIECES_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let mut dec = match decoder(file) {
            Ok(d) => d,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let mut buf = vec![0u8; PIECE];
            match dec.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    // The reader is gone (client disconnected): stop decompressing.
                    if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(log = %path.display(), error = %e, "a stored log does not decompress");
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    Ok(futures_util::stream::unfold(rx, |mut rx| async move {
        let piece = rx.recv().await?;
        Some((piece, rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_counts_across_frames_and_refuses_past_the_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let one = zstd::encode_all(&vec![b'x'; 1 << 20][..], 3).unwrap();
        let mut two_frames = one.clone();
        two_frames.extend_from_slice(&one);
        let p = tmp.path().join("log.zst");
        std::fs::write(&p, &two_frames).unwrap();
        assert_eq!(check(&p, 2 << 20).unwrap(), 2 << 20);
        assert!(matches!(
            check(&p, (2 << 20) - 1),
            Err(UploadError::LogTooLarge(_))
        ));
        std::fs::write(&p, b"plain text, not zstd").unwrap();
        assert!(matches!(
            check(&p, 1 << 30),
            Err(UploadError::BadRequest(_))
        ));
    }
}
