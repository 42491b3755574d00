//! The NAR cache under the state dir, laid out so nginx can serve it as is:
//! `cache/nix-cache-info`, `cache/<hash>.narinfo`, `cache/nar/<filehash>.nar.zst`. Also the
//! upload spool (`uploads/`, resumable: an upload is keyed by build, attempt, output and file
//! hash, and its partial file's length is how much arrived) and build logs (`logs/`).
//!
//! An uploaded NAR is made available only after its FileHash and NarHash are checked; the
//! `nar_files` record is committed after the file is in place, and a narinfo is written last.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt as _};
use sha2::Digest as _;
use thiserror::Error;

use super::records::{NarFileRecord, OutputRecord};
use super::{now_ms, Batch, Committer, Store, StoreError, TreeId};
use crate::derivation::Hash;
use crate::nar::narinfo::NarInfo;
use crate::nar::signing::SecretKey;
use crate::protocol::UploadStatus;

#[derive(Debug, Error)]
pub enum UploadError {
    #[error("upload offset {offset} does not match the {received} bytes received so far: resend from {received}")]
    Offset { offset: u64, received: u64 },
    #[error("upload is larger than its declared file size {0}")]
    TooLarge(u64),
    #[error("{0}")]
    HashMismatch(String),
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
    /// One lock per upload in progress, so two requests for one upload cannot interleave.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

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
            locks: Mutex::new(HashMap::new()),
        })
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

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    fn verified(&self, file_hash: &Hash) -> Result<Option<NarFileRecord>, StoreError> {
        self.store
            .get(TreeId::NarFiles, file_hash.to_nix_string().as_bytes())
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
        let part = self.root.join("uploads").join(key.file_name());
        let received = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        Ok(UploadStatus {
            received,
            verified: false,
            nar_hash: None,
            nar_size: None,
        })
    }

    /// Append a body at `offset`; once the whole file is there, verify and store it.
    pub async fn receive<S, B, E>(
        &self,
        key: &UploadKey,
        offset: u64,
        mut body: S,
    ) -> Result<UploadStatus, UploadError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let name = key.file_name();
        let lock = self.lock_for(&name);
        let _guard = lock.lock().await;
        let status = self.upload_status(key)?;
        if status.verified {
            return Ok(status);
        }
        if offset != status.received {
            return Err(UploadError::Offset {
                offset,
                received: status.received,
            });
        }
        let part = self.root.join("uploads").join(&name);
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await?;
        let mut received = offset;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()))?;
            let chunk = chunk.as_ref();
            received += chunk.len() as u64;
            if received > key.file_size {
                drop(file);
                let _ = std::fs::remove_file(&part);
                return Err(UploadError::TooLarge(key.file_size));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, chunk).await?;
            metrics::counter!("kiln_upload_bytes_total").increment(chunk.len() as u64);
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        drop(file);
        if received < key.file_size {
            return Ok(UploadStatus {
                received,
                verified: false,
                nar_hash: None,
                nar_size: None,
            });
        }
        let (part2, k) = (part.clone(), key.clone());
        let dest = self
            .cache_dir()
            .join("nar")
            .join(format!("{}.nar.zst", key.file_hash.to_base32()));
        let summary = tokio::task::spawn_blocking(move || verify_compressed(&part2, &k, &dest))
            .await
            .map_err(|e| UploadError::Commit(e.to_string()))?;
        let (nar_hash, nar_size) = match summary {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        };
        let rec = NarFileRecord {
            file_size: key.file_size,
            nar_hash: nar_hash.to_nix_string(),
            nar_size,
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
            nar_size: Some(nar_size),
        })
    }

    /// Receive an input source as an uncompressed NAR; verify it against `nar_hash`, compress
    /// it into the cache and make the path available.
    pub async fn receive_source<S, B, E>(
        &self,
        path: &str,
        nar_hash: &Hash,
        references: Vec<String>,
        limit: u64,
        mut body: S,
    ) -> Result<OutputRecord, UploadError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let tmp = self
            .root
            .join("uploads")
            .join(format!("src-{}.nar", random_suffix()));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(UploadError::Body(e.to_string()));
                }
            };
            let chunk = chunk.as_ref();
            size += chunk.len() as u64;
            if size > limit {
                drop(file);
                let _ = std::fs::remove_file(&tmp);
                return Err(UploadError::BadRequest(format!(
                    "source NAR is larger than the limit of {limit} bytes (limits.source_nar_mb)"
                )));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, chunk).await?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        drop(file);
        let (t, want, cache) = (tmp.clone(), nar_hash.clone(), self.cache_dir());
        let done = tokio::task::spawn_blocking(move || compress_source(&t, &want, &cache))
            .await
            .map_err(|e| UploadError::Commit(e.to_string()));
        let _ = std::fs::remove_file(&tmp);
        let (file_hash, file_size, nar_size) = done??;
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

    /// Store a build log (zstd-compressed bytes as the agent sent them).
    pub async fn receive_log<S, B, E>(
        &self,
        build_id: u64,
        attempt: u32,
        limit: u64,
        mut body: S,
    ) -> Result<(), UploadError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let dest = self.log_path(build_id, attempt);
        let tmp = dest.with_extension(format!("tmp-{}", random_suffix()));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()));
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            let chunk = chunk.as_ref();
            size += chunk.len() as u64;
            if size > limit {
                drop(file);
                let _ = std::fs::remove_file(&tmp);
                return Err(UploadError::BadRequest(format!(
                    "build log is larger than the limit of {limit} bytes (limits.log_mb)"
                )));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, chunk).await?;
        }
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&tmp, &dest).await?;
        Ok(())
    }

    /// A stored log, decompressed.
    pub fn read_log(&self, build_id: u64, attempt: u32) -> std::io::Result<Vec<u8>> {
        let f = std::fs::File::open(self.log_path(build_id, attempt))?;
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(f)?.read_to_end(&mut out)?;
        Ok(out)
    }
}

pub fn cache_info(store_dir: &str) -> String {
    format!("StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: 40\n")
}

fn random_suffix() -> String {
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

/// Check a complete upload: its sha256 must be the declared file hash, and it must decompress
/// to a valid NAR. Moves it to `dest` and returns (NarHash, NarSize).
fn verify_compressed(
    part: &Path,
    key: &UploadKey,
    dest: &Path,
) -> Result<(Hash, u64), UploadError> {
    let mut f = std::fs::File::open(part)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = Hash {
        algo: crate::derivation::HashAlgo::Sha256,
        bytes: h.finalize().to_vec(),
    };
    if got != key.file_hash {
        return Err(UploadError::HashMismatch(format!(
            "the uploaded file hashes to {got}, not the declared FileHash {}: it was discarded; upload it again",
            key.file_hash
        )));
    }
    let f = std::fs::File::open(part)?;
    let mut dec = zstd::stream::read::Decoder::new(f)
        .map_err(|e| UploadError::HashMismatch(format!("the upload is not zstd: {e}")))?;
    let summary = crate::nar::validate(&mut dec)
        .map_err(|e| UploadError::HashMismatch(format!("the upload is not a valid NAR: {e}")))?;
    // On disk before the record that makes it available is committed.
    std::fs::File::open(part)?.sync_all()?;
    std::fs::rename(part, dest)?;
    Ok((summary.nar_hash, summary.nar_size))
}

/// Validate an uncompressed source NAR against its claimed hash and compress it into the
/// cache. Returns (FileHash, FileSize, NarSize).
fn compress_source(tmp: &Path, want: &Hash, cache: &Path) -> Result<(Hash, u64, u64), UploadError> {
    let summary = crate::nar::validate(&mut std::io::BufReader::new(std::fs::File::open(tmp)?))
        .map_err(|e| UploadError::HashMismatch(format!("the body is not a valid NAR: {e}")))?;
    if &summary.nar_hash != want {
        return Err(UploadError::HashMismatch(format!(
            "the NAR hashes to {}, not the declared {want}",
            summary.nar_hash
        )));
    }
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
