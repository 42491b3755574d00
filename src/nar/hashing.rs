//! `Write` and `Read` wrappers that count bytes and compute SHA-256 as data passes through:
//! how a NAR's `NarHash`/`NarSize` (or a compressed file's `FileHash`/`FileSize`) is obtained
//! while the bytes are streamed somewhere else, without a second pass.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use crate::derivation::hash::{Hash, HashAlgo};

/// Wraps a writer; every byte the inner writer accepts is hashed and counted.
///
/// Only bytes the inner writer reports as written are hashed, so a short write never makes the
/// hash disagree with what actually reached the destination.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The inner writer, the SHA-256 of everything written and its length. Does not flush:
    /// flush before if the inner writer buffers.
    pub fn finish(self) -> (W, Hash, u64) {
        let hash = Hash {
            algo: HashAlgo::Sha256,
            bytes: self.hasher.finalize().to_vec(),
        };
        (self.inner, hash, self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        // `n <= buf.len()` is the contract of `Write::write`; `get` keeps a broken writer from
        // making us panic.
        if let Some(done) = buf.get(..n) {
            self.hasher.update(done);
        }
        self.count += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.hasher.update(buf);
        self.count += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Wraps a reader; every byte read through it is hashed and counted.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The inner reader, the SHA-256 of everything read and its length.
    pub fn finish(self) -> (R, Hash, u64) {
        let hash = Hash {
            algo: HashAlgo::Sha256,
            bytes: self.hasher.finalize().to_vec(),
        };
        (self.inner, hash, self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(got) = buf.get(..n) {
            self.hasher.update(got);
        }
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_and_reader_agree_with_one_shot_hash() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut w = HashingWriter::new(Vec::new());
        for chunk in data.chunks(999) {
            w.write_all(chunk).unwrap();
        }
        let (inner, hash, n) = w.finish();
        assert_eq!(inner, data);
        assert_eq!(n, data.len() as u64);
        assert_eq!(hash, Hash::sha256(&data));

        let mut r = HashingReader::new(&data[..]);
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).unwrap();
        let (_, hash2, n2) = r.finish();
        assert_eq!((hash2, n2), (hash, n));
    }
}
