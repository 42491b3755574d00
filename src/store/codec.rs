//! The store codec: every record on disk is one version byte followed by the record's bincode
//! (1.3.3, fixed-int little-endian, the crate's default options) encoding. bincode is flagged
//! unmaintained and is not self-describing, so it lives behind this one module (see
//! docs/adr/001-storage.md): no `skip_serializing_if`, `flatten` or `untagged` in stored types,
//! enum variant order is part of the format, and golden-bytes tests pin each record version.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;

/// A record type stored in sled.
pub trait Record: Serialize + DeserializeOwned {
    /// The version byte written before the encoding. Raise it (and keep a decoder for the old
    /// version) whenever the encoding changes.
    const VERSION: u8;
    /// Name used in errors and `kiln state dump`.
    const NAME: &'static str;
}

/// Encode a record with its version byte.
pub fn encode<R: Record>(record: &R) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![R::VERSION];
    bincode::serialize_into(&mut out, record).map_err(|e| StoreError::Codec {
        record: R::NAME,
        message: e.to_string(),
    })?;
    Ok(out)
}

/// Decode a record, checking its version byte.
pub fn decode<R: Record>(bytes: &[u8]) -> Result<R, StoreError> {
    match bytes.split_first() {
        Some((&v, rest)) if v == R::VERSION => {
            bincode::deserialize(rest).map_err(|e| StoreError::Codec {
                record: R::NAME,
                message: e.to_string(),
            })
        }
        Some((&v, _)) => Err(StoreError::Codec {
            record: R::NAME,
            message: format!(
                "version {v} is not known to this kiln (it reads version {}); use the kiln that wrote this state dir",
                R::VERSION
            ),
        }),
        None => Err(StoreError::Codec {
            record: R::NAME,
            message: "empty value".into(),
        }),
    }
}
