//! Golden tests against the real Nix 2.8 (Debian `nix-bin`), run offline as root with a private
//! `NIX_CONF_DIR`. They pin down that Kiln's NARs, NAR hashes, restores, narinfos and
//! signatures are the same as Nix's to the byte, through the library and through the real
//! `kiln` binary. They fail (never skip) when Nix is missing.

#[path = "nar_common.rs"]
mod nar_common;

use std::ffi::OsStr;
use std::io::{Cursor, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln::nar::narinfo::NarInfo;
use kiln::nar::refs::RefScanner;
use kiln::nar::signing::{PublicKey, SecretKey};
use kiln::nar::{self};
use nar_common::{nix, read_tree, run, tree, write_tree};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// A tree with every kind of entry a NAR can hold.
fn every_kind_tree(root: &Path) {
    std::fs::create_dir(root).unwrap();
    let w = |rel: &str, data: &[u8], mode: u32| {
        let p = root.join(rel);
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    w("regular", b"plain file\n", 0o644);
    w("executable", b"#!/bin/sh\necho hi\n", 0o755);
    w("owner-exec-only", b"x", 0o700);
    w("group-exec-only", b"not executable for Nix", 0o654);
    w("empty", b"", 0o644);
    w("seven", b"1234567", 0o644);
    w("eight", b"12345678", 0o644);
    std::os::unix::fs::symlink("regular", root.join("link-relative")).unwrap();
    std::os::unix::fs::symlink(
        "/nix/store/does-not-exist/bin/sh",
        root.join("link-absolute"),
    )
    .unwrap();
    std::os::unix::fs::symlink("../../nowhere", root.join("link-dangling")).unwrap();
    std::os::unix::fs::symlink("sub", root.join("link-to-dir")).unwrap();
    std::fs::create_dir_all(root.join("sub/deeper/deepest")).unwrap();
    std::fs::write(root.join("sub/deeper/deepest/leaf"), b"leaf").unwrap();
    std::fs::create_dir(root.join("sub/empty-dir")).unwrap();
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    for name in [
        &b"with space"[..],
        b"new\nline",
        b"tab\there",
        b"\xff\xfe invalid utf-8",
        "caf\u{e9} \u{1f525}".as_bytes(),
        b"-starts-with-dash",
        b".hidden",
        b"back\\slash",
        b"Z-upper",
        b"a-lower",
        b"\x01control",
        &[b'n'; 255],
    ] {
        std::fs::write(root.join(OsStr::from_bytes(name)), name).unwrap();
    }
    // Multi-MB and not a multiple of the 128 KiB buffers or of 8.
    let big: Vec<u8> = (0..3_000_005u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("sub/big"), big).unwrap();
}

fn nix_dump(path: &Path) -> Vec<u8> {
    run(nix("nix-store").arg("--dump").arg(path)).stdout
}

fn kiln_dump_bin(path: &Path) -> Vec<u8> {
    run(kiln().args(["nar", "dump"]).arg(path)).stdout
}

fn lib_dump(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    nar::dump(path, &mut out).unwrap();
    out
}

#[test]
fn dump_equals_nix_store_dump_for_every_entry_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    every_kind_tree(&root);
    let mut roots: Vec<PathBuf> = vec![root.clone()];
    for e in std::fs::read_dir(&root).unwrap() {
        roots.push(e.unwrap().path());
    }
    roots.push(root.join("sub/big"));
    for path in &roots {
        let expected = nix_dump(path);
        assert!(
            lib_dump(path) == expected,
            "library NAR of {} differs from nix-store --dump",
            path.display()
        );
        assert!(
            kiln_dump_bin(path) == expected,
            "`kiln nar dump {}` differs from nix-store --dump",
            path.display()
        );
    }
}

#[test]
fn dump_equals_nix_store_dump_for_generated_trees() {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&tree(), |node| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = tmp.path().join(i.to_string());
            write_tree(&path, &node);
            prop_assert!(
                lib_dump(&path) == nix_dump(&path),
                "NAR of {} differs",
                path.display()
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn nar_hash_equals_nix_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    every_kind_tree(&root);
    for path in [
        root.clone(),
        root.join("regular"),
        root.join("link-dangling"),
    ] {
        let nix_out = run(nix("nix-hash")
            .args(["--type", "sha256", "--base32"])
            .arg(&path))
        .stdout;
        let expected = format!("sha256:{}", String::from_utf8(nix_out).unwrap());
        let got = String::from_utf8(run(kiln().args(["nar", "hash"]).arg(&path)).stdout).unwrap();
        assert_eq!(got, expected, "{}", path.display());
        assert_eq!(
            nar::hash_path(&path).unwrap().nar_hash.to_string(),
            expected.trim()
        );
    }
}

#[test]
fn restores_agree_with_nix_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    every_kind_tree(&root);
    let original = read_tree(&root);

    // Nix restores Kiln's NAR.
    let kiln_nar = lib_dump(&root);
    let by_nix = tmp.path().join("by-nix");
    let mut child = nix("nix-store")
        .arg("--restore")
        .arg(&by_nix)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&kiln_nar).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "nix-store --restore failed"
    );
    assert_eq!(read_tree(&by_nix), original);

    // Kiln (the binary) restores Nix's NAR.
    let nix_nar = nix_dump(&root);
    let by_kiln = tmp.path().join("by-kiln");
    let mut child = kiln()
        .args(["nar", "restore"])
        .arg(&by_kiln)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&nix_nar).unwrap();
    assert!(child.wait().unwrap().success(), "kiln nar restore failed");
    assert_eq!(read_tree(&by_kiln), original);
    assert!(nix_dump(&by_kiln) == nix_nar);
}

/// Build (offline) an input-addressed store path with two references and a deriver: unlike a
/// content-addressed path, Nix checks its signatures.
fn input_addressed_path() -> PathBuf {
    let tmp = tempfile::tempdir().unwrap();
    let expr = tmp.path().join("golden.nix");
    std::fs::write(
        &expr,
        r#"let
  a = builtins.toFile "kiln-golden-ref-a" "a";
  b = builtins.toFile "kiln-golden-ref-b" "b";
in derivation {
  name = "kiln-golden-signed";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/bin/mkdir $out; echo ${b} > $out/ref; /bin/ln -s ${a} $out/link; echo data > $out/data" ];
}
"#,
    )
    .unwrap();
    let out = run(nix("nix-build").arg(&expr).arg("--no-out-link")).stdout;
    PathBuf::from(String::from_utf8(out).unwrap().trim())
}

fn base_name(p: &str) -> String {
    p.trim().rsplit('/').next().unwrap().to_string()
}

/// A narinfo for `path`, everything computed by Kiln except the deriver (which only the store
/// database knows): NAR, hashes, and references found by scanning the NAR for every hash part
/// in /nix/store. Returns the narinfo and the (uncompressed) NAR.
fn kiln_narinfo(path: &Path) -> (NarInfo, Vec<u8>) {
    let candidates: Vec<String> = std::fs::read_dir("/nix/store")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.get(..32))
                .map(str::to_string)
        })
        .collect();
    let mut scanner = RefScanner::new(candidates);
    let nar_bytes = lib_dump(path);
    scanner.write_all(&nar_bytes).unwrap();
    let summary = nar::validate(&mut Cursor::new(&nar_bytes)).unwrap();
    let found = scanner.into_found();
    let mut references: Vec<String> = std::fs::read_dir("/nix/store")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".drv") && n.get(..32).is_some_and(|h| found.contains(h)))
        .collect();
    references.sort();
    let deriver = run(nix("nix-store").args(["-q", "--deriver"]).arg(path)).stdout;
    let info = NarInfo {
        store_path: path.to_str().unwrap().to_string(),
        url: format!("nar/{}.nar", summary.nar_hash.to_base32()),
        compression: "none".into(),
        file_hash: Some(summary.nar_hash.clone()),
        file_size: Some(summary.nar_size),
        nar_hash: summary.nar_hash,
        nar_size: summary.nar_size,
        references,
        deriver: Some(base_name(&String::from_utf8(deriver).unwrap())),
        system: None,
        sigs: Vec::new(),
        ca: None,
    };
    (info, nar_bytes)
}

/// Write a `file://` binary cache holding one narinfo and its NAR.
fn write_cache(dir: &Path, info: &NarInfo, nar_bytes: &[u8]) {
    std::fs::create_dir_all(dir.join("nar")).unwrap();
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    std::fs::write(dir.join(&info.url), nar_bytes).unwrap();
    let hash = base_name(&info.store_path)[..32].to_string();
    std::fs::write(dir.join(format!("{hash}.narinfo")), info.to_string()).unwrap();
}

fn nix_store_verify(cache: &Path, key: &PublicKey, path: &Path) -> std::process::Output {
    nix("nix")
        .args(["store", "verify", "--store"])
        .arg(format!("file://{}", cache.display()))
        .arg("--trusted-public-keys")
        .arg(key.to_string())
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn nix_accepts_kiln_signatures_and_refuses_bad_ones() {
    let path = input_addressed_path();
    let (mut info, nar_bytes) = kiln_narinfo(&path);
    assert_eq!(
        info.references.len(),
        2,
        "the golden path has two references: {info:?}"
    );
    let key = SecretKey::generate("kiln-golden-1").unwrap();
    info.sign(&key).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let good = tmp.path().join("good");
    write_cache(&good, &info, &nar_bytes);
    let out = nix_store_verify(&good, &key.to_public(), &path);
    assert!(
        out.status.success(),
        "nix store verify refused Kiln's signature:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Same key name, other key: Nix must refuse, or the test above proves nothing.
    let impostor = SecretKey::generate("kiln-golden-1").unwrap();
    let mut forged = info.clone();
    forged.sigs.clear();
    forged.sign(&impostor).unwrap();
    let bad = tmp.path().join("forged");
    write_cache(&bad, &forged, &nar_bytes);
    let out = nix_store_verify(&bad, &key.to_public(), &path);
    assert!(
        !out.status.success(),
        "nix store verify accepted a signature by another key"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("untrusted"));

    // A signature over a different fingerprint (one reference dropped) is refused too.
    let mut tampered = info.clone();
    tampered.references.pop();
    tampered.sigs.clear();
    tampered.sign(&key).unwrap();
    tampered.references = info.references.clone();
    let bad = tmp.path().join("tampered");
    write_cache(&bad, &tampered, &nar_bytes);
    assert!(!nix_store_verify(&bad, &key.to_public(), &path)
        .status
        .success());
}

#[test]
fn kiln_verifies_nix_signatures_and_signs_identically() {
    let path = input_addressed_path();
    let tmp = tempfile::tempdir().unwrap();
    let secret =
        run(nix("nix").args(["key", "generate-secret", "--key-name", "nix-golden-1"])).stdout;
    let secret = String::from_utf8(secret).unwrap();
    let sk_file = tmp.path().join("secret");
    std::fs::write(&sk_file, &secret).unwrap();
    let public = String::from_utf8(
        run(nix("nix")
            .args(["key", "convert-secret-to-public"])
            .stdin(std::fs::File::open(&sk_file).unwrap()))
        .stdout,
    )
    .unwrap();
    let pk_file = tmp.path().join("public");
    std::fs::write(&pk_file, &public).unwrap();
    // Kiln derives the same public key from Nix's secret key.
    assert_eq!(
        SecretKey::parse(&secret).unwrap().to_public().to_string(),
        public.trim()
    );

    let cache = tmp.path().join("cache");
    run(nix("nix")
        .args(["copy", "--to"])
        .arg(format!(
            "file://{}?secret-key={}&compression=none",
            cache.display(),
            sk_file.display()
        ))
        .arg(&path));
    let hash = &base_name(path.to_str().unwrap())[..32];
    let narinfo_file = cache.join(format!("{hash}.narinfo"));
    let nix_text = std::fs::read_to_string(&narinfo_file).unwrap();

    // `kiln narinfo verify` accepts it, with the key inline or in a file.
    for key in [
        public.trim().to_string(),
        pk_file.to_str().unwrap().to_string(),
    ] {
        let out = run(kiln()
            .args(["narinfo", "verify"])
            .arg(&narinfo_file)
            .arg("--key")
            .arg(&key));
        assert!(String::from_utf8_lossy(&out.stdout).contains("good signature by nix-golden-1"));
    }
    // ... and refuses a tampered copy, with a message.
    let tampered_file = tmp.path().join("tampered.narinfo");
    std::fs::write(&tampered_file, nix_text.replace("NarSize: ", "NarSize: 1")).unwrap();
    let out = kiln()
        .args(["narinfo", "verify"])
        .arg(&tampered_file)
        .arg("--key")
        .arg(public.trim())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Parsing and printing Nix's narinfo gives it back byte for byte; Kiln's own narinfo for the
    // same path, signed with the same key, is identical to Nix's (ed25519 is deterministic).
    let parsed = NarInfo::parse(&nix_text).unwrap();
    assert_eq!(parsed.to_string(), nix_text);
    let shown = run(kiln().args(["narinfo", "show"]).arg(&narinfo_file)).stdout;
    assert_eq!(String::from_utf8(shown).unwrap(), nix_text);
    let json = run(kiln()
        .args(["narinfo", "show", "--json"])
        .arg(&narinfo_file))
    .stdout;
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json["nar_size"], parsed.nar_size);
    assert_eq!(json["nar_hash"], parsed.nar_hash.to_string());
    let (mut ours, nar_bytes) = kiln_narinfo(&path);
    ours.sign(&SecretKey::parse(&secret).unwrap()).unwrap();
    assert_eq!(
        ours.to_string(),
        nix_text,
        "Kiln's narinfo differs from Nix's"
    );
    assert_eq!(ours.sigs, parsed.sigs);
    assert!(std::fs::read(cache.join(&ours.url)).unwrap() == nar_bytes);
    assert!(ours.verify(&[PublicKey::parse(&public).unwrap()]));
}

/// A Nix config that substitutes nothing, requires signatures and trusts `key`; narinfo
/// lookups are not cached (each variant below is a new server, but be sure).
fn nix_trusting(dir: &Path, key: &str) -> PathBuf {
    let conf = dir.join("nixconf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        format!(
            "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command\n\
             require-sigs = true\ntrusted-public-keys = {key}\n\
             narinfo-cache-positive-ttl = 0\nnarinfo-cache-negative-ttl = 0\n"
        ),
    )
    .unwrap();
    conf
}

/// `nix copy --from <cache> --to <a fresh store>`: does Nix accept the path?
fn nix_copies(conf: &Path, scratch: &Path, cache_url: &str, path: &Path) -> (bool, String) {
    let root = scratch.join("dest");
    let r = root.display();
    let dest = format!("local?store=/nix/store&state={r}/state&log={r}/log&real={r}/real");
    let out = Command::new("nix")
        .args(["copy", "--from", cache_url, "--to", &dest])
        .arg(path)
        .env("NIX_CONF_DIR", conf)
        .env("XDG_CACHE_HOME", scratch.join("xdg-cache"))
        .env_remove("NIX_PATH")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kiln narinfo verify <url> --key K --check-nar`: does Kiln accept it?
fn kiln_accepts(narinfo_url: &str, key: &str) -> (bool, String) {
    let out = kiln()
        .args([
            "narinfo",
            "verify",
            narinfo_url,
            "--key",
            key,
            "--check-nar",
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A narinfo made by Nix (`nix copy --to file://…?secret-key=`, with a key made by `kiln key
/// generate`), tampered field by field and served over HTTP: Kiln (`kiln narinfo verify
/// --check-nar`) refuses exactly the narinfos a real Nix 2.8 refuses to `nix copy`, and
/// accepts the others. And Kiln's signature of the untouched narinfo is Nix's, byte for byte.
#[test]
fn kiln_refuses_tampered_narinfos_exactly_where_nix_does() {
    let path = input_addressed_path();
    let tmp = tempfile::tempdir().unwrap();
    let (sk_file, pk_file) = (tmp.path().join("k.secret"), tmp.path().join("k.public"));
    run(kiln()
        .args(["key", "generate", "kiln-interop-1"])
        .args([&sk_file, &pk_file]));
    let public = std::fs::read_to_string(&pk_file).unwrap();
    let secret = SecretKey::parse(&std::fs::read_to_string(&sk_file).unwrap()).unwrap();
    let cache = tmp.path().join("nix-made");
    run(nix("nix")
        .args(["copy", "--to"])
        .arg(format!(
            "file://{}?secret-key={}&compression=none",
            cache.display(),
            sk_file.display()
        ))
        .arg(&path));
    let hash = base_name(path.to_str().unwrap())[..32].to_string();
    let nix_text = std::fs::read_to_string(cache.join(format!("{hash}.narinfo"))).unwrap();
    let good = NarInfo::parse(&nix_text).unwrap();
    assert_eq!(good.sigs.len(), 1, "{nix_text}");
    assert!(good.references.len() >= 2, "{nix_text}");

    // Kiln, given the key file `kiln key generate` wrote, signs as Nix did.
    let mut ours = good.clone();
    ours.sigs.clear();
    ours.sign(&secret).unwrap();
    assert_eq!(ours.sigs, good.sigs, "Kiln's Sig differs from Nix's");
    assert_eq!(ours.to_string(), nix_text);

    let resign = |mut ni: NarInfo, key: &SecretKey| {
        ni.sigs.clear();
        ni.sign(key).unwrap();
        ni.to_string()
    };
    let other_key = SecretKey::generate("kiln-interop-1").unwrap();
    let mut flipped = good.clone();
    let sig = flipped.sigs[0].clone();
    let (name, b64) = sig.split_once(':').unwrap();
    let mut raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
    raw[10] ^= 1;
    flipped.sigs = vec![format!(
        "{name}:{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &raw)
    )];
    let other_hash = kiln::derivation::Hash::sha256(b"not this nar");
    let with = |f: &dyn Fn(&mut NarInfo)| {
        let mut ni = good.clone();
        f(&mut ni);
        ni
    };
    let bumped_hash = with(&|n| n.nar_hash = other_hash.clone());
    let bumped_size = with(&|n| n.nar_size += 8);
    let dropped_ref = with(&|n| {
        n.references.pop();
    });
    // (variant, narinfo text, what both must do)
    let variants: Vec<(&str, String, bool)> = vec![
        ("untouched", nix_text.clone(), true),
        ("NarHash changed", bumped_hash.to_string(), false),
        ("NarSize changed", bumped_size.to_string(), false),
        ("References changed", dropped_ref.to_string(), false),
        ("Sig changed", flipped.to_string(), false),
        ("Sig removed", with(&|n| n.sigs.clear()).to_string(), false),
        (
            "signed by another key of that name",
            resign(good.clone(), &other_key),
            false,
        ),
        (
            "NarHash changed and signed again",
            resign(bumped_hash.clone(), &secret),
            false,
        ),
        (
            "NarSize changed and signed again",
            resign(bumped_size.clone(), &secret),
            false,
        ),
        // A signer vouches for references: neither Nix nor Kiln reads them from the NAR.
        (
            "References changed and signed again",
            resign(dropped_ref.clone(), &secret),
            true,
        ),
        // FileHash is not signed, and Nix checks the NarHash of what it unpacks, not it.
        (
            "FileHash changed",
            with(&|n| n.file_hash = Some(other_hash.clone())).to_string(),
            true,
        ),
    ];
    let conf = nix_trusting(tmp.path(), public.trim());
    let mut table = Vec::new();
    for (i, (what, text, accepted)) in variants.iter().enumerate() {
        // The whole cache Nix wrote (the path's closure), with this variant of its narinfo.
        let dir = tmp.path().join(format!("variant-{i}"));
        std::fs::create_dir_all(dir.join("nar")).unwrap();
        for sub in ["", "nar"] {
            for e in std::fs::read_dir(cache.join(sub)).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_file() {
                    std::fs::copy(e.path(), dir.join(sub).join(e.file_name())).unwrap();
                }
            }
        }
        std::fs::write(dir.join(format!("{hash}.narinfo")), text).unwrap();
        let server = nar_common::StaticServer::start(&dir);
        let (nix_ok, nix_says) = nix_copies(&conf, &dir, &server.url, &path);
        let (kiln_ok, kiln_says) =
            kiln_accepts(&format!("{}/{hash}.narinfo", server.url), public.trim());
        table.push(format!("{what:<40} nix {nix_ok:<5} kiln {kiln_ok}"));
        assert_eq!(
            nix_ok,
            *accepted,
            "{what}: Nix was expected to {} it:\n{nix_says}",
            if *accepted { "accept" } else { "refuse" }
        );
        assert_eq!(
            kiln_ok, nix_ok,
            "{what}: Kiln and Nix disagree\nnix: {nix_says}\nkiln: {kiln_says}"
        );
    }
    println!("{}", table.join("\n"));
}
