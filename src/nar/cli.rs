//! `kiln nar ...`, `kiln narinfo ...` and `kiln key ...`: thin command-line faces of [`crate::nar`]. They run
//! synchronously on the calling thread (no runtime, no pool), return the exit code on success
//! and an error saying what failed and what to do otherwise (`main` prints it and exits 1).

use std::io::{BufWriter, Read, Write};
use std::path::Path;

use anyhow::{bail, Context};

use super::narinfo::NarInfo;
use super::signing::PublicKey;

/// `kiln nar dump PATH`: write the NAR of PATH.
pub fn dump(path: &Path, out: &mut dyn Write) -> anyhow::Result<i32> {
    // The NAR writer already hands over 128 KiB blocks, so no extra buffering is needed.
    super::dump(path, out)
        .with_context(|| format!("failed to write the NAR of {}", path.display()))?;
    out.flush().context("failed to flush standard output")?;
    Ok(0)
}

/// `kiln nar restore DIR`: read a NAR and restore it at DIR (which must not exist).
pub fn restore(dir: &Path, input: &mut dyn Read) -> anyhow::Result<i32> {
    super::restore(input, dir).with_context(|| {
        format!(
            "failed to restore the NAR from standard input at {}",
            dir.display()
        )
    })?;
    Ok(0)
}

/// `kiln nar hash PATH`: print `sha256:<base32>` of PATH's NAR.
pub fn hash(path: &Path, out: &mut dyn Write) -> anyhow::Result<i32> {
    let summary = super::hash_path(path)
        .with_context(|| format!("failed to hash the NAR of {}", path.display()))?;
    writeln!(out, "{}", summary.nar_hash.to_nix_string())
        .context("failed to write to standard output")?;
    Ok(0)
}

fn read_narinfo(file: &Path) -> anyhow::Result<NarInfo> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("failed to read narinfo {}", file.display()))?;
    NarInfo::parse(&text).with_context(|| format!("{} is not a valid narinfo", file.display()))
}

/// `kiln narinfo show FILE`: parse and print a narinfo (human, or JSON with `json`).
pub fn narinfo_show(file: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<i32> {
    let info = read_narinfo(file)?;
    let mut out = BufWriter::new(out);
    if json {
        serde_json::to_writer_pretty(&mut out, &info).context("failed to write JSON")?;
        writeln!(out).context("failed to write to standard output")?;
    } else {
        write!(out, "{info}").context("failed to write to standard output")?;
    }
    out.flush().context("failed to write to standard output")?;
    Ok(0)
}

/// Public keys from `--key`: inline `name:base64`, or a file holding one or more of them
/// (separated by white space, as in `trusted-public-keys`).
fn load_keys(key: &str) -> anyhow::Result<Vec<PublicKey>> {
    let inline_err = match PublicKey::parse(key) {
        Ok(k) => return Ok(vec![k]),
        Err(e) => e,
    };
    let path = Path::new(key);
    if !path.exists() {
        bail!("--key {key:?} is neither a public key (name:base64) nor an existing file: {inline_err}");
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read key file {}", path.display()))?;
    let keys = text
        .split_whitespace()
        .map(|k| {
            PublicKey::parse(k).with_context(|| {
                format!(
                    "key file {} holds something that is not a public key \
                     (a secret key? get the public one with `nix key convert-secret-to-public`)",
                    path.display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if keys.is_empty() {
        bail!("key file {} is empty", path.display());
    }
    Ok(keys)
}

/// `kiln narinfo verify FILE --key PUBKEY`: verify the narinfo's signatures against a public key
/// (`name:base64`, or a file holding one). Exit 0 if one signature verifies.
pub fn narinfo_verify(
    file: &Path,
    key: &str,
    store_dir: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let keys = load_keys(key)?;
    let info = read_narinfo(file)?;
    if let Some(dir) = store_dir {
        let dir = dir.to_string_lossy();
        let under = info
            .store_path
            .strip_prefix(dir.trim_end_matches('/'))
            .is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains('/'));
        if !under {
            bail!(
                "{} describes {}, which is not in the store directory {dir}; pass the right --store-dir",
                file.display(),
                info.store_path
            );
        }
    }
    let fingerprint = info
        .fingerprint()
        .with_context(|| format!("cannot check {}", file.display()))?;
    for sig in &info.sigs {
        if let Some(k) = keys.iter().find(|k| k.verify(fingerprint.as_bytes(), sig)) {
            writeln!(out, "{}: good signature by {}", info.store_path, k.name())
                .context("failed to write to standard output")?;
            return Ok(0);
        }
    }
    let names: Vec<&str> = keys.iter().map(|k| k.name()).collect();
    let signers: Vec<&str> = info
        .sigs
        .iter()
        .map(|s| s.split(':').next().unwrap_or(""))
        .collect();
    if info.sigs.is_empty() {
        bail!(
            "{} ({}) has no signature; sign it first",
            file.display(),
            info.store_path
        );
    }
    bail!(
        "no signature of {} ({}) verifies with the key(s) {names:?}; it is signed by {signers:?} \
         (a signature only counts with the key of its name, and the narinfo must not have been changed since signing)",
        file.display(),
        info.store_path
    )
}

#[cfg(feature = "coordinator")]
/// Write `text` to a new file readable by its owner only; an existing file is refused unless
/// `force` (a secret key file is not overwritten by accident).
fn write_private(path: &Path, text: &str, force: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} exists: pick another file, or pass --force to replace it",
                path.display()
            )
        } else {
            anyhow::anyhow!("failed to create {}: {e}", path.display())
        }
    })?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to set mode 0600 on {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("failed to write {}", path.display()))
}

#[cfg(feature = "coordinator")]
/// `kiln key generate NAME SECRET_FILE PUBLIC_FILE`: a signing key in Nix's formats, as
/// `nix-store --generate-binary-cache-key` writes them (`NAME:base64`, no newline); the
/// secret file gets mode 0600. With `guix_public`, the public key in Guix's form too.
pub fn key_generate(
    name: &str,
    secret_file: &Path,
    public_file: &Path,
    guix_public: Option<&Path>,
    force: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !name.is_empty() && !name.contains(':') && !name.chars().any(char::is_whitespace),
        "key name {name:?} is not usable: give a name without ':' or spaces, e.g. cache.example.org-1"
    );
    let key = super::signing::SecretKey::generate(name)?;
    let public = key.to_public();
    write_private(secret_file, &key.to_string(), force)?;
    std::fs::write(public_file, public.to_string())
        .with_context(|| format!("failed to write {}", public_file.display()))?;
    if let Some(g) = guix_public {
        std::fs::write(g, super::guix::public_key_sexp(&public.key_bytes()))
            .with_context(|| format!("failed to write {}", g.display()))?;
    }
    writeln!(
        out,
        "{public}\n(secret key in {}; set signing_key_file to it, and give the public key to \
         Nix's trusted-public-keys)",
        secret_file.display()
    )
    .context("failed to write to standard output")?;
    Ok(0)
}

#[cfg(feature = "coordinator")]
/// `kiln key public SECRET_FILE`: the public key of a secret key file, in Nix's form, or in
/// Guix's with `guix` (for `guix archive --authorize`).
pub fn key_public(secret_file: &Path, guix: bool, out: &mut dyn Write) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(secret_file)
        .with_context(|| format!("failed to read {}", secret_file.display()))?;
    let key = super::signing::SecretKey::parse(&text)
        .with_context(|| format!("{} is not a Nix secret key", secret_file.display()))?;
    let public = key.to_public();
    if guix {
        write!(out, "{}", super::guix::public_key_sexp(&public.key_bytes()))
    } else {
        writeln!(out, "{public}")
    }
    .context("failed to write to standard output")?;
    Ok(0)
}
