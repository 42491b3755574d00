//! The one error type of the NAR functions. Every error about the NAR stream itself names the
//! byte offset in the NAR where the offending item starts, so that an operator can look at the
//! bytes (`xxd -s OFFSET`); every file-system error names the path and the operation.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Why a NAR could not be written, read, validated or restored.
#[derive(Debug, Error)]
pub enum NarError {
    /// The input is not a NAR in the canonical form `nix-store --dump` writes.
    #[error("invalid NAR at byte {offset}: {kind}")]
    Format {
        /// Offset in the NAR of the item that is wrong.
        offset: u64,
        kind: NarErrorKind,
    },
    /// Reading the NAR stream failed (not a format problem: the source itself failed).
    #[error("failed to read the NAR at byte {offset}: {source}")]
    Read { offset: u64, source: io::Error },
    /// Writing the NAR to its destination failed after `offset` bytes.
    #[error("failed to write the NAR after {offset} bytes: {source}")]
    Write { offset: u64, source: io::Error },
    /// A file-system operation on the tree being archived failed.
    #[error("failed to {op} {}: {source}", path.display())]
    Fs {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file-system operation while restoring failed; `offset` is where the NAR entry starts.
    #[error("failed to {op} {} (NAR entry at byte {offset}): {source}", path.display())]
    Restore {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },
    /// The tree holds something a NAR cannot represent (socket, fifo, device).
    #[error("{} is a {kind}, which a NAR cannot hold (only regular files, symlinks and directories); remove it or archive another path", path.display())]
    UnsupportedType { path: PathBuf, kind: &'static str },
    /// A regular file got shorter while it was being archived.
    #[error("{} shrank from {expected} bytes while it was being archived (read only {got}); archive it again once nothing writes to it", path.display())]
    FileChanged {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    /// The tree is nested deeper than [`crate::nar::MAX_DEPTH`], which Kiln would refuse to read.
    #[error("{} is nested deeper than {max} directories, more than a NAR may hold", path.display())]
    TooDeep { path: PathBuf, max: usize },
    /// [`crate::nar::restore`] never overwrites.
    #[error("restore destination {} already exists; remove it or choose a path that does not exist", path.display())]
    DestinationExists { path: PathBuf },
}

/// What exactly is wrong with a NAR stream.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarErrorKind {
    #[error("input ends in the middle of {expected} (the NAR is truncated)")]
    Truncated { expected: &'static str },
    #[error("does not start with the NAR magic \"nix-archive-1\" (found {found}); this is not a NAR, or it is compressed")]
    BadMagic { found: String },
    #[error("non-zero padding after a string")]
    BadPadding,
    #[error("expected {expected}, found {found}")]
    Unexpected {
        expected: &'static str,
        found: String,
    },
    #[error("invalid entry name {name}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("directory entries out of order: {name} comes after {prev} (entries must be sorted by bytes, without duplicates)")]
    Unsorted { prev: String, name: String },
    #[error("{what} is {len} bytes long, more than the {max} allowed")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("invalid symlink target {target}: {reason}")]
    InvalidTarget {
        target: String,
        reason: &'static str,
    },
    #[error("directories nested deeper than {max} levels")]
    TooDeep { max: usize },
    #[error("trailing data after the end of the NAR")]
    TrailingData,
}

/// Show bytes from a NAR in an error message: quoted, non-printable bytes escaped, long
/// strings cut (an error must not echo megabytes of input).
pub(crate) fn show_bytes(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let shown = &bytes[..bytes.len().min(MAX)];
    let more = if bytes.len() > MAX { "..." } else { "" };
    format!("\"{}\"{more}", shown.escape_ascii())
}
