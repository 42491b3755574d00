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

use super::cache::InputCache;
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

/// Why a build's inputs could not all be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    /// For the failure report: names the first input that failed and why.
    pub reason: String,
    /// Inputs the coordinator answered 404 for: it does not have them (any more). Reported
    /// to it (`missing_inputs`), so it can build them again.
    pub missing: Vec<String>,
}

/// Makes every input of the build present at `local(path)`; a failure names the input. The
/// build pinned its inputs in `cache` beforehand; after each fetch the cache is brought back
/// under its cap ([`evict_over_cap`]). An input the coordinator does not have (404) does not
/// stop the others from being tried, so one report names every missing input; any other
/// failure ends the fetching at once.
pub async fn fetch_all(
    coordinator: &Coordinator,
    locks: &InputLocks,
    cache: &InputCache,
    inputs: &[PathInfo],
    local: impl Fn(&str) -> anyhow::Result<PathBuf>,
) -> Result<(), FetchError> {
    let mut missing = Vec::new();
    let mut first_missing = String::new();
    for info in inputs {
        let dest = local(&info.path).map_err(|e| FetchError {
            reason: format!("{e:#}"),
            missing: Vec::new(),
        })?;
        {
            let lock = locks.lock_for(&dest);
            let _guard = lock.lock().await;
            if std::fs::symlink_metadata(&dest).is_ok() {
                cache.present(&dest);
                continue;
            }
            tracing::info!(path = %info.path, size = info.file_size, "fetching input");
            match coordinator
                .call("fetch input", |_token| fetch_one(coordinator, info, &dest))
                .await
            {
                Ok(()) => cache.present(&dest),
                Err(CallError::Rejected(e)) if e.status == 404 => {
                    tracing::warn!(path = %info.path, url = %info.url, "the coordinator does not have this input");
                    if missing.is_empty() {
                        first_missing = format!("failed to fetch input {}: {e}", info.path);
                    }
                    missing.push(info.path.clone());
                    continue;
                }
                Err(e) => {
                    return Err(FetchError {
                        reason: format!("failed to fetch input {}: {e}", info.path),
                        missing,
                    })
                }
            }
        }
        evict_over_cap(cache, locks).await;
    }
    if missing.is_empty() {
        Ok(())
    } else {
        let more = match missing.len() {
            1 => String::new(),
            n => format!(" (and {} more inputs the coordinator lacks)", n - 1),
        };
        Err(FetchError {
            reason: format!("{first_missing}{more}"),
            missing,
        })
    }
}

/// Removes the least recently used unpinned inputs until the cache is under its cap. Each is
/// removed under its per-path lock, and only if no build registered it again since it was
/// chosen (such a build found it present, or waits for the lock and then fetches it anew).
pub async fn evict_over_cap(cache: &InputCache, locks: &InputLocks) {
    remove_evicted(cache, locks, cache.take_over_cap()).await;
}

/// Removes `victims` (taken out of the cache's index) from the disk, but not one that a build
/// registered again meanwhile.
async fn remove_evicted(cache: &InputCache, locks: &InputLocks, victims: Vec<PathBuf>) {
    for path in victims {
        let lock = locks.lock_for(&path);
        let _guard = lock.lock().await;
        if cache.is_known(&path) {
            continue;
        }
        let p = path.clone();
        match blocking("evict an input", move || remove_tree(&p)).await {
            Ok(()) => {
                metrics::INPUTS_EVICTED.inc();
                tracing::info!(path = %path.display(), cache_bytes = cache.total(), cap = cache.cap(), "evicted an input from the cache");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = format!("{e:#}"), "failed to evict an input")
            }
        }
    }
    metrics::INPUT_CACHE_BYTES.set(cache.total());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::TcpListener;

    /// Pins down the cache on a real disk: after each use the least recently used unpinned
    /// inputs are removed from the store until the cache is under its cap; a pinned one stays
    /// whatever its age, and one a build registered again after it was chosen is not removed.
    #[tokio::test]
    async fn eviction_keeps_the_store_under_the_cap_least_recently_used_first() {
        let store = tempfile::tempdir().unwrap();
        let locks = InputLocks::default();
        let cache = InputCache::new(2_500);
        let path = |n: &str| store.path().join(format!("{n}-input"));
        let mut held = Vec::new();
        for name in ["a", "b", "c", "d"] {
            let p = path(name);
            std::fs::create_dir_all(p.join("bin")).unwrap();
            std::fs::write(p.join("bin/tool"), vec![7u8; 1_000]).unwrap();
            let pins = cache.pin([(p.clone(), 1_000)]);
            cache.present(&p);
            if name == "a" {
                held.push(pins); // a build still holds `a`
            }
            evict_over_cap(&cache, &locks).await;
            assert!(
                cache.total() <= cache.cap(),
                "{} after {name}",
                cache.total()
            );
        }
        let exists = |n: &str| std::fs::symlink_metadata(path(n)).is_ok();
        // a (pinned, oldest) stays; b then c, each the least recently used unpinned, went.
        assert!(exists("a") && !exists("b") && !exists("c") && exists("d"));
        let fetch = |name: &str, size: u64| {
            std::fs::create_dir_all(path(name)).unwrap();
            let pins = cache.pin([(path(name), size)]);
            cache.present(&path(name));
            pins
        };
        // Unpinned, `a` is the least recently used.
        drop(held);
        drop(fetch("e", 1_000));
        evict_over_cap(&cache, &locks).await;
        assert!(!exists("a") && exists("d") && exists("e"));
        // `d` used again: `e` is now the least recently used.
        drop(cache.pin([(path("d"), 1_000)]));
        drop(fetch("f", 1_000));
        evict_over_cap(&cache, &locks).await;
        assert!(exists("d") && !exists("e") && exists("f"));
        assert_eq!(cache.total(), 2_000);
        // A path chosen for eviction and registered again before its removal stays.
        drop(fetch("g", 5_000));
        let victims = cache.take_over_cap();
        assert_eq!(victims, vec![path("d"), path("f"), path("g")]);
        let _again = cache.pin([(path("g"), 5_000)]);
        remove_evicted(&cache, &locks, victims).await;
        assert!(
            exists("g"),
            "a path a build registered again is not removed"
        );
        assert!(
            !exists("d") && !exists("f"),
            "the other victims are removed"
        );
    }

    /// How the test server breaks the first answer after half the body.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Break {
        /// Close the connection (the client sees the body end early).
        Close,
        /// Keep the connection open and send nothing more (only the watchdog can tell).
        GoSilent,
    }

    /// A compressed NAR of incompressible data, with its `PathInfo`.
    fn input(store: &Path) -> (PathInfo, Vec<u8>, Vec<u8>) {
        let src = store.join("src-tree");
        std::fs::create_dir_all(&src).unwrap();
        let data: Vec<u8> = (0..1_500_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(src.join("data"), &data).unwrap();
        let mut nar = Vec::new();
        kiln::nar::dump(&src, &mut nar).unwrap();
        let zst = zstd::encode_all(nar.as_slice(), 1).unwrap();
        let h = |b: &[u8]| {
            let mut r = HashReader::new(b);
            std::io::copy(&mut r, &mut std::io::sink()).unwrap();
            r.finish()
        };
        let (nar_hash, nar_size) = h(&nar);
        let (file_hash, file_size) = h(&zst);
        let info = PathInfo {
            path: format!("{}/0123456789abcdfghijklmnpqrsvwxyz-input", store.display()),
            nar_hash,
            nar_size,
            file_hash,
            file_size,
            compression: "zstd".into(),
            url: "nar/input.nar.zst".into(),
            references: vec![],
        };
        (info, zst, data)
    }

    /// Serves `file`: the first answer breaks after half of it; later answers honour `Range`.
    /// Records the `Range` header of every request.
    async fn serve(
        listener: TcpListener,
        file: Vec<u8>,
        brk: Break,
        ranges: Arc<StdMutex<Vec<Option<String>>>>,
    ) {
        let mut first = true;
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let mut conn = BufReader::new(sock);
            let mut range = None;
            loop {
                let mut line = String::new();
                if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some(v) = l
                    .strip_prefix("range: ")
                    .or_else(|| l.strip_prefix("Range: "))
                {
                    range = Some(v.to_owned());
                }
            }
            ranges.lock().unwrap().push(range.clone());
            let len = file.len();
            if first {
                first = false;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                conn.get_mut().write_all(head.as_bytes()).await.unwrap();
                conn.get_mut().write_all(&file[..len / 2]).await.unwrap();
                conn.get_mut().flush().await.unwrap();
                match brk {
                    Break::Close => drop(conn),
                    Break::GoSilent => {
                        // Hold the connection open, silent, until the test ends.
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(300)).await;
                            drop(conn);
                        });
                    }
                }
                continue;
            }
            let start: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{len}\r\n\r\n",
                len - start,
                len - 1
            );
            conn.get_mut().write_all(head.as_bytes()).await.unwrap();
            conn.get_mut().write_all(&file[start..]).await.unwrap();
            conn.get_mut().flush().await.unwrap();
        }
    }

    async fn resumes_after(brk: Break) {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let (info, zst, data) = input(&store);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let ranges = Arc::new(StdMutex::new(Vec::new()));
        let server = tokio::spawn(serve(listener, zst.clone(), brk, ranges.clone()));
        let (tx, _rx) = mpsc::unbounded_channel();
        let identity = crate::client::Identity {
            name: "a1".into(),
            secret: "s".into(),
            systems: vec![],
            max_parallel_builds: 1,
            registration_token: None,
        };
        let mut c = Coordinator::new(&base, identity, Default::default(), tx).unwrap();
        c.set_transfer_stall(Duration::from_millis(1500));
        let store2 = store.clone();
        let fetched = tokio::time::timeout(
            Duration::from_secs(120),
            fetch_all(
                &c,
                &InputLocks::default(),
                &InputCache::new(u64::MAX),
                std::slice::from_ref(&info),
                |p| Ok(store2.join(Path::new(p).file_name().unwrap())),
            ),
        )
        .await
        .expect("the download ends well within 120 s");
        assert_eq!(fetched, Ok(()));
        let restored = std::fs::read(Path::new(&info.path).join("data")).unwrap();
        assert!(restored == data, "the restored input has the served bytes");
        let ranges = ranges.lock().unwrap().clone();
        assert_eq!(
            ranges,
            vec![None, Some(format!("bytes={}-", zst.len() / 2))],
            "one plain request, then one that resumes exactly where the first broke off"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_download_cut_half_way_resumes_with_range() {
        resumes_after(Break::Close).await;
    }

    #[tokio::test]
    async fn a_download_that_goes_silent_is_aborted_and_resumed_with_range() {
        resumes_after(Break::GoSilent).await;
    }
}
