//! Malformed `.drv` inputs through the real `kiln drv show` binary, each under a 2 GB
//! address-space limit (RLIMIT_AS) and killed after 10 s: every one must end with a non-zero
//! exit, an error naming the byte offset, and no panic. The limits are a safety bound so a
//! regression (a hang, a runaway allocation, unbounded recursion) fails instead of taking the
//! machine down; they are not performance assertions.
#![cfg(feature = "coordinator")]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const LIMIT_AS: libc::rlim_t = 2 << 30;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A real derivation written by Nix 2.8 (`uses-outputs` from tests/data/drv/golden.nix).
fn real_drv() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/drv/fixtures/xbwyx1rbm705dkq0cp44qlrik49zc4hy-uses-outputs.drv");
    std::fs::read(p).expect("read fixture")
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// Run `kiln drv show FILE` with the address-space limit and the timeout.
fn run_show(file: &Path) -> Outcome {
    let mut cmd = Command::new(KILN);
    cmd.args(["drv", "show", "--store-dir", "/nix/store"])
        .arg(file)
        .env_remove("KILN_STORE_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT_AS,
                rlim_max: LIMIT_AS,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn kiln");
    // Drain stderr on a thread so a long message cannot block the child.
    let mut err = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln drv show {} ran past {TIMEOUT:?}", file.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = String::from_utf8_lossy(&reader.join().expect("reader")).into_owned();
    Outcome {
        code: status.code(),
        stderr,
    }
}

/// Assert the error contract for one input; `name` says which case it is.
fn assert_rejected(dir: &Path, name: &str, input: &[u8], offset: Option<usize>) {
    let file: PathBuf = dir.join(format!("{}.drv", name.replace(['/', ' '], "_")));
    std::fs::write(&file, input).expect("write input");
    let o = run_show(&file);
    assert!(
        o.code.is_some_and(|c| c != 0),
        "{name}: expected a non-zero exit, got {:?}; stderr: {}",
        o.code,
        o.stderr
    );
    assert!(
        !o.stderr.contains("panicked"),
        "{name}: panic: {}",
        o.stderr
    );
    assert!(
        o.stderr.starts_with("kiln: error: "),
        "{name}: {}",
        o.stderr
    );
    assert!(
        o.stderr.len() < 4096,
        "{name}: error message is {} bytes",
        o.stderr.len()
    );
    match offset {
        Some(at) => assert!(
            o.stderr.contains(&format!("at byte {at}:")),
            "{name}: expected offset {at} in: {}",
            o.stderr
        ),
        None => assert!(
            o.stderr.contains("at byte "),
            "{name}: no offset in: {}",
            o.stderr
        ),
    }
    std::fs::remove_file(&file).expect("remove input");
}

const OUT: &str = "/nix/store/0769psz3b4pc9pxfgxwq3d6j6kj3zllp-x";

fn with_output(output: &str) -> Vec<u8> {
    format!(r#"Derive([{output}],[],[],"x86_64-linux","/bin/sh",[],[("name","x")])"#).into_bytes()
}

#[test]
fn every_truncation_of_a_real_drv_is_rejected_at_its_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = real_drv();
    for n in 0..real.len() {
        assert_rejected(dir.path(), &format!("prefix-{n}"), &real[..n], None);
    }
}

#[test]
fn malformed_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = real_drv();
    let mut trailing = real.clone();
    trailing.extend_from_slice(b"\n");
    let cases: Vec<(&str, Vec<u8>, Option<usize>)> = vec![
        ("empty", b"".to_vec(), Some(0)),
        ("not a derivation", b"hello".to_vec(), Some(0)),
        ("wrong keyword", b"Derivx([".to_vec(), Some(5)),
        ("trailing newline", trailing, Some(real.len())),
        (
            "unbalanced missing ]",
            with_output(&format!(r#"("out","{OUT}","","")"#))
                .into_iter()
                .filter(|&b| b != b']')
                .collect(),
            None,
        ),
        (
            "unbalanced extra ]",
            br#"Derive([]],[],[],"","",[],[])"#.to_vec(),
            Some(9),
        ),
        (
            "unbalanced extra )",
            br#"Derive([],[],[],"","",[],[]))"#.to_vec(),
            Some(28),
        ),
        (
            "unbalanced open (",
            br#"Derive([(],[],[],"","",[],[])"#.to_vec(),
            Some(9),
        ),
        (
            "output arity 3",
            with_output(&format!(r#"("out","{OUT}","")"#)),
            None,
        ),
        (
            "output arity 5",
            with_output(&format!(r#"("out","{OUT}","","","")"#)),
            None,
        ),
        (
            "env arity 1",
            br#"Derive([],[],[],"","",[],[("name")])"#.to_vec(),
            Some(33),
        ),
        (
            "env arity 3",
            br#"Derive([],[],[],"","",[],[("a","b","c")])"#.to_vec(),
            Some(34),
        ),
        (
            "derive arity 6",
            br#"Derive([],[],[],"","",[])"#.to_vec(),
            Some(24),
        ),
        (
            "derive arity 8",
            br#"Derive([],[],[],"","",[],[],[])"#.to_vec(),
            Some(27),
        ),
        (
            "unquoted string",
            br#"Derive([(out,"/x","","")],[],[],"","",[],[])"#.to_vec(),
            Some(9),
        ),
        (
            "unquoted system",
            br#"Derive([],[],[],x86_64-linux,"",[],[])"#.to_vec(),
            Some(16),
        ),
        (
            "unknown hash algo",
            with_output(&format!(r#"("out","{OUT}","sha3","00")"#)),
            None,
        ),
        (
            "unknown r: algo",
            with_output(&format!(r#"("out","{OUT}","r:blake3","00")"#)),
            None,
        ),
        (
            "text method",
            with_output(&format!(r#"("out","{OUT}","text:sha256","00")"#)),
            None,
        ),
        (
            "short sha256",
            with_output(&format!(r#"("out","{OUT}","sha256","{}")"#, "0".repeat(63))),
            None,
        ),
        (
            "long md5",
            with_output(&format!(r#"("out","{OUT}","md5","{}")"#, "0".repeat(33))),
            None,
        ),
        (
            "bad base32",
            with_output(&format!(r#"("out","{OUT}","sha256","{}")"#, "e".repeat(52))),
            None,
        ),
        (
            "relative output path",
            with_output(r#"("out","nix/store/x","","")"#),
            Some(15),
        ),
        (
            "relative input drv",
            br#"Derive([],[("x.drv",["out"])],[],"","",[],[])"#.to_vec(),
            Some(12),
        ),
        (
            "relative input src",
            br#"Derive([],[],["src"],"","",[],[])"#.to_vec(),
            Some(14),
        ),
        (
            "floating with path",
            with_output(&format!(r#"("out","{OUT}","r:sha256","")"#)),
            None,
        ),
        (
            "hash without algo",
            with_output(&format!(r#"("out","{OUT}","","abc")"#)),
            None,
        ),
        (
            "duplicate output",
            with_output(&format!(r#"("out","{OUT}","",""),("out","{OUT}","","")"#)),
            None,
        ),
        (
            "duplicate env",
            br#"Derive([],[],[],"","",[],[("a","1"),("a","2")])"#.to_vec(),
            Some(37),
        ),
        (
            "leading comma",
            br#"Derive([],[],[],"","",[,"a"],[])"#.to_vec(),
            Some(23),
        ),
        (
            "missing comma",
            br#"Derive([],[],[],"","",["a""b"],[])"#.to_vec(),
            Some(26),
        ),
        (
            "trailing comma",
            br#"Derive([],[],[],"","",["a",],[])"#.to_vec(),
            Some(27),
        ),
        (
            "space after comma",
            br#"Derive([], [],[],"","",[],[])"#.to_vec(),
            Some(10),
        ),
        ("escape at end", br#"Derive([],[],[],"\"#.to_vec(), Some(18)),
        ("nul bytes", vec![0u8; 1000], Some(0)),
        ("invalid utf-8", vec![0xffu8; 1000], Some(0)),
    ];
    for (name, input, offset) in cases {
        assert_rejected(dir.path(), name, &input, offset);
    }
}

#[test]
fn huge_and_deep_inputs_are_rejected_quickly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ten_mb = 10 << 20;
    let brackets = vec![b'['; ten_mb];
    assert_rejected(dir.path(), "10 MB of [", &brackets, Some(0));
    let mut deep = b"Derive(".to_vec();
    deep.extend(std::iter::repeat_n(b'[', ten_mb));
    assert_rejected(dir.path(), "Derive( and 10 MB of [", &deep, Some(8));
    let mut nested = b"Derive([".to_vec();
    nested.extend(std::iter::repeat_n(b"[(", ten_mb / 2).flatten());
    assert_rejected(dir.path(), "deep nesting", &nested, Some(8));
    let quotes = vec![b'"'; ten_mb];
    assert_rejected(dir.path(), "10 MB of quote", &quotes, Some(0));
    let mut quotes_in = b"Derive([(".to_vec();
    quotes_in.extend(std::iter::repeat_n(b'"', ten_mb));
    assert_rejected(dir.path(), "quotes in a tuple", &quotes_in, Some(11));
    let mut open_string = br#"Derive([("out",""#.to_vec();
    open_string.extend(std::iter::repeat_n(b'a', 50 << 20));
    let len = open_string.len();
    assert_rejected(
        dir.path(),
        "unterminated 50 MB string",
        &open_string,
        Some(len),
    );
    let mut escapes = br#"Derive([],[],[],"#.to_vec();
    escapes.push(b'"');
    escapes.extend(std::iter::repeat_n(b"\\n", ten_mb / 2).flatten());
    let len = escapes.len();
    assert_rejected(dir.path(), "unterminated escapes", &escapes, Some(len));
    let big_key = "k".repeat(ten_mb);
    let dup = format!(r#"Derive([],[],[],"","",[],[("{big_key}","1"),("{big_key}","2")])"#);
    assert_rejected(dir.path(), "duplicate 10 MB key", dup.as_bytes(), None);
}

#[test]
fn paths_outside_the_store_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("outside.drv");
    std::fs::write(
        &file,
        with_output(r#"("out","/tmp/0769psz3b4pc9pxfgxwq3d6j6kj3zllp-x","","")"#),
    )
    .expect("write");
    let o = run_show(&file);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("is not in the store directory /nix/store"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}
