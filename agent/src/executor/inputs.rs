//! Fetching a build's inputs from the coordinator into the store dir.
//!
//! Each missing input is downloaded from `{base}/{url}`, zstd-decompressed while it streams,
//! hashed (NarHash and NarSize must match the `PathInfo`), restored under a temporary name
//! `.<hash>-<name>.tmp-<random>` in the store dir and renamed into place, so nobody ever sees a
//! half-restored path. A per-path lock makes concurrent builds that need the same input wait
//! for one download instead of racing.
//!
//! A download that breaks off (reset, or no byte for the stall timeout: the progress watchdog
//! of [`crate::transfer`]) is resumed where it stopped with `Range: bytes=<received>-`; the
//! decompressing restorer on its blocking thread never notices. Decompression, hashing and file
//! writes all run on that blocking thread, never on the runtime's (which sends heartbeats).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln::protocol::PathInfo;
use tokio::sync::mpsc;

use crate::client::Coordinator;
use crate::metrics;
use crate::nario::{self, HashReader, NarError};
use crate::retry::{ApiError, CallError, Policy};
use crate::state::{blocking, remove_tree};
use crate::transfer::{self, Progress};

/// Per-store-path locks, shared by every build of the agent.
#[derive(Debug, Default, Clone)]
pub struct InputLocks(Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>);

impl InputLocks {
    fn lock_for(&self, path: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(path.to_owned()).or_default().clone()
    }
}

/// Makes every input of the build present at `local(path)`; a failure names the input.
pub async fn fetch_all(
    coordinator: &Coordinator,
    locks: &InputLocks,
    inputs: &[PathInfo],
    local: impl Fn(&str) -> anyhow::Result<PathBuf>,
) -> Result<(), String> {
    for info in inputs {
        let dest = local(&info.path).map_err(|e| format!("{e:#}"))?;
        let lock = locks.lock_for(&dest);
        let _guard = lock.lock().await;
        if std::fs::symlink_metadata(&dest).is_ok() {
            continue;
        }
        tracing::info!(path = %info.path, size = info.file_size, "fetching input");
        coordinator
            .call("fetch input", |_token| fetch_one(coordinator, info, &dest))
            .await
            .map_err(|e| format!("failed to fetch input {}: {e}", info.path))?;
    }
    Ok(())
}

/// One try: download (resuming after breaks), decompress, check and restore; the temporary
/// path is removed on failure.
async fn fetch_one(
    coordinator: &Coordinator,
    info: &PathInfo,
    dest: &Path,
) -> Result<(), CallError> {
    let base = dest
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{base}.tmp-{:016x}", rand::random::<u64>()));
    let (tx, rx) = mpsc::channel::<Chunk>(16);
    let (want_hash, want_size) = (info.nar_hash.clone(), info.nar_size);
    let (tmp2, dest2) = (tmp.clone(), dest.to_owned());
    let restorer =
        tokio::task::spawn_blocking(move || restore(rx, &tmp2, &dest2, &want_hash, want_size));
    let url = coordinator.url(&info.url);
    let streamed = download(
        coordinator.http(),
        &url,
        coordinator.transfer_stall(),
        &Policy::AGENT,
        &tx,
    )
    .await;
    if streamed.is_err() {
        // Tell the restorer the stream broke, so it does not take it for a short NAR.
        let _ = tx.send(Err(())).await;
    }
    drop(tx);
    let restored = restorer
        .await
        .map_err(|e| CallError::transient(format!("restore task failed: {e}")))?;
    if let Err(e) = streamed.and(restored) {
        let t = tmp.clone();
        if let Err(rm) = blocking("remove a partial input", move || remove_tree(&t)).await {
            tracing::warn!(path = %tmp.display(), error = format!("{rm:#}"), "failed to remove a partial input");
        }
        return Err(e);
    }
    Ok(())
}

/// Streams `url` into `tx`, resuming with `Range` after every transient break (a reset, a
/// 5xx, or no byte for `stall`), waiting between tries as `policy` says (or as `Retry-After`
/// says). Returns when the body is complete, when the receiver stopped listening (its own
/// error then says why), or on a permanent failure.
pub async fn download(
    http: &reqwest::Client,
    url: &str,
    stall: std::time::Duration,
    policy: &Policy,
    tx: &mpsc::Sender<Chunk>,
) -> Result<(), CallError> {
    let mut received = 0u64;
    let mut backoff = policy.backoff();
    loop {
        let progress = Progress::new();
        let before = received;
        let attempt = transfer::watch(
            "download input",
            stall,
            &progress,
            download_from(http, url, &mut received, &progress, tx),
        )
        .await;
        let (message, retry_after) = match attempt {
            Ok(()) => return Ok(()),
            Err(CallError::Transient {
                message,
                retry_after,
            }) => (message, retry_after),
            Err(e) => return Err(e),
        };
        if received > before {
            // Bytes moved: the link works, so the next break starts its waits afresh.
            backoff = policy.backoff();
        }
        let Some(next) = backoff.next_wait() else {
            return Err(CallError::Transient {
                message,
                retry_after,
            });
        };
        let wait = Policy::wait(next, retry_after);
        metrics::RETRIES.inc();
        if received > 0 {
            metrics::RESUMED_DOWNLOADS.inc();
        }
        tracing::warn!(url, received, error = %message, wait_ms = wait.as_millis() as u64, "download broke off; resuming");
        tokio::time::sleep(wait).await;
    }
}

/// One request of a download: from byte `received` on (a `Range` request when above 0),
/// adding to `received` as chunks are handed to `tx`.
async fn download_from(
    http: &reqwest::Client,
    url: &str,
    received: &mut u64,
    progress: &Progress,
    tx: &mpsc::Sender<Chunk>,
) -> Result<(), CallError> {
    let mut rb = http.get(url);
    if *received > 0 {
        rb = rb.header(reqwest::header::RANGE, format!("bytes={received}-"));
    }
    let mut resp = rb
        .send()
        .await
        .map_err(|e| crate::retry::classify_transport(&e))?;
    progress.tick();
    let status = resp.status().as_u16();
    // Bytes of this answer to drop: those we already have, when the server ignored the range.
    let mut skip = match status {
        206 => {
            let start = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_start);
            if start != Some(*received) {
                return Err(CallError::Rejected(ApiError {
                    status,
                    code: "bad_range".into(),
                    message: format!(
                        "asked {url} for bytes from {received} on, got Content-Range starting at {start:?}"
                    ),
                }));
            }
            0
        }
        200 => *received,
        _ => {
            let ra = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.bytes().await.unwrap_or_default();
            return Err(crate::retry::classify(status, ra.as_deref(), &body));
        }
    };
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => {
                return if skip > 0 {
                    Err(CallError::transient(format!(
                        "{url} ended before the {received} bytes already received"
                    )))
                } else {
                    Ok(())
                };
            }
            Err(e) => return Err(crate::retry::classify_transport(&e)),
        };
        progress.tick();
        let mut chunk = chunk;
        if skip > 0 {
            let drop_now = skip.min(chunk.len() as u64) as usize;
            let _ = chunk.split_to(drop_now);
            skip -= drop_now as u64;
            if chunk.is_empty() {
                continue;
            }
        }
        let n = chunk.len() as u64;
        if tx.send(Ok(chunk)).await.is_err() {
            return Ok(()); // The restorer stopped early; its error says why.
        }
        *received += n;
    }
}

/// The first byte position of a `Content-Range: bytes a-b/len` header.
fn content_range_start(v: &str) -> Option<u64> {
    let range = v.trim().strip_prefix("bytes ")?;
    let (a, _) = range.split_once('-')?;
    a.trim().parse().ok()
}

/// Blocking: decompress and restore what arrives on `rx`, check it, rename it into place.
fn restore(
    rx: mpsc::Receiver<Chunk>,
    tmp: &Path,
    dest: &Path,
    want_hash: &str,
    want_size: u64,
) -> Result<(), CallError> {
    let reader = ChannelReader {
        rx,
        current: bytes::Bytes::new(),
    };
    let decoder =
        zstd::Decoder::new(reader).map_err(|e| CallError::transient(format!("zstd: {e}")))?;
    let mut hashing = HashReader::new(decoder);
    match nario::restore(&mut hashing, tmp) {
        Ok(()) => {}
        // The download broke: try again.
        Err(e @ NarError::Read { .. }) => {
            return Err(CallError::transient(format!(
                "failed to restore the NAR: {e}"
            )))
        }
        Err(e) => {
            return Err(CallError::Rejected(ApiError {
                status: 0,
                code: "bad_nar".into(),
                message: format!("failed to restore the NAR: {e}"),
            }))
        }
    }
    // Drain what follows the NAR (nothing, in a valid file) so the hash covers every byte.
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|e| CallError::transient(e.to_string()))?;
    let (hash, size) = hashing.finish();
    if hash != want_hash || size != want_size {
        return Err(CallError::Rejected(ApiError {
            status: 0,
            code: "nar_hash_mismatch".into(),
            message: format!("NAR is {hash} ({size} bytes), the coordinator said {want_hash} ({want_size} bytes)"),
        }));
    }
    std::fs::rename(tmp, dest).map_err(|e| {
        CallError::Rejected(ApiError {
            status: 0,
            code: "local_io".into(),
            message: format!("failed to rename {} into place: {e}", tmp.display()),
        })
    })
}

/// A piece of the download, or the news that the download broke.
pub type Chunk = Result<bytes::Bytes, ()>;

/// A blocking `Read` over the chunks an async task sends.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    current: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(())) => return Err(std::io::Error::other("the download broke")),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
