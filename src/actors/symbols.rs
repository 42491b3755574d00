//! Interned names the scheduler works with: systems and tag sets become small integer ids, and
//! store paths become 20-byte digests. A queued build then costs a few ids in memory instead of
//! owned strings, and the allocator's groups are keyed by `(system id, tag set id)`.
//!
//! One [`Symbols`] table lives for the whole process and is shared by the build queue and the
//! allocator (an `Arc`), so an id means the same thing to both and survives their restarts. It
//! only grows: a system or a tag set, once seen, keeps its id. Both are few in a real farm
//! (the distinct `system` strings of the derivations and the distinct tag sets of the
//! submissions); a client that submits a million distinct tag sets pays their memory.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest as _, Sha256};

/// The id of an interned system string.
pub type SystemId = u32;
/// The id of an interned, normalised (sorted, deduplicated) tag set. 0 is the empty set.
pub type TagSetId = u32;
/// A normalised tag set.
pub type TagSet = Arc<[(String, String)]>;

/// The system of `builtin:` derivations (e.g. `builtin:fetchurl`): any agent may build them.
pub const BUILTIN_SYSTEM: &str = "builtin";

/// A store path as the scheduler keys it: the 160 bits of its 32-character nix-base32 hash
/// part, or (for a path without a valid hash part, which validated input never has) the first
/// 20 bytes of the SHA-256 of the whole path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathDigest(pub [u8; 20]);

impl PathDigest {
    pub fn of(path: &str) -> PathDigest {
        let base = path.rsplit('/').next().unwrap_or(path);
        if let Some(hash) = base.as_bytes().get(..32) {
            if base.as_bytes().get(32).is_none_or(|c| *c == b'-') {
                if let Some(d) = decode_hash_part(hash) {
                    return PathDigest(d);
                }
            }
        }
        let h = Sha256::digest(path.as_bytes());
        let mut d = [0u8; 20];
        d.copy_from_slice(&h[..20]);
        PathDigest(d)
    }
}

/// Nix base32 (the last character holds the lowest bits) of a 32-character hash part into
/// its 20 bytes, without allocating (the start-up scan does this for every path); `None` for a
/// character outside the alphabet.
fn decode_hash_part(hash: &[u8]) -> Option<[u8; 20]> {
    let mut out = [0u8; 20];
    for (pos, c) in hash.iter().enumerate() {
        let v = crate::derivation::base32::char_value(*c)? as u16;
        let b = (hash.len() - 1 - pos) * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = (v << j) as u8;
        let hi = (v >> (8 - j)) as u8;
        out[i] |= lo;
        if i + 1 < 20 {
            out[i + 1] |= hi;
        } else if hi != 0 {
            return None;
        }
    }
    Some(out)
}

#[derive(Default)]
struct Inner {
    systems: Vec<Arc<str>>,
    system_ids: HashMap<Arc<str>, SystemId>,
    tag_sets: Vec<TagSet>,
    tag_set_ids: HashMap<TagSet, TagSetId>,
}

/// The process-wide table of systems and tag sets (see the module doc).
pub struct Symbols {
    inner: RwLock<Inner>,
}

impl Default for Symbols {
    fn default() -> Symbols {
        let empty: TagSet = Arc::from(Vec::new());
        let mut inner = Inner::default();
        inner.tag_sets.push(empty.clone());
        inner.tag_set_ids.insert(empty, 0);
        Symbols {
            inner: RwLock::new(inner),
        }
    }
}

impl Symbols {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere while interning; the table is append-only
        // and every append completes before it is visible, so it stays usable.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of `system`, interning it if new.
    pub fn system(&self, system: &str) -> SystemId {
        if let Some(id) = self.read().system_ids.get(system) {
            return *id;
        }
        let mut w = self.write();
        if let Some(id) = w.system_ids.get(system) {
            return *id;
        }
        let id = w.systems.len() as SystemId;
        let s: Arc<str> = Arc::from(system);
        w.systems.push(s.clone());
        w.system_ids.insert(s, id);
        id
    }

    /// The id of `system` if it was ever seen.
    pub fn find_system(&self, system: &str) -> Option<SystemId> {
        self.read().system_ids.get(system).copied()
    }

    /// The name of a system id ("" for an id never handed out).
    pub fn system_name(&self, id: SystemId) -> Arc<str> {
        self.read()
            .systems
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// The id of a tag set (order and duplicates do not matter), interning it if new.
    pub fn tag_set<S: AsRef<str>>(&self, tags: &[(S, S)]) -> TagSetId {
        if tags.is_empty() {
            return 0;
        }
        let mut norm: Vec<(String, String)> = tags
            .iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
            .collect();
        norm.sort();
        norm.dedup();
        let norm: TagSet = Arc::from(norm);
        if let Some(id) = self.read().tag_set_ids.get(&norm) {
            return *id;
        }
        let mut w = self.write();
        if let Some(id) = w.tag_set_ids.get(&norm) {
            return *id;
        }
        let id = w.tag_sets.len() as TagSetId;
        w.tag_sets.push(norm.clone());
        w.tag_set_ids.insert(norm, id);
        id
    }

    /// The tags of a tag set id (empty for an id never handed out).
    pub fn tags(&self, id: TagSetId) -> TagSet {
        self.read()
            .tag_sets
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_tag_sets_normalised() {
        let s = Symbols::default();
        let x = s.system("x86_64-linux");
        assert_eq!(s.system("x86_64-linux"), x);
        assert_ne!(s.system("i586-gnu"), x);
        assert_eq!(&*s.system_name(x), "x86_64-linux");
        assert_eq!(s.tag_set::<&str>(&[]), 0);
        let a = s.tag_set(&[("b", "1"), ("a", "2")]);
        let b = s.tag_set(&[("a", "2"), ("b", "1"), ("a", "2")]);
        assert_eq!(a, b);
        assert_eq!(s.tags(a).len(), 2);
    }

    /// The allocation-free decoder agrees with the crate's nix-base32 decoder.
    #[test]
    fn hash_part_decoding_matches_base32() {
        for seed in 0u8..50 {
            let bytes: Vec<u8> = (0..20)
                .map(|i| seed.wrapping_mul(31).wrapping_add(i * 7))
                .collect();
            let text = crate::derivation::base32::encode(&bytes);
            assert_eq!(decode_hash_part(text.as_bytes()).unwrap().to_vec(), bytes);
        }
        assert!(decode_hash_part(b"0123456789abcdfghijklmnpqrsvwxye").is_none());
    }

    #[test]
    fn path_digests_use_the_hash_part() {
        let p = "/gnu/store/0123456789abcdfghijklmnpqrsvwxyz-hello-1.0";
        let q = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-other";
        // Same hash part, same digest (a store path is named by its hash part).
        assert_eq!(PathDigest::of(p), PathDigest::of(q));
        assert_ne!(
            PathDigest::of(p),
            PathDigest::of("/gnu/store/1123456789abcdfghijklmnpqrsvwxyz-hello-1.0")
        );
        // Not a store path: hashed whole, still stable.
        assert_eq!(PathDigest::of("/tmp/x"), PathDigest::of("/tmp/x"));
        assert_ne!(PathDigest::of("/tmp/x"), PathDigest::of("/tmp/y"));
    }
}
