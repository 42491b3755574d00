//! Uploaded sources are accepted under the store path real Nix 2.8 gives them, and only there.
//! A private Nix store (store dir in a temp dir, the coordinator's store dir too) gets sources
//! the ways Nix adds them: `nix-store --add` of a directory, a plain file and an executable
//! file (recursive SHA-256, "source"), `nix-store --add-fixed sha256` (flat), and
//! `builtins.toFile` with a reference (text, "text:<ref>"). Each is uploaded with Nix's NAR
//! hash and references and accepted; the same NARs under another source's path or with
//! references they were not added with are refused with 422 `wrong_source_path` naming the
//! path Nix gave them. `kiln submit` of a derivation with those sources uploads them, and the
//! source one of them refers to; a builder script naming an input derivation's output that
//! is not built here is uploaded with that reference (and the output is not).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// A private Nix configuration and a store whose directory is `<root>/store`.
struct Nix {
    conf: tempfile::TempDir,
    store: String,
}

impl Nix {
    fn new(root: &Path) -> Nix {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("nix-store").is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "nix-store not found: run scripts/test, which installs nix-bin"
        );
        let conf = tempfile::tempdir().unwrap();
        std::fs::write(
            conf.path().join("nix.conf"),
            "build-users-group =\nsandbox = false\nsubstituters =\n\
             experimental-features = nix-command\n",
        )
        .unwrap();
        let r = root.display();
        Nix {
            conf,
            store: format!("local?store={r}/store&state={r}/state&log={r}/log"),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut c = Command::new(program);
        c.env("NIX_CONF_DIR", self.conf.path())
            .env_remove("NIX_PATH")
            .arg("--store")
            .arg(&self.store)
            .args(args);
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

    fn text(&self, program: &str, args: &[&str]) -> String {
        String::from_utf8(self.run(program, args).stdout)
            .unwrap()
            .trim()
            .to_string()
    }
}

/// What Nix says about a path: its NAR, NAR hash and references.
struct Added {
    path: String,
    nar: Vec<u8>,
    nar_hash: String,
    references: Vec<String>,
}

fn added(nix: &Nix, path: &str) -> Added {
    let refs = nix.text("nix-store", &["--query", "--references", path]);
    Added {
        path: path.to_string(),
        nar: nix.run("nix-store", &["--dump", path]).stdout,
        nar_hash: nix.text("nix-store", &["--query", "--hash", path]),
        references: refs.lines().map(str::to_string).collect(),
    }
}

fn upload(c: &Coordinator, path: &str, a: &Added, refs: &[String]) -> (u16, serde_json::Value) {
    response(
        ureq::put(&c.url("/api/v1/sources"))
            .set("Content-Type", "application/x-nix-archive")
            .query("path", path)
            .query("nar_hash", &a.nar_hash)
            .query("references", &refs.join(","))
            .send_bytes(&a.nar),
    )
}

fn hash_part(path: &str) -> &str {
    &path.rsplit('/').next().unwrap()[..32]
}

#[test]
fn sources_are_accepted_only_under_the_path_nix_gives_them() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("nix");
    let store: PathBuf = root.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let nix = Nix::new(&root);

    // The sources, added by Nix.
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("tree/sub")).unwrap();
    std::fs::write(work.join("tree/a"), b"alpha\n").unwrap();
    std::fs::write(work.join("tree/sub/b"), b"beta\n").unwrap();
    std::os::unix::fs::symlink("a", work.join("tree/link")).unwrap();
    std::fs::write(work.join("plain.txt"), b"plain text\n").unwrap();
    std::fs::write(work.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(work.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(work.join("flat.bin"), b"fixed contents").unwrap();
    let s = |p: &str| work.join(p).to_str().unwrap().to_string();
    let recursive = nix.text(
        "nix-store",
        &["--add", &s("tree"), &s("plain.txt"), &s("run.sh")],
    );
    let recursive: Vec<&str> = recursive.lines().collect();
    assert_eq!(recursive.len(), 3, "{recursive:?}");
    let flat = nix.text("nix-store", &["--add-fixed", "sha256", &s("flat.bin")]);
    std::fs::write(
        work.join("text.nix"),
        "let dep = builtins.toFile \"dep\" \"a dependency\\n\";\n\
         in builtins.toFile \"with-ref\" \"uses ${dep}\\n\"\n",
    )
    .unwrap();
    let text = nix.text(
        "nix-instantiate",
        &["--eval", "--read-write-mode", &s("text.nix")],
    );
    let text = text.trim_matches('"').to_string();
    let text_src = added(&nix, &text);
    assert_eq!(
        text_src.references.len(),
        1,
        "builtins.toFile with a reference"
    );
    let dep = text_src.references[0].clone();

    let mut c = {
        std::fs::create_dir_all(tmp.path().join("coord")).unwrap();
        Coordinator::start(&tmp.path().join("coord"), &store, "")
    };
    let sources: Vec<Added> = recursive
        .iter()
        .copied()
        .chain([flat.as_str(), dep.as_str(), text.as_str()])
        .map(|p| added(&nix, p))
        .collect();

    // Refused first (so that nothing is available yet): another source's path; a forged path
    // of the same name (the message names Nix's path); the text source claimed without its
    // reference; the tree claimed with a reference Nix did not give it.
    let tree = &sources[0];
    let (code, r) = upload(&c, &sources[1].path, tree, &[]);
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (422, Some("wrong_source_path")),
        "{r}"
    );
    let h = hash_part(&tree.path);
    let forged_hash: String = h
        .chars()
        .map(|ch| if ch == '0' { '1' } else { '0' })
        .collect();
    let forged = tree.path.replace(h, &forged_hash);
    let (code, r) = upload(&c, &forged, tree, &[]);
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (422, Some("wrong_source_path")),
        "{r}"
    );
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&tree.path),
        "the message names Nix's path: {msg}"
    );
    let (code, r) = upload(&c, &text, &text_src, &[]);
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (422, Some("wrong_source_path")),
        "{r}"
    );
    let (code, r) = upload(&c, &tree.path, tree, std::slice::from_ref(&dep));
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (422, Some("wrong_source_path")),
        "{r}"
    );
    for a in &sources {
        let (code, ni) = get(&c.agent(&format!("/{}.narinfo", hash_part(&a.path))));
        assert_eq!(code, 404, "{} is available after refusals: {ni}", a.path);
    }

    // Accepted under Nix's own paths, with Nix's references; the narinfo says so.
    for a in &sources {
        let (code, r) = upload(&c, &a.path, a, &a.references);
        assert_eq!(code, 200, "{} refused: {r}", a.path);
        let (code, ni) = get(&c.agent(&format!("/{}.narinfo", hash_part(&a.path))));
        assert_eq!(code, 200, "{ni}");
        let ni = ni.as_str().unwrap().to_string();
        assert!(ni.contains(&format!("StorePath: {}\n", a.path)), "{ni}");
        let refs: Vec<&str> = a
            .references
            .iter()
            .map(|r| r.rsplit('/').next().unwrap())
            .collect();
        let got = ni
            .lines()
            .find_map(|l| l.strip_prefix("References:"))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>();
        assert_eq!(got, refs, "{ni}");
    }
    c.stop();

    // `kiln submit` of a derivation whose inputs are such sources uploads them to a fresh
    // coordinator under the same paths, with the source a source refers to (`dep`: in no
    // derivation's inputSrcs, only in the text's references).
    std::fs::write(
        work.join("drv.nix"),
        "let dep = builtins.toFile \"dep\" \"a dependency\\n\";\n\
         script = builtins.toFile \"with-ref\" \"uses ${dep}\\n\";\n\
         in derivation { name = \"uses-sources\"; system = \"x86_64-linux\";\n\
         builder = \"/bin/sh\"; args = [ \"-c\" \"echo > $out\" ];\n\
         tree = ./tree; run = ./run.sh; inherit script; }\n",
    )
    .unwrap();
    let drv = nix.text("nix-instantiate", &[&s("drv.nix")]);
    let c2 = {
        std::fs::create_dir_all(tmp.path().join("coord2")).unwrap();
        Coordinator::start(&tmp.path().join("coord2"), &store, "")
    };
    let out = Command::new(kiln_bin())
        .args(["submit", "--json", "--coordinator", &c2.client_url])
        .arg("--store-dir")
        .arg(&store)
        .arg(&drv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [recursive[0], recursive[2], dep.as_str(), text.as_str()] {
        let (code, ni) = get(&c2.agent(&format!("/{}.narinfo", hash_part(p))));
        assert_eq!(code, 200, "kiln submit did not upload {p}: {ni}");
    }
}

/// A builder script (a text source, as Guix adds them) that names the output of an input
/// derivation not built here yet: `kiln submit` finds that reference (outputs of the closure
/// are candidates even when absent), uploads the script under its text path with it, and does
/// not try to upload the output.
#[test]
fn a_source_naming_an_unbuilt_input_output_is_uploaded_with_that_reference() {
    use kiln::derivation::paths::make_text_path;
    use kiln::derivation::store_path::StoreDir;
    use kiln::derivation::{Derivation, PathComputer, StorePath};

    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let (dep_drv, dep_bytes) = simple_drv(&sd, "dep", "echo dep > $out");
    std::fs::write(&dep_drv, &dep_bytes).unwrap();
    let dep = Derivation::parse(&dep_bytes).unwrap();
    let dep_out = String::from_utf8(dep.outputs[0].1.path.clone()).unwrap();
    assert!(!Path::new(&dep_out).exists(), "the input is not built here");

    let script = format!("cat {dep_out}/x > $out\n");
    let dep_out_sp = sd.parse_path(dep_out.as_bytes()).unwrap();
    let script_sp = make_text_path(
        &sd,
        "builder.sh",
        script.as_bytes(),
        std::slice::from_ref(&dep_out_sp),
    )
    .unwrap();
    let script_path = sd.full_path(&script_sp);
    std::fs::write(&script_path, &script).unwrap();

    let mut drv = Derivation::parse(&simple_drv(&sd, "user", "unused").1).unwrap();
    drv.input_drvs = vec![(dep_drv.clone().into_bytes(), vec![b"out".to_vec()])];
    drv.input_srcs = vec![script_path.clone().into_bytes()];
    drv.args = vec![script_path.clone().into_bytes()];
    drv.outputs[0].1.path.clear();
    for (k, v) in drv.env.iter_mut() {
        if k == b"out" {
            v.clear();
        }
    }
    let mut loader = |p: &StorePath| -> anyhow::Result<Derivation> {
        Ok(Derivation::parse(&std::fs::read(sd.full_path(p))?)?)
    };
    let out = {
        let mut pc = PathComputer::new(sd.clone(), &mut loader);
        let paths = pc.output_paths(&drv).unwrap();
        sd.full_path(paths[0].1.as_ref().unwrap())
    };
    drv.outputs[0].1.path = out.clone().into_bytes();
    for (k, v) in drv.env.iter_mut() {
        if k == b"out" {
            *v = out.clone().into_bytes();
        }
    }
    let drv_path = sd.full_path(&kiln::derivation::paths::drv_path(&sd, &drv).unwrap());
    std::fs::write(&drv_path, drv.print()).unwrap();

    std::fs::create_dir_all(tmp.path().join("coord")).unwrap();
    let c = Coordinator::start(&tmp.path().join("coord"), &store, "");
    let out = Command::new(kiln_bin())
        .args(["submit", "--json", "--coordinator", &c.client_url])
        .arg("--store-dir")
        .arg(&store)
        .arg(&drv_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, ni) = get(&c.agent(&format!("/{}.narinfo", script_sp.hash_part())));
    assert_eq!(code, 200, "the script was not uploaded: {ni}");
    let ni = ni.as_str().unwrap();
    assert!(
        ni.contains(&format!("References: {}\n", dep_out_sp.base_name())),
        "{ni}"
    );
    let (code, _) = get(&c.agent(&format!("/{}.narinfo", dep_out_sp.hash_part())));
    assert_eq!(code, 404, "the unbuilt output was not uploaded as a source");
}
