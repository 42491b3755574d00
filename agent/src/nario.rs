//! The agent's adapters over `kiln::nar`: dump a path as a NAR, restore a NAR, scan a stream
//! for store path references, count and hash bytes as they pass, and tee a stream into two
//! writers. Hashes come out as `sha256:<nix base32>` strings, as the protocol carries them.

use std::io::{self, Read, Write};
use std::path::Path;

pub use kiln::nar::NarError;

/// Writes the NAR serialisation of `path` to `w`.
pub fn dump<W: Write>(path: &Path, w: &mut W) -> Result<(), NarError> {
    kiln::nar::dump(path, w)
}

/// Restores the NAR read from `r` at `dest`, which must not exist.
pub fn restore<R: Read>(r: &mut R, dest: &Path) -> Result<(), NarError> {
    kiln::nar::restore(r, dest)
}

/// Finds which of a set of 32-character store path hash parts occur in a byte stream.
pub struct RefScanner(kiln::nar::refs::RefScanner);

impl RefScanner {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(hash_parts: I) -> RefScanner {
        RefScanner(kiln::nar::refs::RefScanner::new(
            hash_parts.into_iter().map(|h| h.as_ref().to_owned()),
        ))
    }

    /// The hash parts seen so far, sorted.
    pub fn found(&self) -> Vec<String> {
        self.0.found().into_iter().collect()
    }
}

impl Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Counts and sha256-hashes the bytes written through it.
pub struct HashCounter<W>(kiln::nar::HashingWriter<W>);

impl<W: Write> HashCounter<W> {
    pub fn new(inner: W) -> HashCounter<W> {
        HashCounter(kiln::nar::HashingWriter::new(inner))
    }
    /// `(sha256:<nix base32>, byte count, inner writer)`.
    pub fn finish(self) -> (String, u64, W) {
        let (inner, hash, count) = self.0.finish();
        (hash.to_nix_string(), count, inner)
    }
}

impl<W: Write> Write for HashCounter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Counts and sha256-hashes the bytes read through it.
pub struct HashReader<R>(kiln::nar::HashingReader<R>);

impl<R: Read> HashReader<R> {
    pub fn new(inner: R) -> HashReader<R> {
        HashReader(kiln::nar::HashingReader::new(inner))
    }
    /// `(sha256:<nix base32>, byte count)`.
    pub fn finish(self) -> (String, u64) {
        let (_, hash, count) = self.0.finish();
        (hash.to_nix_string(), count)
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// Writes everything to two writers.
pub struct Tee<A, B>(pub A, pub B);

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt as _};

    const H1: &str = "0123456789abcdfghijklmnpqrsvwxyz";
    const H2: &str = "zyxwvsrqpnmlkjihgfdcba9876543210";

    #[test]
    fn finds_hashes_split_across_writes() {
        let text = format!("..{H1}/bin and {H2}");
        for split in 0..text.len() {
            let mut s = RefScanner::new([H1, H2, "ffffffffffffffffffffffffffffffff"]);
            s.write_all(&text.as_bytes()[..split]).unwrap();
            s.write_all(&text.as_bytes()[split..]).unwrap();
            let mut want = vec![H1.to_owned(), H2.to_owned()];
            want.sort();
            assert_eq!(s.found(), want, "split at {split}");
        }
    }

    #[test]
    fn dump_restore_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("d/f"), [0xffu8, 0, 1]).unwrap();
        fs::write(src.join("x"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("x"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("d/f", src.join("l")).unwrap();
        let mut nar = Vec::new();
        dump(&src, &mut nar).unwrap();
        let dst = tmp.path().join("dst");
        restore(&mut nar.as_slice(), &dst).unwrap();
        let mut again = Vec::new();
        dump(&dst, &mut again).unwrap();
        assert_eq!(nar, again);
    }
}
