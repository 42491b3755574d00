//! Hash algorithms and hash values as Nix names and prints them (`sha256:<base32>`, base16,
//! base64 and SRI forms are parsed; Nix's `sha256:<base32>` is what Kiln prints).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use sha2::Digest as _;
use thiserror::Error;

use super::base32;

/// A hash algorithm Nix knows.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// Digest size in bytes.
    pub fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// The name Nix uses (`md5`, `sha1`, `sha256`, `sha512`).
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Parse an algorithm name as Nix spells it.
    pub fn from_name(s: &str) -> Option<HashAlgo> {
        match s {
            "md5" => Some(HashAlgo::Md5),
            "sha1" => Some(HashAlgo::Sha1),
            "sha256" => Some(HashAlgo::Sha256),
            "sha512" => Some(HashAlgo::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A hash value with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    pub algo: HashAlgo,
    pub bytes: Vec<u8>,
}

/// Why a hash string could not be parsed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum HashParseError {
    #[error("unknown hash algorithm {0:?} (expected md5, sha1, sha256 or sha512)")]
    UnknownAlgo(String),
    #[error("hash {0:?} has no algorithm prefix (expected e.g. sha256:<base32>)")]
    NoAlgo(String),
    #[error("hash {hash:?} has the wrong length for {algo} (expected {base16} base16, {base32} base32 or {base64} base64 characters)")]
    WrongLength {
        hash: String,
        algo: HashAlgo,
        base16: usize,
        base32: usize,
        base64: usize,
    },
    #[error("hash {0:?} is not valid in its encoding: {1}")]
    BadEncoding(String, String),
}

/// `s` for an error message, cut short if long: hash strings come from untrusted input (a
/// `.drv`, a narinfo, an agent's report), and an error must not echo megabytes of it (found by
/// the `drv` fuzz target, see `tests/data/fuzz-regressions/drv/`).
pub(crate) fn shown(s: &str) -> String {
    const MAX_CHARS: usize = 120;
    match s.char_indices().nth(MAX_CHARS) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}… ({} bytes)", &s[..cut], s.len()),
    }
}

impl Hash {
    /// SHA-256 of `data`.
    pub fn sha256(data: &[u8]) -> Hash {
        Hash {
            algo: HashAlgo::Sha256,
            bytes: sha2::Sha256::digest(data).to_vec(),
        }
    }

    /// Lower-case hexadecimal digest, without the algorithm.
    pub fn to_base16(&self) -> String {
        let mut s = String::with_capacity(self.bytes.len() * 2);
        for b in &self.bytes {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Nix base32 digest, without the algorithm.
    pub fn to_base32(&self) -> String {
        base32::encode(&self.bytes)
    }

    /// `<algo>:<base32>`, the form narinfos use.
    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.algo, self.to_base32())
    }

    /// SRI form `<algo>-<base64>`.
    pub fn to_sri(&self) -> String {
        format!(
            "{}-{}",
            self.algo,
            base64::engine::general_purpose::STANDARD.encode(&self.bytes)
        )
    }

    /// Parse a digest without prefix in base16, Nix base32 or base64, chosen by length.
    pub fn parse_digest(algo: HashAlgo, s: &str) -> Result<Hash, HashParseError> {
        let size = algo.size();
        let b64len = size.div_ceil(3) * 4;
        let bad = |e: String| HashParseError::BadEncoding(shown(s), e);
        let bytes = if s.len() == size * 2 {
            // `from_str_radix` alone would also take a leading `+`; Nix takes hex digits only.
            if let Some(c) = s.chars().find(|c| !c.is_ascii_hexdigit()) {
                return Err(bad(format!("invalid base16 character {c:?}")));
            }
            let mut out = Vec::with_capacity(size);
            for i in 0..size {
                let pair = s
                    .get(i * 2..i * 2 + 2)
                    .ok_or_else(|| bad("not ASCII".into()))?;
                out.push(u8::from_str_radix(pair, 16).map_err(|e| bad(e.to_string()))?);
            }
            out
        } else if s.len() == base32::encoded_len(size) {
            base32::decode(s, size).map_err(|e| bad(e.to_string()))?
        } else if s.len() == b64len {
            let v = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| bad(e.to_string()))?;
            if v.len() != size {
                return Err(bad(format!(
                    "decodes to {} bytes, expected {size}",
                    v.len()
                )));
            }
            v
        } else {
            return Err(HashParseError::WrongLength {
                hash: shown(s),
                algo,
                base16: size * 2,
                base32: base32::encoded_len(size),
                base64: b64len,
            });
        };
        Ok(Hash { algo, bytes })
    }
}

impl FromStr for Hash {
    type Err = HashParseError;

    /// Parse `<algo>:<digest>` or SRI `<algo>-<base64>`.
    fn from_str(s: &str) -> Result<Hash, HashParseError> {
        let (algo, digest) = if let Some((a, d)) = s.split_once(':') {
            (a, d)
        } else if let Some((a, d)) = s.split_once('-') {
            (a, d)
        } else {
            return Err(HashParseError::NoAlgo(shown(s)));
        };
        let algo =
            HashAlgo::from_name(algo).ok_or_else(|| HashParseError::UnknownAlgo(shown(algo)))?;
        Hash::parse_digest(algo, digest)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_nix_string())
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_nix_string())
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_encodings_to_the_same_hash() {
        let h = Hash::sha256(b"kiln");
        let forms = [
            h.to_nix_string(),
            format!("sha256:{}", h.to_base16()),
            h.to_sri(),
        ];
        for f in forms {
            assert_eq!(f.parse::<Hash>().unwrap(), h, "{f}");
        }
    }

    #[test]
    fn refuses_unknown_algorithm_and_wrong_length() {
        assert!(matches!(
            "sha3:abc".parse::<Hash>(),
            Err(HashParseError::UnknownAlgo(_))
        ));
        assert!(matches!(
            "sha256:abc".parse::<Hash>(),
            Err(HashParseError::WrongLength { .. })
        ));
        // A sign is not a hex digit, even though `from_str_radix` accepts one.
        let plus = format!("md5:+{}", "0".repeat(31));
        assert!(matches!(
            plus.parse::<Hash>(),
            Err(HashParseError::BadEncoding(..))
        ));
    }
}
