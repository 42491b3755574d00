//! Private NAR plumbing of the agent: dump a path as a NAR, restore a NAR into a path, scan a
//! stream for store path references, and count and hash bytes as they pass.
//!
//! `kiln::nar` is meant to own the NAR format; when this was written it had no API yet, so the
//! agent carries this small streaming implementation (constant memory, bytes everywhere). It is
//! the one place to switch to `kiln::nar::{dump, restore, refs::RefScanner, HashingWriter}`.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::path::Path;

use sha2::{Digest as _, Sha256};

const MAGIC: &[u8] = b"nix-archive-1";

fn write_str<W: Write>(w: &mut W, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    pad(w, s.len() as u64)
}

fn pad<W: Write>(w: &mut W, len: u64) -> io::Result<()> {
    let n = (8 - (len % 8) as usize) % 8;
    w.write_all(&[0u8; 8][..n])
}

/// Writes the NAR serialisation of `path` to `w`.
pub fn dump<W: Write>(path: &Path, w: &mut W) -> io::Result<()> {
    write_str(w, MAGIC)?;
    dump_entry(path, w)
}

fn dump_entry<W: Write>(path: &Path, w: &mut W) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    write_str(w, b"(")?;
    write_str(w, b"type")?;
    if meta.file_type().is_symlink() {
        write_str(w, b"symlink")?;
        write_str(w, b"target")?;
        write_str(w, fs::read_link(path)?.as_os_str().as_bytes())?;
    } else if meta.is_file() {
        write_str(w, b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            write_str(w, b"executable")?;
            write_str(w, b"")?;
        }
        write_str(w, b"contents")?;
        w.write_all(&meta.len().to_le_bytes())?;
        let copied = io::copy(&mut fs::File::open(path)?, w)?;
        if copied != meta.len() {
            return Err(io::Error::other(format!(
                "{} changed size while being archived",
                path.display()
            )));
        }
        pad(w, copied)?;
    } else if meta.is_dir() {
        write_str(w, b"directory")?;
        let mut names: Vec<_> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            write_str(w, b"entry")?;
            write_str(w, b"(")?;
            write_str(w, b"name")?;
            write_str(w, name.as_bytes())?;
            write_str(w, b"node")?;
            dump_entry(&path.join(&name), w)?;
            write_str(w, b")")?;
        }
    } else {
        return Err(io::Error::other(format!(
            "{} is neither a file, a directory nor a symlink",
            path.display()
        )));
    }
    write_str(w, b")")
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u64<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn skip_pad<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let n = (8 - (len % 8) as usize) % 8;
    let mut b = [0u8; 8];
    r.read_exact(&mut b[..n])?;
    if b[..n].iter().any(|&c| c != 0) {
        return Err(bad("non-zero NAR padding"));
    }
    Ok(())
}

/// Reads a short NAR string (tokens, names, targets: at most 4 KiB).
fn read_str<R: Read>(r: &mut R) -> io::Result<Vec<u8>> {
    let len = read_u64(r)?;
    if len > 4096 {
        return Err(bad(format!("NAR string of {len} bytes is too long")));
    }
    let mut s = vec![0u8; len as usize];
    r.read_exact(&mut s)?;
    skip_pad(r, len)?;
    Ok(s)
}

fn expect<R: Read>(r: &mut R, want: &[u8]) -> io::Result<()> {
    let got = read_str(r)?;
    if got != want {
        return Err(bad(format!(
            "NAR: expected {:?}, found {:?}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(&got)
        )));
    }
    Ok(())
}

/// Restores the NAR read from `r` at `dest`, which must not exist.
pub fn restore<R: Read>(r: &mut R, dest: &Path) -> io::Result<()> {
    expect(r, MAGIC)?;
    restore_entry(r, dest)
}

fn restore_entry<R: Read>(r: &mut R, dest: &Path) -> io::Result<()> {
    expect(r, b"(")?;
    expect(r, b"type")?;
    match read_str(r)?.as_slice() {
        b"symlink" => {
            expect(r, b"target")?;
            let target = read_str(r)?;
            symlink(std::ffi::OsStr::from_bytes(&target), dest)?;
            expect(r, b")")
        }
        b"regular" => restore_file(r, dest),
        b"directory" => restore_dir(r, dest),
        other => Err(bad(format!(
            "NAR: unknown node type {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

fn restore_file<R: Read>(r: &mut R, dest: &Path) -> io::Result<()> {
    let mut tag = read_str(r)?;
    let mut executable = false;
    if tag == b"executable" {
        expect(r, b"")?;
        executable = true;
        tag = read_str(r)?;
    }
    if tag != b"contents" {
        return Err(bad("NAR: expected contents"));
    }
    let len = read_u64(r)?;
    let mut f = fs::OpenOptions::new().write(true).create_new(true).open(dest)?;
    let copied = io::copy(&mut r.take(len), &mut f)?;
    if copied != len {
        return Err(bad("NAR: truncated file contents"));
    }
    skip_pad(r, len)?;
    let mode = if executable { 0o555 } else { 0o444 };
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    expect(r, b")")
}

fn restore_dir<R: Read>(r: &mut R, dest: &Path) -> io::Result<()> {
    fs::create_dir(dest)?;
    let mut previous: Option<Vec<u8>> = None;
    loop {
        match read_str(r)?.as_slice() {
            b")" => return Ok(()),
            b"entry" => {}
            _ => return Err(bad("NAR: expected entry or )")),
        }
        expect(r, b"(")?;
        expect(r, b"name")?;
        let name = read_str(r)?;
        let invalid = name.is_empty() || name == b"." || name == b".." || name.contains(&b'/');
        if invalid || name.contains(&0) || previous.as_ref().is_some_and(|p| *p >= name) {
            return Err(bad(format!(
                "NAR: invalid or unsorted entry name {:?}",
                String::from_utf8_lossy(&name)
            )));
        }
        expect(r, b"node")?;
        restore_entry(r, &dest.join(std::ffi::OsStr::from_bytes(&name)))?;
        expect(r, b")")?;
        previous = Some(name);
    }
}

/// Finds which of a set of 32-character store path hash parts occur in a byte stream.
pub struct RefScanner {
    candidates: BTreeSet<[u8; 32]>,
    found: BTreeSet<[u8; 32]>,
    /// The last 31 bytes seen, so a hash split across two writes is still found.
    tail: Vec<u8>,
}

const HASH_LEN: usize = 32;

impl RefScanner {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(hash_parts: I) -> RefScanner {
        let candidates = hash_parts
            .into_iter()
            .filter_map(|h| <[u8; 32]>::try_from(h.as_ref().as_bytes()).ok())
            .collect();
        RefScanner {
            candidates,
            found: BTreeSet::new(),
            tail: Vec::with_capacity(2 * HASH_LEN),
        }
    }

    /// The hash parts seen so far, sorted.
    pub fn found(&self) -> Vec<String> {
        self.found
            .iter()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .collect()
    }

    fn scan(&mut self, data: &[u8]) {
        let mut i = 0;
        'outer: while i + HASH_LEN <= data.len() {
            for j in (0..HASH_LEN).rev() {
                if kiln::derivation::base32::char_value(data[i + j]).is_none() {
                    i += j + 1;
                    continue 'outer;
                }
            }
            if let Ok(window) = <[u8; 32]>::try_from(&data[i..i + HASH_LEN]) {
                if self.candidates.contains(&window) {
                    self.found.insert(window);
                }
            }
            i += 1;
        }
    }
}

impl Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.candidates.is_empty() {
            return Ok(buf.len());
        }
        // Scan the seam (tail + head of buf), then buf itself.
        let head = &buf[..buf.len().min(HASH_LEN - 1)];
        let mut seam = std::mem::take(&mut self.tail);
        seam.extend_from_slice(head);
        self.scan(&seam);
        self.scan(buf);
        let keep_from = seam.len().saturating_sub(HASH_LEN - 1);
        let mut tail = seam.split_off(keep_from);
        if buf.len() >= HASH_LEN - 1 {
            tail.clear();
            tail.extend_from_slice(&buf[buf.len() - (HASH_LEN - 1)..]);
        }
        self.tail = tail;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts and sha256-hashes the bytes written through it.
pub struct HashCounter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashCounter<W> {
    pub fn new(inner: W) -> HashCounter<W> {
        HashCounter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// `(sha256:<nix base32>, byte count, inner writer)`.
    pub fn finish(self) -> (String, u64, W) {
        (nix_sha256(self.hasher), self.count, self.inner)
    }
}

impl<W: Write> Write for HashCounter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts and sha256-hashes the bytes read through it.
pub struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashReader<R> {
    pub fn new(inner: R) -> HashReader<R> {
        HashReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// `(sha256:<nix base32>, byte count)`.
    pub fn finish(self) -> (String, u64) {
        (nix_sha256(self.hasher), self.count)
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn nix_sha256(h: Sha256) -> String {
    format!("sha256:{}", kiln::derivation::base32::encode(&h.finalize()))
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
