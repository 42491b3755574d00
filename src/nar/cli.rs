//! `kiln nar ...` and `kiln narinfo ...`.

use std::io::{Read, Write};
use std::path::Path;

/// `kiln nar dump PATH`: write the NAR of PATH.
pub fn dump(_path: &Path, _out: &mut dyn Write) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet")
}

/// `kiln nar restore DIR`: read a NAR and restore it at DIR (which must not exist).
pub fn restore(_dir: &Path, _input: &mut dyn Read) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet")
}

/// `kiln nar hash PATH`: print `sha256:<base32>` of PATH's NAR.
pub fn hash(_path: &Path, _out: &mut dyn Write) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet")
}

/// `kiln narinfo show FILE`: parse and print a narinfo (human, or JSON with `json`).
pub fn narinfo_show(_file: &Path, _json: bool, _out: &mut dyn Write) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet")
}

/// `kiln narinfo verify FILE --key PUBKEY`: verify the narinfo's signatures against a public key
/// (`name:base64`, or a file holding one). Exit 0 if one signature verifies.
pub fn narinfo_verify(_file: &Path, _key: &str, _store_dir: Option<&Path>, _out: &mut dyn Write) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet")
}
