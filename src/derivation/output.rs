//! What a derivation output's three strings mean. A `.drv` output is a tuple
//! `("name","path","hashAlgo","hash")`; the combination of empty and non-empty fields decides
//! whether the output is input-addressed, fixed-output, floating content-addressed, deferred
//! or impure. The rules are Nix 2.8's (`parseDerivationOutput` in
//! `src/libstore/derivations.cc`), except that Kiln refuses combinations Nix silently
//! ignores or asserts on (see `docs/derivations.md`).

use std::fmt;

use thiserror::Error;

use super::hash::{Hash, HashAlgo, HashParseError};
use super::DerivationOutput;

/// How the contents of a content-addressed output are hashed: the file itself (`Flat`) or
/// its NAR serialisation (`Recursive`, written `r:` before the algorithm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileIngestionMethod {
    Flat,
    Recursive,
}

impl FileIngestionMethod {
    /// The prefix Nix writes before the algorithm name: `""` or `"r:"`.
    pub fn prefix(self) -> &'static str {
        match self {
            FileIngestionMethod::Flat => "",
            FileIngestionMethod::Recursive => "r:",
        }
    }
}

/// The meaning of one output, borrowed from its [`DerivationOutput`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputKind<'a> {
    /// `("out","/nix/store/…-x","","")`: the path is computed from the derivation.
    InputAddressed { path: &'a [u8] },
    /// `("out","/nix/store/…-x","r:sha256","<hex>")`: the contents' hash is known in advance.
    Fixed {
        path: &'a [u8],
        method: FileIngestionMethod,
        hash: Hash,
    },
    /// `("out","","r:sha256","")`: content-addressed, the path is known only after the build.
    Floating {
        method: FileIngestionMethod,
        algo: HashAlgo,
    },
    /// `("out","","","")`: input-addressed, but the path depends on floating inputs.
    Deferred,
    /// `("out","","r:sha256","impure")`: an impure derivation's output.
    Impure {
        method: FileIngestionMethod,
        algo: HashAlgo,
    },
}

/// `"<method><algo>"` as Nix prints it, e.g. `r:sha256`.
pub fn method_algo(method: FileIngestionMethod, algo: HashAlgo) -> String {
    format!("{}{}", method.prefix(), algo.name())
}

/// Why an output's strings do not form a valid output. `field` says which string is wrong so
/// the parser can point at its byte offset.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OutputError {
    #[error("unknown hash algorithm {0:?} (Nix 2.8 knows md5, sha1, sha256 and sha512, optionally prefixed by \"r:\")")]
    UnknownAlgo(String),
    #[error("bad fixed-output hash: {0}")]
    BadHash(HashParseError),
    #[error("output path {0:?} is not an absolute path")]
    RelativePath(String),
    #[error("a {0} output must have an empty path, found {1:?}")]
    PathNotEmpty(&'static str, String),
    #[error("an output without hash algorithm must have an empty hash, found {0:?}")]
    HashWithoutAlgo(String),
}

/// Which of the three strings an [`OutputError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputField {
    Path,
    HashAlgo,
    Hash,
}

impl OutputError {
    /// The field the error is about.
    pub fn field(&self) -> OutputField {
        match self {
            OutputError::UnknownAlgo(_) => OutputField::HashAlgo,
            OutputError::BadHash(_) | OutputError::HashWithoutAlgo(_) => OutputField::Hash,
            OutputError::RelativePath(_) | OutputError::PathNotEmpty(..) => OutputField::Path,
        }
    }
}

/// `b` for an error message: lossy UTF-8, cut short if long.
fn lossy(b: &[u8]) -> String {
    super::hash::shown(&String::from_utf8_lossy(b))
}

/// Parse `hashAlgo` (`sha256`, `r:sha1`, …) into its method and algorithm.
fn parse_method_algo(s: &[u8]) -> Result<(FileIngestionMethod, HashAlgo), OutputError> {
    let (method, rest) = match s.strip_prefix(b"r:") {
        Some(rest) => (FileIngestionMethod::Recursive, rest),
        None => (FileIngestionMethod::Flat, s),
    };
    let algo = std::str::from_utf8(rest)
        .ok()
        .and_then(HashAlgo::from_name)
        .ok_or_else(|| OutputError::UnknownAlgo(lossy(s)))?;
    Ok((method, algo))
}

fn absolute(path: &[u8]) -> Result<(), OutputError> {
    if path.first() == Some(&b'/') {
        Ok(())
    } else {
        Err(OutputError::RelativePath(lossy(path)))
    }
}

impl DerivationOutput {
    /// An input-addressed output at `path`.
    pub fn input_addressed(path: impl Into<Vec<u8>>) -> DerivationOutput {
        DerivationOutput {
            path: path.into(),
            ..DerivationOutput::default()
        }
    }

    /// What this output is. Fails on combinations Nix 2.8 refuses or asserts on.
    pub fn kind(&self) -> Result<OutputKind<'_>, OutputError> {
        if self.hash_algo.is_empty() {
            if !self.hash.is_empty() {
                return Err(OutputError::HashWithoutAlgo(lossy(&self.hash)));
            }
            if self.path.is_empty() {
                return Ok(OutputKind::Deferred);
            }
            absolute(&self.path)?;
            return Ok(OutputKind::InputAddressed { path: &self.path });
        }
        let (method, algo) = parse_method_algo(&self.hash_algo)?;
        if self.hash == b"impure" {
            if !self.path.is_empty() {
                return Err(OutputError::PathNotEmpty("impure", lossy(&self.path)));
            }
            return Ok(OutputKind::Impure { method, algo });
        }
        if self.hash.is_empty() {
            if !self.path.is_empty() {
                return Err(OutputError::PathNotEmpty(
                    "floating content-addressed",
                    lossy(&self.path),
                ));
            }
            return Ok(OutputKind::Floating { method, algo });
        }
        absolute(&self.path)?;
        let digest = std::str::from_utf8(&self.hash).map_err(|_| {
            OutputError::BadHash(HashParseError::BadEncoding(
                lossy(&self.hash),
                "not ASCII".into(),
            ))
        })?;
        let hash = Hash::parse_digest(algo, digest).map_err(OutputError::BadHash)?;
        Ok(OutputKind::Fixed {
            path: &self.path,
            method,
            hash,
        })
    }
}

impl fmt::Display for OutputKind<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputKind::InputAddressed { .. } => f.write_str("input-addressed"),
            OutputKind::Fixed { method, hash, .. } => {
                write!(f, "fixed-output ({})", method_algo(*method, hash.algo))
            }
            OutputKind::Floating { method, algo } => {
                write!(
                    f,
                    "floating content-addressed ({})",
                    method_algo(*method, *algo)
                )
            }
            OutputKind::Deferred => f.write_str("deferred"),
            OutputKind::Impure { method, algo } => {
                write!(f, "impure ({})", method_algo(*method, *algo))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(path: &str, algo: &str, hash: &str) -> DerivationOutput {
        DerivationOutput {
            path: path.into(),
            hash_algo: algo.into(),
            hash: hash.into(),
        }
    }

    #[test]
    fn every_kind_is_recognised() {
        let p = "/nix/store/0000000000000000000000000000000a-x";
        assert_eq!(
            out(p, "", "").kind().unwrap(),
            OutputKind::InputAddressed { path: p.as_bytes() }
        );
        assert_eq!(out("", "", "").kind().unwrap(), OutputKind::Deferred);
        assert_eq!(
            out("", "r:sha256", "").kind().unwrap(),
            OutputKind::Floating {
                method: FileIngestionMethod::Recursive,
                algo: HashAlgo::Sha256
            }
        );
        assert_eq!(
            out("", "sha512", "impure").kind().unwrap(),
            OutputKind::Impure {
                method: FileIngestionMethod::Flat,
                algo: HashAlgo::Sha512
            }
        );
        let md5 = "d41d8cd98f00b204e9800998ecf8427e";
        match out(p, "md5", md5).kind().unwrap() {
            OutputKind::Fixed { method, hash, .. } => {
                assert_eq!(method, FileIngestionMethod::Flat);
                assert_eq!(hash.to_base16(), md5);
            }
            k => panic!("unexpected {k:?}"),
        }
    }

    #[test]
    fn refuses_what_nix_refuses_or_asserts_on() {
        let p = "/nix/store/0000000000000000000000000000000a-x";
        assert!(matches!(
            out(p, "sha3", "00").kind(),
            Err(OutputError::UnknownAlgo(_))
        ));
        assert!(matches!(
            out(p, "r:", "00").kind(),
            Err(OutputError::UnknownAlgo(_))
        ));
        assert!(matches!(
            out(p, "text:sha256", "00").kind(),
            Err(OutputError::UnknownAlgo(_))
        ));
        assert!(matches!(
            out(p, "sha256", "00").kind(),
            Err(OutputError::BadHash(_))
        ));
        assert!(matches!(
            out("x", "", "").kind(),
            Err(OutputError::RelativePath(_))
        ));
        assert!(matches!(
            out(p, "r:sha256", "").kind(),
            Err(OutputError::PathNotEmpty(..))
        ));
        assert!(matches!(
            out("", "", "abc").kind(),
            Err(OutputError::HashWithoutAlgo(_))
        ));
    }
}
