//! Store directories and store paths. A store path is `<storedir>/<hash>-<name>`: a 32-char
//! Nix base32 hash part and a name of at most 211 characters from `[A-Za-z0-9+-._?=]`, the
//! rules of Nix 2.8's `StorePath` (`src/libstore/path.cc`). Which store directory a
//! derivation lives in is resolved once: the `--store-dir` flag, else `KILN_STORE_DIR`, else
//! the directory all of its paths share, which must be `/gnu/store` or `/nix/store`.

use std::fmt;
use std::path::Path;

use thiserror::Error;

use super::base32;

/// Length of the hash part of a store path (20 bytes in Nix base32).
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix allows in a store path.
pub const MAX_NAME_LEN: usize = 211;
/// The environment variable naming the store directory when no flag is given.
pub const STORE_DIR_ENV: &str = "KILN_STORE_DIR";
/// The store directories Kiln recognises without being told.
pub const WELL_KNOWN_STORE_DIRS: [&str; 2] = ["/gnu/store", "/nix/store"];

/// Why a store directory or store path is not valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    #[error("store directory {0:?} is not valid: {1}")]
    BadStoreDir(String, &'static str),
    #[error("path {path:?} is not in the store directory {store_dir}")]
    NotInStore { path: String, store_dir: String },
    #[error("path {0:?} is not canonical (no '.', '..', '//' or trailing '/' allowed)")]
    NotCanonical(String),
    #[error(
        "store path base name {0:?} is too short (expected a 32-character hash, '-' and a name)"
    )]
    TooShort(String),
    #[error("store path {0:?} has an invalid hash part (expected 32 nix base32 characters followed by '-')")]
    BadHashPart(String),
    #[error("store path {0:?} has an empty name")]
    EmptyName(String),
    #[error("store path {0:?} has a name longer than 211 characters")]
    NameTooLong(String),
    #[error("store path {path:?} contains the illegal character {ch:?} in its name")]
    BadNameChar { path: String, ch: char },
    #[error("cannot tell the store directory: {0}; pass --store-dir or set KILN_STORE_DIR")]
    Unresolved(String),
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether `c` may appear in a store path name (Nix 2.8's `checkName`).
pub fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
}

/// Check a store path name; `whole` is what errors quote.
fn check_name(name: &[u8], whole: &[u8]) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName(lossy(whole)));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(lossy(whole)));
    }
    if let Some(&c) = name.iter().find(|&&c| !is_name_char(c)) {
        return Err(StorePathError::BadNameChar {
            path: lossy(whole),
            ch: c as char,
        });
    }
    Ok(())
}

/// Whether `p` is an absolute path with no `.`/`..`/empty components and no trailing `/`.
fn is_canonical(p: &[u8]) -> bool {
    p.first() == Some(&b'/')
        && p.len() > 1
        && p[1..]
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// A store directory such as `/gnu/store`: absolute, canonical, no trailing slash, UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreDir(String);

impl StoreDir {
    /// Check and wrap a store directory.
    pub fn new(path: impl AsRef<Path>) -> Result<StoreDir, StorePathError> {
        let path = path.as_ref();
        let shown = path.to_string_lossy().into_owned();
        let s = path.to_str().ok_or(StorePathError::BadStoreDir(
            shown.clone(),
            "it is not valid UTF-8",
        ))?;
        if !s.starts_with('/') {
            return Err(StorePathError::BadStoreDir(
                shown,
                "it is not an absolute path",
            ));
        }
        if s == "/" {
            return Err(StorePathError::BadStoreDir(
                shown,
                "it is the root directory",
            ));
        }
        if !is_canonical(s.as_bytes()) {
            return Err(StorePathError::BadStoreDir(
                shown,
                "it is not canonical (no '.', '..', '//' or trailing '/')",
            ));
        }
        Ok(StoreDir(s.to_string()))
    }

    /// The directory, e.g. `/gnu/store`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Resolve the store directory: `flag` if given, else `KILN_STORE_DIR` if set and not
    /// empty, else the one of `/gnu/store` and `/nix/store` under which all `paths` lie.
    pub fn resolve(flag: Option<&Path>, paths: &[&[u8]]) -> Result<StoreDir, StorePathError> {
        let env = std::env::var_os(STORE_DIR_ENV);
        Self::resolve_with_env(flag, env.as_deref().map(Path::new), paths)
    }

    /// [`StoreDir::resolve`] with the environment variable's value passed in (for tests).
    pub fn resolve_with_env(
        flag: Option<&Path>,
        env: Option<&Path>,
        paths: &[&[u8]],
    ) -> Result<StoreDir, StorePathError> {
        if let Some(dir) = flag {
            return StoreDir::new(dir);
        }
        if let Some(dir) = env.filter(|d| !d.as_os_str().is_empty()) {
            return StoreDir::new(dir);
        }
        let Some(first) = paths.first() else {
            return Err(StorePathError::Unresolved(
                "there are no store paths to guess it from".into(),
            ));
        };
        let known = WELL_KNOWN_STORE_DIRS
            .iter()
            .find(|d| first.starts_with(d.as_bytes()) && first.get(d.len()) == Some(&b'/'));
        let Some(dir) = known else {
            return Err(StorePathError::Unresolved(format!(
                "path {:?} is under neither /gnu/store nor /nix/store",
                lossy(first)
            )));
        };
        for p in paths {
            if !(p.starts_with(dir.as_bytes()) && p.get(dir.len()) == Some(&b'/')) {
                return Err(StorePathError::Unresolved(format!(
                    "path {:?} is not under {dir} like {:?}",
                    lossy(p),
                    lossy(first)
                )));
            }
        }
        StoreDir::new(dir)
    }

    /// Parse a full path that must lie directly in this store directory.
    pub fn parse_path(&self, path: &[u8]) -> Result<StorePath, StorePathError> {
        let dir = self.0.as_bytes();
        let in_dir = path.len() > dir.len() + 1 && path.starts_with(dir) && path[dir.len()] == b'/';
        if !in_dir {
            return Err(StorePathError::NotInStore {
                path: lossy(path),
                store_dir: self.0.clone(),
            });
        }
        let base = &path[dir.len() + 1..];
        if !is_canonical(path) {
            return Err(StorePathError::NotCanonical(lossy(path)));
        }
        if base.contains(&b'/') {
            return Err(StorePathError::NotInStore {
                path: lossy(path),
                store_dir: self.0.clone(),
            });
        }
        StorePath::from_base_name_bytes(base).map_err(|e| match e {
            // Quote the whole path rather than the base name.
            StorePathError::BadNameChar { ch, .. } => StorePathError::BadNameChar {
                path: lossy(path),
                ch,
            },
            e => e,
        })
    }

    /// `<storedir>/<hash>-<name>`.
    pub fn full_path(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path.0)
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A store path without its directory: `<hash>-<name>`. Ordered as Nix orders store paths
/// (by base name), so sorted sets print in Nix's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath(String);

impl StorePath {
    /// Parse `<hash>-<name>`.
    pub fn from_base_name(s: &str) -> Result<StorePath, StorePathError> {
        Self::from_base_name_bytes(s.as_bytes())
    }

    /// Parse `<hash>-<name>` given as bytes.
    pub fn from_base_name_bytes(base: &[u8]) -> Result<StorePath, StorePathError> {
        if base.len() < HASH_PART_LEN + 2 {
            return Err(StorePathError::TooShort(lossy(base)));
        }
        let (hash, rest) = base.split_at(HASH_PART_LEN);
        if !hash.iter().all(|&c| base32::char_value(c).is_some()) || rest[0] != b'-' {
            return Err(StorePathError::BadHashPart(lossy(base)));
        }
        check_name(&rest[1..], base)?;
        // Every byte was checked to be ASCII above, so this never fails.
        let s = String::from_utf8(base.to_vec())
            .map_err(|_| StorePathError::BadHashPart(lossy(base)))?;
        Ok(StorePath(s))
    }

    /// A store path from a 20-byte hash and a name.
    pub fn from_hash(hash: &[u8; 20], name: &str) -> Result<StorePath, StorePathError> {
        let base = format!("{}-{name}", base32::encode(hash));
        check_name(name.as_bytes(), base.as_bytes())?;
        Ok(StorePath(base))
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.0[..HASH_PART_LEN]
    }

    /// The name after the hash and `-`.
    pub fn name(&self) -> &str {
        &self.0[HASH_PART_LEN + 1..]
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        self.0.clone()
    }

    /// `<hash>-<name>`, borrowed.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name ends in `.drv`.
    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }
}

impl std::str::FromStr for StorePath {
    type Err = StorePathError;

    /// Parse `<hash>-<name>`.
    fn from_str(s: &str) -> Result<StorePath, StorePathError> {
        StorePath::from_base_name(s)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-bash-5.1.drv";

    fn nix() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    #[test]
    fn store_dir_must_be_canonical() {
        assert!(StoreDir::new("/gnu/store").is_ok());
        for bad in [
            "gnu/store",
            "/gnu/store/",
            "/gnu//store",
            "/gnu/./store",
            "/",
            "",
        ] {
            assert!(StoreDir::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_store_paths() {
        let p = nix().parse_path(P.as_bytes()).unwrap();
        assert_eq!(p.hash_part(), "0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy");
        assert_eq!(p.name(), "bash-5.1.drv");
        assert!(p.is_derivation());
        assert_eq!(nix().full_path(&p), P);
        assert_eq!(StorePath::from_base_name(&p.base_name()).unwrap(), p);
        assert_eq!(p.to_string(), p.base_name());
    }

    #[test]
    fn refuses_bad_store_paths() {
        let s = nix();
        type Expect = fn(&StorePathError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("/gnu/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-x", |e| {
                matches!(e, StorePathError::NotInStore { .. })
            }),
            ("/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-x/bin", |e| {
                matches!(e, StorePathError::NotInStore { .. })
            }),
            ("/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-x/", |e| {
                matches!(e, StorePathError::NotCanonical(_))
            }),
            ("/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-", |e| {
                matches!(e, StorePathError::TooShort(_))
            }),
            ("/nix/store/ejvxqc5hvm4h6kfml5a4k4bhnswm4zjy-x", |e| {
                matches!(e, StorePathError::BadHashPart(_))
            }),
            ("/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy_x", |e| {
                matches!(e, StorePathError::BadHashPart(_))
            }),
            ("/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-a b", |e| {
                matches!(e, StorePathError::BadNameChar { ch: ' ', .. })
            }),
            ("/nix/store", |e| {
                matches!(e, StorePathError::NotInStore { .. })
            }),
        ];
        for (path, ok) in cases {
            let e = s.parse_path(path.as_bytes()).expect_err(path);
            assert!(ok(&e), "{path}: {e}");
        }
        let long = format!(
            "/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-{}",
            "a".repeat(212)
        );
        assert!(matches!(
            s.parse_path(long.as_bytes()),
            Err(StorePathError::NameTooLong(_))
        ));
        let ok = format!(
            "/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-{}",
            "a".repeat(211)
        );
        assert!(s.parse_path(ok.as_bytes()).is_ok());
    }

    #[test]
    fn resolves_store_dir() {
        let g: &[u8] = b"/gnu/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-x";
        let n: &[u8] = b"/nix/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-x";
        let t: &[u8] = b"/tmp/store/0jvxqc5hvm4h6kfml5a4k4bhnswm4zjy-x";
        let r = |flag: Option<&str>, env: Option<&str>, paths: &[&[u8]]| {
            StoreDir::resolve_with_env(flag.map(Path::new), env.map(Path::new), paths)
        };
        assert_eq!(r(None, None, &[g, g]).unwrap().as_str(), "/gnu/store");
        assert_eq!(r(None, None, &[n]).unwrap().as_str(), "/nix/store");
        assert_eq!(
            r(Some("/tmp/store"), Some("/x"), &[t]).unwrap().as_str(),
            "/tmp/store"
        );
        assert_eq!(
            r(None, Some("/tmp/store"), &[t]).unwrap().as_str(),
            "/tmp/store"
        );
        assert_eq!(r(None, Some(""), &[n]).unwrap().as_str(), "/nix/store");
        for paths in [
            &[g, n][..],
            &[t][..],
            &[][..],
            &[b"/gnu/storex/a".as_slice()][..],
        ] {
            let e = r(None, None, paths).unwrap_err();
            assert!(e.to_string().contains("--store-dir"), "{e}");
        }
    }
}
