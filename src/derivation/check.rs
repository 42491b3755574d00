//! `check`: does a `.drv` file's name match its contents, and does each declared output path
//! (and the environment variable named after the output) match what Nix would compute? The
//! answer is a [`CheckReport`] listing every mismatch in words, rather than the first error,
//! so an operator sees everything wrong with a file at once.

use std::fmt;
use std::path::{Path, PathBuf};

use super::modulo::{Loader, PathComputer};
use super::output::OutputKind;
use super::paths::{drv_path, hash_placeholder};
use super::store_path::{StoreDir, StorePath};
use super::Derivation;

/// The outcome of checking one `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The file that was checked, as given.
    pub file: PathBuf,
    /// The store path Nix would give the file (None if it could not be computed).
    pub expected_drv_path: Option<String>,
    /// Each output with the path Nix computes for it (None when not known before building).
    pub outputs: Vec<(String, Option<String>)>,
    /// Every way the file differs from what Nix would have written, one sentence each.
    pub mismatches: Vec<String>,
}

impl CheckReport {
    /// Whether the file matches its contents in every respect checked.
    pub fn is_ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        if self.is_ok() {
            writeln!(f, "{file}: ok")?;
        } else {
            writeln!(f, "{file}: {} mismatch(es)", self.mismatches.len())?;
        }
        if let Some(p) = &self.expected_drv_path {
            writeln!(f, "  drv path: {p}")?;
        }
        for (name, path) in &self.outputs {
            let path = path.as_deref().unwrap_or("(known only after building)");
            writeln!(f, "  output {name}: {path}")?;
        }
        for m in &self.mismatches {
            writeln!(f, "  mismatch: {m}")?;
        }
        Ok(())
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Check `drv`, read from `file_path`, against Nix's path computations. Input derivations
/// are read with `loader`. A file outside the store directory is checked for its outputs
/// only (its name cannot be compared).
pub fn check(
    store_dir: &StoreDir,
    file_path: &Path,
    drv: &Derivation,
    loader: &mut Loader<'_>,
) -> CheckReport {
    let mut report = CheckReport {
        file: file_path.to_path_buf(),
        expected_drv_path: None,
        outputs: Vec::new(),
        mismatches: Vec::new(),
    };
    check_file_name(store_dir, file_path, drv, &mut report);
    let mut computer = PathComputer::new(store_dir.clone(), loader);
    match computer.output_paths(drv) {
        Ok(paths) => {
            for (name, computed) in paths {
                check_output(store_dir, drv, &name, computed.as_ref(), &mut report);
                let shown = computed.map(|p| store_dir.full_path(&p));
                report.outputs.push((lossy(&name), shown));
            }
        }
        Err(e) => report
            .mismatches
            .push(format!("cannot compute the output paths: {e}")),
    }
    report
}

fn check_file_name(
    store_dir: &StoreDir,
    file_path: &Path,
    drv: &Derivation,
    report: &mut CheckReport,
) {
    let expected = match drv_path(store_dir, drv) {
        Ok(p) => store_dir.full_path(&p),
        Err(e) => {
            report
                .mismatches
                .push(format!("cannot compute the derivation's own path: {e}"));
            return;
        }
    };
    report.expected_drv_path = Some(expected.clone());
    let bytes = file_path.as_os_str().as_encoded_bytes();
    if let Ok(actual) = store_dir.parse_path(bytes) {
        let actual = store_dir.full_path(&actual);
        if actual != expected {
            report.mismatches.push(format!(
                "file name does not match the contents: the file is {actual} but Nix would store these contents as {expected}"
            ));
        }
    }
}

fn check_output(
    store_dir: &StoreDir,
    drv: &Derivation,
    name: &[u8],
    computed: Option<&StorePath>,
    report: &mut CheckReport,
) {
    let shown = lossy(name);
    let Some((_, output)) = drv.outputs.iter().find(|(n, _)| n == name) else {
        return;
    };
    let computed_full = computed.map(|p| store_dir.full_path(p));
    let declared = match output.kind() {
        Ok(OutputKind::InputAddressed { path } | OutputKind::Fixed { path, .. }) => Some(path),
        Ok(_) => None,
        Err(e) => {
            report.mismatches.push(format!("output {shown:?}: {e}"));
            return;
        }
    };
    match (declared, &computed_full) {
        (Some(d), Some(c)) if d != c.as_bytes() => report.mismatches.push(format!(
            "output {shown:?} declares path {} but Nix computes {c}",
            lossy(d)
        )),
        (Some(d), None) => report.mismatches.push(format!(
            "output {shown:?} declares path {} but Nix would leave it without a path (an input is content-addressed or impure)",
            lossy(d)
        )),
        (None, Some(c)) => report.mismatches.push(format!(
            "output {shown:?} has no path but Nix computes {c} (no input is deferred)"
        )),
        _ => {}
    }
    // The environment variable Nix sets for the output.
    let expected_env = match (output.kind(), &computed_full) {
        (Ok(OutputKind::Deferred), None) => String::new(),
        (Ok(OutputKind::Floating { .. } | OutputKind::Impure { .. }), _) => {
            hash_placeholder(&shown)
        }
        (_, Some(c)) => c.clone(),
        (_, None) => return,
    };
    match drv.env_var(name) {
        None => report.mismatches.push(format!(
            "environment variable {shown:?} is missing; Nix sets it to {expected_env:?}"
        )),
        Some(v) if v != expected_env.as_bytes() => report.mismatches.push(format!(
            "environment variable {shown:?} is {:?} but Nix sets it to {expected_env:?}",
            lossy(v)
        )),
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Real derivations written by Nix 2.8 (from tests/data/drv/golden.nix).
    const FIXTURES: &[(&str, &[u8])] = &[
        ("xbwyx1rbm705dkq0cp44qlrik49zc4hy-uses-outputs.drv", include_bytes!("../../tests/data/drv/fixtures/xbwyx1rbm705dkq0cp44qlrik49zc4hy-uses-outputs.drv")),
        ("l8530s0wkd50q4m33ba52w1a3wp8cfkz-multi.drv", include_bytes!("../../tests/data/drv/fixtures/l8530s0wkd50q4m33ba52w1a3wp8cfkz-multi.drv")),
        ("b7nsrzhc7dx50zm75zp4gpm7ngybbh80-fixed-flat-md5.drv", include_bytes!("../../tests/data/drv/fixtures/b7nsrzhc7dx50zm75zp4gpm7ngybbh80-fixed-flat-md5.drv")),
        ("xz6xhfsl3lnar9p6nww5p68nns9059nc-fixed-recursive-sha256.drv", include_bytes!("../../tests/data/drv/fixtures/xz6xhfsl3lnar9p6nww5p68nns9059nc-fixed-recursive-sha256.drv")),
        ("mpzww2f2cvcx0672hpx2xsccw4ykw5rj-deferred.drv", include_bytes!("../../tests/data/drv/fixtures/mpzww2f2cvcx0672hpx2xsccw4ykw5rj-deferred.drv")),
        ("ng48arh2pqkyzfbr3rgr8xk9vkldxn29-floating.drv", include_bytes!("../../tests/data/drv/fixtures/ng48arh2pqkyzfbr3rgr8xk9vkldxn29-floating.drv")),
        ("6a9zcr3mgmw009zzhavqlg5abs3x8gf4-impure.drv", include_bytes!("../../tests/data/drv/fixtures/6a9zcr3mgmw009zzhavqlg5abs3x8gf4-impure.drv")),
    ];

    fn store() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn fixtures() -> HashMap<String, Derivation> {
        FIXTURES
            .iter()
            .map(|(n, b)| (n.to_string(), Derivation::parse(b).unwrap()))
            .collect()
    }

    fn run(name: &str, drv: &Derivation) -> CheckReport {
        let all = fixtures();
        let mut loader = |p: &StorePath| -> anyhow::Result<Derivation> {
            all.get(p.as_str())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no fixture {p}"))
        };
        let file = PathBuf::from(format!("/nix/store/{name}"));
        check(&store(), &file, drv, &mut loader)
    }

    #[test]
    fn fixtures_print_back_byte_for_byte() {
        for (name, bytes) in FIXTURES {
            let drv = Derivation::parse(bytes).unwrap();
            assert!(drv.print() == *bytes, "{name}");
            assert!(
                super::super::canonical_bytes(&store(), &drv).unwrap() == *bytes,
                "{name}"
            );
        }
    }

    #[test]
    fn every_fixture_checks_out() {
        for (name, drv) in fixtures() {
            let report = run(&name, &drv);
            assert!(report.is_ok(), "{report}");
            assert_eq!(report.expected_drv_path, Some(format!("/nix/store/{name}")));
        }
    }

    #[test]
    fn mismatches_are_reported_in_words() {
        let all = fixtures();
        let name = "l8530s0wkd50q4m33ba52w1a3wp8cfkz-multi.drv";
        let mut drv = all[name].clone();
        drv.outputs[0].1.path = b"/nix/store/00000000000000000000000000000000-multi-bin".to_vec();
        let report = run(name, &drv);
        let text = report.mismatches.join("\n");
        assert!(
            text.contains("file name does not match the contents"),
            "{text}"
        );
        assert!(text.contains("output \"bin\" declares path /nix/store/00000000000000000000000000000000-multi-bin but Nix computes"), "{text}");

        let mut drv = all[name].clone();
        drv.env.retain(|(k, _)| k != b"dev");
        let report = run(name, &drv);
        assert!(
            report
                .mismatches
                .iter()
                .any(|m| m.contains("environment variable \"dev\" is missing")),
            "{report}"
        );
    }

    #[test]
    fn missing_inputs_are_reported() {
        let all = fixtures();
        let drv = all["xbwyx1rbm705dkq0cp44qlrik49zc4hy-uses-outputs.drv"].clone();
        let mut loader =
            |p: &StorePath| -> anyhow::Result<Derivation> { anyhow::bail!("{p} is not here") };
        let report = check(&store(), Path::new("x.drv"), &drv, &mut loader);
        assert!(!report.is_ok());
        assert!(
            report.mismatches[0].contains("cannot read input derivation"),
            "{report}"
        );
    }
}
