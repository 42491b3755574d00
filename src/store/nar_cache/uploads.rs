//! Output uploads in progress: the partial files under `uploads/`, one slot per upload, and
//! the verifier that checks an upload while its bytes arrive.
//!
//! An upload is keyed by (build, attempt, output, file hash); its partial file
//! `uploads/<build>-<attempt>-<output>-<filehash>.part` holds the bytes received so far, and
//! its length is the resume offset. Each upload in progress has a [`Slot`]:
//!
//! - a lock, so requests for one upload never interleave bytes;
//! - a turn counter: every `PUT` that arrives raises it, and the request holding the lock lets
//!   go at once (answering 409 `upload_superseded`). A half-open connection (a blackholed
//!   link, whose server side does not know the client is gone) thus never blocks the resumed
//!   request behind it for a whole stall timeout;
//! - a verifier: one thread that appends the arriving bytes to the partial file and, in the
//!   same pass, computes the FileHash and decompresses the zstd stream into the NAR validator
//!   (NarHash, NarSize). When the last byte arrives, verification is already done but for the
//!   tail, so it never outlives the agent's read timeout. After a coordinator restart, a new
//!   verifier first reads the partial file from disk (at disk speed), then carries on with the
//!   new bytes. A stream that is not zstd or not a NAR fails as soon as that is known, not
//!   after the last byte.
//!
//! Memory per upload is bounded: the channel holds at most [`CHANNEL_CHUNKS`] chunks, and the
//! zstd window is at most 2^[`WINDOW_LOG_MAX`] bytes.
//!
//! Slots and partial files nobody resumes are removed by [`Uploads::sweep`] once unused for the
//! partial-upload expiry, and by [`Uploads::sweep_at_start`]; a new upload of the same build
//! output (another attempt, another file hash) replaces the older partial file. So neither the
//! slot map nor `uploads/` grows without bound.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};

use super::{UploadError, UploadKey};
use crate::derivation::Hash;

/// Chunks buffered between the HTTP handler and the verifier.
const CHANNEL_CHUNKS: usize = 8;
/// Largest zstd window accepted in an upload (2^27 = 128 MiB, zstd's own default limit).
pub const WINDOW_LOG_MAX: u32 = 27;
/// Start the kernel's write-back every this many bytes, so the fsync after the last byte has
/// little left to write.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// What the verifier found in a complete upload.
#[derive(Debug, Clone)]
pub struct Verified {
    pub file_hash: Hash,
    pub file_size: u64,
    pub nar_hash: Hash,
    pub nar_size: u64,
}

/// Why a request stopped reading its body before the end of the file.
#[derive(Debug)]
pub enum Stop {
    /// The body ended (the client sent what it meant to send).
    End,
    Stalled,
    Superseded,
    Broken(String),
}

enum Msg {
    Data(bytes::Bytes),
    /// Answer with the number of bytes in the file once every earlier chunk is written.
    Sync(oneshot::Sender<u64>),
    /// The file is complete: finish the verification.
    End,
}

/// The verifier thread of one upload, as its slot holds it.
struct Worker {
    tx: mpsc::Sender<Msg>,
    /// Bytes in the partial file (written by the verifier thread).
    written: Arc<AtomicU64>,
    /// Whether any chunk was handed over (until then `written` is exact without a sync).
    sent_any: bool,
    done: oneshot::Receiver<Result<Verified, UploadError>>,
}

/// One upload in progress.
struct Slot {
    /// Raised by every request that wants this upload; the holder of `worker` lets go when it
    /// changes.
    turn: watch::Sender<u64>,
    /// The lock that serializes requests, and the verifier it guards (None until the first
    /// `PUT`, and after a failure).
    worker: tokio::sync::Mutex<Option<Worker>>,
    /// When a request last touched it (ms since the epoch), for expiry.
    last_used_ms: AtomicU64,
}

pub struct Uploads {
    dir: PathBuf,
    stall: Duration,
    expiry: Duration,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

fn now_ms() -> u64 {
    crate::store::now_ms()
}

impl Uploads {
    pub fn new(dir: PathBuf, stall: Duration, expiry: Duration) -> Uploads {
        Uploads {
            dir,
            stall,
            expiry,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_timeouts(&mut self, stall: Duration, expiry: Duration) {
        self.stall = stall;
        self.expiry = expiry;
    }

    pub fn stall(&self) -> Duration {
        self.stall
    }

    pub fn expiry(&self) -> Duration {
        self.expiry
    }

    pub fn part_path(&self, key: &UploadKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// Bytes received so far (the partial file's length; 0 when there is none).
    pub fn received(&self, key: &UploadKey) -> u64 {
        std::fs::metadata(self.part_path(key))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Slots alive (uploads in progress or waiting to be resumed).
    pub fn slot_count(&self) -> usize {
        self.lock_slots().len()
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, key: &UploadKey) -> Arc<Slot> {
        let name = key.file_name();
        let mut slots = self.lock_slots();
        if let Some(s) = slots.get(&name) {
            s.last_used_ms.store(now_ms(), Ordering::Relaxed);
            return s.clone();
        }
        let s = Arc::new(Slot {
            turn: watch::channel(0).0,
            worker: tokio::sync::Mutex::new(None),
            last_used_ms: AtomicU64::new(now_ms()),
        });
        slots.insert(name, s.clone());
        drop(slots);
        self.supersede_others(key);
        s
    }

    /// Whether `slot` is still the slot of `key` (not removed since it was taken).
    fn is_current(&self, key: &UploadKey, slot: &Arc<Slot>) -> bool {
        self.lock_slots()
            .get(&key.file_name())
            .is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    /// Removes the slot and the partial file of an upload that is done (verified or failed).
    pub fn forget(&self, key: &UploadKey) {
        let name = key.file_name();
        self.lock_slots().remove(&name);
        remove_quietly(&self.dir.join(&name));
    }

    /// A new upload of a build output makes the older partial files of that build output
    /// (another attempt, another file hash) useless: remove those nobody is sending.
    fn supersede_others(&self, key: &UploadKey) {
        let mine = key.file_name();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((build, _attempt, output)) = parse_part_name(&name) else {
                continue;
            };
            if name == mine || build != key.build_id || output != key.output {
                continue;
            }
            if self.remove_if_idle(&name) {
                tracing::info!(part = %name, replaced_by = %mine, "removed a superseded partial upload");
            }
        }
    }

    /// Removes a slot (if any) and its partial file, unless a request is using the slot.
    fn remove_if_idle(&self, name: &str) -> bool {
        let mut slots = self.lock_slots();
        if let Some(s) = slots.get(name) {
            if s.worker.try_lock().is_err() {
                return false;
            }
            slots.remove(name);
        }
        drop(slots);
        remove_quietly(&self.dir.join(name));
        true
    }

    /// Appends a body at `offset` (which must be the number of bytes received), feeding the
    /// verifier. Returns how much the file holds, and the verification once it is complete.
    pub async fn receive<S, E>(
        &self,
        key: &UploadKey,
        offset: u64,
        mut body: S,
    ) -> Result<(u64, Option<Verified>), UploadError>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt as _;
        let slot = self.slot(key);
        // Take the turn before waiting for the lock: whoever holds it lets go.
        slot.turn.send_modify(|t| *t += 1);
        let mut turn = slot.turn.subscribe();
        turn.mark_unchanged();
        let mut guard = slot.worker.lock().await;
        if !self.is_current(key, &slot) {
            // The upload ended (verified, refused, expired) while this request waited: it has
            // nothing left to append to. The client asks for the status again.
            return Err(UploadError::Superseded);
        }
        slot.last_used_ms.store(now_ms(), Ordering::Relaxed);
        if guard.is_none() {
            *guard = Some(spawn_worker(self.part_path(key))?);
        }
        let worker = guard.as_mut().ok_or_else(|| {
            UploadError::Commit("the upload's verifier is missing after its start".into())
        })?;
        // Every chunk an earlier request handed over is written before the offset is judged
        // (that request may have been dropped with chunks still queued).
        // (A verifier that was never sent a chunk may still be reading the partial file from
        // disk after a restart: its count is exact already, and waiting would stall the body.)
        let known = if worker.sent_any {
            synced(worker).await
        } else {
            Some(worker.written.load(Ordering::SeqCst))
        };
        let Some(mut received) = known else {
            let err = verifier_failure(guard.take()).await;
            drop(guard);
            self.forget(key);
            return Err(err);
        };
        if offset != received {
            return Err(UploadError::Offset { offset, received });
        }
        let stop = loop {
            let next = tokio::select! {
                biased;
                _ = turn.changed() => break Stop::Superseded,
                n = tokio::time::timeout(self.stall, body.next()) => n,
            };
            let chunk = match next {
                Err(_) => break Stop::Stalled,
                Ok(None) => break Stop::End,
                Ok(Some(Err(e))) => break Stop::Broken(e.to_string()),
                Ok(Some(Ok(c))) => c,
            };
            received += chunk.len() as u64;
            if received > key.file_size {
                drop(guard.take());
                drop(guard);
                self.forget(key);
                return Err(UploadError::TooLarge(key.file_size));
            }
            metrics::counter!("kiln_upload_bytes_total").increment(chunk.len() as u64);
            worker.sent_any = true;
            if worker.tx.send(Msg::Data(chunk)).await.is_err() {
                // The verifier refused the stream (not zstd, not a NAR): say why.
                let err = verifier_failure(guard.take()).await;
                drop(guard);
                self.forget(key);
                return Err(err);
            }
        };
        slot.last_used_ms.store(now_ms(), Ordering::Relaxed);
        // Everything read is written before the answer says how much arrived.
        let Some(written) = synced(worker).await else {
            let err = verifier_failure(guard.take()).await;
            drop(guard);
            self.forget(key);
            return Err(err);
        };
        match stop {
            Stop::End => {}
            Stop::Stalled => {
                tracing::warn!(part = %key.file_name(), received = written, stall_ms = self.stall.as_millis() as u64, "upload body stalled; dropped the request, kept the bytes");
                metrics::counter!("kiln_transfer_stalls_total").increment(1);
                return Err(UploadError::Stalled(self.stall));
            }
            Stop::Superseded => return Err(UploadError::Superseded),
            Stop::Broken(e) => return Err(UploadError::Body(e)),
        }
        if written < key.file_size {
            return Ok((written, None));
        }
        // Sending End cannot fail for lack of room: the Sync above emptied the channel (if the
        // verifier is gone, its result says why).
        let done = guard.take().inspect(|w| {
            let _ = w.tx.try_send(Msg::End);
        });
        let result = match done {
            Some(w) => w.done.await.unwrap_or_else(|_| {
                Err(UploadError::Commit("the upload's verifier stopped".into()))
            }),
            None => Err(UploadError::Commit(
                "the upload's verifier is missing".into(),
            )),
        };
        drop(guard);
        match result {
            Ok(v) => Ok((written, Some(v))),
            Err(e) => {
                self.forget(key);
                Err(e)
            }
        }
    }

    /// Removes partial uploads nobody used for the expiry, with their slots; and any other file
    /// in `uploads/` (temporary files of source uploads) older than that. Blocking.
    pub fn sweep(&self) -> usize {
        let expired_before = now_ms().saturating_sub(self.expiry.as_millis() as u64);
        let mut removed = 0;
        let stale: Vec<String> = self
            .lock_slots()
            .iter()
            .filter(|(_, s)| s.last_used_ms.load(Ordering::Relaxed) < expired_before)
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if self.remove_if_idle(&name) {
                tracing::info!(part = %name, "removed a partial upload nobody resumed");
                removed += 1;
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return removed;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if self.lock_slots().contains_key(&name) {
                continue;
            }
            if modified_ms(&e.path()).is_some_and(|m| m < expired_before) {
                remove_quietly(&e.path());
                tracing::info!(file = %name, "removed an abandoned upload file");
                removed += 1;
            }
        }
        removed
    }

    /// At start no request is in flight: remove partial uploads older than the expiry and
    /// every other file in `uploads/` (temporaries of source uploads cut by a crash). Partial
    /// uploads younger than that stay, to be resumed. Blocking.
    pub fn sweep_at_start(&self) -> usize {
        let expired_before = now_ms().saturating_sub(self.expiry.as_millis() as u64);
        let mut removed = 0;
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let resumable = parse_part_name(&name).is_some()
                && modified_ms(&e.path()).is_some_and(|m| m >= expired_before);
            if !resumable {
                remove_quietly(&e.path());
                tracing::info!(file = %name, "removed an abandoned upload file at start");
                removed += 1;
            }
        }
        removed
    }
}

/// The number of bytes in the partial file once every chunk sent before is written; `None`
/// when the verifier has stopped (its result says why).
async fn synced(worker: &Worker) -> Option<u64> {
    let (tx, rx) = oneshot::channel();
    worker.tx.send(Msg::Sync(tx)).await.ok()?;
    rx.await.ok()
}

/// The error a failed verifier left, once its thread has ended.
async fn verifier_failure(worker: Option<Worker>) -> UploadError {
    match worker {
        Some(w) => match w.done.await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => UploadError::Commit("the upload's verifier ended early".into()),
            Err(_) => UploadError::Commit("the upload's verifier stopped".into()),
        },
        None => UploadError::Commit("the upload's verifier is missing".into()),
    }
}

fn modified_ms(p: &Path) -> Option<u64> {
    let m = std::fs::metadata(p).ok()?.modified().ok()?;
    Some(m.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis() as u64)
}

fn remove_quietly(p: &Path) {
    if let Err(e) = std::fs::remove_file(p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %p.display(), error = %e, "failed to remove an upload file");
        }
    }
}

/// `(build, attempt, output)` of a partial file name `<build>-<attempt>-<output>-<hash>.part`.
pub fn parse_part_name(name: &str) -> Option<(u64, u32, String)> {
    let stem = name.strip_suffix(".part")?;
    // The hash is 52 nix-base32 characters; the output name may contain '-'.
    let (rest, hash) = stem.rsplit_once('-')?;
    if hash.len() != 52 {
        return None;
    }
    let (build, rest) = rest.split_once('-')?;
    let (attempt, output) = rest.split_once('-')?;
    Some((
        build.parse().ok()?,
        attempt.parse().ok()?,
        output.to_string(),
    ))
}

/// Starts the verifier of the partial file at `part` (created if missing).
fn spawn_worker(part: PathBuf) -> Result<Worker, UploadError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)?;
    let existing = out.metadata()?.len();
    let catchup = std::fs::File::open(&part)?;
    let written = Arc::new(AtomicU64::new(existing));
    let abandoned = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let (done_tx, done) = oneshot::channel();
    let reader = PartReader {
        catchup,
        catchup_left: existing,
        out,
        rx,
        written: written.clone(),
        pending: bytes::Bytes::new(),
        ended: false,
        unsynced: 0,
        abandoned: abandoned.clone(),
    };
    std::thread::Builder::new()
        .name("kiln-upload".into())
        .spawn(move || {
            let _ = done_tx.send(verify(reader, &abandoned));
        })?;
    Ok(Worker {
        tx,
        written,
        sent_any: false,
        done,
    })
}

/// The verifier: FileHash over the compressed bytes, zstd, then the NAR validator. Ends with
/// the partial file fsynced.
fn verify(reader: PartReader, abandoned: &AtomicBool) -> Result<Verified, UploadError> {
    let hashing = crate::nar::HashingReader::new(reader);
    let mut decoder = zstd::stream::read::Decoder::new(hashing)
        .map_err(|e| UploadError::HashMismatch(format!("cannot start zstd: {e}")))?;
    decoder
        .window_log_max(WINDOW_LOG_MAX)
        .map_err(|e| UploadError::HashMismatch(format!("cannot set the zstd window: {e}")))?;
    let summary = crate::nar::validate(&mut decoder).map_err(|e| {
        if abandoned.load(Ordering::SeqCst) {
            UploadError::Commit("the upload was abandoned".into())
        } else {
            UploadError::HashMismatch(format!(
                "the upload is not a zstd-compressed NAR ({}): it was discarded; upload it again",
                error_chain(&e)
            ))
        }
    })?;
    // validate read the decompressed stream to its end; read what zstd left (nothing, in a
    // well-formed file) so the FileHash covers every byte.
    let mut hashing = decoder.finish().into_inner();
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| {
        UploadError::HashMismatch(format!("the upload has bytes after its zstd frames: {e}"))
    })?;
    let (reader, file_hash, file_size) = hashing.finish();
    reader.out.sync_all()?;
    Ok(Verified {
        file_hash,
        file_size,
        nar_hash: summary.nar_hash,
        nar_size: summary.nar_size,
    })
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The compressed stream as the verifier reads it: first the bytes already in the partial
/// file (after a restart), then each chunk as it arrives, appended to the file as it passes.
struct PartReader {
    catchup: std::fs::File,
    catchup_left: u64,
    out: std::fs::File,
    rx: mpsc::Receiver<Msg>,
    written: Arc<AtomicU64>,
    pending: bytes::Bytes,
    ended: bool,
    unsynced: u64,
    /// Set when the slot went away before the end (expired, superseded, failed): the
    /// verifier's error then means nothing.
    abandoned: Arc<AtomicBool>,
}

impl PartReader {
    fn append(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.out.write_all(chunk)?;
        let total =
            self.written.fetch_add(chunk.len() as u64, Ordering::SeqCst) + chunk.len() as u64;
        self.unsynced += chunk.len() as u64;
        if self.unsynced >= WRITEBACK_EVERY {
            start_writeback(&self.out, total - self.unsynced, self.unsynced);
            self.unsynced = 0;
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(f: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: sync_file_range on a file descriptor we own; it only starts write-back of the
    // range and touches no memory of ours. A failure only means the final fsync does more.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &std::fs::File, _: u64, _: u64) {}

impl Read for PartReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.catchup_left > 0 {
            let want = buf
                .len()
                .min(self.catchup_left.min(usize::MAX as u64) as usize);
            let n = self.catchup.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::Error::other("the partial file shrank while read"));
            }
            self.catchup_left -= n as u64;
            return Ok(n);
        }
        while self.pending.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Msg::Data(chunk)) => {
                    self.append(&chunk)?;
                    self.pending = chunk;
                }
                Some(Msg::Sync(reply)) => {
                    let _ = reply.send(self.written.load(Ordering::SeqCst));
                }
                Some(Msg::End) => self.ended = true,
                None => {
                    self.abandoned.store(true, Ordering::SeqCst);
                    return Err(std::io::Error::other("the upload was abandoned"));
                }
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_parse_with_dashes_in_the_output() {
        let h = "1".repeat(52);
        assert_eq!(
            parse_part_name(&format!("7-2-out-{h}.part")),
            Some((7, 2, "out".into()))
        );
        assert_eq!(
            parse_part_name(&format!("7-2-dev-doc-{h}.part")),
            Some((7, 2, "dev-doc".into()))
        );
        assert_eq!(parse_part_name("src-0123.nar"), None);
        assert_eq!(parse_part_name(&format!("x-2-out-{h}.part")), None);
        assert_eq!(parse_part_name("7-2-out-short.part"), None);
    }
}
