//! Kiln's durable state: one sled database under `<state-dir>/db` with one tree per record
//! kind, written only through the [`committer::Committer`] (group commit: one transaction and
//! one flush per batch, replies after the flush). sled is behind this module and bincode
//! behind [`codec`], so either is a one-module swap (docs/adr/001-storage.md).

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
}

impl TreeId {
    pub const ALL: [TreeId; 10] = [
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
}

/// The state dir layout version this kiln writes.
pub const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state database error: {0}")]
    Sled(#[from] sled::Error),
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
                other => StoreError::Sled(other),
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

    pub fn tree(&self, t: TreeId) -> &sled::Tree {
        &self.trees[t as usize]
    }

    pub(crate) fn trees(&self) -> &[sled::Tree] {
        &self.trees
    }

    pub(crate) fn db(&self) -> &sled::Db {
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
    ) -> impl Iterator<Item = Result<(sled::IVec, R), StoreError>> + '_ {
        self.tree(t).iter().map(|kv| {
            let (k, v) = kv?;
            Ok((k, codec::decode(&v)?))
        })
    }

    /// A big-endian u64 from the meta tree.
    pub fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree(TreeId::Meta)
            .get(key)?
            .and_then(|v| keys::parse_u64_key(&v)))
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
