//! Restoring a NAR into the file system: the [`Sink`] that creates directories, files and
//! symlinks for the parser in `read.rs`, and the public [`restore`] functions.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::error::NarError;
use super::read::{Parser, Sink};
use super::NarSummary;

/// Restore the NAR read from `input` at `dest`, which must not exist. Streams in constant
/// memory. On error, whatever was already created at `dest` is removed again.
pub fn restore<R: Read + ?Sized>(input: &mut R, dest: &Path) -> Result<(), NarError> {
    restore_inner(input, dest, false).map(|_| ())
}

/// [`restore`], also returning the hash and size of the NAR that was read.
pub fn restore_summary<R: Read + ?Sized>(
    input: &mut R,
    dest: &Path,
) -> Result<NarSummary, NarError> {
    restore_inner(input, dest, true)
}

fn restore_inner<R: Read + ?Sized>(
    input: &mut R,
    dest: &Path,
    hash: bool,
) -> Result<NarSummary, NarError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(NarError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let mut sink = FsSink {
        dest: dest.to_path_buf(),
        file: None,
        created_root: false,
    };
    let mut parser = Parser::new(input, hash);
    match parser.parse(&mut sink) {
        Ok(()) => Ok(parser.summary()),
        Err(e) => {
            sink.file = None;
            if sink.created_root {
                // Best effort: the error being reported matters more than a failed cleanup.
                let _ = match fs::symlink_metadata(dest) {
                    Ok(m) if m.is_dir() => fs::remove_dir_all(dest),
                    Ok(_) => fs::remove_file(dest),
                    Err(_) => Ok(()),
                };
            }
            Err(e)
        }
    }
}

/// Writes the tree under `dest`. Entry names were checked by the parser (no `/`, `.`, `..`,
/// NUL, no duplicates) and children are only ever created inside directories this sink created,
/// so nothing can be written outside `dest` or through a symlink.
struct FsSink {
    dest: PathBuf,
    /// The regular file being written.
    file: Option<(File, PathBuf)>,
    /// Whether `dest` itself was created (and so may be removed on error).
    created_root: bool,
}

impl FsSink {
    fn path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.dest.clone()
        } else {
            self.dest.join(OsStr::from_bytes(rel))
        }
    }

    fn created(
        &mut self,
        rel: &[u8],
        path: &Path,
        result: io::Result<()>,
        op: &'static str,
        offset: u64,
    ) -> Result<(), NarError> {
        match result {
            Ok(()) => {
                if rel.is_empty() {
                    self.created_root = true;
                }
                Ok(())
            }
            Err(e) if rel.is_empty() && e.kind() == io::ErrorKind::AlreadyExists => {
                Err(NarError::DestinationExists {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => Err(NarError::Restore {
                op,
                path: path.to_path_buf(),
                offset,
                source,
            }),
        }
    }
}

impl Sink for FsSink {
    fn directory(&mut self, rel: &[u8], offset: u64) -> Result<(), NarError> {
        let path = self.path(rel);
        let result = fs::create_dir(&path);
        self.created(rel, &path, result, "create directory", offset)
    }

    fn file_start(&mut self, rel: &[u8], executable: bool, offset: u64) -> Result<(), NarError> {
        let path = self.path(rel);
        let result = OpenOptions::new().write(true).create_new(true).open(&path);
        let file = match result {
            Ok(f) => {
                self.created(rel, &path, Ok(()), "create file", offset)?;
                f
            }
            Err(e) => return self.created(rel, &path, Err(e), "create file", offset),
        };
        if executable {
            // As Nix: keep the mode the umask gave and add every execute bit.
            let err = |source| NarError::Restore {
                op: "make executable",
                path: path.clone(),
                offset,
                source,
            };
            let mode = file.metadata().map_err(err)?.permissions().mode();
            file.set_permissions(fs::Permissions::from_mode(mode | 0o111))
                .map_err(err)?;
        }
        self.file = Some((file, path));
        Ok(())
    }

    fn file_data(&mut self, data: &[u8], offset: u64) -> Result<(), NarError> {
        if let Some((file, path)) = &mut self.file {
            file.write_all(data).map_err(|source| NarError::Restore {
                op: "write",
                path: path.clone(),
                offset,
                source,
            })?;
        }
        Ok(())
    }

    fn file_end(&mut self) {
        self.file = None;
    }

    fn symlink(&mut self, rel: &[u8], target: &[u8], offset: u64) -> Result<(), NarError> {
        let path = self.path(rel);
        let result = std::os::unix::fs::symlink(OsStr::from_bytes(target), &path);
        self.created(rel, &path, result, "create symlink", offset)
    }
}
