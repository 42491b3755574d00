//! Reading a NAR: [`validate`] checks a stream and returns its hash and size, [`restore`]
//! recreates the tree in the file system. Both run the same streaming parser, so what
//! `validate` accepts is exactly what `restore` can write.
//!
//! The parser is an explicit state machine (no recursion: 10 MB of nested directories cannot
//! overflow the stack), allocates only bounded strings (tags, names up to [`MAX_NAME_LEN`],
//! symlink targets up to [`MAX_TARGET_LEN`]) and streams file contents through its read buffer.
//!
//! It accepts only the canonical form `nix-store --dump` writes, and so is stricter than Nix
//! 2.8's own parser, which accepts fields in any order and, through a bug (its previous name
//! is reset for every entry), unsorted and duplicate entries. A NAR Kiln accepts hashes to the
//! same value after a round trip through the file system, which is what makes `NarHash`
//! meaningful; see `docs/nar.md`.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{show_bytes, NarError, NarErrorKind};
use super::{padding, NarSummary, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, NAR_MAGIC};
use crate::derivation::hash::{Hash, HashAlgo};

/// Size of the parser's read buffer; file contents are handed on in blocks of at most this.
const BUF_SIZE: usize = 128 * 1024;

/// Tags are short; a longer string where a tag is expected is refused without reading it.
const MAX_TAG_LEN: u64 = 16;

/// Check that `input` holds exactly one canonical NAR and nothing after it, without writing
/// anything; returns its SHA-256 and size. This is how uploads are verified.
pub fn validate<R: Read + ?Sized>(input: &mut R) -> Result<NarSummary, NarError> {
    let mut parser = Parser::new(input, true);
    parser.parse(&mut NullSink)?;
    Ok(parser.summary())
}

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

/// Where the parser sends what it reads. `rel` is the entry's path relative to the root,
/// components joined by `/`, empty for the root; `offset` is where the node starts in the NAR.
trait Sink {
    fn directory(&mut self, rel: &[u8], offset: u64) -> Result<(), NarError>;
    fn file_start(&mut self, rel: &[u8], executable: bool, offset: u64) -> Result<(), NarError>;
    fn file_data(&mut self, data: &[u8], offset: u64) -> Result<(), NarError>;
    fn file_end(&mut self);
    fn symlink(&mut self, rel: &[u8], target: &[u8], offset: u64) -> Result<(), NarError>;
}

/// Accepts everything: validation only.
struct NullSink;

impl Sink for NullSink {
    fn directory(&mut self, _: &[u8], _: u64) -> Result<(), NarError> {
        Ok(())
    }
    fn file_start(&mut self, _: &[u8], _: bool, _: u64) -> Result<(), NarError> {
        Ok(())
    }
    fn file_data(&mut self, _: &[u8], _: u64) -> Result<(), NarError> {
        Ok(())
    }
    fn file_end(&mut self) {}
    fn symlink(&mut self, _: &[u8], _: &[u8], _: u64) -> Result<(), NarError> {
        Ok(())
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

/// The tags of the NAR grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Open,
    Close,
    Type,
    Regular,
    Symlink,
    Directory,
    Executable,
    Contents,
    Target,
    Entry,
    Name,
    Node,
    Empty,
}

impl Tag {
    fn from_bytes(b: &[u8]) -> Option<Tag> {
        Some(match b {
            b"(" => Tag::Open,
            b")" => Tag::Close,
            b"type" => Tag::Type,
            b"regular" => Tag::Regular,
            b"symlink" => Tag::Symlink,
            b"directory" => Tag::Directory,
            b"executable" => Tag::Executable,
            b"contents" => Tag::Contents,
            b"target" => Tag::Target,
            b"entry" => Tag::Entry,
            b"name" => Tag::Name,
            b"node" => Tag::Node,
            b"" => Tag::Empty,
            _ => return None,
        })
    }
}

/// One open directory: where its path ends in the parser's `rel`, and its previous entry name.
struct Frame {
    dir_len: usize,
    prev: Option<Vec<u8>>,
}

struct Parser<R: Read> {
    input: BufReader<R>,
    /// Bytes of NAR consumed so far: the offset of the next byte.
    pos: u64,
    hasher: Option<Sha256>,
    /// Holds the last string read (tag, name or target).
    scratch: Vec<u8>,
}

impl<R: Read> Parser<R> {
    fn new(input: R, hash: bool) -> Self {
        Parser {
            input: BufReader::with_capacity(BUF_SIZE, input),
            pos: 0,
            hasher: hash.then(Sha256::new),
            scratch: Vec::new(),
        }
    }

    fn summary(self) -> NarSummary {
        let bytes = self
            .hasher
            .map(|h| h.finalize().to_vec())
            .unwrap_or_default();
        NarSummary {
            nar_hash: Hash {
                algo: HashAlgo::Sha256,
                bytes,
            },
            nar_size: self.pos,
        }
    }

    fn format_err(&self, offset: u64, kind: NarErrorKind) -> NarError {
        NarError::Format { offset, kind }
    }

    /// Read the whole NAR into `sink`, then make sure nothing follows it.
    fn parse(&mut self, sink: &mut dyn Sink) -> Result<(), NarError> {
        self.magic()?;
        let mut rel: Vec<u8> = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        'node: loop {
            let node_offset = self.pos;
            if self.node(sink, &rel)? {
                if stack.len() >= MAX_DEPTH {
                    return Err(
                        self.format_err(node_offset, NarErrorKind::TooDeep { max: MAX_DEPTH })
                    );
                }
                stack.push(Frame {
                    dir_len: rel.len(),
                    prev: None,
                });
            } else if stack.is_empty() {
                break;
            } else {
                self.expect(Tag::Close, "\")\" closing a directory entry")?;
            }
            // Inside the innermost open directory: entries, or its end.
            loop {
                let Some(frame) = stack.last_mut() else {
                    break 'node;
                };
                let offset = self.pos;
                match self.tag("\"entry\" or \")\" closing a directory")? {
                    Tag::Close => {
                        stack.pop();
                        if stack.is_empty() {
                            break 'node;
                        }
                        self.expect(Tag::Close, "\")\" closing a directory entry")?;
                    }
                    Tag::Entry => {
                        self.expect(Tag::Open, "\"(\" opening a directory entry")?;
                        self.expect(Tag::Name, "\"name\"")?;
                        let name_offset = self.pos;
                        self.string(MAX_NAME_LEN, "an entry name")?;
                        let name = &self.scratch;
                        check_name(name).map_err(|reason| {
                            self.format_err(
                                name_offset,
                                NarErrorKind::InvalidName {
                                    name: show_bytes(name),
                                    reason,
                                },
                            )
                        })?;
                        match &mut frame.prev {
                            Some(prev) if name.as_slice() <= prev.as_slice() => {
                                return Err(self.format_err(
                                    name_offset,
                                    NarErrorKind::Unsorted {
                                        prev: show_bytes(prev),
                                        name: show_bytes(name),
                                    },
                                ));
                            }
                            Some(prev) => {
                                prev.clear();
                                prev.extend_from_slice(name);
                            }
                            None => frame.prev = Some(name.clone()),
                        }
                        rel.truncate(frame.dir_len);
                        if !rel.is_empty() {
                            rel.push(b'/');
                        }
                        rel.extend_from_slice(name);
                        self.expect(Tag::Node, "\"node\"")?;
                        continue 'node;
                    }
                    other => {
                        return Err(self.unexpected(
                            offset,
                            "\"entry\" or \")\" closing a directory",
                            other,
                        ));
                    }
                }
            }
        }
        self.end()
    }

    /// Parse one node. Files and symlinks are read whole (`false`); for a directory only its
    /// header is read and `true` returned.
    fn node(&mut self, sink: &mut dyn Sink, rel: &[u8]) -> Result<bool, NarError> {
        let node_offset = self.pos;
        self.expect(Tag::Open, "\"(\" opening a node")?;
        self.expect(Tag::Type, "\"type\"")?;
        let offset = self.pos;
        let what = "a node type (\"regular\", \"symlink\" or \"directory\")";
        match self.tag(what)? {
            Tag::Regular => {
                let offset = self.pos;
                let executable = match self.tag("\"executable\" or \"contents\"")? {
                    Tag::Executable => {
                        self.expect(Tag::Empty, "an empty string after \"executable\"")?;
                        self.expect(Tag::Contents, "\"contents\"")?;
                        true
                    }
                    Tag::Contents => false,
                    other => {
                        return Err(self.unexpected(
                            offset,
                            "\"executable\" or \"contents\"",
                            other,
                        ))
                    }
                };
                sink.file_start(rel, executable, node_offset)?;
                self.contents(sink)?;
                sink.file_end();
                self.expect(Tag::Close, "\")\" closing a regular file")?;
                Ok(false)
            }
            Tag::Symlink => {
                self.expect(Tag::Target, "\"target\"")?;
                let target_offset = self.pos;
                self.string(MAX_TARGET_LEN, "a symlink target")?;
                let target = &self.scratch;
                let reason = if target.is_empty() {
                    Some("it is empty")
                } else if target.contains(&0) {
                    Some("it contains a NUL byte")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let target = show_bytes(target);
                    return Err(self.format_err(
                        target_offset,
                        NarErrorKind::InvalidTarget { target, reason },
                    ));
                }
                sink.symlink(rel, target, node_offset)?;
                self.expect(Tag::Close, "\")\" closing a symlink")?;
                Ok(false)
            }
            Tag::Directory => {
                sink.directory(rel, node_offset)?;
                Ok(true)
            }
            other => Err(self.unexpected(offset, what, other)),
        }
    }

    fn magic(&mut self) -> Result<(), NarError> {
        let mut len = [0u8; 8];
        self.fill(&mut len, "the NAR magic")?;
        let len = u64::from_le_bytes(len);
        if len != NAR_MAGIC.len() as u64 {
            let found = format!("a string length of {len}");
            return Err(self.format_err(0, NarErrorKind::BadMagic { found }));
        }
        let mut magic = [0u8; 16];
        self.fill(&mut magic, "the NAR magic")?;
        if &magic[..NAR_MAGIC.len()] != NAR_MAGIC {
            let found = show_bytes(&magic[..NAR_MAGIC.len()]);
            return Err(self.format_err(0, NarErrorKind::BadMagic { found }));
        }
        if magic[NAR_MAGIC.len()..].iter().any(|&b| b != 0) {
            return Err(self.format_err(8 + NAR_MAGIC.len() as u64, NarErrorKind::BadPadding));
        }
        Ok(())
    }

    /// After the root node: the input must end here.
    fn end(&mut self) -> Result<(), NarError> {
        loop {
            match self.input.fill_buf() {
                Ok([]) => return Ok(()),
                Ok(_) => return Err(self.format_err(self.pos, NarErrorKind::TrailingData)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(NarError::Read {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
    }

    fn unexpected(&self, offset: u64, expected: &'static str, found: Tag) -> NarError {
        let found = match found {
            Tag::Empty => "an empty string".to_string(),
            _ => show_bytes(&self.scratch),
        };
        self.format_err(offset, NarErrorKind::Unexpected { expected, found })
    }

    /// Read a tag; anything that is not one of the grammar's tags is an error naming `expected`.
    fn tag(&mut self, expected: &'static str) -> Result<Tag, NarError> {
        let offset = self.pos;
        let len = self.u64(expected)?;
        if len > MAX_TAG_LEN {
            let found = format!("a string of {len} bytes");
            return Err(self.format_err(offset, NarErrorKind::Unexpected { expected, found }));
        }
        self.string_body(len, expected)?;
        match Tag::from_bytes(&self.scratch) {
            Some(tag) => Ok(tag),
            None => {
                let found = show_bytes(&self.scratch);
                Err(self.format_err(offset, NarErrorKind::Unexpected { expected, found }))
            }
        }
    }

    fn expect(&mut self, want: Tag, expected: &'static str) -> Result<(), NarError> {
        let offset = self.pos;
        let got = self.tag(expected)?;
        if got != want {
            return Err(self.unexpected(offset, expected, got));
        }
        Ok(())
    }

    /// Read a string of at most `max` bytes into `scratch`.
    fn string(&mut self, max: u64, what: &'static str) -> Result<(), NarError> {
        let offset = self.pos;
        let len = self.u64(what)?;
        if len > max {
            return Err(self.format_err(offset, NarErrorKind::TooLong { what, len, max }));
        }
        self.string_body(len, what)
    }

    /// Read `len` (already bounded) bytes into `scratch`, then the padding.
    fn string_body(&mut self, len: u64, what: &'static str) -> Result<(), NarError> {
        let mut buf = std::mem::take(&mut self.scratch);
        // `len` was checked against a limit of at most MAX_TARGET_LEN, so it fits in usize.
        buf.resize(len as usize, 0);
        self.fill(&mut buf, what)?;
        self.scratch = buf;
        self.padding(len)
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let n = padding(len);
        if n > 0 {
            let offset = self.pos;
            let mut pad = [0u8; 8];
            self.fill(&mut pad[..n], "padding")?;
            if pad.iter().any(|&b| b != 0) {
                return Err(self.format_err(offset, NarErrorKind::BadPadding));
            }
        }
        Ok(())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Stream a file's contents (length, bytes, padding) into the sink.
    fn contents(&mut self, sink: &mut dyn Sink) -> Result<(), NarError> {
        let offset = self.pos;
        let len = self.u64("the length of a file's contents")?;
        // No file can be longer than off_t allows; a larger length is garbage, and refusing it
        // here also keeps `len + padding` from overflowing.
        let max = i64::MAX as u64;
        if len > max {
            let what = "a file's contents";
            return Err(self.format_err(offset, NarErrorKind::TooLong { what, len, max }));
        }
        let mut left = len;
        while left > 0 {
            let data_offset = self.pos;
            let avail = match self.input.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(NarError::Read {
                        offset: self.pos,
                        source,
                    })
                }
            };
            if avail.is_empty() {
                let kind = NarErrorKind::Truncated {
                    expected: "a file's contents",
                };
                return Err(NarError::Format {
                    offset: self.pos,
                    kind,
                });
            }
            let n = avail.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let chunk = &avail[..n];
            if let Some(h) = &mut self.hasher {
                h.update(chunk);
            }
            sink.file_data(chunk, data_offset)?;
            self.input.consume(n);
            self.pos += n as u64;
            left -= n as u64;
        }
        self.padding(len)
    }

    /// Fill `buf` from the input, hashing and counting; running out is a truncation error.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), NarError> {
        let mut done = 0;
        while done < buf.len() {
            let avail = match self.input.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(NarError::Read {
                        offset: self.pos,
                        source,
                    })
                }
            };
            if avail.is_empty() {
                let kind = NarErrorKind::Truncated { expected: what };
                return Err(NarError::Format {
                    offset: self.pos,
                    kind,
                });
            }
            let n = avail.len().min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&avail[..n]);
            if let Some(h) = &mut self.hasher {
                h.update(&avail[..n]);
            }
            self.input.consume(n);
            self.pos += n as u64;
            done += n;
        }
        Ok(())
    }
}

/// Why `name` cannot be a directory entry, if it cannot (the rules of Nix's parser).
fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("it is empty")
    } else if name == b"." || name == b".." {
        Err("\".\" and \"..\" are not entries")
    } else if name.contains(&b'/') {
        Err("it contains '/'")
    } else if name.contains(&0) {
        Err("it contains a NUL byte")
    } else {
        Ok(())
    }
}
