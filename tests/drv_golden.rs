//! Golden tests against real Nix 2.8: `nix-instantiate` writes derivations for every case
//! Kiln must handle (tests/data/drv/golden.nix), and for each of them and all their input
//! derivations Kiln must print the parsed file back byte for byte, `kiln drv show` must equal
//! `nix show-derivation`, and `kiln drv check` / the path computations must agree with the
//! paths Nix chose. Nix runs offline with a private configuration; a missing Nix is a test
//! failure, never a skip.
#![cfg(feature = "coordinator")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::derivation::{drv_path, Derivation, OutputKind, PathComputer, StoreDir, StorePath};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/drv")
}

/// A private Nix configuration: offline, no build users, no sandbox, the experimental
/// features the golden derivations need.
struct Nix {
    conf: tempfile::TempDir,
    /// `--store` argument for a store in a test directory, or None for /nix/store.
    store: Option<String>,
}

impl Nix {
    fn new() -> Nix {
        for tool in ["nix-instantiate", "nix", "nix-store"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false);
            assert!(
                found,
                "{tool} not found: run scripts/test, which installs nix-bin"
            );
        }
        let conf = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            conf.path().join("nix.conf"),
            "build-users-group =\nsandbox = false\nsubstituters =\n\
             experimental-features = nix-command ca-derivations impure-derivations\n",
        )
        .expect("write nix.conf");
        Nix { conf, store: None }
    }

    /// Use a store whose directory is `<root>/store` instead of /nix/store.
    fn with_store_in(mut self, root: &Path) -> Nix {
        let r = root.display();
        self.store = Some(format!("local?store={r}/store&state={r}/state&log={r}/log"));
        self
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_CONF_DIR", self.conf.path());
        c.env_remove("NIX_PATH");
        if let Some(s) = &self.store {
            c.arg("--store").arg(s);
        }
        c
    }

    fn run(&self, mut c: Command) -> Output {
        let out = c
            .output()
            .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
        assert!(
            out.status.success(),
            "{c:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Instantiate every attribute of tests/data/drv/golden.nix; returns the .drv paths.
    fn instantiate_golden(&self) -> Vec<PathBuf> {
        let mut c = self.cmd("nix-instantiate");
        c.arg(data_dir().join("golden.nix"));
        let out = self.run(c);
        String::from_utf8(out.stdout)
            .expect("nix-instantiate prints UTF-8 paths")
            .lines()
            // `path.drv!output` when the first output is not `out`.
            .map(|l| PathBuf::from(l.split('!').next().unwrap_or(l)))
            .collect()
    }

    /// The derivations and every .drv in their closure, sorted.
    fn closure(&self, drvs: &[PathBuf]) -> Vec<PathBuf> {
        let mut c = self.cmd("nix-store");
        c.arg("--query").arg("--requisites").args(drvs);
        let out = self.run(c);
        let all: BTreeSet<PathBuf> = String::from_utf8(out.stdout)
            .expect("UTF-8 paths")
            .lines()
            .filter(|l| l.ends_with(".drv"))
            .map(PathBuf::from)
            .collect();
        all.into_iter().collect()
    }

    fn show(&self, drvs: &[PathBuf]) -> Vec<u8> {
        let mut c = self.cmd("nix");
        c.arg("show-derivation").args(drvs);
        self.run(c).stdout
    }
}

fn kiln(args: &[&str], files: &[PathBuf], store_dir: Option<&str>) -> Output {
    let mut c = Command::new(KILN);
    c.args(args).args(files).env_remove("KILN_STORE_DIR");
    if let Some(d) = store_dir {
        c.arg("--store-dir").arg(d);
    }
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {KILN}: {e}"))
}

/// Compare two `show` outputs: as JSON values when both are UTF-8, and always as bytes.
fn assert_same_json(kiln: &[u8], nix: &[u8], what: &str) {
    if let (Ok(k), Ok(n)) = (std::str::from_utf8(kiln), std::str::from_utf8(nix)) {
        let kv: serde_json::Value =
            serde_json::from_str(k).unwrap_or_else(|e| panic!("{what}: kiln JSON invalid: {e}"));
        let nv: serde_json::Value =
            serde_json::from_str(n).unwrap_or_else(|e| panic!("{what}: nix JSON invalid: {e}"));
        assert_eq!(kv, nv, "{what}: JSON values differ");
    }
    if kiln != nix {
        let at = kiln
            .iter()
            .zip(nix)
            .position(|(a, b)| a != b)
            .unwrap_or(kiln.len().min(nix.len()));
        let ctx = |b: &[u8]| {
            String::from_utf8_lossy(&b[at.saturating_sub(60)..(at + 60).min(b.len())]).into_owned()
        };
        panic!(
            "{what}: kiln drv show differs from nix show-derivation at byte {at}\nkiln: {:?}\nnix:  {:?}",
            ctx(kiln),
            ctx(nix)
        );
    }
}

#[test]
fn every_golden_drv_round_trips_byte_for_byte() {
    let nix = Nix::new();
    let drvs = nix.closure(&nix.instantiate_golden());
    assert!(
        drvs.len() > 60,
        "expected the whole closure, got {}",
        drvs.len()
    );
    for f in &drvs {
        let bytes = std::fs::read(f).expect("read drv");
        let d = Derivation::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(d.print() == bytes, "{}: print(parse(f)) != f", f.display());
        for (name, o) in &d.outputs {
            o.kind()
                .unwrap_or_else(|e| panic!("{}: output {name:?}: {e}", f.display()));
        }
    }
}

#[test]
fn golden_drvs_cover_every_output_kind() {
    let nix = Nix::new();
    let drvs = nix.closure(&nix.instantiate_golden());
    let mut kinds = BTreeSet::new();
    for f in &drvs {
        let d = Derivation::parse(&std::fs::read(f).expect("read")).expect("parse");
        for (_, o) in &d.outputs {
            kinds.insert(match o.kind().expect("kind") {
                OutputKind::InputAddressed { .. } => "input-addressed".to_string(),
                OutputKind::Fixed { method, hash, .. } => format!("fixed {method:?} {}", hash.algo),
                OutputKind::Floating { .. } => "floating".into(),
                OutputKind::Deferred => "deferred".into(),
                OutputKind::Impure { .. } => "impure".into(),
            });
        }
    }
    assert_eq!(kinds.len(), 4 + 8, "{kinds:?}");
}

#[test]
fn kiln_show_equals_nix_show_derivation() {
    let nix = Nix::new();
    let drvs = nix.closure(&nix.instantiate_golden());
    for f in &drvs {
        let k = kiln(&["drv", "show"], std::slice::from_ref(f), None);
        assert!(
            k.status.success(),
            "kiln drv show {}: {}",
            f.display(),
            String::from_utf8_lossy(&k.stderr)
        );
        assert_same_json(
            &k.stdout,
            &nix.show(std::slice::from_ref(f)),
            &f.display().to_string(),
        );
    }
    // All at once, in reverse order: keys sorted as Nix sorts store paths.
    let mut rev = drvs.clone();
    rev.reverse();
    let k = kiln(&["drv", "show"], &rev, None);
    assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
    assert_same_json(&k.stdout, &nix.show(&rev), "all golden derivations");
}

#[test]
fn kiln_paths_agree_with_nix() {
    let nix = Nix::new();
    let drvs = nix.closure(&nix.instantiate_golden());
    let store = StoreDir::new("/nix/store").expect("store dir");
    let mut load = |p: &StorePath| -> anyhow::Result<Derivation> {
        Ok(Derivation::parse(&std::fs::read(store.full_path(p))?)?)
    };
    let mut computer = PathComputer::new(store.clone(), &mut load);
    for f in &drvs {
        let d = Derivation::parse(&std::fs::read(f).expect("read")).expect("parse");
        let own = drv_path(&store, &d).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(
            Path::new(&store.full_path(&own)),
            f.as_path(),
            "drv path of {}",
            f.display()
        );
        let paths = computer
            .output_paths(&d)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for ((name, o), (name2, computed)) in d.outputs.iter().zip(&paths) {
            assert_eq!(name, name2);
            let computed = computed
                .as_ref()
                .map(|p| store.full_path(p).into_bytes())
                .unwrap_or_default();
            assert_eq!(
                computed,
                o.path,
                "{}: output {}",
                f.display(),
                String::from_utf8_lossy(name)
            );
        }
    }
}

#[test]
fn kiln_check_accepts_every_golden_drv() {
    let nix = Nix::new();
    let drvs = nix.closure(&nix.instantiate_golden());
    let out = kiln(&["drv", "check"], &drvs, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kiln drv check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches(": ok\n").count(), drvs.len(), "{stdout}");
    // Every output path Nix shows appears in the report.
    let shown: serde_json::Value = serde_json::from_slice(&nix.show(&drvs[..1])).expect("json");
    for (_, drv) in shown.as_object().expect("object") {
        for (_, o) in drv["outputs"].as_object().expect("outputs") {
            if let Some(p) = o.get("path").and_then(|p| p.as_str()) {
                assert!(stdout.contains(p), "{p} missing from\n{stdout}");
            }
        }
    }
}

#[test]
fn kiln_check_reports_tampered_files() {
    let nix = Nix::new();
    let drvs = nix.instantiate_golden();
    let multi = drvs
        .iter()
        .find(|p| p.to_string_lossy().ends_with("-multi.drv"))
        .expect("multi.drv");
    let text = std::fs::read_to_string(multi).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    // Change one env value: the file name and output paths no longer match the contents.
    let tampered = dir.path().join("tampered.drv");
    std::fs::write(
        &tampered,
        text.replace(
            "(\"system\",\"x86_64-linux\")",
            "(\"system\",\"x86_64-linuz\")",
        ),
    )
    .expect("write");
    let out = kiln(&["drv", "check"], &[tampered], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("declares path"), "{stdout}");
}

#[test]
fn custom_store_dir_matches_nix() {
    let root = tempfile::tempdir().expect("tempdir");
    let nix = Nix::new().with_store_in(root.path());
    let store_dir = format!("{}/store", root.path().display());
    let drvs = nix.closure(&nix.instantiate_golden());
    assert!(drvs.iter().all(|d| d.starts_with(&store_dir)), "{drvs:?}");
    let k = kiln(&["drv", "show"], &drvs, Some(&store_dir));
    assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
    assert_same_json(&k.stdout, &nix.show(&drvs), "custom store");
    let c = kiln(&["drv", "check"], &drvs, Some(&store_dir));
    assert!(
        c.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&c.stdout),
        String::from_utf8_lossy(&c.stderr)
    );
    // Without --store-dir, paths outside /gnu/store and /nix/store cannot be guessed.
    let k = kiln(&["drv", "show"], &drvs[..1], None);
    assert!(!k.status.success());
    assert!(
        String::from_utf8_lossy(&k.stderr).contains("--store-dir"),
        "{}",
        String::from_utf8_lossy(&k.stderr)
    );
}

/// Pins down the table in docs/derivations.md: files Nix 2.8 accepts although Nix never
/// writes them. Kiln shows the ones it matches exactly as Nix does, and refuses the others
/// with an error naming the byte offset. The files use a floating output, which Nix does not
/// check when they are added to the store.
#[test]
fn odd_files_nix_accepts_are_matched_or_refused_as_documented() {
    let nix = Nix::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let drv = |name: &str, args: &str, env: &str, tail: &str| {
        format!(
            r#"Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[{args}],[{env}("name","{name}")]){tail}"#
        )
    };
    let cases = [
        (
            "unknown-escape",
            drv("unknown-escape", r#""a\xb\qc""#, "", ""),
            None,
        ),
        (
            "unsorted-env",
            drv("unsorted-env", "", r#"("z","1"),"#, ""),
            None,
        ),
        (
            "missing-comma",
            drv("missing-comma", r#""a""b""#, "", ""),
            Some("expected ',' or ']'"),
        ),
        (
            "leading-comma",
            drv("leading-comma", r#","a""#, "", ""),
            Some("expected '\"' starting"),
        ),
        (
            "trailing-data",
            drv("trailing-data", "", "", "GARBAGE"),
            Some("expected end of input"),
        ),
        (
            "duplicate-env",
            drv("duplicate-env", "", r#"("v","1"),("v","2"),"#, ""),
            Some("duplicate environment variable"),
        ),
    ];
    for (name, text, refused) in cases {
        let file = dir.path().join(format!("{name}.drv"));
        std::fs::write(&file, &text).expect("write");
        let mut add = nix.cmd("nix-store");
        add.arg("--add").arg(&file);
        let added = String::from_utf8(nix.run(add).stdout).expect("utf-8");
        let path = PathBuf::from(added.trim());
        let nix_json = nix.show(std::slice::from_ref(&path));
        let k = kiln(
            &["drv", "show"],
            std::slice::from_ref(&path),
            Some("/nix/store"),
        );
        match refused {
            None => {
                assert!(
                    k.status.success(),
                    "{name}: {}",
                    String::from_utf8_lossy(&k.stderr)
                );
                assert_same_json(&k.stdout, &nix_json, name);
            }
            Some(msg) => {
                let err = String::from_utf8_lossy(&k.stderr);
                assert!(!k.status.success(), "{name}: Kiln accepted it");
                assert!(
                    err.contains(msg) && err.contains("at byte "),
                    "{name}: {err}"
                );
            }
        }
    }
}
