//! The NAR cache under the state dir, laid out so nginx can serve it as is:
//! `cache/nix-cache-info`, `cache/<hash>.narinfo`, `cache/nar/<filehash>.nar.zst`. Also the
//! upload spool (`uploads/`, resumable: an upload is keyed by build, attempt, output and file
//! hash, and its partial file's length is how much arrived; see [`uploads`]) and build logs
//! (`logs/`, see [`logs`]).
//!
//! An uploaded NAR is made available only after its FileHash and NarHash are checked (while
//! its bytes arrive); the `nar_files` record is committed after the file is in place, and a
//! narinfo is written last. An uploaded source is accepted only under the store path its own
//! NAR, name and references give ([`crate::nar::ca`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use thiserror::Error;

use super::records::{NarFileRecord, OutputRecord};
use super::{now_ms, Batch, Committer, Store, StoreError, TreeId};
use crate::derivation::store_path::{StoreDir, StorePath};
use crate::derivation::Hash;
use crate::nar::narinfo::NarInfo;
use crate::nar::signing::SecretKey;
use crate::protocol::UploadStatus;

pub mod logs;
pub mod uploads;

pub use logs::LogLimits;

#[derive(Debug, Error)]
pub enum UploadError {
    #[error("upload offset {offset} does not match the {received} bytes received so far: resend from {received}")]
    Offset { offset: u64, received: u64 },
    #[error("upload is larger than its declared file size {0}")]
    TooLarge(u64),
    #[error("no bytes of the body arrived for {} ms (timeouts.transfer_stall_ms): the request was dropped and the bytes received are kept; ask for the upload status and resume", .0.as_millis())]
    Stalled(Duration),
    #[error(
        "a newer request for this upload took over: ask for the upload status and resume from it"
    )]
    Superseded,
    #[error("the build log decompresses to more than {0} bytes (limits.log_decompressed_mb): it was not stored; shorten the log or raise the limit")]
    LogTooLarge(u64),
    #[error("{0}")]
    HashMismatch(String),
    #[error("{0}")]
    WrongSourcePath(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the upload body broke off: {0}")]
    Body(String),
    #[error("I/O error in the NAR cache: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Commit(String),
}

/// Identifies one upload.
#[derive(Debug, Clone)]
pub struct UploadKey {
    pub build_id: u64,
    pub attempt: u32,
    pub output: String,
    pub file_hash: Hash,
    pub file_size: u64,
}

impl UploadKey {
    fn file_name(&self) -> String {
        format!(
            "{}-{}-{}-{}.part",
            self.build_id,
            self.attempt,
            self.output,
            self.file_hash.to_base32()
        )
    }
}

/// The relative URL of a compressed NAR, from its `sha256:<base32>` file hash.
pub fn nar_url(file_hash: &str) -> String {
    let b32 = file_hash.split_once(':').map_or(file_hash, |(_, h)| h);
    format!("nar/{b32}.nar.zst")
}

/// Valid Nix output names: letters, digits and `+-._?=`, not starting with a dot.
pub fn valid_output_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with('.')
        && n.len() <= 64
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

pub struct NarCache {
    root: PathBuf,
    store: Store,
    committer: Committer,
    key: Option<SecretKey>,
    /// Output uploads in progress: their partial files, locks and verifiers.
    uploads: uploads::Uploads,
}

/// Default of `timeouts.transfer_stall_ms`.
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);
/// Default of `timeouts.partial_upload_expiry_ms`.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(24 * 3600);

impl NarCache {
    pub fn new(
        state_dir: &Path,
        store: Store,
        committer: Committer,
        key: Option<SecretKey>,
    ) -> std::io::Result<NarCache> {
        for d in ["cache/nar", "uploads", "logs"] {
            std::fs::create_dir_all(state_dir.join(d))?;
        }
        Ok(NarCache {
            root: state_dir.to_path_buf(),
            store,
            committer,
            key,
            uploads: uploads::Uploads::new(
                state_dir.join("uploads"),
                DEFAULT_STALL,
                DEFAULT_EXPIRY,
            ),
        })
    }

    /// Sets the stall timeout of request bodies and the expiry of partial uploads nobody
    /// resumes (`timeouts.transfer_stall_ms`, `timeouts.partial_upload_expiry_ms`).
    pub fn with_transfer_timeouts(mut self, stall: Duration, expiry: Duration) -> NarCache {
        self.uploads.set_timeouts(stall, expiry);
        self
    }

    /// The stall timeout of request bodies.
    pub fn stall(&self) -> Duration {
        self.uploads.stall()
    }

    /// Removes what a crash left: partial uploads older than the expiry, temporary files of
    /// source uploads, logs and narinfos. Call before serving. Blocking.
    pub fn sweep_at_start(&self) -> usize {
        let mut removed = self.uploads.sweep_at_start();
        for dir in [
            self.root.join("logs"),
            self.cache_dir(),
            self.cache_dir().join("nar"),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Removes partial uploads (and their slots) nobody used for the expiry. Blocking.
    pub fn sweep_uploads(&self) -> usize {
        let n = self.uploads.sweep();
        metrics::gauge!("kiln_upload_slots").set(self.uploads.slot_count() as f64);
        n
    }

    /// How often [`NarCache::sweep_uploads`] should run: a quarter of the expiry, between
    /// 100 ms and a minute.
    pub fn sweep_interval(&self) -> Duration {
        (self.uploads.expiry() / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
    }

    /// Uploads in progress or waiting to be resumed (their slots in memory).
    pub fn upload_slots(&self) -> usize {
        self.uploads.slot_count()
    }

    fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// The file behind `/nar/<name>`, if `name` is a well-formed NAR file name (no traversal).
    pub fn nar_file(&self, name: &str) -> Option<PathBuf> {
        let stem = name.strip_suffix(".nar.zst")?;
        let ok = stem.len() == 52
            && stem
                .bytes()
                .all(|c| crate::derivation::base32::char_value(c).is_some());
        ok.then(|| self.cache_dir().join("nar").join(name))
    }

    /// Write `cache/nix-cache-info` for a store dir.
    pub fn write_cache_info(&self, store_dir: &str) -> std::io::Result<()> {
        atomic_write(
            &self.cache_dir().join("nix-cache-info"),
            cache_info(store_dir).as_bytes(),
        )
    }

    pub fn log_path(&self, build_id: u64, attempt: u32) -> PathBuf {
        self.root
            .join("logs")
            .join(format!("{build_id}-{attempt}.log.zst"))
    }

    /// The record of a verified upload whose file is in the cache. A record whose file is
    /// gone (deleted, lost to a disk fault) does not count: the file is uploaded again, as
    /// when a lost input is built again (docs/runtime-semantics.md, "Lost inputs").
    fn verified(&self, file_hash: &Hash) -> Result<Option<NarFileRecord>, StoreError> {
        let r: Option<NarFileRecord> = self
            .store
            .get(TreeId::NarFiles, file_hash.to_nix_string().as_bytes())?;
        Ok(r.filter(|_| {
            self.cache_dir()
                .join("nar")
                .join(format!("{}.nar.zst", file_hash.to_base32()))
                .exists()
        }))
    }

    /// How much of an upload arrived.
    pub fn upload_status(&self, key: &UploadKey) -> Result<UploadStatus, UploadError> {
        if let Some(r) = self.verified(&key.file_hash)? {
            return Ok(UploadStatus {
                received: r.file_size,
                verified: true,
                nar_hash: Some(r.nar_hash),
                nar_size: Some(r.nar_size),
            });
        }
        Ok(UploadStatus {
            received: self.uploads.received(key),
            verified: false,
            nar_hash: None,
            nar_size: None,
        })
    }

    /// Append a body at `offset`; once the whole file is there (and verified while it
    /// arrived), store it. A file already verified is answered at once, its body unread.
    pub async fn receive<S, E>(
        &self,
        key: &UploadKey,
        offset: u64,
        body: S,
    ) -> Result<UploadStatus, UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if let Some(r) = self.verified(&key.file_hash)? {
            return Ok(UploadStatus {
                received: r.file_size,
                verified: true,
                nar_hash: Some(r.nar_hash),
                nar_size: Some(r.nar_size),
            });
        }
        let received = self.uploads.receive(key, offset, body).await;
        metrics::gauge!("kiln_upload_slots").set(self.uploads.slot_count() as f64);
        let (received, verified) = received?;
        let Some(v) = verified else {
            return Ok(UploadStatus {
                received,
                verified: false,
                nar_hash: None,
                nar_size: None,
            });
        };
        if v.file_hash != key.file_hash {
            self.uploads.forget(key);
            return Err(UploadError::HashMismatch(format!(
                "the uploaded file hashes to {}, not the declared FileHash {}: it was discarded; upload it again",
                v.file_hash, key.file_hash
            )));
        }
        let dest = self
            .cache_dir()
            .join("nar")
            .join(format!("{}.nar.zst", key.file_hash.to_base32()));
        // The verifier fsynced the file: it is on disk before the record that makes it
        // available is committed.
        tokio::fs::rename(self.uploads.part_path(key), &dest).await?;
        self.uploads.forget(key);
        let rec = NarFileRecord {
            file_size: v.file_size,
            nar_hash: v.nar_hash.to_nix_string(),
            nar_size: v.nar_size,
            created_ms: now_ms(),
        };
        let mut b = Batch::new();
        b.put(
            TreeId::NarFiles,
            key.file_hash.to_nix_string().as_bytes(),
            &rec,
        )?;
        self.committer
            .commit(b)
            .await
            .map_err(|e| UploadError::Commit(e.to_string()))?;
        Ok(UploadStatus {
            received,
            verified: true,
            nar_hash: Some(rec.nar_hash),
            nar_size: Some(rec.nar_size),
        })
    }

    /// Receive an input source as an uncompressed NAR; verify it against `nar_hash` and check
    /// that `path` is the store path a store would give it (see [`SourceClaim`]), compress it
    /// into the cache and make the path available.
    pub async fn receive_source<S, E>(
        &self,
        claim: SourceClaim,
        nar_hash: &Hash,
        limit: u64,
        mut body: S,
    ) -> Result<OutputRecord, UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp = self
            .root
            .join("uploads")
            .join(format!("src-{}.nar", random_suffix()));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut size = 0u64;
        let stall = self.stall();
        loop {
            let chunk = match tokio::time::timeout(stall, body.next()).await {
                Ok(None) => break,
                Ok(Some(Ok(c))) => c,
                Ok(Some(Err(e))) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(UploadError::Body(e.to_string()));
                }
                Err(_) => {
                    let _ = std::fs::remove_file(&tmp);
                    metrics::counter!("kiln_transfer_stalls_total").increment(1);
                    return Err(UploadError::Stalled(stall));
                }
            };
            size += chunk.len() as u64;
            if size > limit {
                drop(file);
                let _ = std::fs::remove_file(&tmp);
                return Err(UploadError::BadRequest(format!(
                    "source NAR is larger than the limit of {limit} bytes (limits.source_nar_mb)"
                )));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        drop(file);
        let (t, want, cache) = (tmp.clone(), nar_hash.clone(), self.cache_dir());
        let path = claim.store_dir.full_path(&claim.path);
        let references: Vec<String> = claim
            .references
            .iter()
            .map(|r| claim.store_dir.full_path(r))
            .collect();
        let done = tokio::task::spawn_blocking(move || compress_source(&t, &want, &cache, &claim))
            .await
            .map_err(|e| UploadError::Commit(e.to_string()));
        let _ = std::fs::remove_file(&tmp);
        let (file_hash, file_size, nar_size) = done??;
        let path = path.as_str();
        let rec = OutputRecord {
            path: path.to_string(),
            nar_hash: nar_hash.to_nix_string(),
            nar_size,
            file_hash: file_hash.to_nix_string(),
            file_size,
            references,
            deriver: String::new(),
            system: String::new(),
            build_id: 0,
            created_ms: now_ms(),
        };
        let hash_part = super::keys::output_key(path);
        let mut b = Batch::new();
        b.put(
            TreeId::NarFiles,
            rec.file_hash.as_bytes(),
            &NarFileRecord {
                file_size,
                nar_hash: rec.nar_hash.clone(),
                nar_size,
                created_ms: rec.created_ms,
            },
        )?;
        b.put(TreeId::Outputs, hash_part.as_bytes(), &rec)?;
        b.event("source-added", 0, 0, serde_json::json!({"path": path}));
        self.committer
            .commit(b)
            .await
            .map_err(|e| UploadError::Commit(e.to_string()))?;
        self.write_narinfos(std::slice::from_ref(&rec))?;
        Ok(rec)
    }

    /// The references a verified output NAR (by its `sha256:<base32>` FileHash) holds among
    /// `candidates` (full store paths): the paths whose 32-character hash part appears in its
    /// NAR, as Nix's `RefScanSink` finds them. `None` if no verified file has that hash. Reads
    /// and decompresses the whole file: blocking.
    pub fn scan_references(
        &self,
        file_hash: &str,
        candidates: &[String],
    ) -> Result<Option<std::collections::BTreeSet<String>>, UploadError> {
        let Some(file) = self.nar_file(nar_url(file_hash).trim_start_matches("nar/")) else {
            return Ok(None);
        };
        let f = match std::fs::File::open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let by_hash: std::collections::BTreeMap<&str, &String> = candidates
            .iter()
            .filter_map(|p| Some((p.rsplit('/').next()?.get(..32)?, p)))
            .collect();
        let mut scanner = crate::nar::refs::RefScanner::new(by_hash.keys().map(|h| h.to_string()));
        let mut dec = zstd::stream::read::Decoder::new(std::io::BufReader::new(f))?;
        std::io::copy(&mut dec, &mut scanner)?;
        Ok(Some(
            scanner
                .into_found()
                .iter()
                .filter_map(|h| by_hash.get(h.as_str()).map(|p| (*p).clone()))
                .collect(),
        ))
    }

    /// The narinfo of an available path, signed if a key is configured.
    pub fn narinfo(&self, o: &OutputRecord) -> Result<NarInfo, UploadError> {
        let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
        let parse = |h: &str| {
            h.parse::<Hash>()
                .map_err(|e| UploadError::Commit(format!("stored hash {h:?} does not parse: {e}")))
        };
        let mut refs: Vec<String> = o.references.iter().map(|r| base(r)).collect();
        refs.sort();
        let mut ni = NarInfo {
            store_path: o.path.clone(),
            url: nar_url(&o.file_hash),
            compression: "zstd".into(),
            file_hash: Some(parse(&o.file_hash)?),
            file_size: Some(o.file_size),
            nar_hash: parse(&o.nar_hash)?,
            nar_size: o.nar_size,
            references: refs,
            deriver: (!o.deriver.is_empty()).then(|| base(&o.deriver)),
            system: (!o.system.is_empty()).then(|| o.system.clone()),
            sigs: Vec::new(),
            ca: None,
        };
        if let Some(k) = &self.key {
            ni.sign(k)
                .map_err(|e| UploadError::Commit(format!("cannot sign narinfo: {e}")))?;
        }
        Ok(ni)
    }

    /// Write `cache/<hash>.narinfo` for each output (atomically).
    pub fn write_narinfos(&self, outputs: &[OutputRecord]) -> Result<(), UploadError> {
        for o in outputs {
            let ni = self.narinfo(o)?;
            let hash_part = super::keys::output_key(&o.path);
            // No fsync per file: sled's `outputs` record is the source of truth (narinfos are
            // served from it), and a file lost or left empty by a crash is rewritten at the
            // next start (`repair_narinfos`).
            atomic_write_unsynced(
                &self.cache_dir().join(format!("{hash_part}.narinfo")),
                ni.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// Rewrite narinfo files that are missing (a crash between commit and write).
    pub fn repair_narinfos(&self) -> Result<usize, UploadError> {
        let mut n = 0;
        for r in self.store.scan::<OutputRecord>(TreeId::Outputs) {
            let (k, o) = r?;
            let f = self
                .cache_dir()
                .join(format!("{}.narinfo", String::from_utf8_lossy(&k)));
            if std::fs::metadata(&f).map_or(true, |m| m.len() == 0) {
                self.write_narinfos(std::slice::from_ref(&o))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Store a build log (zstd-compressed bytes as the agent sent them), after checking by
    /// streaming that it decompresses within `limits.decompressed`.
    pub async fn receive_log<S, E>(
        &self,
        build_id: u64,
        attempt: u32,
        limits: LogLimits,
        body: S,
    ) -> Result<(), UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        logs::receive(&self.log_path(build_id, attempt), limits, body).await
    }

    /// A stored log, decompressed as it is read (bounded memory for any ratio).
    pub async fn log_stream(
        &self,
        build_id: u64,
        attempt: u32,
    ) -> std::io::Result<impl Stream<Item = Result<bytes::Bytes, std::io::Error>>> {
        logs::stream(self.log_path(build_id, attempt)).await
    }
}

pub fn cache_info(store_dir: &str) -> String {
    format!("StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: 40\n")
}

pub(crate) fn random_suffix() -> String {
    use rand::RngCore as _;
    format!("{:016x}", rand::thread_rng().next_u64())
}

/// [`atomic_write`] without the fsync: for files that can be rebuilt from sled.
pub fn atomic_write_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", random_suffix()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Write a file via a temporary name and a rename, so readers never see half of it.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", random_suffix()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// What an uploader says a source is: its store path (in the served store dir) and the store
/// paths it references.
#[derive(Debug, Clone)]
pub struct SourceClaim {
    pub store_dir: StoreDir,
    pub path: StorePath,
    pub references: Vec<StorePath>,
}

/// Refuse a source whose claimed path is not one a store gives this NAR, name and references
/// (`nix-store --add`, `builtins.toFile`, a flat fixed-output addition). The NAR is valid.
fn check_source_path(tmp: &Path, nar_hash: &Hash, claim: &SourceClaim) -> Result<(), UploadError> {
    use crate::nar::ca;
    let flat = ca::flat_file(&mut std::io::BufReader::new(std::fs::File::open(tmp)?))?;
    let cands = ca::candidates(
        &claim.store_dir,
        claim.path.name(),
        nar_hash,
        flat.as_ref(),
        &claim.references,
        Some(&claim.path),
    )
    .map_err(|e| UploadError::BadRequest(format!("source name {:?}: {e}", claim.path.name())))?;
    if cands.iter().any(|c| c.path == claim.path) {
        return Ok(());
    }
    let sd = &claim.store_dir;
    let should: Vec<String> = cands
        .iter()
        .map(|c| {
            let how = match c.kind {
                ca::CaKind::Source => "added recursively (nix-store --add)",
                ca::CaKind::Text => "a text file with these references (builtins.toFile)",
                ca::CaKind::Flat => "a flat file (nix-store --add-fixed sha256)",
            };
            format!("{} ({how})", sd.full_path(&c.path))
        })
        .collect();
    let refs: Vec<String> = claim.references.iter().map(|r| sd.full_path(r)).collect();
    Err(UploadError::WrongSourcePath(format!(
        "source {} is not the store path of its contents: with references [{}] a store names \
         this NAR {}; upload it under its own path, or list the references it was added with",
        sd.full_path(&claim.path),
        refs.join(", "),
        should.join(" or ")
    )))
}

/// Validate an uncompressed source NAR against its claimed hash and path and compress it into
/// the cache. Returns (FileHash, FileSize, NarSize).
fn compress_source(
    tmp: &Path,
    want: &Hash,
    cache: &Path,
    claim: &SourceClaim,
) -> Result<(Hash, u64, u64), UploadError> {
    let summary = crate::nar::validate(&mut std::io::BufReader::new(std::fs::File::open(tmp)?))
        .map_err(|e| UploadError::HashMismatch(format!("the body is not a valid NAR: {e}")))?;
    if &summary.nar_hash != want {
        return Err(UploadError::HashMismatch(format!(
            "the NAR hashes to {}, not the declared {want}",
            summary.nar_hash
        )));
    }
    check_source_path(tmp, &summary.nar_hash, claim)?;
    let ztmp = tmp.with_extension("nar.zst");
    let out = std::fs::File::create(&ztmp)?;
    let hw = crate::nar::HashingWriter::new(out);
    let mut enc = zstd::stream::write::Encoder::new(hw, 3)?;
    std::io::copy(&mut std::fs::File::open(tmp)?, &mut enc)?;
    let hw = enc.finish()?;
    let (file, file_hash, file_size) = hw.finish();
    file.sync_all()?;
    std::fs::rename(
        &ztmp,
        cache
            .join("nar")
            .join(format!("{}.nar.zst", file_hash.to_base32())),
    )?;
    Ok((file_hash, file_size, summary.nar_size))
}
