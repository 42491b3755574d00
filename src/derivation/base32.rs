//! Nix's base32: the alphabet and bit order Nix uses for store path hashes and `sha256:<base32>`
//! hash strings. It is not RFC 4648: the alphabet omits `e o u t`, and the string is written
//! from the most significant 5-bit group of the *last* byte backwards.

use thiserror::Error;

/// The 32 characters of Nix's base32, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not valid Nix base32.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid nix base32 character {0:?} at position {1}")]
    InvalidChar(char, usize),
    #[error(
        "nix base32 string of length {got} cannot encode {want} bytes (expected length {expected})"
    )]
    WrongLength {
        got: usize,
        want: usize,
        expected: usize,
    },
    #[error("nix base32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Length of the base32 encoding of `n` bytes.
pub fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// Value of one base32 character, if it is in the alphabet.
pub fn char_value(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Encode bytes as Nix base32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] as u16 >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decode a Nix base32 string into exactly `want` bytes.
pub fn decode(s: &str, want: usize) -> Result<Vec<u8>, Base32Error> {
    let expected = encoded_len(want);
    if s.len() != expected {
        return Err(Base32Error::WrongLength {
            got: s.len(),
            want,
            expected,
        });
    }
    let mut out = vec![0u8; want];
    for (pos, c) in s.bytes().enumerate() {
        let v = char_value(c).ok_or(Base32Error::InvalidChar(c as char, pos))? as u16;
        let n = s.len() - 1 - pos;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (v << j) as u8;
        let carry = v >> (8 - j);
        if i + 1 < want {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Base32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vector() {
        // sha256("") in Nix base32, as printed by `nix-hash --type sha256 --to-base32`.
        let h = sha2::Sha256::digest_bytes(b"");
        assert_eq!(
            encode(&h),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    trait DigestBytes {
        fn digest_bytes(b: &[u8]) -> Vec<u8>;
    }
    impl DigestBytes for sha2::Sha256 {
        fn digest_bytes(b: &[u8]) -> Vec<u8> {
            use sha2::Digest;
            sha2::Sha256::digest(b).to_vec()
        }
    }

    proptest! {
        #[test]
        fn roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&s, bytes.len()).unwrap(), bytes);
        }
    }
}
