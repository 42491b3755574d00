//! The storage boundary (docs/adr/001-storage.md): the engine stays behind `src/store/`, so
//! "only the committer writes" holds by construction and swapping sled is a one-module change;
//! and `src/store/` does not depend on the HTTP framework. Pins the check
//! `grep -rn "sled::" src --include=*.rs | grep -v '^src/store/'` (empty) and its siblings.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `(file relative to the crate, line number, line)` of every line under `src/` outside
/// `src/<inside>/` that contains one of `needles`.
fn offending(inside: &str, needles: &[&str], only_inside: bool) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() > 20, "the scan found the sources: {files:?}");
    let mut hits = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let is_inside = rel.starts_with(&format!("src/{inside}/"));
        if is_inside != only_inside {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|x| line.contains(x)) {
                hits.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    hits
}

#[test]
fn no_sled_type_outside_src_store() {
    let hits = offending("store", &["sled::", "IVec", "sled::Tree"], false);
    assert!(
        hits.is_empty(),
        "sled used outside src/store/ (add a typed accessor to Store instead):\n{}",
        hits.join("\n")
    );
}

#[test]
fn no_tree_handed_out_of_src_store() {
    // `Store::tree` is private to the store module; a call elsewhere would not compile, but
    // a new public accessor returning the engine's tree would. Catch the call sites.
    let hits = offending("store", &[".tree(TreeId", ".trees()", ".db()"], false);
    assert!(
        hits.is_empty(),
        "engine trees reached outside src/store/:\n{}",
        hits.join("\n")
    );
}

#[test]
fn src_store_does_not_depend_on_actix_web() {
    let hits = offending("store", &["actix_web", "actix-web"], true);
    assert!(
        hits.is_empty(),
        "src/store/ uses actix-web (take a generic Stream instead):\n{}",
        hits.join("\n")
    );
}
