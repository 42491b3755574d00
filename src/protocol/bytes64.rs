//! Bytes that travel in JSON as standard base64 (derivations and logs are not UTF-8).

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes64(pub Vec<u8>);

impl std::fmt::Debug for Bytes64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes64({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

/// Decodes the string where the deserializer holds it (borrowed from the input or from its
/// scratch buffer), so a big submission's base64 never gets a copy of its own.
struct Base64Visitor;

impl serde::de::Visitor<'_> for Base64Visitor {
    type Value = Bytes64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a standard base64 string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Bytes64, E> {
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Bytes64)
            .map_err(|e| E::custom(format!("invalid base64: {e}")))
    }
}

impl<'de> Deserialize<'de> for Bytes64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes64, D::Error> {
        d.deserialize_str(Base64Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_utf8_bytes_roundtrip_through_json() {
        let b = Bytes64(vec![0xff, 0xfe, b'"', 0, b'\\']);
        let j = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Bytes64>(&j).unwrap(), b);
        // Through a reader too (the string then sits in the parser's scratch buffer).
        assert_eq!(
            serde_json::from_reader::<_, Bytes64>(j.as_bytes()).unwrap(),
            b
        );
    }

    #[test]
    fn bad_base64_and_non_strings_are_refused() {
        let e = serde_json::from_str::<Bytes64>("\"not*base64\"").unwrap_err();
        assert!(e.to_string().contains("invalid base64"), "{e}");
        let e = serde_json::from_str::<Bytes64>("12").unwrap_err();
        assert!(e.to_string().contains("base64 string"), "{e}");
    }
}
