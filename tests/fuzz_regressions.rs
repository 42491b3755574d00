//! Fuzz reproducers kept as regression tests: every file under
//! `tests/data/fuzz-regressions/<target>/` is replayed through the same entry point the fuzz
//! target runs (`fuzz/src/checks.rs`, included here unchanged), so every property the fuzzer
//! checks (no panic, bounded memory, clear errors, round trips) is checked again on every
//! `cargo test`. Each reproducer has a `<file>.expect` beside it: `accepted`, or `refused`
//! and then, on the next line, text the error must contain. The seed set in `fuzz/seeds/` is
//! replayed too: every seed is a valid input and must be accepted. See `docs/fuzzing.md`.

#[path = "../fuzz/src/alloc.rs"]
mod alloc;
#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::any::Any;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use checks::Outcome;

// The checks bound memory with the counting allocator, exactly as in the fuzz binaries.
#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Input files of a directory (not the `.expect` files), sorted; none if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("read a directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "expect"))
        .collect();
    files.sort();
    files
}

fn panic_text(p: Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "a panic without a message".to_string()
    }
}

/// Run `check` on `file`; a panic (a broken property) becomes an `Err` naming the file.
fn replay(check: checks::Check, file: &Path) -> Result<Outcome, String> {
    let data = fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    panic::catch_unwind(AssertUnwindSafe(|| check(&data)))
        .map_err(|p| format!("{}: {}", file.display(), panic_text(p)))
}

/// What a reproducer's `.expect` file says.
fn expected(file: &Path) -> Result<(bool, Option<String>), String> {
    let mut name = file.as_os_str().to_owned();
    name.push(".expect");
    let text = fs::read_to_string(&name).map_err(|e| {
        format!(
            "{}: no readable {} saying what the input must give ({e}); write `accepted`, or \
             `refused` and a line the error must contain",
            file.display(),
            Path::new(&name).display()
        )
    })?;
    let mut lines = text.lines();
    match lines.next().map(str::trim) {
        Some("accepted") => Ok((true, None)),
        Some("refused") => Ok((false, lines.next().map(str::to_string))),
        other => Err(format!(
            "{}.expect: first line must be `accepted` or `refused`, not {other:?}",
            file.display()
        )),
    }
}

#[test]
fn every_reproducer_replays_to_its_expected_outcome() {
    let dir = root().join("tests/data/fuzz-regressions");
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, check) in checks::TARGETS {
        for file in inputs(&dir.join(target)) {
            replayed += 1;
            let outcome = match replay(*check, &file) {
                Ok(o) => o,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            let (accept, contains) = match expected(&file) {
                Ok(x) => x,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            match (&outcome, accept, contains) {
                (Outcome::Accepted, true, _) => {}
                (Outcome::Refused(msg), false, Some(want)) if !msg.contains(&want) => failures
                    .push(format!(
                        "{}: refused, but the error does not contain {want:?}: {msg}",
                        file.display()
                    )),
                (Outcome::Refused(_), false, _) => {}
                (other, _, _) => failures.push(format!(
                    "{}: expected {}, got {other:?}",
                    file.display(),
                    if accept { "accepted" } else { "refused" }
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The bugs fixed so far have reproducers: the test cannot pass by finding no files.
    assert!(
        replayed >= 4,
        "only {replayed} reproducers found under {}",
        dir.display()
    );
}

#[test]
fn every_seed_is_accepted() {
    let dir = root().join("fuzz/seeds");
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, check) in checks::TARGETS {
        let files = inputs(&dir.join(target));
        if files.is_empty() {
            failures.push(format!("no seeds for target {target} in {}", dir.display()));
        }
        for file in files {
            replayed += 1;
            match replay(*check, &file) {
                Ok(Outcome::Accepted) => {}
                Ok(other) => failures.push(format!("{}: seed gives {other:?}", file.display())),
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        replayed >= 20,
        "only {replayed} seeds found under {}",
        dir.display()
    );
}

/// The error of a refused reproducer stays short however long the offending field is: the
/// fixed bug was an error that quoted a 10 KB hash (or reference) whole.
#[test]
fn long_fields_are_quoted_cut_short() {
    let dir = root().join("tests/data/fuzz-regressions");
    for (target, file) in [
        ("drv", "long-fixed-output-hash"),
        ("drv", "long-hash-algorithm"),
        ("narinfo", "long-reference-in-error"),
    ] {
        let check = checks::TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, c)| *c)
            .expect("target exists");
        let path = dir.join(target).join(file);
        let len = fs::metadata(&path).expect("reproducer exists").len();
        match replay(check, &path) {
            Ok(Outcome::Refused(msg)) => {
                assert!(len > 10_000, "{file} should hold a field over 10 KB");
                assert!(
                    msg.len() < 1_000,
                    "{file}: error of {} bytes: {msg}",
                    msg.len()
                );
                assert!(msg.contains("bytes)") || msg.contains("…"), "{file}: {msg}");
            }
            other => panic!("{file}: expected a refusal, got {other:?}"),
        }
    }
}
