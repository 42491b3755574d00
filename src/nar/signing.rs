//! Nix's signing keys and detached ed25519 signatures, in Nix's text formats:
//! a key is `name:base64(bytes)` (64 bytes for a secret key — libsodium's seed followed by the
//! public key —, 32 for a public key) and a signature is `name:base64(64-byte signature)`,
//! where `name` tells a verifier which of its trusted keys to use.

use std::fmt;
use std::fs::File;
use std::io::Read;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use thiserror::Error;

/// Why a key could not be parsed or made.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("key {0:?} is not of the form name:base64 (as written by `nix key generate-secret`)")]
    NoName(String),
    #[error("key {name:?} is not valid base64: {err}")]
    BadBase64 { name: String, err: String },
    #[error("key {name:?} decodes to {len} bytes; a Nix {kind} key has {want}")]
    WrongLength {
        name: String,
        kind: &'static str,
        len: usize,
        want: usize,
    },
    #[error("secret key {0:?} is corrupt: its public half does not match its seed")]
    Mismatch(String),
    #[error("failed to read random bytes from /dev/urandom: {0}")]
    Random(std::io::Error),
}

/// Split `name:base64` into the name and the decoded bytes.
fn split_key(s: &str) -> Result<(String, Vec<u8>), KeyError> {
    let s = s.trim();
    let (name, b64) = match s.split_once(':') {
        Some((n, k)) if !n.is_empty() && !k.is_empty() => (n, k),
        _ => return Err(KeyError::NoName(shorten(s))),
    };
    let bytes = BASE64.decode(b64).map_err(|e| KeyError::BadBase64 {
        name: name.to_string(),
        err: e.to_string(),
    })?;
    Ok((name.to_string(), bytes))
}

/// Keys are secrets: never echo more than a prefix of a malformed one in an error.
fn shorten(s: &str) -> String {
    s.chars().take(16).collect::<String>() + if s.chars().count() > 16 { "..." } else { "" }
}

/// An ed25519 secret key with its name, as in a Nix secret key file.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// A fresh key named `name` (e.g. `cache.example.org-1`), from the system's randomness.
    pub fn generate(name: &str) -> Result<SecretKey, KeyError> {
        // /dev/urandom exists on every system Kiln targets (Linux, GNU/Hurd) and avoids a
        // dependency on an RNG crate in the light part of the crate.
        let mut seed = [0u8; 32];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(KeyError::Random)?;
        Ok(SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Parse `name:base64(64 bytes)`, the content of a Nix secret key file (surrounding
    /// whitespace is ignored).
    pub fn parse(s: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split_key(s)?;
        let bytes: [u8; 64] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength {
                name: name.clone(),
                kind: "secret",
                len: bytes.len(),
                want: 64,
            })?;
        let key =
            SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::Mismatch(name.clone()))?;
        Ok(SecretKey { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The 32-byte seed (RFC 8032's secret key), for the Guix signer, which derives its ECDSA
    /// scalar from it.
    #[cfg_attr(not(feature = "coordinator"), allow(dead_code))]
    pub(crate) fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Sign `msg`: `name:base64(signature)`, as Nix's `SecretKey::signDetached`.
    pub fn sign(&self, msg: &[u8]) -> String {
        let sig: Signature = self.key.sign(msg);
        format!("{}:{}", self.name, BASE64.encode(sig.to_bytes()))
    }
}

impl fmt::Display for SecretKey {
    /// The secret key file format `name:base64(seed ++ public key)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

/// An ed25519 public key with its name, as given to Nix's `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parse `name:base64(32 bytes)`.
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split_key(s)?;
        let wrong = || KeyError::WrongLength {
            name: name.clone(),
            kind: "public",
            len: bytes.len(),
            want: 32,
        };
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| wrong())?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::Mismatch(name.clone()))?;
        Ok(PublicKey { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key's 32 bytes (Guix names a key by them alone).
    pub fn key_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Whether `sig` (`name:base64`) is this key's signature of `msg`. A signature naming
    /// another key is not checked and gives `false`, as in Nix, where the name selects the key.
    ///
    /// Uses strict verification (canonical `S`, no small-order `R` or key), the checks
    /// libsodium's `crypto_sign_verify_detached`, which Nix uses, makes.
    pub fn verify(&self, msg: &[u8], sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = BASE64.decode(b64) else {
            return false;
        };
        let Ok(arr) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        self.key
            .verify_strict(msg, &Signature::from_bytes(&arr))
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_key_formats_round_trip() {
        let sk = SecretKey::generate("test-1").unwrap();
        let sk2 = SecretKey::parse(&sk.to_string()).unwrap();
        assert_eq!(sk.to_string(), sk2.to_string());
        let pk = PublicKey::parse(&sk.to_public().to_string()).unwrap();
        let sig = sk2.sign(b"hello");
        assert!(sig.starts_with("test-1:"));
        assert!(pk.verify(b"hello", &sig));
        assert!(!pk.verify(b"hellO", &sig));
        let other = SecretKey::generate("test-2").unwrap();
        assert!(!other.to_public().verify(b"hello", &sig));
        // Same key bytes, other name: the name selects the key, so it does not verify.
        let renamed = PublicKey::parse(&pk.to_string().replacen("test-1", "test-2", 1)).unwrap();
        assert!(!renamed.verify(b"hello", &sig));
    }

    #[test]
    fn refuses_malformed_keys() {
        assert!(matches!(
            SecretKey::parse("nocolon"),
            Err(KeyError::NoName(_))
        ));
        assert!(matches!(
            PublicKey::parse("a:!!!"),
            Err(KeyError::BadBase64 { .. })
        ));
        assert!(matches!(
            PublicKey::parse("a:AAAA"),
            Err(KeyError::WrongLength { .. })
        ));
        let sk = SecretKey::generate("k").unwrap();
        assert!(matches!(
            SecretKey::parse(&sk.to_public().to_string()),
            Err(KeyError::WrongLength { .. })
        ));
    }
}
