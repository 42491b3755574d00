//! Content-addressed store paths of sources: the path a store gives a file tree it is handed
//! (`nix-store --add`, `builtins.path`, `builtins.toFile`, Guix's `add-to-store` and
//! `add-text-to-store`), computed from its NAR, its name and its references. The coordinator
//! accepts an uploaded source only under that path: a source is the client's data, and a path
//! is a promise about the data behind it.
//!
//! The three ways a store names such a path (Nix 2.8 `makeFixedOutputPath`, `makeTextPath`,
//! `makeType`; guix-daemon's are the same, from the Nix it forked):
//!
//! | kind | when | type string | inner hash |
//! |---|---|---|---|
//! | source | recursive (NAR) SHA-256, the default of `nix-store --add` and Guix's `local-file … #:recursive? #t` | `source:<ref>…[:self]` | SHA-256 of the NAR |
//! | text | a single regular file with references (`builtins.toFile`, `add-text-to-store`) | `text:<ref>…` | SHA-256 of the file's contents |
//! | flat | a single regular file added by content (`nix-store --add-fixed sha256`, Guix's `local-file`'s default) | `output:out` | SHA-256 of `fixed:out:sha256:<hex>:` |
//!
//! References are full store paths, sorted; a source that refers to itself says `:self`
//! instead of its own path.

use std::io::{self, Read};

use crate::derivation::hash::{Hash, HashAlgo};
use crate::derivation::paths::make_store_path;
use crate::derivation::store_path::{StoreDir, StorePath, StorePathError};

/// How a content-addressed path was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// Recursive SHA-256 of the NAR (`fixed:r:sha256`).
    Source,
    /// A text file's contents, with references (`text:sha256`).
    Text,
    /// A flat file's contents, no references (`fixed:sha256`).
    Flat,
}

/// A regular file at the root of a NAR: the SHA-256 of its contents and whether it is
/// executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatFile {
    pub sha256: Hash,
    pub executable: bool,
}

/// The candidate paths of a source and how each is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub kind: CaKind,
    pub path: StorePath,
    /// The narinfo `CA` field of the path named so.
    pub ca: String,
}

fn type_string(store_dir: &StoreDir, ty: &str, refs: &[&StorePath], self_ref: bool) -> String {
    let mut sorted: Vec<&StorePath> = refs.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut s = ty.to_string();
    for r in sorted {
        s.push(':');
        s.push_str(&store_dir.full_path(r));
    }
    if self_ref {
        s.push_str(":self");
    }
    s
}

/// Every path a store could have given this content under `name` with `references`:
/// the source path always; the text and flat paths too when the NAR is a single
/// non-executable regular file (`flat`), the flat one only without references.
/// `this` is the path the uploader claims, so that a reference to itself is recognised.
pub fn candidates(
    store_dir: &StoreDir,
    name: &str,
    nar_hash: &Hash,
    flat: Option<&FlatFile>,
    references: &[StorePath],
    this: Option<&StorePath>,
) -> Result<Vec<Candidate>, StorePathError> {
    let self_ref = this.is_some_and(|t| references.contains(t));
    let others: Vec<&StorePath> = references.iter().filter(|r| Some(*r) != this).collect();
    let mut out = vec![Candidate {
        kind: CaKind::Source,
        path: make_store_path(
            store_dir,
            &type_string(store_dir, "source", &others, self_ref),
            nar_hash,
            name,
        )?,
        ca: format!("fixed:r:{}", nar_hash.to_nix_string()),
    }];
    if let Some(f) = flat.filter(|f| !f.executable && !self_ref) {
        out.push(Candidate {
            kind: CaKind::Text,
            path: make_store_path(
                store_dir,
                &type_string(store_dir, "text", &others, false),
                &f.sha256,
                name,
            )?,
            ca: format!("text:{}", f.sha256.to_nix_string()),
        });
        if others.is_empty() {
            let inner = format!("fixed:out:sha256:{}:", f.sha256.to_base16());
            out.push(Candidate {
                kind: CaKind::Flat,
                path: make_store_path(
                    store_dir,
                    "output:out",
                    &Hash::sha256(inner.as_bytes()),
                    name,
                )?,
                ca: format!("fixed:{}", f.sha256.to_nix_string()),
            });
        }
    }
    Ok(out)
}

/// Read one NAR string (length, bytes, padding); `None` if it is longer than `max`.
fn read_str(r: &mut impl Read, max: u64) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > max {
        return Ok(None);
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b)?;
    let mut pad = vec![0u8; super::padding(len)];
    r.read_exact(&mut pad)?;
    Ok(Some(b))
}

/// If the NAR (already validated) is a single regular file, the SHA-256 of its contents and
/// whether it is executable; `None` for a directory or a symlink. Streams the contents.
pub fn flat_file(nar: &mut impl Read) -> io::Result<Option<FlatFile>> {
    for want in [&b"nix-archive-1"[..], b"(", b"type", b"regular"] {
        if read_str(nar, 64)?.as_deref() != Some(want) {
            return Ok(None);
        }
    }
    let mut executable = false;
    let mut tag = read_str(nar, 64)?;
    if tag.as_deref() == Some(b"executable") {
        executable = true;
        read_str(nar, 64)?;
        tag = read_str(nar, 64)?;
    }
    if tag.as_deref() != Some(b"contents") {
        return Ok(None);
    }
    let mut len = [0u8; 8];
    nar.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    let mut h = crate::nar::HashingWriter::new(io::sink());
    io::copy(&mut nar.take(len), &mut h)?;
    let (_, sha256, got) = h.finish();
    if got != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the NAR ends inside the file's contents",
        ));
    }
    debug_assert_eq!(sha256.algo, HashAlgo::Sha256);
    Ok(Some(FlatFile { sha256, executable }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nar_of(path: &std::path::Path) -> Vec<u8> {
        let mut out = Vec::new();
        crate::nar::dump(path, &mut out).unwrap();
        out
    }

    #[test]
    fn flat_file_reads_regular_files_only() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"hello\n").unwrap();
        let got = flat_file(&mut &nar_of(&f)[..]).unwrap().unwrap();
        assert_eq!(got.sha256, Hash::sha256(b"hello\n"));
        assert!(!got.executable);
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(flat_file(&mut &nar_of(&f)[..]).unwrap().unwrap().executable);
        let d = tmp.path().join("d");
        std::fs::create_dir(&d).unwrap();
        assert_eq!(flat_file(&mut &nar_of(&d)[..]).unwrap(), None);
        std::os::unix::fs::symlink("f", tmp.path().join("l")).unwrap();
        assert_eq!(
            flat_file(&mut &nar_of(&tmp.path().join("l"))[..]).unwrap(),
            None
        );
    }

    /// Which candidates there are and what references change; that the paths are the ones
    /// Nix gives is checked against Nix 2.8 itself in tests/source_paths.rs.
    #[test]
    fn candidates_include_source_text_and_flat_paths() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let nar_hash = Hash::sha256(b"not a real nar");
        let flat = FlatFile {
            sha256: Hash::sha256(b"x"),
            executable: false,
        };
        let c = candidates(&sd, "x", &nar_hash, Some(&flat), &[], None).unwrap();
        assert_eq!(
            c.iter().map(|c| c.kind).collect::<Vec<_>>(),
            [CaKind::Source, CaKind::Text, CaKind::Flat]
        );
        assert!(c[0].ca.starts_with("fixed:r:sha256:"));
        // References change the source and text paths; a flat path has none.
        let r = StorePath::from_base_name("0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-dep").unwrap();
        let with = candidates(
            &sd,
            "x",
            &nar_hash,
            Some(&flat),
            std::slice::from_ref(&r),
            None,
        )
        .unwrap();
        assert_eq!(with.len(), 2);
        assert_ne!(with[0].path, c[0].path);
        assert_ne!(with[1].path, c[1].path);
        // A self-reference is ":self", not the path.
        let this = c[0].path.clone();
        let selfish = candidates(
            &sd,
            "x",
            &nar_hash,
            None,
            std::slice::from_ref(&this),
            Some(&this),
        )
        .unwrap();
        assert_ne!(selfish[0].path, this);
        assert_eq!(selfish.len(), 1);
    }
}
