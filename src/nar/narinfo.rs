//! Narinfo files: the `Field: value` text a binary cache serves at `/<hash>.narinfo` to say
//! where a store path's NAR is, how it is compressed, its hashes, references and signatures.
//! Also the signature fingerprint `1;<path>;<narhash>;<narsize>;<refs>` and signing with
//! Nix's ed25519 keys. Field order and fingerprint follow Nix 2.8 (`src/libstore/nar-info.cc`,
//! `ValidPathInfo::fingerprint` in `src/libstore/store-api.cc`); see `docs/nar.md`.

use std::collections::BTreeSet;
use std::fmt;

use thiserror::Error;

use super::signing::{PublicKey, SecretKey};
use crate::derivation::base32;
use crate::derivation::hash::Hash;

/// Why a narinfo could not be parsed or fingerprinted. Parse errors name the line (from 1) and
/// the field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo line {line} is not of the form \"Field: value\": {text:?}")]
    Syntax { line: usize, text: String },
    #[error("narinfo line {line}: invalid {field} {value:?}: {reason}")]
    BadField {
        line: usize,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("narinfo line {line}: field {field} appears a second time")]
    Duplicate { line: usize, field: &'static str },
    #[error("narinfo has no {field} field, which is required")]
    Missing { field: &'static str },
    #[error("cannot fingerprint the narinfo of {path}: {reason}")]
    Fingerprint { path: String, reason: String },
}

/// A parsed narinfo. Store paths other than `store_path` are base names (`<hash>-<name>`), as in
/// the file; the store directory is the one of `store_path`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NarInfo {
    /// Full store path, e.g. `/nix/store/<hash>-hello-2.12`.
    pub store_path: String,
    /// Where the (compressed) NAR is, relative to the cache root, e.g. `nar/<filehash>.nar.xz`.
    pub url: String,
    /// `none`, `xz`, `bzip2`, `zstd`, `br`, ... (Nix assumes `bzip2` when absent).
    pub compression: String,
    /// SHA-256 of the file at `url`.
    pub file_hash: Option<Hash>,
    /// Size of the file at `url`.
    pub file_size: Option<u64>,
    /// SHA-256 of the uncompressed NAR.
    pub nar_hash: Hash,
    /// Size of the uncompressed NAR (never 0).
    pub nar_size: u64,
    /// Base names of the store paths this path refers to, in file order (Nix writes them
    /// sorted; so should whoever builds a `NarInfo`).
    pub references: Vec<String>,
    /// Base name of the `.drv` that built the path.
    pub deriver: Option<String>,
    pub system: Option<String>,
    /// Signatures `keyname:base64`, in file order.
    pub sigs: Vec<String>,
    /// Content address (`fixed:r:sha256:...`, `text:sha256:...`), for content-addressed paths.
    pub ca: Option<String>,
}

/// Fields as they are gathered while parsing.
#[derive(Default)]
struct Fields {
    store_path: Option<String>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Hash>,
    nar_size: Option<u64>,
    references: Option<Vec<String>>,
    deriver: Option<Option<String>>,
    system: Option<Option<String>>,
    sigs: Vec<String>,
    ca: Option<String>,
}

impl NarInfo {
    /// Parse narinfo text. Unknown fields are ignored (as Nix does, so that newer caches stay
    /// readable); known fields are checked, and each may appear once (`Sig` any number of times).
    /// Blank lines are ignored; the last line need not end with a newline.
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let mut f = Fields::default();
        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            if raw.is_empty() {
                continue;
            }
            let Some((name, value)) = raw.split_once(':') else {
                return Err(NarInfoError::Syntax {
                    line,
                    text: raw.chars().take(100).collect(),
                });
            };
            let value = value.strip_prefix(' ').unwrap_or(value);
            parse_field(&mut f, line, name, value)?;
        }
        let missing = |field| NarInfoError::Missing { field };
        let compression = match f.compression {
            Some(c) if !c.is_empty() => c,
            _ => "bzip2".to_string(),
        };
        Ok(NarInfo {
            store_path: f.store_path.ok_or(missing("StorePath"))?,
            url: f.url.ok_or(missing("URL"))?,
            compression,
            file_hash: f.file_hash,
            file_size: f.file_size,
            nar_hash: f.nar_hash.ok_or(missing("NarHash"))?,
            nar_size: f.nar_size.ok_or(missing("NarSize"))?,
            references: f.references.unwrap_or_default(),
            deriver: f.deriver.flatten(),
            system: f.system.flatten(),
            sigs: f.sigs,
            ca: f.ca,
        })
    }

    /// The store directory of `store_path` (`/nix/store`), and its base name.
    fn split_store_path(&self) -> Result<(&str, &str), NarInfoError> {
        check_store_path(&self.store_path).map_err(|reason| NarInfoError::Fingerprint {
            path: self.store_path.clone(),
            reason,
        })
    }

    /// The message Nix signs: `1;<store path>;<nar hash as algo:base32>;<nar size>;<references
    /// as full paths, sorted, comma-separated>`.
    pub fn fingerprint(&self) -> Result<String, NarInfoError> {
        let (dir, _) = self.split_store_path()?;
        if self.nar_size == 0 {
            return Err(NarInfoError::Fingerprint {
                path: self.store_path.clone(),
                reason: "its NAR size is 0 (unknown)".into(),
            });
        }
        let refs: BTreeSet<String> = self
            .references
            .iter()
            .map(|r| format!("{dir}/{r}"))
            .collect();
        let refs: Vec<String> = refs.into_iter().collect();
        Ok(format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(",")
        ))
    }

    /// Add `key`'s signature (unless an identical one is there already).
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), NarInfoError> {
        let sig = key.sign(self.fingerprint()?.as_bytes());
        if !self.sigs.contains(&sig) {
            self.sigs.push(sig);
        }
        Ok(())
    }

    /// How many signatures verify with one of `keys` (a signature names its key).
    pub fn valid_signatures(&self, keys: &[PublicKey]) -> usize {
        let Ok(fp) = self.fingerprint() else {
            return 0;
        };
        self.sigs
            .iter()
            .filter(|sig| keys.iter().any(|k| k.verify(fp.as_bytes(), sig)))
            .count()
    }

    /// Whether at least one signature verifies with one of `keys`.
    pub fn verify(&self, keys: &[PublicKey]) -> bool {
        self.valid_signatures(keys) > 0
    }
}

fn parse_field(f: &mut Fields, line: usize, name: &str, value: &str) -> Result<(), NarInfoError> {
    fn set<T>(
        slot: &mut Option<T>,
        v: T,
        line: usize,
        field: &'static str,
    ) -> Result<(), NarInfoError> {
        if slot.is_some() {
            return Err(NarInfoError::Duplicate { line, field });
        }
        *slot = Some(v);
        Ok(())
    }
    let bad = |field: &'static str, reason: String| NarInfoError::BadField {
        line,
        field,
        value: value.chars().take(200).collect(),
        reason,
    };
    let hash = |field| value.parse::<Hash>().map_err(|e| bad(field, e.to_string()));
    let number = |field| {
        value
            .parse::<u64>()
            .map_err(|_| bad(field, "expected a decimal number of bytes".into()))
    };
    match name {
        "StorePath" => {
            check_store_path(value).map_err(|r| bad("StorePath", r))?;
            set(&mut f.store_path, value.to_string(), line, "StorePath")
        }
        "URL" => {
            if value.is_empty() {
                return Err(bad("URL", "it is empty".into()));
            }
            set(&mut f.url, value.to_string(), line, "URL")
        }
        "Compression" => set(&mut f.compression, value.to_string(), line, "Compression"),
        "FileHash" => set(&mut f.file_hash, hash("FileHash")?, line, "FileHash"),
        "FileSize" => set(&mut f.file_size, number("FileSize")?, line, "FileSize"),
        "NarHash" => set(&mut f.nar_hash, hash("NarHash")?, line, "NarHash"),
        "NarSize" => {
            let n = number("NarSize")?;
            if n == 0 {
                return Err(bad("NarSize", "a NAR is never empty".into()));
            }
            set(&mut f.nar_size, n, line, "NarSize")
        }
        "References" => {
            let refs: Vec<String> = value
                .split(' ')
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect();
            for r in &refs {
                check_base_name(r).map_err(|reason| {
                    // One reference can be the whole line: quote only its start.
                    let mut shown: String = r.chars().take(100).collect();
                    if shown.len() < r.len() {
                        shown.push('…');
                    }
                    bad("References", format!("{shown:?}: {reason}"))
                })?;
            }
            set(&mut f.references, refs, line, "References")
        }
        "Deriver" => {
            let d = if value == "unknown-deriver" {
                None
            } else {
                check_base_name(value).map_err(|r| bad("Deriver", r))?;
                Some(value.to_string())
            };
            set(&mut f.deriver, d, line, "Deriver")
        }
        "System" => {
            let s = (!value.is_empty()).then(|| value.to_string());
            set(&mut f.system, s, line, "System")
        }
        "Sig" => {
            if !value.contains(':') {
                return Err(bad("Sig", "expected keyname:base64".into()));
            }
            f.sigs.push(value.to_string());
            Ok(())
        }
        "CA" => {
            if value.is_empty() {
                return Err(bad("CA", "it is empty".into()));
            }
            set(&mut f.ca, value.to_string(), line, "CA")
        }
        _ => Ok(()),
    }
}

/// Check a full store path and split it into store directory and base name.
fn check_store_path(path: &str) -> Result<(&str, &str), String> {
    let Some((dir, base)) = path.rsplit_once('/') else {
        return Err("expected an absolute store path like /nix/store/<hash>-<name>".into());
    };
    if !dir.starts_with('/') {
        return Err("expected an absolute store path like /nix/store/<hash>-<name>".into());
    }
    check_base_name(base)?;
    Ok((dir, base))
}

/// Check a store path's base name: 32 characters of Nix base32, `-`, and a name of 1 to 211
/// characters from `[A-Za-z0-9+-._?=]` not starting with `.` (Nix's rules).
fn check_base_name(base: &str) -> Result<(), String> {
    let b = base.as_bytes();
    if b.len() < 34 || b[32] != b'-' {
        return Err("expected <32-character hash>-<name>".into());
    }
    if let Some(c) = b[..32].iter().find(|&&c| base32::char_value(c).is_none()) {
        return Err(format!("{:?} is not a Nix base32 character", *c as char));
    }
    let name = &b[33..];
    if name.len() > 211 {
        return Err("the name is longer than 211 characters".into());
    }
    if name[0] == b'.' {
        return Err("the name starts with '.'".into());
    }
    if let Some(c) = name
        .iter()
        .find(|&&c| !(c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)))
    {
        return Err(format!(
            "{:?} is not allowed in a store path name",
            *c as char
        ));
    }
    Ok(())
}

impl fmt::Display for NarInfo {
    /// The narinfo text, fields in the order Nix 2.8 writes them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {}", h.to_nix_string())?;
        }
        if let Some(n) = self.file_size {
            writeln!(f, "FileSize: {n}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash.to_nix_string())?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        writeln!(f, "References: {}", self.references.join(" "))?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {d}")?;
        }
        if let Some(s) = &self.system {
            writeln!(f, "System: {s}")?;
        }
        for s in &self.sigs {
            writeln!(f, "Sig: {s}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::hash::HashAlgo;
    use proptest::prelude::*;

    /// Written by `nix copy --to file://...?secret-key=...` (Nix 2.8.0) for an input-addressed
    /// path; key in `tests/data/nar/test-1.*`.
    const NIX_NARINFO: &str = include_str!("../../tests/data/nar/nix-2.8-input-addressed.narinfo");
    const NIX_CA_NARINFO: &str = include_str!("../../tests/data/nar/nix-2.8-ca.narinfo");
    const PUBLIC: &str = include_str!("../../tests/data/nar/test-1.public");
    const SECRET: &str = include_str!("../../tests/data/nar/test-1.secret");

    #[test]
    fn nix_narinfos_print_back_byte_for_byte() {
        for text in [NIX_NARINFO, NIX_CA_NARINFO] {
            let info = NarInfo::parse(text).unwrap();
            assert_eq!(info.to_string(), text);
        }
    }

    #[test]
    fn verifies_nix_signature_and_signs_identically() {
        let pk = PublicKey::parse(PUBLIC).unwrap();
        let sk = SecretKey::parse(SECRET).unwrap();
        for text in [NIX_NARINFO, NIX_CA_NARINFO] {
            let info = NarInfo::parse(text).unwrap();
            assert!(info.verify(std::slice::from_ref(&pk)));
            // ed25519 is deterministic: the same key gives Nix's signature byte for byte.
            let mut unsigned = info.clone();
            unsigned.sigs.clear();
            unsigned.sign(&sk).unwrap();
            assert_eq!(unsigned.sigs, info.sigs);
            let mut tampered = info.clone();
            tampered.nar_size += 1;
            assert!(!tampered.verify(std::slice::from_ref(&pk)));
        }
    }

    #[test]
    fn fingerprint_sorts_references_and_uses_full_paths() {
        let mut info = NarInfo::parse(NIX_NARINFO).unwrap();
        info.references = vec![
            "sbldylj3clbkc0aqvjjzfa6slp4zdvlj-b".into(),
            "0c0aqvjjzfa6slp4zdvljsbldylj3clb-a".into(),
        ];
        let fp = info.fingerprint().unwrap();
        assert_eq!(
            fp,
            "1;/nix/store/bnsr5jnvbz11g60zwdzvx6lvw34nfmcf-kiln-golden;\
             sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h;120;\
             /nix/store/0c0aqvjjzfa6slp4zdvljsbldylj3clb-a,/nix/store/sbldylj3clbkc0aqvjjzfa6slp4zdvlj-b"
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let text = NIX_NARINFO.replace("NarSize: 120", "NarSize: lots");
        match NarInfo::parse(&text) {
            Err(NarInfoError::BadField {
                line: 7,
                field: "NarSize",
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let text = NIX_NARINFO.replace("NarHash: ", "NarHash: md4:");
        assert!(matches!(
            NarInfo::parse(&text),
            Err(NarInfoError::BadField {
                line: 6,
                field: "NarHash",
                ..
            })
        ));
        let text = NIX_NARINFO.replace("URL", "Nope\nURL");
        assert!(matches!(
            NarInfo::parse(&text),
            Err(NarInfoError::Syntax { line: 2, .. })
        ));
        let text = NIX_NARINFO.replace("StorePath: /nix/store/", "StorePath: nix/");
        assert!(matches!(
            NarInfo::parse(&text),
            Err(NarInfoError::BadField {
                line: 1,
                field: "StorePath",
                ..
            })
        ));
        let text = NIX_NARINFO.replace("NarSize: 120\n", "");
        assert_eq!(
            NarInfo::parse(&text),
            Err(NarInfoError::Missing { field: "NarSize" })
        );
        let text = format!("{NIX_NARINFO}URL: again\n");
        assert!(matches!(
            NarInfo::parse(&text),
            Err(NarInfoError::Duplicate {
                line: 11,
                field: "URL"
            })
        ));
        let text = NIX_NARINFO.replace("References: ", "References: not-a-path");
        assert!(matches!(
            NarInfo::parse(&text),
            Err(NarInfoError::BadField {
                field: "References",
                ..
            })
        ));
    }

    fn base_name() -> impl Strategy<Value = String> {
        (
            "[0-9a-df-np-sv-z]{32}",
            "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,40}",
        )
            .prop_map(|(h, n)| format!("{h}-{n}"))
    }

    fn sha256() -> impl Strategy<Value = Hash> {
        proptest::collection::vec(any::<u8>(), 32).prop_map(|bytes| Hash {
            algo: HashAlgo::Sha256,
            bytes,
        })
    }

    fn field_text() -> impl Strategy<Value = String> {
        // Any single-line text without leading space (a value's first space is the separator's).
        "[^ \n\r][^\n\r]{0,40}"
    }

    fn narinfo() -> impl Strategy<Value = NarInfo> {
        (
            ("/[a-z]{1,8}(/[a-z]{1,8}){0,2}", base_name()),
            field_text(),
            field_text(),
            proptest::option::of(sha256()),
            proptest::option::of(any::<u64>()),
            (sha256(), 1..u64::MAX),
            proptest::collection::vec(base_name(), 0..5),
            proptest::option::of(base_name()),
            proptest::option::of(field_text()),
            proptest::collection::vec("[a-z.-]{1,10}:[A-Za-z0-9+/=]{1,88}", 0..3),
            proptest::option::of(field_text()),
        )
            .prop_map(
                |(
                    (dir, base),
                    url,
                    compression,
                    file_hash,
                    file_size,
                    (nar_hash, nar_size),
                    references,
                    deriver,
                    system,
                    sigs,
                    ca,
                )| NarInfo {
                    store_path: format!("{dir}/{base}"),
                    url,
                    compression,
                    file_hash,
                    file_size,
                    nar_hash,
                    nar_size,
                    references,
                    deriver,
                    system,
                    sigs,
                    ca,
                },
            )
    }

    proptest! {
        #[test]
        fn parse_print_round_trips(info in narinfo()) {
            let text = info.to_string();
            prop_assert_eq!(NarInfo::parse(&text).unwrap(), info);
        }

        #[test]
        fn parse_never_panics(text in "(?s).{0,400}") {
            let _ = NarInfo::parse(&text);
        }

        #[test]
        fn signatures_verify_and_break_on_change(info in narinfo(), bump in 1..1000u64) {
            let sk = SecretKey::parse(SECRET).unwrap();
            let pk = sk.to_public();
            let mut info = info;
            info.sigs.clear();
            info.sign(&sk).unwrap();
            prop_assert!(info.verify(std::slice::from_ref(&pk)));
            info.nar_size = info.nar_size.wrapping_add(bump).max(1);
            prop_assert!(!info.verify(std::slice::from_ref(&pk)));
        }
    }
}
