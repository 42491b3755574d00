//! Builtin builders (`builder = "builtin:NAME"`), run inside the agent instead of as a process,
//! and the fixed-output check every derivation with an output hash gets.
//!
//! Only `builtin:fetchurl` exists, as Nix defines it: it downloads the derivation's `url` (env)
//! into its `out` output. `unpack = "1"`: the download is a NAR, restored at `out`;
//! `executable = "1"`: the file is made executable. `file://`, `http://` and `https://` URLs
//! are fetched (no mirrors, no netrc); any other scheme, an `.xz` NAR, or a builtin other than
//! `fetchurl` fails the build with a reason saying so. The derivation must be fixed-output:
//! what was downloaded must match `outputHash` ([`check_fixed_output`]), else the build fails
//! naming the expected and the actual hash.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kiln::derivation::Derivation;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;

use super::process::{Exit, StopReason};
use crate::nario;
use crate::state::blocking;

/// Runs builtin `name` of `drv` with `outputs` (output name, local path); progress goes to the
/// build's `log`.
pub async fn run(
    http: &reqwest::Client,
    drv: &Derivation,
    outputs: &[(String, PathBuf)],
    log: &Path,
    stop: &mut watch::Receiver<Option<StopReason>>,
) -> anyhow::Result<Exit> {
    let name = String::from_utf8_lossy(&drv.builder).into_owned();
    if name != "builtin:fetchurl" {
        return Ok(Exit::Failed(format!(
            "unsupported builtin builder {name:?}: this agent builds only builtin:fetchurl"
        )));
    }
    tokio::select! {
        r = fetchurl(http, drv, outputs, log) => r,
        r = stop.wait_for(Option::is_some) => {
            let reason = r.ok().and_then(|s| *s).unwrap_or(StopReason::Shutdown);
            Ok(Exit::Stopped(reason))
        }
    }
}

fn env<'a>(drv: &'a Derivation, name: &str) -> Option<&'a [u8]> {
    drv.env
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

async fn fetchurl(
    http: &reqwest::Client,
    drv: &Derivation,
    outputs: &[(String, PathBuf)],
    log: &Path,
) -> anyhow::Result<Exit> {
    let Some((_, out)) = outputs.iter().find(|(n, _)| n == "out") else {
        return Ok(Exit::Failed(
            "builtin:fetchurl requires an output named out".into(),
        ));
    };
    let fixed = drv
        .outputs
        .iter()
        .any(|(n, o)| n == b"out" && !o.hash.is_empty());
    if !fixed {
        return Ok(Exit::Failed(
            "builtin:fetchurl must be a fixed-output derivation (its out output has no outputHash)"
                .into(),
        ));
    }
    let Some(url) = env(drv, "url").map(|u| String::from_utf8_lossy(u).into_owned()) else {
        return Ok(Exit::Failed(
            "builtin:fetchurl needs the env variable url".into(),
        ));
    };
    let unpack = env(drv, "unpack") == Some(b"1");
    let executable = env(drv, "executable") == Some(b"1");
    if unpack && url.ends_with(".xz") {
        return Ok(Exit::Failed(format!(
            "builtin:fetchurl cannot unpack {url}: xz-compressed NARs are not supported by this agent"
        )));
    }
    let mut logf = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await
        .context("failed to open the build log")?;
    let _ = logf
        .write_all(format!("downloading '{url}'...\n").as_bytes())
        .await;
    // Downloaded to a file in the store dir first, then written or restored at `out`.
    let tmp = out.with_file_name(format!(
        ".{}.download-{:016x}",
        out.file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rand::random::<u64>()
    ));
    let got = download_to(http, &url, &tmp).await;
    let result = match got {
        Err(reason) => Ok(Exit::Failed(reason)),
        Ok(size) => {
            let _ = logf
                .write_all(format!("downloaded {size} bytes\n").as_bytes())
                .await;
            let (t, o) = (tmp.clone(), out.clone());
            let placed = blocking("place the download", move || {
                if unpack {
                    let mut f = std::fs::File::open(&t)
                        .with_context(|| format!("failed to open {}", t.display()))?;
                    nario::restore(&mut std::io::BufReader::new(&mut f), &o)
                        .map_err(|e| anyhow::anyhow!("the download is not a valid NAR: {e}"))?;
                } else {
                    std::fs::rename(&t, &o).with_context(|| {
                        format!("failed to move the download to {}", o.display())
                    })?;
                    if executable {
                        use std::os::unix::fs::PermissionsExt as _;
                        std::fs::set_permissions(&o, std::fs::Permissions::from_mode(0o755))
                            .with_context(|| {
                                format!("failed to make {} executable", o.display())
                            })?;
                    }
                }
                Ok(())
            })
            .await;
            match placed {
                Ok(()) => Ok(Exit::Success),
                Err(e) => Ok(Exit::Failed(format!(
                    "builtin:fetchurl failed on {url}: {e:#}"
                ))),
            }
        }
    };
    let _ = tokio::fs::remove_file(&tmp).await;
    result
}

/// Downloads `url` into the new file `dest`; the byte count, or why it failed.
async fn download_to(http: &reqwest::Client, url: &str, dest: &Path) -> Result<u64, String> {
    let fail =
        |e: &dyn std::fmt::Display| format!("builtin:fetchurl failed to download {url}: {e}");
    if let Some(path) = url.strip_prefix("file://") {
        let (src, d) = (PathBuf::from(path), dest.to_owned());
        return blocking("copy a file:// download", move || {
            std::fs::copy(&src, &d).with_context(|| format!("failed to read {}", src.display()))
        })
        .await
        .map_err(|e| fail(&format!("{e:#}")));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "builtin:fetchurl cannot fetch {url}: only file://, http:// and https:// URLs are supported by this agent"
        ));
    }
    let mut resp = http.get(url).send().await.map_err(|e| fail(&e))?;
    if !resp.status().is_success() {
        return Err(fail(&format!("HTTP status {}", resp.status())));
    }
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| fail(&format!("failed to create {}: {e}", dest.display())))?;
    let mut size = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(&e))? {
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| fail(&format!("failed to write {}: {e}", dest.display())))?;
    }
    file.flush().await.map_err(|e| fail(&e))?;
    Ok(size)
}

/// Checks every output of `drv` that declares a hash (a fixed-output derivation) against what
/// was built at its local path: `None` when all match, else the reason the build fails (with
/// the expected and the actual hash, hex, as the `.drv` states it). Modes as in Nix:
/// `outputHashAlgo` `sha256`/`sha512` hashes the file (flat; it must be a regular file),
/// `r:sha256`/`r:sha512` the NAR serialisation (recursive).
pub async fn check_fixed_output(
    drv: &Derivation,
    outputs: &[(String, PathBuf)],
) -> anyhow::Result<Option<String>> {
    for (name, o) in &drv.outputs {
        if o.hash.is_empty() {
            continue;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let Some((_, local)) = outputs.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let algo = String::from_utf8_lossy(&o.hash_algo).into_owned();
        let expected = String::from_utf8_lossy(&o.hash).to_ascii_lowercase();
        let (recursive, kind) = match algo.strip_prefix("r:") {
            Some(k) => (true, k.to_owned()),
            None => (false, algo.clone()),
        };
        if kind != "sha256" && kind != "sha512" {
            return Ok(Some(format!(
                "output {name}: unsupported outputHashAlgo {algo:?} (this agent checks sha256 and sha512)"
            )));
        }
        let path = local.clone();
        let got = blocking("hash a fixed output", move || {
            hash_output(&path, recursive, &kind)
        })
        .await?;
        let got = match got {
            Ok(h) => h,
            Err(reason) => return Ok(Some(format!("output {name}: {reason}"))),
        };
        if got != expected {
            let mode = if recursive { "recursive" } else { "flat" };
            return Ok(Some(format!(
                "hash mismatch in fixed-output derivation output {name} ({mode}): expected {algo}:{expected}, got {algo}:{got}"
            )));
        }
    }
    Ok(None)
}

/// The hex hash of `path`: of its NAR when `recursive`, else of its contents (a regular file).
fn hash_output(path: &Path, recursive: bool, kind: &str) -> anyhow::Result<Result<String, String>> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("failed to stat {}", path.display()))?;
    if !recursive && !meta.is_file() {
        return Ok(Err(format!(
            "{} is not a regular file, as a flat fixed output must be",
            path.display()
        )));
    }
    let mut w: Box<dyn DigestWrite> = match kind {
        "sha512" => Box::new(Hasher(sha2::Sha512::new())),
        _ => Box::new(Hasher(sha2::Sha256::new())),
    };
    if recursive {
        nario::dump(path, &mut w)
            .map_err(|e| anyhow::anyhow!("failed to dump {}: {e}", path.display()))?;
    } else {
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        std::io::copy(&mut f, &mut w)
            .with_context(|| format!("failed to read {}", path.display()))?;
    }
    w.flush()?;
    Ok(Ok(hex(&w.digest())))
}

trait DigestWrite: std::io::Write {
    fn digest(self: Box<Self>) -> Vec<u8>;
}

struct Hasher<D>(D);

impl<D: sha2::Digest> std::io::Write for Hasher<D> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<D: sha2::Digest> DigestWrite for Hasher<D> {
    fn digest(self: Box<Self>) -> Vec<u8> {
        self.0.finalize().to_vec()
    }
}

/// Lower-case hex, as `.drv` files state output hashes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_files_flat_and_trees_recursively() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        // sha256("abc"), a well-known test vector.
        assert_eq!(
            hash_output(&f, false, "sha256").unwrap().unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut nar = Vec::new();
        kiln::nar::dump(&f, &mut nar).unwrap();
        assert_eq!(
            hash_output(&f, true, "sha256").unwrap().unwrap(),
            hex(&sha2::Sha256::digest(&nar))
        );
        assert!(hash_output(dir.path(), false, "sha256").unwrap().is_err());
    }
}
