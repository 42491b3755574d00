//! Kiln's durable state: one sled database under `<state-dir>/db` with one tree per record
//! kind, written only through the [`committer::Committer`] (group commit: one transaction and
//! one flush per batch, replies after the flush). sled is behind this module and bincode
//! behind [`codec`], so either is a one-module swap (docs/adr/001-storage.md).
//!
//! No sled type leaves `src/store/`: other modules read through typed accessors of [`Store`]
//! (records by key, scans yielding [`Key`]s, the meta values, the event log after a sequence
//! number, the hook work), and they cannot write at all — only the committer holds the trees.
//! `tests/storage_boundary.rs` keeps it so.

pub mod codec;
pub mod committer;
pub mod dump;
pub mod keys;
pub mod records;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use codec::Record;
pub use committer::{Batch, Committer, NewEvent, Op};

/// The trees, in the order of [`Store::trees`]. Names are on disk: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TreeId {
    Derivations = 0,
    Builds = 1,
    Outputs = 2,
    NarFiles = 3,
    Agents = 4,
    AgentNames = 5,
    Events = 6,
    HookWork = 7,
    HookDead = 8,
    Meta = 9,
    RegistrationTokens = 10,
    OutputBuilds = 11,
    ClientTokens = 12,
    AgentControls = 13,
}

impl TreeId {
    pub const ALL: [TreeId; 14] = [
        TreeId::Derivations,
        TreeId::Builds,
        TreeId::Outputs,
        TreeId::NarFiles,
        TreeId::Agents,
        TreeId::AgentNames,
        TreeId::Events,
        TreeId::HookWork,
        TreeId::HookDead,
        TreeId::Meta,
        TreeId::RegistrationTokens,
        TreeId::OutputBuilds,
        TreeId::ClientTokens,
        TreeId::AgentControls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TreeId::Derivations => "derivations",
            TreeId::Builds => "builds",
            TreeId::Outputs => "outputs",
            TreeId::NarFiles => "nar_files",
            TreeId::Agents => "agents",
            TreeId::AgentNames => "agent_names",
            TreeId::Events => "events",
            TreeId::HookWork => "hook_work",
            TreeId::HookDead => "hook_dead",
            TreeId::Meta => "meta",
            TreeId::RegistrationTokens => "registration_tokens",
            TreeId::OutputBuilds => "output_builds",
            TreeId::ClientTokens => "client_tokens",
            TreeId::AgentControls => "agent_controls",
        }
    }
}

/// Keys of the `meta` tree (values are big-endian u64 unless noted).
pub mod meta {
    pub const NEXT_BUILD_ID: &[u8] = b"next_build_id";
    pub const NEXT_AGENT_ID: &[u8] = b"next_agent_id";
    pub const NEXT_EVENT_SEQ: &[u8] = b"next_event_seq";
    /// UTF-8 path of the store dir this state dir serves.
    pub const STORE_DIR: &[u8] = b"store_dir";
    /// The layout version of the whole state dir.
    pub const SCHEMA: &[u8] = b"schema";
    /// Present once the `output_builds` index covers every build (state dirs written before
    /// it existed are indexed at their first start).
    pub const OUTPUT_BUILDS_INDEXED: &[u8] = b"output_builds_indexed";
}

/// The state dir layout version this kiln writes.
pub const SCHEMA_VERSION: u64 = 1;

/// An error of the storage engine itself, opaque outside this module.
#[derive(Debug, Error)]
#[error(transparent)]
pub struct EngineError(sled::Error);

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state database error: {0}")]
    Engine(#[from] EngineError),
    #[error("stored {record} record cannot be decoded: {message}")]
    Codec {
        record: &'static str,
        message: String,
    },
    #[error("the state dir {path} is in use by another kiln process (sled holds its lock); stop that process first")]
    Locked { path: PathBuf },
    #[error("the committer has stopped; the coordinator is shutting down")]
    CommitterGone,
    #[error("the state dir {path} has layout version {found}, this kiln knows {SCHEMA_VERSION}; use a matching kiln")]
    Schema { path: PathBuf, found: u64 },
    #[error("I/O error on the state dir: {0}")]
    Io(#[from] std::io::Error),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        StoreError::Engine(EngineError(e))
    }
}

/// A key as stored: the bytes of a record's key (ids are big-endian, see [`keys`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key(sled::IVec);

impl Key {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The id of a key made by [`keys::u64_key`].
    pub fn as_u64(&self) -> Option<u64> {
        keys::parse_u64_key(&self.0)
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Open options of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// sled's background flush period; `None` turns it off.
    pub background_flush_ms: Option<u64>,
    pub cache_capacity_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            background_flush_ms: None,
            cache_capacity_bytes: 64 << 20,
        }
    }
}

/// An open state database. Cloning is cheap (sled trees are reference counted); any thread may
/// read, only the committer writes.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    path: PathBuf,
}

impl Store {
    /// Open (or create) the database under `<state_dir>/db`.
    pub fn open(state_dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        let path = state_dir.join("db");
        std::fs::create_dir_all(state_dir)?;
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_capacity_bytes)
            .flush_every_ms(options.background_flush_ms)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked { path: path.clone() }
                }
                sled::Error::Io(ref io) if io.to_string().contains("lock") => {
                    StoreError::Locked { path: path.clone() }
                }
                other => StoreError::from(other),
            })?;
        let trees = TreeId::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()?;
        let store = Store { db, trees, path };
        match store.meta_u64(meta::SCHEMA)? {
            None => {
                store
                    .tree(TreeId::Meta)
                    .insert(meta::SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                store.db.flush()?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(found) => {
                return Err(StoreError::Schema {
                    path: store.path.clone(),
                    found,
                })
            }
        }
        Ok(store)
    }

    /// The engine's tree: for this module, the committer and the dump only.
    fn tree(&self, t: TreeId) -> &sled::Tree {
        &self.trees[t as usize]
    }

    fn trees(&self) -> &[sled::Tree] {
        &self.trees
    }

    fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and decode one record.
    pub fn get<R: Record>(&self, t: TreeId, key: &[u8]) -> Result<Option<R>, StoreError> {
        match self.tree(t).get(key)? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn contains(&self, t: TreeId, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.tree(t).contains_key(key)?)
    }

    /// Every record of a tree, in key order.
    pub fn scan<R: Record>(
        &self,
        t: TreeId,
    ) -> impl Iterator<Item = Result<(Key, R), StoreError>> + '_ {
        self.tree(t).iter().map(|kv| {
            let (k, v) = kv?;
            Ok((Key(k), codec::decode(&v)?))
        })
    }

    /// The records of a tree after `key` (exclusive), in key order (a page of a sweep).
    pub fn scan_after<R: Record>(
        &self,
        t: TreeId,
        key: &[u8],
    ) -> impl Iterator<Item = Result<(Key, R), StoreError>> + '_ {
        use std::ops::Bound;
        self.tree(t)
            .range::<&[u8], _>((Bound::Excluded(key), Bound::Unbounded))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((Key(k), codec::decode(&v)?))
            })
    }

    /// Every build record in id order, decoded without copying its strings (the start-up
    /// scan of a million builds): `f` sees a borrowed view of each. Stops at `f`'s first
    /// error. sled's iteration runs on a second thread and hands the raw values over in
    /// batches, so reading the tree and the caller's work overlap.
    pub fn visit_builds<E: From<StoreError> + Send>(
        &self,
        mut f: impl FnMut(&records::BuildView<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        const BATCH: usize = 4096;
        let tree = self.tree(TreeId::Builds).clone();
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<sled::IVec>, sled::Error>>(4);
            scope.spawn(move || {
                let mut batch = Vec::with_capacity(BATCH);
                for kv in tree.iter() {
                    match kv {
                        Ok((_, v)) => batch.push(v),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    if batch.len() == BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        // The receiver stopped (an error): stop reading.
                        if tx.send(Ok(full)).is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(batch));
            });
            // Dropping `rx` on an early return ends the reader at its next send.
            for batch in rx {
                for v in batch.map_err(StoreError::from)? {
                    match codec::decode_build_view(&v)? {
                        codec::View::Borrowed(view) => f(&view)?,
                        codec::View::Owned(rec) => f(&records::BuildView::of(&rec))?,
                    }
                }
            }
            Ok(())
        })
    }

    /// The id of the last build created for an output path (any state), from the
    /// `output_builds` index.
    pub fn last_build_of(&self, path: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree(TreeId::OutputBuilds)
            .get(keys::output_key(path).as_bytes())?
            .and_then(|v| keys::parse_u64_key(&v)))
    }

    /// Build records from `after` (exclusive) on, in id order, at most `limit` of them (a page
    /// of a listing).
    pub fn builds_after(
        &self,
        after: u64,
    ) -> impl Iterator<Item = Result<records::BuildRecord, StoreError>> + '_ {
        let from = keys::u64_key(after.saturating_add(1));
        self.tree(TreeId::Builds)
            .range(from..)
            .map(|kv| codec::decode(&kv?.1))
    }

    /// Records in a tree.
    pub fn len(&self, t: TreeId) -> usize {
        self.tree(t).len()
    }

    pub fn is_empty(&self, t: TreeId) -> bool {
        self.tree(t).is_empty()
    }

    /// A big-endian u64 from the meta tree.
    pub fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree(TreeId::Meta)
            .get(key)?
            .and_then(|v| keys::parse_u64_key(&v)))
    }

    /// A UTF-8 string from the meta tree (e.g. [`meta::STORE_DIR`]); bytes that are not UTF-8
    /// are replaced, as they can only come from a damaged database.
    pub fn meta_str(&self, key: &[u8]) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree(TreeId::Meta)
            .get(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The id of the agent registered under `name`.
    pub fn agent_id(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree(TreeId::AgentNames)
            .get(name.as_bytes())?
            .and_then(|v| keys::parse_u64_key(&v)))
    }

    /// The sequence number of the last event in the log (0 when it is empty).
    pub fn last_event_seq(&self) -> Result<u64, StoreError> {
        Ok(match self.tree(TreeId::Events).last()? {
            Some((k, _)) => keys::parse_u64_key(&k).unwrap_or(0),
            None => 0,
        })
    }

    /// The events with a sequence number above `since`, in order.
    pub fn events_after(
        &self,
        since: u64,
    ) -> impl Iterator<Item = Result<records::EventRecord, StoreError>> + '_ {
        let from = keys::u64_key(since.saturating_add(1));
        self.tree(TreeId::Events)
            .range(from..)
            .map(|kv| codec::decode(&kv?.1))
    }

    /// Every pending hook run: (hook name, event sequence number, record), grouped by hook
    /// and in event order. A key that does not parse is skipped (it cannot be written).
    pub fn hook_work(
        &self,
    ) -> impl Iterator<Item = Result<(String, u64, records::HookWorkRecord), StoreError>> + '_ {
        self.tree(TreeId::HookWork).iter().filter_map(|kv| {
            let (k, v) = match kv {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let (hook, seq) = keys::parse_hook_work_key(&k)?;
            Some(codec::decode(&v).map(|w| (hook, seq, w)))
        })
    }

    /// Size of the database on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
pub mod nar_cache;
