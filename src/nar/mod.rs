//! NAR archives (write from a path, restore to a path, validate and hash a stream), narinfos,
//! Nix's ed25519 signatures and (with the coordinator, experimental) Guix's. Streaming in constant memory; compiles without the
//! coordinator's dependencies, because the agent writes and uploads NARs too.
//!
//! The format is described in `docs/nar.md`. In short: a NAR is a sequence of length-prefixed,
//! zero-padded byte strings, `nix-archive-1` followed by one node, where a node is
//! `( type regular [executable ""] contents <bytes> )`, `( type symlink target <bytes> )` or
//! `( type directory { entry ( name <bytes> node <node> ) }* )` with entries sorted by the bytes
//! of their names. Kiln writes exactly what `nix-store --dump` writes and reads only that
//! canonical form back (stricter than Nix, see [`read`]).

pub mod ca;
pub mod cli;
mod error;
#[cfg(feature = "coordinator")]
pub mod guix;
mod hashing;
pub mod narinfo;
mod read;
pub mod refs;
mod restore;
#[cfg(feature = "coordinator")]
pub mod sexp;
pub mod signing;
mod write;

pub use error::{NarError, NarErrorKind};
pub use hashing::{HashingReader, HashingWriter};
pub use read::validate;
pub use restore::{restore, restore_summary};
pub use write::{dump, hash_path};

use crate::derivation::hash::Hash;

/// The magic string every NAR starts with.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Longest entry name Kiln accepts in a NAR: `NAME_MAX` on Linux and the BSDs. No file system
/// Kiln restores to stores longer names, so a longer one is refused up front.
pub const MAX_NAME_LEN: u64 = 255;

/// Longest symlink target Kiln accepts: `PATH_MAX` (4096) minus the terminating NUL.
pub const MAX_TARGET_LEN: u64 = 4095;

/// Deepest directory nesting Kiln accepts. A path this deep with one-byte names is already
/// `PATH_MAX` long, so nothing deeper can be restored with ordinary path syscalls; the limit
/// keeps the reader's per-level state (one previous name per level) bounded.
pub const MAX_DEPTH: usize = 2048;

/// What [`validate`] (and [`hash_path`]) learn about a NAR: its SHA-256 and its size in bytes,
/// the `NarHash` and `NarSize` of a narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarSummary {
    /// SHA-256 of the whole NAR.
    pub nar_hash: Hash,
    /// Length of the NAR in bytes.
    pub nar_size: u64,
}

/// Padding after a string of `len` bytes, so that the next item starts at a multiple of 8.
pub(crate) fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}
