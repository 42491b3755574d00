//! `.drv` parse throughput over a corpus of many small real derivations, in MB/s including
//! building the `Derivation` value (every string copied out, escapes decoded, keys checked).
//!
//! The corpus is made at bench time by real Nix: `nix-instantiate tests/data/drv/corpus.nix`
//! writes 1,000 varied derivations (plus their `builtins.toFile` sources) into /nix/store, and
//! the bench reads every `.drv` of their closure into memory. Set `KILN_BENCH_DRV_DIR` to a
//! directory of `.drv` files to use another corpus (e.g. a real /nix/store). Each figure is
//! printed on its own line. Run with `cargo bench --bench drv_parse`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::derivation::Derivation;

/// How long each measurement runs at least.
const MEASURE: Duration = Duration::from_secs(3);

fn nix_corpus() -> (String, Vec<PathBuf>) {
    let conf = tempfile::tempdir().expect("temp dir for nix.conf");
    std::fs::write(
        conf.path().join("nix.conf"),
        "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command\n",
    )
    .expect("write nix.conf");
    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/drv/corpus.nix");
    let out = Command::new("nix-instantiate")
        .arg(&expr)
        .env("NIX_CONF_DIR", conf.path())
        .output()
        .unwrap_or_else(|e| {
            panic!("nix-instantiate not found ({e}): run scripts/test, which installs nix-bin")
        });
    assert!(
        out.status.success(),
        "nix-instantiate {} failed: {}",
        expr.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let files = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| PathBuf::from(l.split('!').next().unwrap_or(l)))
        .collect();
    (format!("nix-instantiate {}", expr.display()), files)
}

fn dir_corpus(dir: &Path) -> (String, Vec<PathBuf>) {
    let files = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "drv"))
        .collect();
    (format!("every .drv in {}", dir.display()), files)
}

/// Run `f` over the whole corpus until `MEASURE` has passed; returns (passes, elapsed).
fn measure(mut f: impl FnMut()) -> (u64, Duration) {
    f(); // warm up caches and the allocator
    let start = Instant::now();
    let mut passes = 0;
    while start.elapsed() < MEASURE {
        f();
        passes += 1;
    }
    (passes, start.elapsed())
}

fn main() {
    let from_dir = std::env::var_os("KILN_BENCH_DRV_DIR");
    let (source, files) = match &from_dir {
        Some(dir) => dir_corpus(Path::new(dir)),
        None => nix_corpus(),
    };
    let mut corpus: Vec<Vec<u8>> = Vec::with_capacity(files.len());
    let mut skipped = 0;
    for f in &files {
        let c = std::fs::read(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        match Derivation::parse(&c) {
            Ok(_) => corpus.push(c),
            // A directory may hold hand-made invalid files (the malformed-input experiments);
            // everything Nix made for the corpus must parse.
            Err(e) if from_dir.is_some() => {
                skipped += 1;
                eprintln!("skipping {}: {e}", f.display());
            }
            Err(e) => panic!("{} does not parse: {e}", f.display()),
        }
    }
    let bytes: usize = corpus.iter().map(Vec::len).sum();
    println!(
        "corpus: {} derivations, {} bytes ({} bytes mean), from {source} ({skipped} skipped)",
        corpus.len(),
        bytes,
        bytes / corpus.len().max(1)
    );

    let (passes, t) = measure(|| {
        for c in &corpus {
            black_box(Derivation::parse(black_box(c)).ok());
        }
    });
    let secs = t.as_secs_f64();
    let mb = (bytes as f64 * passes as f64) / 1e6;
    println!(
        "parse: {:.1} MB/s ({:.0} derivations/s)",
        mb / secs,
        (corpus.len() as u64 * passes) as f64 / secs
    );

    let parsed: Vec<Derivation> = corpus
        .iter()
        .filter_map(|c| Derivation::parse(c).ok())
        .collect();
    let (passes, t) = measure(|| {
        for d in &parsed {
            black_box(black_box(d).print());
        }
    });
    let mb = (bytes as f64 * passes as f64) / 1e6;
    println!("print: {:.1} MB/s", mb / t.as_secs_f64());
}
