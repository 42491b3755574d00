//! The entry points of the fuzz targets and the properties each one checks, one public
//! function per target. A broken property is a panic, which is what libFuzzer reports as a
//! crash. This file is shared, unchanged, by the fuzz crate and by
//! `tests/fuzz_regressions.rs` (included there with `#[path]`), so a reproducer is replayed
//! through exactly the code the fuzzer ran.
//!
//! Properties checked on every input, whatever it is:
//! - no panic, no arithmetic overflow (the fuzz profile keeps overflow checks on);
//! - bounded memory: the bytes a parser holds at its peak are bounded by a constant (the NAR
//!   reader streams) or by a small multiple of the input (the text parsers);
//! - a refusal is a clear error: not empty, at most [`MAX_ERROR_LEN`] bytes whatever the input
//!   size (an error must not echo megabytes back into a log line or an HTTP reply), and it
//!   says where (a byte offset, a line, a line and column);
//! - an accepted input round-trips: `parse(print(x)) == x`, and printing is stable.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use kiln::derivation::hash::Hash;
use kiln::derivation::{
    canonical_bytes, derivation_type, drv_path, Derivation, PathComputer, StoreDir, StorePath,
};
use kiln::nar::narinfo::NarInfo;
use kiln::nar::refs::RefScanner;
use kiln::nar::signing::SecretKey;
use kiln::nar::{self, NarError};
use kiln::protocol;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::alloc::peak_during;

/// What a target made of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The input was accepted (and every property of an accepted input held).
    Accepted,
    /// The input was refused with this error message (which was checked to be clear).
    Refused(String),
}

/// Longest error message a parser may give, whatever the size of its input. Parsers quote
/// the offending text cut to 100-200 characters, and Rust's `{:?}` may spend up to 10 bytes
/// on one character (`\u{10ffff}`), so quoting is bounded but not short; inputs reach 64 KiB,
/// so a field echoed whole is still caught.
pub const MAX_ERROR_LEN: usize = 4096;

/// A target's entry point: panics when a property does not hold.
pub type Check = fn(&[u8]) -> Outcome;

/// The fuzz targets, by name: the names of the fuzz binaries and of the directories under
/// `tests/data/fuzz-regressions/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("drv", drv),
    ("nar", nar),
    ("nar_restore", nar_restore),
    ("narinfo", narinfo),
    ("protocol_json", protocol_json),
    ("protocol_query", protocol_query),
];

fn assert_clear(target: &str, msg: &str, says_where: &str) {
    assert!(!msg.trim().is_empty(), "{target}: empty error message");
    assert!(
        msg.len() <= MAX_ERROR_LEN,
        "{target}: error message of {} bytes, more than {MAX_ERROR_LEN}: {}...",
        msg.len(),
        msg.chars().take(300).collect::<String>()
    );
    assert!(
        msg.contains(says_where),
        "{target}: error message does not say where ({says_where:?}): {msg}"
    );
}

fn assert_memory(target: &str, input_len: usize, peak: usize, bound: usize) {
    assert!(
        peak <= bound,
        "{target}: reading {input_len} bytes held {peak} bytes at its peak, over the bound of {bound}"
    );
}

// ---------------------------------------------------------------------------------------------
// .drv
// ---------------------------------------------------------------------------------------------

/// The `.drv` parser ([`Derivation::parse`]) and what a submission computes from a parsed
/// derivation (`src/actors/submission.rs`): its type, name, canonical form, own path and
/// output paths.
pub fn drv(data: &[u8]) -> Outcome {
    let (parsed, peak) = peak_during(|| Derivation::parse(data));
    // Every string is copied once; small strings cost their Vec header and a growth margin.
    assert_memory("drv", data.len(), peak, 64 * data.len() + (64 << 10));
    let drv = match parsed {
        Err(e) => {
            assert!(
                e.offset <= data.len(),
                "drv: error offset {} is past the end of the {} byte input",
                e.offset,
                data.len()
            );
            let msg = e.to_string();
            assert_clear("drv", &msg, "at byte ");
            return Outcome::Refused(msg);
        }
        Ok(d) => d,
    };
    let printed = drv.print();
    let again = match Derivation::parse(&printed) {
        Ok(d) => d,
        Err(e) => panic!("drv: the printed form of an accepted derivation does not parse: {e}"),
    };
    assert!(again == drv, "drv: parse(print(d)) != d");
    assert!(
        again.print() == printed,
        "drv: print(parse(print(d))) != print(d)"
    );
    derived(&drv);
    Outcome::Accepted
}

/// The computations a submission runs on a parsed derivation. Their errors are answers; only
/// panics and broken invariants are findings.
fn derived(drv: &Derivation) {
    let _ = derivation_type(drv);
    let _ = drv.name();
    let paths: Vec<&[u8]> = drv
        .input_drvs
        .iter()
        .map(|(p, _)| p.as_slice())
        .chain(drv.input_srcs.iter().map(Vec::as_slice))
        .collect();
    let store_dir = match StoreDir::resolve_with_env(None, None, &paths) {
        Ok(d) => d,
        Err(_) => match StoreDir::new("/nix/store") {
            Ok(d) => d,
            Err(e) => panic!("/nix/store is not a valid store directory: {e}"),
        },
    };
    let _ = canonical_bytes(&store_dir, drv);
    if let Ok(p) = drv_path(&store_dir, drv) {
        let full = store_dir.full_path(&p);
        let back = store_dir.parse_path(full.as_bytes());
        assert!(
            back.as_ref() == Ok(&p),
            "drv: the computed path {full} does not parse back: {back:?}"
        );
    }
    // Inputs load as this derivation without inputs of its own, so the walk over input
    // derivations and their hashes modulo runs for real on fuzzed content. After a few loads
    // the loader fails, as for an unknown input: each load copies the whole input, and a
    // thousand inputs would make one execution quadratic.
    let leaf = Derivation {
        input_drvs: Vec::new(),
        ..drv.clone()
    };
    let mut loads = 0;
    let mut loader = |p: &StorePath| -> anyhow::Result<Derivation> {
        loads += 1;
        if loads > 16 {
            anyhow::bail!(
                "{} is not known (the fuzz loader knows 16 inputs)",
                p.as_str()
            );
        }
        Ok(leaf.clone())
    };
    let mut computer = PathComputer::new(store_dir, &mut loader);
    let _ = computer.output_paths(drv);
}

// ---------------------------------------------------------------------------------------------
// NAR
// ---------------------------------------------------------------------------------------------

/// Memory the NAR reader may hold, whatever the input: its 128 KiB read buffer, and per open
/// directory (at most `MAX_DEPTH`) one previous name and one path component of at most
/// `MAX_NAME_LEN` bytes, with growth margins.
const NAR_MEMORY: usize = 4 << 20;

/// A reader that hands out the input in small, varying pieces and now and then fails with
/// `Interrupted`, as a socket may; the parser must give the same answer as from one slice.
struct Dribble<'a> {
    data: &'a [u8],
    calls: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls % 7 == 3 {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = (self.calls % 19 + 1).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn nar_error(target: &str, e: &NarError, len: usize) -> String {
    match e {
        NarError::Format { offset, .. } => assert!(
            *offset <= len as u64,
            "{target}: error offset {offset} is past the end of the {len} byte input"
        ),
        other => panic!("{target}: reading from memory failed with a non-format error: {other}"),
    }
    let msg = e.to_string();
    assert_clear(target, &msg, "at byte ");
    msg
}

/// The validating NAR reader ([`nar::validate`], what checks every upload), fed in one slice
/// and in dribbles, and the reference scanner run over the same bytes.
pub fn nar(data: &[u8]) -> Outcome {
    let (whole, peak) = peak_during(|| nar::validate(&mut &data[..]));
    assert_memory("nar", data.len(), peak, NAR_MEMORY);
    let mut dribble = Dribble { data, calls: 0 };
    let dribbled = nar::validate(&mut dribble);
    refs(data);
    match (whole, dribbled) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "nar: the summary depends on how the input is read");
            assert_eq!(a.nar_size, data.len() as u64, "nar: wrong NarSize");
            assert!(a.nar_hash == Hash::sha256(data), "nar: wrong NarHash");
            Outcome::Accepted
        }
        (Err(a), Err(b)) => {
            let msg = nar_error("nar", &a, data.len());
            assert_eq!(
                msg,
                b.to_string(),
                "nar: the error depends on how the input is read"
            );
            Outcome::Refused(msg)
        }
        (a, b) => panic!("nar: read whole: {a:?}; read in dribbles: {b:?}"),
    }
}

/// [`RefScanner`] against a naive search: candidates are some 32-byte windows of the input
/// that could be hash parts, plus one that is absent; the input is written in varying pieces.
fn refs(data: &[u8]) {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let is_hash = |w: &[u8]| w.iter().all(|b| ALPHABET.contains(b));
    let mut candidates: Vec<String> = data
        .windows(32)
        .step_by(5)
        .filter(|w| is_hash(w))
        .take(8)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    candidates.push("00000000000000000000000000000000".to_string());
    candidates.push("not a hash".to_string());
    let mut scanner = RefScanner::new(candidates.clone());
    let mut rest = data;
    let mut step = 1;
    while !rest.is_empty() {
        let n = step.min(rest.len());
        if let Err(e) = scanner.write_all(&rest[..n]) {
            panic!("nar: the reference scanner failed to take bytes: {e}");
        }
        rest = &rest[n..];
        step = step * 3 % 61 + 1;
    }
    let found = scanner.into_found();
    for c in &candidates {
        let present = c.len() == 32 && data.windows(32).any(|w| w == c.as_bytes());
        assert_eq!(
            found.contains(c),
            present,
            "nar: the reference scanner is wrong about {c:?}"
        );
    }
}

/// Where `nar_restore` restores: one directory per process, on tmpfs when there is one.
fn restore_base() -> &'static Path {
    static BASE: OnceLock<tempfile::TempDir> = OnceLock::new();
    BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let made = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("kiln-fuzz-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("kiln-fuzz-").tempdir()
        };
        match made {
            Ok(d) => d,
            Err(e) => panic!("nar_restore: cannot make a temporary directory: {e}"),
        }
    })
    .path()
}

/// [`nar::restore_summary`] into a fresh directory, then [`nar::dump`] of what it wrote:
/// restore accepts exactly what `validate` accepts, a refused NAR leaves nothing behind, and
/// an accepted one dumps back to the same bytes (which is what makes `NarHash` meaningful).
pub fn nar_restore(data: &[u8]) -> Outcome {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dest: PathBuf = restore_base().join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    let restored = nar::restore_summary(&mut &data[..], &dest);
    let validated = nar::validate(&mut &data[..]);
    let outcome = match (restored, validated) {
        (Ok(r), Ok(v)) => {
            assert_eq!(
                r, v,
                "nar_restore: restore and validate disagree on the summary"
            );
            let mut dumped = Vec::with_capacity(data.len());
            if let Err(e) = nar::dump(&dest, &mut dumped) {
                panic!("nar_restore: cannot dump what was restored: {e}");
            }
            assert!(
                dumped == data,
                "nar_restore: dump(restore(nar)) != nar ({} bytes dumped, {} read)",
                dumped.len(),
                data.len()
            );
            Outcome::Accepted
        }
        (Err(r), Err(v)) => {
            let msg = nar_error("nar_restore", &r, data.len());
            assert_eq!(
                msg,
                v.to_string(),
                "nar_restore: restore and validate refuse differently"
            );
            assert!(
                std::fs::symlink_metadata(&dest).is_err(),
                "nar_restore: a refused NAR left {} behind",
                dest.display()
            );
            Outcome::Refused(msg)
        }
        (r, v) => panic!("nar_restore: restore: {r:?}; validate: {v:?}"),
    };
    remove(&dest);
    outcome
}

/// Remove a restored tree; a failure here is the harness's, and would fill the disk.
fn remove(dest: &Path) {
    let result = match std::fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dest),
        Ok(_) => std::fs::remove_file(dest),
        Err(_) => Ok(()),
    };
    if let Err(e) = result {
        panic!("nar_restore: cannot remove {}: {e}", dest.display());
    }
}

// ---------------------------------------------------------------------------------------------
// narinfo
// ---------------------------------------------------------------------------------------------

fn test_key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(
        || match SecretKey::parse(include_str!("../../tests/data/nar/test-1.secret")) {
            Ok(k) => k,
            Err(e) => panic!("tests/data/nar/test-1.secret does not parse: {e}"),
        },
    )
}

/// [`NarInfo::parse`] (input bytes read as lossy UTF-8), printing, fingerprinting, signing and
/// verifying.
pub fn narinfo(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let (parsed, peak) = peak_during(|| NarInfo::parse(&text));
    assert_memory("narinfo", text.len(), peak, 16 * text.len() + (64 << 10));
    let info = match parsed {
        Err(e) => {
            let msg = e.to_string();
            // A missing field has no line; every other error names its line.
            let says_where = if msg.starts_with("narinfo has no ") {
                " field"
            } else {
                "narinfo line "
            };
            assert_clear("narinfo", &msg, says_where);
            return Outcome::Refused(msg);
        }
        Ok(i) => i,
    };
    let printed = info.to_string();
    let again = match NarInfo::parse(&printed) {
        Ok(i) => i,
        Err(e) => panic!("narinfo: the printed form of an accepted narinfo does not parse: {e}"),
    };
    assert_eq!(again, info, "narinfo: parse(print(n)) != n");
    assert_eq!(
        again.to_string(),
        printed,
        "narinfo: printing is not stable"
    );
    let key = test_key();
    let public = [key.to_public()];
    let _ = info.valid_signatures(&public);
    match info.fingerprint() {
        Ok(fp) => {
            assert!(fp.starts_with("1;"), "narinfo: odd fingerprint {fp:?}");
            let mut signed = info.clone();
            if let Err(e) = signed.sign(key) {
                panic!("narinfo: fingerprinted but cannot sign: {e}");
            }
            assert!(
                signed.verify(&public),
                "narinfo: own signature does not verify"
            );
            let reparsed = NarInfo::parse(&signed.to_string());
            assert!(
                reparsed.as_ref() == Ok(&signed),
                "narinfo: a signed narinfo does not round-trip: {reparsed:?}"
            );
        }
        Err(e) => {
            let mut signed = info.clone();
            assert!(
                signed.sign(key).is_err(),
                "narinfo: signed without a fingerprint"
            );
            assert_clear("narinfo", &e.to_string(), "");
        }
    }
    Outcome::Accepted
}

// ---------------------------------------------------------------------------------------------
// protocol
// ---------------------------------------------------------------------------------------------

/// Memory for a JSON body: serde buffers internally tagged enums (a `Content` tree of up to
/// 32 bytes per one or two bytes of input), and vectors grow by doubling.
fn json_memory(len: usize) -> usize {
    128 * len + (1 << 20)
}

/// Deserialise `data` as `T` the way actix-web's `Json` extractor does
/// (`serde_json::from_slice`); an accepted value must serialise and deserialise back to the
/// same JSON.
fn json_as<T: Serialize + DeserializeOwned>(data: &[u8], what: &str) -> Option<String> {
    let (parsed, peak) = peak_during(|| serde_json::from_slice::<T>(data));
    assert_memory(what, data.len(), peak, json_memory(data.len()));
    match parsed {
        Ok(v) => {
            let value = match serde_json::to_value(&v) {
                Ok(j) => j,
                Err(e) => panic!("{what}: an accepted value does not serialise: {e}"),
            };
            let text = value.to_string();
            let back: T = match serde_json::from_str(&text) {
                Ok(b) => b,
                Err(e) => panic!("{what}: serialised {text} does not deserialise: {e}"),
            };
            let again = serde_json::to_value(&back).ok();
            assert!(
                again.as_ref() == Some(&value),
                "{what}: JSON does not round-trip: {text}"
            );
            None
        }
        Err(e) => {
            // serde_json echoes unknown enum variants and field names, as long as the body
            // holds them; the route's body limit bounds that, so no length check here.
            let msg = e.to_string();
            assert!(!msg.trim().is_empty(), "{what}: empty error message");
            assert!(
                msg.contains(" line ") && msg.contains(" column "),
                "{what}: error does not say where: {msg}"
            );
            Some(msg)
        }
    }
}

/// Every JSON body the coordinator accepts from agents and clients, and every reply body the
/// agent and the client read from the coordinator. Accepted if any type accepts the input.
pub fn protocol_json(data: &[u8]) -> Outcome {
    use protocol::*;
    let results = [
        // Agent API request bodies.
        json_as::<OpenSession>(data, "OpenSession"),
        json_as::<Heartbeat>(data, "Heartbeat"),
        json_as::<WorkRequest>(data, "WorkRequest"),
        json_as::<StartReport>(data, "StartReport"),
        json_as::<ResultReport>(data, "ResultReport"),
        // Client API request bodies.
        json_as::<NewAgent>(data, "NewAgent"),
        json_as::<PathsQuery>(data, "PathsQuery"),
        json_as::<SubmitBuilds>(data, "SubmitBuilds"),
        // Replies the agent and the client read.
        json_as::<SessionOpened>(data, "SessionOpened"),
        json_as::<HeartbeatReply>(data, "HeartbeatReply"),
        json_as::<WorkReply>(data, "WorkReply"),
        json_as::<UploadStatus>(data, "UploadStatus"),
        json_as::<ResultAck>(data, "ResultAck"),
        json_as::<AgentCreated>(data, "AgentCreated"),
        json_as::<Vec<AgentInfo>>(data, "AgentInfo list"),
        json_as::<MissingPaths>(data, "MissingPaths"),
        json_as::<Submitted>(data, "Submitted"),
        json_as::<Vec<BuildSummary>>(data, "BuildSummary list"),
        json_as::<BuildDetail>(data, "BuildDetail"),
        json_as::<ErrorBody>(data, "ErrorBody"),
    ];
    first_refusal(results)
}

/// Deserialise a query string as `T` the way actix-web's `Query` extractor does
/// (`serde_urlencoded`); an accepted value must encode and decode back to the same string.
fn query_as<T: Serialize + DeserializeOwned>(data: &[u8], what: &str) -> Option<String> {
    let (parsed, peak) = peak_during(|| serde_urlencoded::from_bytes::<T>(data));
    assert_memory(what, data.len(), peak, 64 * data.len() + (64 << 10));
    match parsed {
        Ok(v) => {
            let text = match serde_urlencoded::to_string(&v) {
                Ok(t) => t,
                Err(e) => panic!("{what}: an accepted query does not encode: {e}"),
            };
            let back: T = match serde_urlencoded::from_str(&text) {
                Ok(b) => b,
                Err(e) => panic!("{what}: encoded {text:?} does not decode: {e}"),
            };
            let again = serde_urlencoded::to_string(&back).ok();
            assert!(
                again.as_deref() == Some(text.as_str()),
                "{what}: query does not round-trip: {text:?} then {again:?}"
            );
            None
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.trim().is_empty(), "{what}: empty error message");
            Some(msg)
        }
    }
}

/// Every query string the coordinator parses into a type of `kiln::protocol`.
pub fn protocol_query(data: &[u8]) -> Outcome {
    use protocol::*;
    let results = [
        query_as::<UploadQuery>(data, "UploadQuery"),
        query_as::<LogQuery>(data, "LogQuery"),
        query_as::<SourceQuery>(data, "SourceQuery"),
        query_as::<BuildsQuery>(data, "BuildsQuery"),
    ];
    first_refusal(results)
}

fn first_refusal<const N: usize>(results: [Option<String>; N]) -> Outcome {
    if results.iter().any(Option::is_none) {
        return Outcome::Accepted;
    }
    match results.into_iter().flatten().next() {
        Some(msg) => Outcome::Refused(msg),
        None => Outcome::Accepted,
    }
}
