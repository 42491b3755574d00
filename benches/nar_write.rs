//! NAR writing speed, Kiln beside `nix-store --dump` on the same trees in the same run: one
//! 5 MB file, and 1,000 small files in 10 directories. Each is written to a sink (`io::sink` in
//! process, `/dev/null` for a process) and to a pipe that another thread drains. Kiln is timed
//! as a library call and as the `kiln nar dump` process (the fair comparison with the
//! `nix-store` process, start-up included); a dump of an empty file shows each program's
//! start-up cost. Run with `cargo bench --bench nar_write`; results go to `docs/perf-nar.md`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REPS: usize = 25;

fn main() {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let conf = tmp.path().join("nixconf");
    std::fs::create_dir(&conf).expect("nix conf dir");
    std::fs::write(
        conf.join("nix.conf"),
        "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command\n",
    )
    .expect("nix.conf");
    let bench = Bench {
        conf,
        kiln: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
    };
    if Command::new("nix-store").arg("--version").output().is_err() {
        panic!("nix-store not found: run scripts/test, which installs nix-bin");
    }

    let big = tmp.path().join("big");
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(&big, data).expect("write big file");

    let small = tmp.path().join("small");
    std::fs::create_dir(&small).expect("mkdir");
    for d in 0..10 {
        let dir = small.join(format!("dir{d}"));
        std::fs::create_dir(&dir).expect("mkdir");
        for f in 0..100u32 {
            let len = (f * 37 + d * 11) % 2048;
            let body: Vec<u8> = (0..len).map(|i| (i ^ f) as u8).collect();
            std::fs::write(dir.join(format!("file-{f:03}")), body).expect("write small file");
        }
    }

    let empty = tmp.path().join("empty");
    std::fs::write(&empty, b"").expect("write empty file");

    println!("NAR write benchmark: median (min) of {REPS} runs, MB/s of NAR bytes (1 MB = 10^6 B)");
    println!("machine: {} CPUs, {}", num_cpus(), cpu_model());
    for (label, path) in [
        ("one 5 MB file", &big),
        ("1,000 small files", &small),
        ("empty file (start-up)", &empty),
    ] {
        bench.compare(label, path);
    }
}

struct Bench {
    conf: PathBuf,
    kiln: PathBuf,
}

/// Median and minimum of `REPS` timings of `f`.
fn time(mut f: impl FnMut()) -> (Duration, Duration) {
    f(); // warm the page cache and the binaries
    let mut t: Vec<Duration> = (0..REPS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    (t[REPS / 2], t[0])
}

/// A pipe whose read end is drained (and counted) by a thread; returns the write end.
fn drained_pipe() -> (File, std::thread::JoinHandle<u64>) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(
        unsafe { libc::pipe(fds.as_mut_ptr()) },
        0,
        "pipe: {}",
        io::Error::last_os_error()
    );
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    (w, std::thread::spawn(move || drain(r)))
}

fn drain(mut r: impl Read) -> u64 {
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return n,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("drain: {e}"),
        }
    }
}

impl Bench {
    fn process(&self, program: &Path, args: &[&str], path: &Path, to_pipe: bool) -> u64 {
        let mut cmd = Command::new(program);
        cmd.args(args).arg(path).env("NIX_CONF_DIR", &self.conf);
        if to_pipe {
            let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
            let n = drain(child.stdout.take().expect("stdout"));
            assert!(child.wait().expect("wait").success(), "{program:?} failed");
            n
        } else {
            let null = File::create("/dev/null").expect("/dev/null");
            let status = cmd.stdout(null).status().expect("run");
            assert!(status.success(), "{program:?} failed");
            0
        }
    }

    fn compare(&self, label: &str, path: &Path) {
        let mut nar_bytes = Vec::new();
        kiln::nar::dump(path, &mut nar_bytes).expect("dump");
        let nix = Path::new("nix-store");
        let size = nar_bytes.len() as f64;
        let rows: Vec<(&str, (Duration, Duration))> = vec![
            (
                "kiln lib  -> io::sink",
                time(|| kiln::nar::dump(path, &mut io::sink()).expect("dump")),
            ),
            (
                "kiln lib  -> pipe",
                time(|| {
                    let (mut w, reader) = drained_pipe();
                    kiln::nar::dump(path, &mut w).expect("dump");
                    drop(w);
                    assert_eq!(reader.join().expect("drain thread"), nar_bytes.len() as u64);
                }),
            ),
            (
                "kiln nar dump  > /dev/null",
                time(|| {
                    self.process(&self.kiln, &["nar", "dump"], path, false);
                }),
            ),
            (
                "kiln nar dump  | pipe",
                time(|| {
                    assert_eq!(
                        self.process(&self.kiln, &["nar", "dump"], path, true),
                        nar_bytes.len() as u64
                    );
                }),
            ),
            (
                "nix-store --dump > /dev/null",
                time(|| {
                    self.process(nix, &["--dump"], path, false);
                }),
            ),
            (
                "nix-store --dump | pipe",
                time(|| {
                    assert_eq!(
                        self.process(nix, &["--dump"], path, true),
                        nar_bytes.len() as u64
                    );
                }),
            ),
        ];
        println!();
        println!("## {label}: NAR of {} bytes", nar_bytes.len());
        println!(
            "{:<30} {:>12} {:>12} {:>10}",
            "writer", "median ms", "min ms", "MB/s"
        );
        for (name, (median, min)) in &rows {
            println!(
                "{name:<30} {:>12.3} {:>12.3} {:>10.1}",
                median.as_secs_f64() * 1e3,
                min.as_secs_f64() * 1e3,
                size / median.as_secs_f64() / 1e6
            );
        }
        let ratio = |a: usize, b: usize| rows[b].1 .0.as_secs_f64() / rows[a].1 .0.as_secs_f64();
        println!("speed-up of kiln over nix-store (median time of nix / median time of kiln):");
        println!(
            "  process to /dev/null: {:.2}x   process to pipe: {:.2}x",
            ratio(2, 4),
            ratio(3, 5)
        );
        println!("  library to sink vs nix to /dev/null: {:.2}x   library to pipe vs nix to pipe: {:.2}x", ratio(0, 4), ratio(1, 5));
        io::stdout().flush().expect("flush stdout");
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
