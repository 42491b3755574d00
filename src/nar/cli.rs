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

/// The keys `--key` names, by kind: Nix's `name:base64` (checked against `Sig:` lines) and,
/// with the coordinator's features, Guix's `(public-key ...)` (checked against the
/// `Signature:` line).
struct Keys {
    nix: Vec<PublicKey>,
    #[cfg_attr(not(feature = "coordinator"), allow(dead_code))]
    guix: Vec<[u8; 32]>,
}

/// Public keys from `--key`: inline `name:base64`, or a file holding one or more of them
/// (separated by white space, as in `trusted-public-keys`), or a Guix public key file.
fn load_keys(key: &str) -> anyhow::Result<Keys> {
    let inline_err = match PublicKey::parse(key) {
        Ok(k) => {
            return Ok(Keys {
                nix: vec![k],
                guix: Vec::new(),
            })
        }
        Err(e) => e,
    };
    let path = Path::new(key);
    if !path.exists() {
        bail!("--key {key:?} is neither a public key (name:base64) nor an existing file: {inline_err}");
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read key file {}", path.display()))?;
    if text.trim_start().starts_with('(') {
        #[cfg(feature = "coordinator")]
        {
            let k = super::guix::parse_public_key(&text)
                .with_context(|| format!("key file {} is not a Guix public key", path.display()))?;
            return Ok(Keys {
                nix: Vec::new(),
                guix: vec![k],
            });
        }
        #[cfg(not(feature = "coordinator"))]
        bail!(
            "key file {} holds a Guix key, which this build of kiln cannot check",
            path.display()
        );
    }
    let keys = text
        .split_whitespace()
        .map(|k| {
            PublicKey::parse(k).with_context(|| {
                format!(
                    "key file {} holds something that is not a public key \
                     (a secret key? get the public one with `kiln key public`)",
                    path.display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if keys.is_empty() {
        bail!("key file {} is empty", path.display());
    }
    Ok(Keys {
        nix: keys,
        guix: Vec::new(),
    })
}

/// A narinfo or NAR location: a file, or an `http(s)://` URL (with the coordinator's
/// features).
fn open_location(loc: &str) -> anyhow::Result<Box<dyn Read>> {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        #[cfg(feature = "coordinator")]
        {
            let resp = ureq::get(loc)
                .timeout(std::time::Duration::from_secs(300))
                .call()
                .with_context(|| format!("failed to fetch {loc}"))?;
            return Ok(Box::new(resp.into_reader()));
        }
        #[cfg(not(feature = "coordinator"))]
        bail!("this build of kiln cannot fetch {loc}: give a file");
    }
    let f = std::fs::File::open(loc).with_context(|| format!("failed to open {loc}"))?;
    Ok(Box::new(std::io::BufReader::new(f)))
}

/// The location of `url` (a narinfo's `URL`), relative to the narinfo at `narinfo`.
fn beside(narinfo: &str, url: &str) -> String {
    if url.contains("://") {
        return url.to_string();
    }
    match narinfo.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{url}"),
        None => url.to_string(),
    }
}

/// Check the NAR the narinfo points at: decompress it and compare its NarHash and NarSize,
/// as a Nix client does when it imports it ("hash mismatch importing path"). A FileHash or
/// FileSize that differs is reported, not refused: Nix 2.8 does not check them either.
fn check_nar(location: &str, info: &NarInfo, out: &mut dyn Write) -> anyhow::Result<()> {
    let nar_loc = beside(location, &info.url);
    let file = super::HashingReader::new(open_location(&nar_loc)?);
    let (summary, file_hash, file_size) = match info.compression.as_str() {
        "none" => {
            let mut r = file;
            let s =
                super::validate(&mut r).with_context(|| format!("{nar_loc} is not a valid NAR"))?;
            std::io::copy(&mut r, &mut std::io::sink())?;
            let (_, h, n) = r.finish();
            (s, h, n)
        }
        #[cfg(feature = "coordinator")]
        "zstd" => {
            let mut d = zstd::stream::read::Decoder::new(file)?;
            let s = super::validate(&mut d)
                .with_context(|| format!("{nar_loc} is not a zstd-compressed NAR"))?;
            let mut r = d.finish();
            std::io::copy(&mut r, &mut std::io::sink())?;
            let (_, h, n) = r.into_inner().finish();
            (s, h, n)
        }
        other => bail!(
            "cannot check the NAR at {nar_loc}: it is compressed with {other}, and kiln reads \
             none and zstd"
        ),
    };
    if info.file_hash.as_ref().is_some_and(|h| h != &file_hash)
        || info.file_size.is_some_and(|n| n != file_size)
    {
        writeln!(
            out,
            "note: the file at {nar_loc} ({file_size} bytes, {file_hash}) is not the one FileHash and FileSize describe; \
             Nix does not check them, and neither does this check"
        )?;
    }
    if summary.nar_hash != info.nar_hash {
        bail!(
            "hash mismatch in the NAR of {}: the narinfo says NarHash {}, the NAR at {nar_loc} hashes to {}",
            info.store_path,
            info.nar_hash,
            summary.nar_hash
        );
    }
    if summary.nar_size != info.nar_size {
        bail!(
            "size mismatch in the NAR of {}: the narinfo says NarSize {}, the NAR at {nar_loc} is {} bytes",
            info.store_path,
            info.nar_size,
            summary.nar_size
        );
    }
    Ok(())
}

/// `kiln narinfo verify FILE|URL --key PUBKEY [--check-nar]`: verify the narinfo's signatures
/// against public keys (`name:base64`, or a file holding Nix keys or a Guix key), and with
/// `check_nar` that its NAR is the one it describes. Exit 0 if a signature of the key's kind
/// verifies (and the NAR matches).
pub fn narinfo_verify(
    location: &str,
    key: &str,
    store_dir: Option<&Path>,
    check_nar_too: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let keys = load_keys(key)?;
    let mut text = String::new();
    open_location(location)?
        .read_to_string(&mut text)
        .with_context(|| format!("failed to read narinfo {location}"))?;
    let info =
        NarInfo::parse(&text).with_context(|| format!("{location} is not a valid narinfo"))?;
    if let Some(dir) = store_dir {
        let dir = dir.to_string_lossy();
        let under = info
            .store_path
            .strip_prefix(dir.trim_end_matches('/'))
            .is_some_and(|rest| rest.starts_with('/') && !rest[1..].contains('/'));
        if !under {
            bail!(
                "{location} describes {}, which is not in the store directory {dir}; pass the right --store-dir",
                info.store_path
            );
        }
    }
    let good = signed_by(location, &text, &info, &keys)?;
    if check_nar_too {
        check_nar(location, &info, out)?;
    }
    writeln!(out, "{}: good signature by {good}", info.store_path)
        .context("failed to write to standard output")?;
    if check_nar_too {
        writeln!(
            out,
            "{}: the NAR matches NarHash and NarSize",
            info.store_path
        )
        .context("failed to write to standard output")?;
    }
    Ok(0)
}

/// Which key signed the narinfo, or why none did.
fn signed_by(location: &str, text: &str, info: &NarInfo, keys: &Keys) -> anyhow::Result<String> {
    if !keys.nix.is_empty() {
        let fingerprint = info
            .fingerprint()
            .with_context(|| format!("cannot check {location}"))?;
        for sig in &info.sigs {
            if let Some(k) = keys
                .nix
                .iter()
                .find(|k| k.verify(fingerprint.as_bytes(), sig))
            {
                return Ok(k.name().to_string());
            }
        }
        let names: Vec<&str> = keys.nix.iter().map(|k| k.name()).collect();
        let signers: Vec<&str> = info
            .sigs
            .iter()
            .map(|s| s.split(':').next().unwrap_or(""))
            .collect();
        if info.sigs.is_empty() {
            bail!(
                "{location} ({}) has no signature; sign it first",
                info.store_path
            );
        }
        bail!(
            "no signature of {location} ({}) verifies with the key(s) {names:?}; it is signed by {signers:?} \
             (a signature only counts with the key of its name, and the narinfo must not have been changed since signing)",
            info.store_path
        )
    }
    #[cfg(feature = "coordinator")]
    {
        let key = super::guix::verify_narinfo(text, &keys.guix).map_err(|e| {
            anyhow::anyhow!(
                "the Guix signature of {location} ({}) is not good: {e}",
                info.store_path
            )
        })?;
        let hex: String = key.iter().map(|b| format!("{b:02X}")).collect();
        Ok(format!("Guix key #{hex}#"))
    }
    #[cfg(not(feature = "coordinator"))]
    {
        let _ = text;
        bail!("no Nix public key given")
    }
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
