//! Fetching a build's inputs from the coordinator into the store dir.
//!
//! Each missing input is downloaded from `{base}/{url}`, zstd-decompressed while it streams,
//! hashed (NarHash and NarSize must match the `PathInfo`), restored under a temporary name
//! `.<hash>-<name>.tmp-<random>` in the store dir and renamed into place, so nobody ever sees a
//! half-restored path. A per-path lock makes concurrent builds that need the same input wait
//! for one download instead of racing.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln::protocol::PathInfo;
use tokio::sync::mpsc;

use crate::client::Coordinator;
use crate::nario::{self, HashReader, NarError};
use crate::retry::{ApiError, CallError};
use crate::state::remove_tree;

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

/// One try: download, decompress, check and restore; the temporary path is removed on failure.
async fn fetch_one(
    coordinator: &Coordinator,
    info: &PathInfo,
    dest: &Path,
) -> Result<(), CallError> {
    let resp = coordinator
        .http()
        .get(coordinator.url(&info.url))
        .send()
        .await
        .map_err(|e| crate::retry::classify_transport(&e))?;
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        let ra = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await.unwrap_or_default();
        return Err(crate::retry::classify(status, ra.as_deref(), &body));
    }
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
    let mut resp = resp;
    let streamed = async {
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => Ok(c),
                Ok(None) => return Ok(()),
                // Tell the restorer the stream broke, so it does not take it for a short NAR.
                Err(e) => Err(crate::retry::classify_transport(&e)),
            };
            let failed = chunk
                .as_ref()
                .err()
                .map(|e| CallError::transient(e.to_string()));
            if tx.send(chunk.map_err(|_| ())).await.is_err() {
                return Ok(()); // The restorer stopped early; its error says why.
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }
    .await;
    drop(tx);
    let restored = restorer
        .await
        .map_err(|e| CallError::transient(format!("restore task failed: {e}")))?;
    if let Err(e) = streamed.and(restored) {
        if let Err(rm) = remove_tree(&tmp) {
            tracing::warn!(path = %tmp.display(), error = format!("{rm:#}"), "failed to remove a partial input");
        }
        return Err(e);
    }
    Ok(())
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
type Chunk = Result<bytes::Bytes, ()>;

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
