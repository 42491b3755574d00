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

    /// Decode an older version of this record (`version` below [`Record::VERSION`]) into the
    /// current one; `None` when the version is not known. Implementations decode the old
    /// layout with [`decode_body`] and convert it.
    fn decode_older(version: u8, body: &[u8]) -> Option<Result<Self, StoreError>> {
        let _ = (version, body);
        None
    }
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

/// Decode the bincode body of a record (what follows the version byte) as `T`: for
/// [`Record::decode_older`], which names the old layout of a record as `T`.
pub fn decode_body<T: DeserializeOwned>(
    record: &'static str,
    body: &[u8],
) -> Result<T, StoreError> {
    bincode::deserialize(body).map_err(|e| StoreError::Codec {
        record,
        message: e.to_string(),
    })
}

/// Decode a record, checking its version byte; older versions the record knows are converted.
pub fn decode<R: Record>(bytes: &[u8]) -> Result<R, StoreError> {
    match bytes.split_first() {
        Some((&v, rest)) if v == R::VERSION => decode_body(R::NAME, rest),
        Some((&v, rest)) if v < R::VERSION => match R::decode_older(v, rest) {
            Some(r) => r,
            None => Err(StoreError::Codec {
                record: R::NAME,
                message: format!(
                    "version {v} is no longer readable by this kiln (it reads version {}); use an older kiln to migrate this state dir",
                    R::VERSION
                ),
            }),
        },
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

/// A build record decoded for the start-up scan: borrowed from the stored bytes when it is
/// the current version, owned when it was converted from an older one.
pub enum View<'a> {
    Borrowed(super::records::BuildView<'a>),
    Owned(super::records::BuildRecord),
}

/// Decode a build record's bytes into a [`View`].
pub fn decode_build_view(bytes: &[u8]) -> Result<View<'_>, StoreError> {
    use super::records::BuildRecord;
    match bytes.split_first() {
        Some((&v, rest)) if v == BuildRecord::VERSION => {
            Ok(View::Borrowed(bincode::deserialize(rest).map_err(|e| {
                StoreError::Codec {
                    record: BuildRecord::NAME,
                    message: e.to_string(),
                }
            })?))
        }
        _ => decode::<BuildRecord>(bytes).map(View::Owned),
    }
}
