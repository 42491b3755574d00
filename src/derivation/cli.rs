//! `kiln drv show` and `kiln drv check`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// `kiln drv show FILE...`: print the derivations as JSON, keyed by drv path, as
/// `nix show-derivation` does. Returns the process exit code.
pub fn show(_files: &[PathBuf], _store_dir: Option<&Path>, _out: &mut dyn Write) -> anyhow::Result<i32> {
    anyhow::bail!("kiln drv show is not implemented yet")
}

/// `kiln drv check FILE...`: say whether each file's name and output paths match its contents.
/// Returns the process exit code (0 when every file matches).
pub fn check(_files: &[PathBuf], _store_dir: Option<&Path>, _out: &mut dyn Write) -> anyhow::Result<i32> {
    anyhow::bail!("kiln drv check is not implemented yet")
}
