//! Reference scanning: which of a set of store paths does an output mention? Nix answers this
//! by searching the output's NAR for the 32-character hash part of every candidate store path
//! (the inputs of the build); each one found is a reference of the output. [`RefScanner`] is a
//! `Write` sink for the NAR bytes that does the same search, across write boundaries.

use std::collections::{BTreeSet, HashSet};
use std::io::{self, Write};

use crate::derivation::base32;

/// Length of the hash part of a store path, in characters.
const HASH_LEN: usize = 32;

/// A `Write` sink that looks for candidate hash parts in everything written to it.
///
/// It keeps the last `HASH_LEN - 1` bytes of the previous write, so a hash split across two
/// writes is still found. Memory is the candidate set plus 31 bytes.
pub struct RefScanner {
    /// Candidates not found yet. Found ones move to `found` so they are not looked for again.
    pending: HashSet<[u8; HASH_LEN]>,
    found: BTreeSet<String>,
    /// The last bytes written (at most `HASH_LEN - 1`), for hashes straddling two writes.
    tail: Vec<u8>,
    /// `is_base32[b]` iff `b` is in Nix's base32 alphabet.
    is_base32: [bool; 256],
}

impl RefScanner {
    /// A scanner for `candidates`: hash parts of store paths (32 characters of Nix base32).
    /// Strings of any other shape can never be found and are ignored.
    pub fn new(candidates: impl IntoIterator<Item = String>) -> Self {
        let mut is_base32 = [false; 256];
        for &c in base32::ALPHABET {
            is_base32[c as usize] = true;
        }
        let pending = candidates
            .into_iter()
            .filter_map(|c| <[u8; HASH_LEN]>::try_from(c.as_bytes()).ok())
            .filter(|c| c.iter().all(|&b| is_base32[b as usize]))
            .collect();
        RefScanner {
            pending,
            found: BTreeSet::new(),
            tail: Vec::with_capacity(2 * HASH_LEN),
            is_base32,
        }
    }

    /// The candidates seen so far.
    pub fn found(&self) -> BTreeSet<String> {
        self.found.clone()
    }

    /// Consume the scanner, returning the candidates seen.
    pub fn into_found(self) -> BTreeSet<String> {
        self.found
    }

    /// Look for candidates in `s`. Windows are checked from their last byte backwards, so a
    /// byte outside the alphabet lets the search skip past it at once.
    fn search(&mut self, s: &[u8]) {
        let mut i = 0;
        while i + HASH_LEN <= s.len() {
            let window = &s[i..i + HASH_LEN];
            if let Some(bad) = window.iter().rposition(|&b| !self.is_base32[b as usize]) {
                i += bad + 1;
                continue;
            }
            if let Ok(key) = <[u8; HASH_LEN]>::try_from(window) {
                if self.pending.remove(&key) {
                    // The alphabet is ASCII, so this is always valid UTF-8.
                    self.found
                        .insert(String::from_utf8_lossy(&key).into_owned());
                }
            }
            i += 1;
        }
    }

    fn scan(&mut self, data: &[u8]) {
        if self.pending.is_empty() || data.is_empty() {
            return;
        }
        // Windows that start in the tail and end in `data`.
        let head = data.len().min(HASH_LEN - 1);
        let mut joined = std::mem::take(&mut self.tail);
        let tail_len = joined.len();
        joined.extend_from_slice(&data[..head]);
        if tail_len > 0 {
            self.search(&joined);
        }
        self.search(data);
        // Keep the last HASH_LEN - 1 bytes of everything seen.
        let keep = HASH_LEN - 1;
        if data.len() >= keep {
            joined.clear();
            joined.extend_from_slice(&data[data.len() - keep..]);
        } else {
            // `joined` is the old tail followed by all of `data`.
            let drop = joined.len().saturating_sub(keep);
            joined.drain(..drop);
        }
        self.tail = joined;
    }
}

impl Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H1: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
    const H2: &str = "7zfd1877wk11c9c730mdqa9w1p6cmli6";

    #[test]
    fn finds_hashes_in_one_write() {
        let mut s = RefScanner::new([H1.to_string(), H2.to_string()]);
        s.write_all(format!("/nix/store/{H1}-foo/bin").as_bytes())
            .unwrap();
        assert_eq!(s.found(), BTreeSet::from([H1.to_string()]));
    }

    proptest! {
        /// A hash is found wherever the input is split into writes.
        #[test]
        fn finds_hashes_across_any_split(
            prefix in proptest::collection::vec(any::<u8>(), 0..100),
            suffix in proptest::collection::vec(any::<u8>(), 0..100),
            cuts in proptest::collection::vec(0usize..300, 0..8),
        ) {
            let mut data = prefix.clone();
            data.extend_from_slice(H1.as_bytes());
            data.extend_from_slice(&suffix);
            let mut cuts = cuts;
            cuts.push(data.len());
            cuts.sort_unstable();
            let mut s = RefScanner::new([H1.to_string(), H2.to_string()]);
            let mut start = 0;
            for c in cuts {
                let c = c.min(data.len());
                if c >= start {
                    s.write_all(&data[start..c]).unwrap();
                    start = c;
                }
            }
            prop_assert!(s.found().contains(H1));
            let h2_there = data.windows(32).any(|w| w == H2.as_bytes());
            prop_assert_eq!(s.found().contains(H2), h2_there);
        }
    }
}
