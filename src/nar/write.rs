//! Writing a NAR from a path in the file system: byte for byte what `nix-store --dump` writes.
//!
//! The walk is iterative (an explicit stack of directory listings), so deep trees cannot
//! overflow the call stack, and file contents are streamed through one fixed buffer, so memory
//! does not grow with file sizes. Small strings (tags, names) are gathered in the same buffer
//! so that an unbuffered destination still sees few, large writes.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::NarError;
use super::hashing::HashingWriter;
use super::{padding, NarSummary, MAX_DEPTH, NAR_MAGIC};

/// Size of the write buffer. File contents are read straight into it, so this is also the size
/// of each `read(2)` on a large file. 64 KiB, Linux's default pipe capacity, measured best of
/// 32, 64, 128 and 512 KiB in `benches/nar_write.rs`: into a pipe, a write larger than the
/// pipe cannot complete until the reader has drained it, so 128 KiB was 1.5x and 512 KiB 6x
/// slower there; into a sink or a file the size hardly matters.
const BUF_SIZE: usize = 64 * 1024;

/// Write the NAR serialisation of `path` (which is not followed if it is a symlink) to `out`.
///
/// Regular files are executable in the NAR iff their owner's execute bit is set; directory
/// entries are written sorted by the bytes of their names; names and symlink targets are the
/// raw bytes of the file system. Fails on sockets, fifos and devices, as Nix does.
pub fn dump<W: Write + ?Sized>(path: &Path, out: &mut W) -> Result<(), NarError> {
    let mut w = NarWriter::new(out);
    w.string(NAR_MAGIC)?;
    let mut stack: Vec<DirFrame> = Vec::new();
    if let Some(frame) = dump_node(&mut w, path.to_path_buf())? {
        stack.push(frame);
    }
    while let Some(frame) = stack.last_mut() {
        match frame.entries.next() {
            Some(name) => {
                let child = frame.path.join(&name);
                w.string(b"entry")?;
                w.string(b"(")?;
                w.string(b"name")?;
                w.string(name.as_bytes())?;
                w.string(b"node")?;
                match dump_node(&mut w, child)? {
                    Some(dir) => {
                        if stack.len() >= MAX_DEPTH {
                            return Err(NarError::TooDeep {
                                path: dir.path,
                                max: MAX_DEPTH,
                            });
                        }
                        stack.push(dir);
                    }
                    // Close the entry of a file or symlink.
                    None => w.string(b")")?,
                }
            }
            None => {
                stack.pop();
                // Close the directory node, then the entry holding it (unless it is the root).
                w.string(b")")?;
                if !stack.is_empty() {
                    w.string(b")")?;
                }
            }
        }
    }
    w.flush_buf()
}

/// The NAR hash (SHA-256) and size of `path`, without keeping the NAR anywhere.
pub fn hash_path(path: &Path) -> Result<NarSummary, NarError> {
    let mut hw = HashingWriter::new(io::sink());
    dump(path, &mut hw)?;
    let (_, nar_hash, nar_size) = hw.finish();
    Ok(NarSummary { nar_hash, nar_size })
}

/// A directory being written: its path and the names not yet written, sorted.
struct DirFrame {
    path: PathBuf,
    entries: std::vec::IntoIter<OsString>,
}

/// Write the start of the node at `path`. A file or symlink is written whole and `None`
/// returned; a directory's header is written and its listing returned, for the caller to walk.
fn dump_node<W: Write + ?Sized>(
    w: &mut NarWriter<'_, W>,
    path: PathBuf,
) -> Result<Option<DirFrame>, NarError> {
    let meta = fs::symlink_metadata(&path).map_err(|source| NarError::Fs {
        op: "stat",
        path: path.clone(),
        source,
    })?;
    let ft = meta.file_type();
    w.string(b"(")?;
    w.string(b"type")?;
    if ft.is_file() {
        w.string(b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            w.string(b"executable")?;
            w.string(b"")?;
        }
        w.string(b"contents")?;
        w.contents(&path, meta.len())?;
        w.string(b")")?;
        Ok(None)
    } else if ft.is_symlink() {
        let target = fs::read_link(&path).map_err(|source| NarError::Fs {
            op: "read symlink",
            path: path.clone(),
            source,
        })?;
        w.string(b"symlink")?;
        w.string(b"target")?;
        w.string(target.as_os_str().as_bytes())?;
        w.string(b")")?;
        Ok(None)
    } else if ft.is_dir() {
        w.string(b"directory")?;
        let entries = list_dir(&path)?;
        Ok(Some(DirFrame {
            path,
            entries: entries.into_iter(),
        }))
    } else {
        let kind = if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "file of unknown type"
        };
        Err(NarError::UnsupportedType { path, kind })
    }
}

/// The names in directory `path`, sorted by their bytes (as Nix's `std::map<std::string>`).
fn list_dir(path: &Path) -> Result<Vec<OsString>, NarError> {
    let fs_err = |source| NarError::Fs {
        op: "read directory",
        path: path.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(path).map_err(fs_err)? {
        names.push(entry.map_err(fs_err)?.file_name());
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

const ZEROS: [u8; 8] = [0; 8];

/// Buffers NAR output and writes it to the destination in large blocks.
struct NarWriter<'a, W: Write + ?Sized> {
    out: &'a mut W,
    buf: Box<[u8]>,
    /// Bytes of `buf` in use.
    len: usize,
    /// Bytes already handed to `out` (for error messages).
    written: u64,
}

impl<'a, W: Write + ?Sized> NarWriter<'a, W> {
    fn new(out: &'a mut W) -> Self {
        NarWriter {
            out,
            buf: vec![0u8; BUF_SIZE].into_boxed_slice(),
            len: 0,
            written: 0,
        }
    }

    fn flush_buf(&mut self) -> Result<(), NarError> {
        if self.len > 0 {
            let written = self.written;
            self.out
                .write_all(&self.buf[..self.len])
                .map_err(|source| NarError::Write {
                    offset: written,
                    source,
                })?;
            self.written += self.len as u64;
            self.len = 0;
        }
        Ok(())
    }

    /// Append raw bytes.
    fn put(&mut self, bytes: &[u8]) -> Result<(), NarError> {
        if bytes.len() > self.buf.len() - self.len {
            self.flush_buf()?;
        }
        if bytes.len() > self.buf.len() {
            let written = self.written;
            self.out
                .write_all(bytes)
                .map_err(|source| NarError::Write {
                    offset: written,
                    source,
                })?;
            self.written += bytes.len() as u64;
        } else {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }

    /// Append a NAR string: 64-bit little-endian length, the bytes, zero padding to 8.
    fn string(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s)?;
        self.put(&ZEROS[..padding(s.len() as u64)])
    }

    /// Append the contents of the regular file at `path`, `size` bytes long (from `lstat`), as
    /// a NAR string. Reads exactly `size` bytes, as Nix does: a file that grows meanwhile is cut,
    /// one that shrinks is an error.
    fn contents(&mut self, path: &Path, size: u64) -> Result<(), NarError> {
        let mut file = File::open(path).map_err(|source| NarError::Fs {
            op: "open",
            path: path.to_path_buf(),
            source,
        })?;
        self.put(&size.to_le_bytes())?;
        let mut left = size;
        while left > 0 {
            if self.len == self.buf.len() {
                self.flush_buf()?;
            }
            let space = &mut self.buf[self.len..];
            let want = space.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            match file.read(&mut space[..want]) {
                Ok(0) => {
                    return Err(NarError::FileChanged {
                        path: path.to_path_buf(),
                        expected: size,
                        got: size - left,
                    })
                }
                Ok(n) => {
                    self.len += n;
                    left -= n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(NarError::Fs {
                        op: "read",
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        self.put(&ZEROS[..padding(size)])
    }
}
