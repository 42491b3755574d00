//! `kiln drv show` and `kiln drv check`: read `.drv` files, resolve their store directory,
//! and print JSON as `nix show-derivation` does, or a report of whether each file's name and
//! output paths match its contents. Errors say which file and what to do; `main` prints them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::check::check as check_drv;
use super::json::{write_derivation, JsonWriter};
use super::paths::{canonical_bytes, drv_path};
use super::store_path::{StoreDir, StorePath};
use super::Derivation;

/// Read and parse one `.drv` file, with the file named in every error.
pub fn read_derivation(file: &Path) -> anyhow::Result<Derivation> {
    let bytes = std::fs::read(file)
        .with_context(|| format!("cannot read {}: check the path", file.display()))?;
    Derivation::parse(&bytes).with_context(|| {
        format!(
            "{} is not a valid derivation (.drv file in ATerm format)",
            file.display()
        )
    })
}

/// The paths a derivation names, from which its store directory can be guessed.
fn named_paths(drv: &Derivation) -> Vec<&[u8]> {
    let outputs = drv
        .outputs
        .iter()
        .map(|(_, o)| o.path.as_slice())
        .filter(|p| !p.is_empty());
    let inputs = drv.input_drvs.iter().map(|(p, _)| p.as_slice());
    let srcs = drv.input_srcs.iter().map(Vec::as_slice);
    outputs.chain(inputs).chain(srcs).collect()
}

/// The store directory for `drv` read from `file`: the flag, else `KILN_STORE_DIR`, else the
/// well-known directory its paths (or, if it names none, the file itself) lie under.
fn resolve_store_dir(
    file: &Path,
    flag: Option<&Path>,
    drv: &Derivation,
) -> anyhow::Result<StoreDir> {
    let mut paths = named_paths(drv);
    let file_bytes = file.as_os_str().as_encoded_bytes();
    if paths.is_empty() {
        paths.push(file_bytes);
    }
    StoreDir::resolve(flag, &paths)
        .with_context(|| format!("{}: cannot resolve the store directory", file.display()))
}

/// The store path of `file` if it is (or links to) a file directly in the store directory.
fn file_store_path(store_dir: &StoreDir, file: &Path) -> Option<StorePath> {
    if let Ok(p) = store_dir.parse_path(file.as_os_str().as_encoded_bytes()) {
        return Some(p);
    }
    let real = std::fs::canonicalize(file).ok()?;
    store_dir
        .parse_path(real.as_os_str().as_encoded_bytes())
        .ok()
}

/// `kiln drv show FILE...`: print the derivations as JSON, keyed by drv path, as
/// `nix show-derivation` does. A file outside the store is keyed by the path Nix would give
/// it. Returns the process exit code.
pub fn show(
    files: &[PathBuf],
    store_dir: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    // Nix prints a set of derivations: sorted by store path, each once.
    let mut drvs: BTreeMap<StorePath, (StoreDir, Derivation, PathBuf)> = BTreeMap::new();
    for file in files {
        let drv = read_derivation(file)?;
        let dir = resolve_store_dir(file, store_dir, &drv)?;
        let path = match file_store_path(&dir, file) {
            Some(p) => p,
            None => drv_path(&dir, &drv).with_context(|| {
                format!(
                    "{} is not in the store directory {dir} and its store path cannot be computed",
                    file.display()
                )
            })?,
        };
        drvs.insert(path, (dir, drv, file.clone()));
    }
    let mut w = JsonWriter::new();
    w.open(b'{');
    for (path, (dir, drv, file)) in &drvs {
        let name = path.name().strip_suffix(".drv").unwrap_or(path.name());
        w.key(dir.full_path(path).as_bytes());
        write_derivation(&mut w, dir, drv, name).with_context(|| {
            format!(
                "{}: the derivation is not valid in store directory {dir} (pass --store-dir if it belongs to another store)",
                file.display()
            )
        })?;
    }
    w.close(b'}');
    w.out.push(b'\n');
    out.write_all(&w.out)
        .context("cannot write to standard output")?;
    Ok(0)
}

/// `kiln drv check FILE...`: say whether each file's name and output paths match its
/// contents. Input derivations are read from the store directory. Returns the process exit
/// code (0 when every file matches, 1 otherwise).
pub fn check(
    files: &[PathBuf],
    store_dir: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let mut all_ok = true;
    for file in files {
        let bytes = std::fs::read(file)
            .with_context(|| format!("cannot read {}: check the path", file.display()))?;
        let drv = Derivation::parse(&bytes).with_context(|| {
            format!(
                "{} is not a valid derivation (.drv file in ATerm format)",
                file.display()
            )
        })?;
        let dir = resolve_store_dir(file, store_dir, &drv)?;
        let loader_dir = dir.clone();
        let mut loader = move |p: &StorePath| -> anyhow::Result<Derivation> {
            read_derivation(Path::new(&loader_dir.full_path(p)))
        };
        let mut report = check_drv(&dir, file, &drv, &mut loader);
        if let Ok(canonical) = canonical_bytes(&dir, &drv) {
            if canonical != bytes {
                report.mismatches.push(
                    "the file is not in Nix's canonical form (Nix would write these contents differently: sorted, without unknown escapes)".into(),
                );
            }
        }
        all_ok &= report.is_ok();
        write!(out, "{report}").context("cannot write to standard output")?;
    }
    // Mismatches are results, not errors: the report says what differs, the exit code is 1.
    Ok(if all_ok { 0 } else { 1 })
}
