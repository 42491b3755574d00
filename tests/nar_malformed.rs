//! Malformed NARs: each gives a clear error naming what is wrong and the byte offset, never a
//! panic, a hang, deep recursion or an allocation sized by the input's claims. The last tests
//! run the real `kiln nar restore` under a 2 GB address-space limit with a 10 s deadline.

use std::io::{Cursor, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln::nar::{self, NarError, NarErrorKind};
use proptest::prelude::*;

/// Append a NAR string.
fn s(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
    out.resize(out.len() + (8 - bytes.len() % 8) % 8, 0);
}

fn strings(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        s(&mut out, p);
    }
    out
}

/// A directory NAR with the given (name, file contents) entries, in the given order.
fn dir_nar(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = strings(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    for (name, contents) in entries {
        for p in [
            &b"entry"[..],
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            contents,
            b")",
            b")",
        ] {
            s(&mut out, p);
        }
    }
    s(&mut out, b")");
    out
}

fn sample_nar() -> Vec<u8> {
    let mut out = strings(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    for p in [
        &b"entry"[..],
        b"(",
        b"name",
        b"a",
        b"node",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"hello",
        b")",
        b")",
    ] {
        s(&mut out, p);
    }
    for p in [
        &b"entry"[..],
        b"(",
        b"name",
        b"b",
        b"node",
        b"(",
        b"type",
        b"directory",
    ] {
        s(&mut out, p);
    }
    for p in [
        &b"entry"[..],
        b"(",
        b"name",
        b"l",
        b"node",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"/x/y",
        b")",
        b")",
    ] {
        s(&mut out, p);
    }
    for p in [&b")"[..], b")", b")"] {
        s(&mut out, p);
    }
    out
}

fn format_error(bytes: &[u8]) -> (u64, NarErrorKind) {
    match nar::validate(&mut Cursor::new(bytes)) {
        Err(NarError::Format { offset, kind }) => (offset, kind),
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn sample_is_valid() {
    let nar_bytes = sample_nar();
    let summary = nar::validate(&mut Cursor::new(&nar_bytes)).unwrap();
    assert_eq!(summary.nar_size, nar_bytes.len() as u64);
}

#[test]
fn truncation_at_every_offset_is_reported_where_the_input_ends() {
    let full = sample_nar();
    for cut in 0..full.len() {
        let (offset, kind) = format_error(&full[..cut]);
        assert!(
            matches!(kind, NarErrorKind::Truncated { .. }),
            "cut at {cut}: {kind}"
        );
        assert_eq!(offset, cut as u64, "cut at {cut}");
    }
}

#[test]
fn bad_magic() {
    let (offset, kind) = format_error(&strings(&[b"nix-archive-2"]));
    assert_eq!(offset, 0);
    assert!(matches!(kind, NarErrorKind::BadMagic { .. }), "{kind}");
    // A zstd frame: the first 8 bytes read as an absurd length.
    let (_, kind) = format_error(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0, 1, 2, 3]);
    assert!(kind.to_string().contains("compressed"), "{kind}");
}

#[test]
fn bad_padding_names_its_offset() {
    let mut bytes = sample_nar();
    // The "(" after the magic: length at 24, byte at 32, padding 33..40.
    bytes[35] = 1;
    assert_eq!(format_error(&bytes), (33, NarErrorKind::BadPadding));
}

#[test]
fn unsorted_and_duplicate_entries() {
    let (offset, kind) = format_error(&dir_nar(&[(b"b", b""), (b"a", b"")]));
    assert!(matches!(kind, NarErrorKind::Unsorted { .. }), "{kind}");
    assert!(offset > 0);
    let (_, kind) = format_error(&dir_nar(&[(b"a", b"1"), (b"a", b"2")]));
    assert!(matches!(kind, NarErrorKind::Unsorted { .. }), "{kind}");
    // Sorted by bytes, not by anything else: 0xff sorts after 'z'.
    nar::validate(&mut Cursor::new(dir_nar(&[
        (b"Z", b""),
        (b"z", b""),
        (b"\xff", b""),
    ])))
    .unwrap();
}

#[test]
fn invalid_names() {
    for name in [&b"."[..], b"..", b"a/b", b"/", b"a\0b", b""] {
        let (_, kind) = format_error(&dir_nar(&[(name, b"")]));
        assert!(
            matches!(kind, NarErrorKind::InvalidName { .. }),
            "{name:?}: {kind}"
        );
    }
}

#[test]
fn huge_declared_lengths_are_refused_without_allocating() {
    let mut bytes = strings(&[b"nix-archive-1", b"("]);
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    let (offset, kind) = format_error(&bytes);
    assert_eq!(offset, 40);
    assert!(
        kind.to_string().contains("18446744073709551615 bytes"),
        "{kind}"
    );

    let mut bytes = strings(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
    ]);
    bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let (_, kind) = format_error(&bytes);
    assert!(
        matches!(
            kind,
            NarErrorKind::TooLong {
                what: "an entry name",
                ..
            }
        ),
        "{kind}"
    );

    let mut bytes = strings(&[b"nix-archive-1", b"(", b"type", b"symlink", b"target"]);
    bytes.extend_from_slice(&1_000_000u64.to_le_bytes());
    let (_, kind) = format_error(&bytes);
    assert!(
        matches!(
            kind,
            NarErrorKind::TooLong {
                what: "a symlink target",
                ..
            }
        ),
        "{kind}"
    );

    let mut bytes = strings(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    let (_, kind) = format_error(&bytes);
    assert!(matches!(kind, NarErrorKind::TooLong { .. }), "{kind}");

    // A plausible but false length is streamed, not allocated: it ends as a truncation.
    let mut bytes = strings(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    bytes.extend_from_slice(b"short");
    let (offset, kind) = format_error(&bytes);
    assert!(matches!(kind, NarErrorKind::Truncated { .. }), "{kind}");
    assert_eq!(offset, bytes.len() as u64);
}

#[test]
fn deep_nesting_is_refused_not_recursed() {
    let depth = 100_000;
    let mut bytes = strings(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    let level = strings(&[
        b"entry",
        b"(",
        b"name",
        b"d",
        b"node",
        b"(",
        b"type",
        b"directory",
    ]);
    for _ in 0..depth {
        bytes.extend_from_slice(&level);
    }
    let (_, kind) = format_error(&bytes);
    assert_eq!(
        kind,
        NarErrorKind::TooDeep {
            max: nar::MAX_DEPTH
        }
    );
}

#[test]
fn trailing_data_unknown_tags_and_field_order() {
    let mut bytes = sample_nar();
    let len = bytes.len() as u64;
    bytes.push(0);
    assert_eq!(format_error(&bytes), (len, NarErrorKind::TrailingData));

    let bytes = strings(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"]);
    let (offset, kind) = format_error(&bytes);
    assert_eq!(offset, 56);
    assert!(kind.to_string().contains("\"fifo\""), "{kind}");

    // Nix's parser takes fields in any order; Kiln only the canonical one.
    let bytes = strings(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"x",
        b"executable",
        b"",
        b")",
    ]);
    let (_, kind) = format_error(&bytes);
    assert!(matches!(kind, NarErrorKind::Unexpected { .. }), "{kind}");

    let bytes = strings(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"yes",
        b"contents",
        b"x",
        b")",
    ]);
    let (_, kind) = format_error(&bytes);
    assert!(kind.to_string().contains("empty string"), "{kind}");

    for target in [&b""[..], b"a\0b"] {
        let bytes = strings(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            target,
            b")",
        ]);
        let (_, kind) = format_error(&bytes);
        assert!(matches!(kind, NarErrorKind::InvalidTarget { .. }), "{kind}");
    }
}

#[test]
fn failed_restore_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("out");
    let mut bytes = dir_nar(&[(b"a", b"1"), (b"c", b"2"), (b"b", b"3")]);
    let err = nar::restore(&mut Cursor::new(&mut bytes), &dest).unwrap_err();
    assert!(err.to_string().contains("out of order"), "{err}");
    assert!(!dest.exists(), "partial tree left at {}", dest.display());
}

proptest! {
    /// Arbitrary corruption of a valid NAR never panics, and restore agrees with validate.
    #[test]
    fn corrupted_nars_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = sample_nar();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        let cut = cut.index(bytes.len() + 1);
        bytes.truncate(cut);
        let validated = nar::validate(&mut Cursor::new(&bytes));
        let tmp = tempfile::tempdir().unwrap();
        let restored = nar::restore(&mut Cursor::new(&bytes), &tmp.path().join("r"));
        prop_assert_eq!(validated.is_ok(), restored.is_ok(), "{:?} vs {:?}", validated, restored);
    }
}

/// Run `kiln nar restore` on `input` under a 2 GB address-space limit; it must fail cleanly
/// within 10 s with an error naming a byte offset.
fn restore_under_limits(input: &[u8]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["nar", "restore"])
        .arg(tmp.path().join("out"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The child may stop reading early (that is the point); a broken pipe is fine.
    let _ = stdin.write_all(input);
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            assert_eq!(status.code(), Some(1), "stderr: {stderr}");
            assert!(stderr.contains("at byte"), "stderr: {stderr}");
            return stderr;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kiln nar restore did not finish within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn binary_survives_malformed_inputs_under_memory_and_time_limits() {
    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        strings(&[b"nix-archive-2"]),
        dir_nar(&[(b"b", b""), (b"a", b"")]),
        dir_nar(&[(b"..", b"")]),
        sample_nar()[..100].to_vec(),
    ];
    let mut huge = strings(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
    ]);
    huge.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
    inputs.push(huge);
    let mut deep = strings(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    let level = strings(&[
        b"entry",
        b"(",
        b"name",
        b"d",
        b"node",
        b"(",
        b"type",
        b"directory",
    ]);
    while deep.len() < 10 << 20 {
        deep.extend_from_slice(&level);
    }
    inputs.push(deep);
    // 10 MB of "(" tags.
    let mut opens = strings(&[b"nix-archive-1"]);
    while opens.len() < 10 << 20 {
        s(&mut opens, b"(");
    }
    inputs.push(opens);
    for input in inputs {
        restore_under_limits(&input);
    }
}
