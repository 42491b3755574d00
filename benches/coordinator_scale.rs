//! Benchmark: the real `kiln coordinator` process with 1,000,000 queued builds (10,000 with
//! `KILN_BENCH_QUICK=1`). Writes a state dir of runnable builds through the real committer
//! (realistic records: a `.drv` path, one output, five inputs, one of 8 systems, priorities
//! 0-6), then:
//!
//! 1. starts the coordinator on it, SIGKILLs it once it answered, and starts it again
//!    (the restart after SIGKILL);
//! 2. times from the second spawn to the first work response of an agent of `x86_64-linux`,
//!    and checks that build against ground truth (the highest priority, then the lowest id,
//!    of that system — what the writer put in);
//! 3. reads the process's resident memory (`VmRSS` of `/proc/PID/status`) once loaded and
//!    divides by the number of queued builds (sled's cache size is stated);
//! 4. times `GET /api/v1/builds?state=runnable&limit=50` (what `kiln builds --state runnable
//!    --limit 50` sends) 20 times;
//! 5. times work requests over HTTP, each answered after its lease is committed: an agent of
//!    all 8 systems asks for one build at a time, 500 times (100 quick), each with its own
//!    request id, and keeps what it gets (p50/p99/max; every request must get a build).
//!
//! Prints one JSON object. Reproduce: `cargo bench --bench coordinator_scale` (figures in
//! docs/performance.md). Loops are bounded in count and time; only 127.0.0.1 is used.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::protocol::BuildState;
use kiln::store::committer::CommitterOptions;
use kiln::store::keys::u64_key;
use kiln::store::records::{BuildRecord, EventRecord};
use kiln::store::{meta, Batch, Committer, Store, StoreOptions, TreeId};

const SYSTEMS: [&str; 8] = [
    "x86_64-linux",
    "i686-linux",
    "aarch64-linux",
    "armhf-linux",
    "i586-gnu",
    "powerpc64le-linux",
    "riscv64-linux",
    "x86_64-darwin",
];
const LIMIT: Duration = Duration::from_secs(300);
const CACHE_MB: u64 = 64;

fn record(id: u64) -> BuildRecord {
    // A valid 32-character nix-base32 hash part per (build, salt).
    let h = |salt: u64| {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest([id.to_be_bytes(), salt.to_be_bytes()].concat());
        kiln::derivation::base32::encode(&d[..20])
    };
    let store = "/gnu/store";
    BuildRecord {
        id,
        drv_path: format!("{store}/{}-package-{id}.drv", h(1)),
        system: SYSTEMS[(id % 8) as usize].into(),
        priority: ((id / 8) % 7) as i32,
        tags: vec![],
        state: BuildState::Runnable,
        attempt: 0,
        agent_id: 0,
        outputs: vec![("out".into(), format!("{store}/{}-package-{id}", h(2)))],
        needs: (0..5)
            .map(|k| format!("{store}/{}-input-{k}", h(10 + k)))
            .collect(),
        created_ms: 1_700_000_000_000 + id,
        allocated_ms: 0,
        started_ms: 0,
        finished_ms: 0,
        reason: String::new(),
        log_attempt: 0,
        request: String::new(),
        retries: 0,
        builder_retries: 0,
        defer_until_ms: 0,
    }
}

fn fill(dir: &Path, n: u64) {
    let store = Store::open(
        dir,
        &StoreOptions {
            background_flush_ms: None,
            cache_capacity_bytes: CACHE_MB << 20,
        },
    )
    .expect("open the state dir");
    let c = Committer::start(
        store.clone(),
        CommitterOptions::default(),
        Box::new(|_: &[EventRecord]| {}),
    )
    .expect("committer");
    let mut id = 1;
    while id <= n {
        let mut b = Batch::new();
        for i in id..(id + 1000).min(n + 1) {
            b.put(TreeId::Builds, &u64_key(i), &record(i)).unwrap();
        }
        id += 1000;
        b.put_raw(TreeId::Meta, meta::NEXT_BUILD_ID, &u64_key(id));
        b.put_raw(TreeId::Meta, meta::STORE_DIR, b"/gnu/store");
        c.commit_blocking(b).unwrap();
    }
    c.shutdown_blocking();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Running {
    child: Child,
    agent: String,
    client: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path) -> Running {
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!("[store]\nbackground_flush_ms = 0\ncache_capacity_mb = {CACHE_MB}\n"),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("coordinator.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["coordinator", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--client-listen", "127.0.0.1:0"])
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn kiln coordinator");
    let deadline = Instant::now() + LIMIT;
    let v: serde_json::Value = loop {
        if let Ok(s) = std::fs::read_to_string(&ready) {
            if let Ok(v) = serde_json::from_str(&s) {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "the coordinator never got ready");
        std::thread::sleep(Duration::from_millis(5));
    };
    Running {
        child,
        agent: format!("http://{}", v["listen"].as_str().unwrap()),
        client: format!("http://{}", v["client_listen"].as_str().unwrap()),
    }
}

fn http() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// Open a session for agent `name` (created once) and ask for one build; returns its id.
fn first_work(r: &Running, name: &str, secret: &mut Option<String>) -> u64 {
    let h = http();
    if secret.is_none() {
        let v: serde_json::Value = h
            .post(&format!("{}/api/v1/agents", r.client))
            .send_json(serde_json::json!({"name": name, "systems": ["x86_64-linux"]}))
            .expect("create agent")
            .into_json()
            .unwrap();
        *secret = Some(v["secret"].as_str().unwrap().to_string());
    }
    let opened: serde_json::Value = h
        .post(&format!("{}/api/agent/v1/session", r.agent))
        .send_json(
            serde_json::json!({"name": name, "secret": secret.as_deref().unwrap(),
            "protocol_version": kiln::protocol::PROTOCOL_VERSION,
            "systems": ["x86_64-linux"], "max_parallel_builds": 1}),
        )
        .expect("open session")
        .into_json()
        .unwrap();
    let token = opened["session_token"].as_str().unwrap().to_string();
    let reply: serde_json::Value = h
        .post(&format!("{}/api/agent/v1/work", r.agent))
        .set(kiln::protocol::SESSION_HEADER, &token)
        .send_json(serde_json::json!({"max_builds": 1, "request_id": format!("{name}-1")}))
        .expect("work request")
        .into_json()
        .unwrap();
    reply["builds"][0]["build_id"]
        .as_u64()
        .expect("a build was assigned")
}

/// `count` work requests of one build each by an agent of every system, sequential, each
/// answered once its lease is committed; their times in ms, sorted.
fn work_requests(r: &Running, count: usize) -> Vec<f64> {
    let h = http();
    let v: serde_json::Value = h
        .post(&format!("{}/api/v1/agents", r.client))
        .send_json(serde_json::json!({"name": "bench-w", "systems": SYSTEMS}))
        .expect("create agent")
        .into_json()
        .unwrap();
    let secret = v["secret"].as_str().unwrap().to_string();
    let opened: serde_json::Value = h
        .post(&format!("{}/api/agent/v1/session", r.agent))
        .send_json(serde_json::json!({"name": "bench-w", "secret": secret,
            "protocol_version": kiln::protocol::PROTOCOL_VERSION,
            "systems": SYSTEMS, "max_parallel_builds": 100_000}))
        .expect("open session")
        .into_json()
        .unwrap();
    let token = opened["session_token"].as_str().unwrap().to_string();
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        let reply: serde_json::Value = h
            .post(&format!("{}/api/agent/v1/work", r.agent))
            .set(kiln::protocol::SESSION_HEADER, &token)
            .send_json(serde_json::json!({"max_builds": 1, "request_id": format!("w-{i}")}))
            .expect("work request")
            .into_json()
            .unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(
            reply["builds"][0]["build_id"].as_u64().is_some(),
            "work request {i} got no build: {reply}"
        );
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times
}

fn main() {
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let n: u64 = if quick { 10_000 } else { 1_000_000 };
    let tmp = tempfile::tempdir().expect("tempdir");
    // KILN_BENCH_STATE_DIR=DIR fills DIR once and reuses it on later runs (for profiling).
    let dir: PathBuf = match std::env::var_os("KILN_BENCH_STATE_DIR") {
        Some(d) => PathBuf::from(d),
        None => tmp.path().join("state"),
    };
    let t = Instant::now();
    if !dir.join("db").exists() {
        fill(&dir, n);
    }
    let fill_s = t.elapsed().as_secs_f64();
    // Ground truth: x86_64-linux builds (id % 8 == 0) of the highest priority 6, oldest
    // first. The first start leases the first; it stays leased to that agent through the
    // restart, so the second start's answer is the next one.
    let mut best = (1..=n).filter(|id| id % 8 == 0 && (id / 8) % 7 == 6);
    let expected_first = best.next().expect("the state has such a build");
    let expected = best.next().expect("the state has two such builds");

    // First start, then SIGKILL once it served.
    let mut secret = None;
    let first = spawn(&dir);
    let got_first = first_work(&first, "bench-a", &mut secret);
    drop(first); // SIGKILL
    let t = Instant::now();
    let second = spawn(&dir);
    let ready_s = t.elapsed().as_secs_f64();
    let mut secret_b = None;
    let got = first_work(&second, "bench-b", &mut secret_b);
    let first_work_s = t.elapsed().as_secs_f64();
    let pid = second.child.id();
    let rss = rss_kib(pid);

    let h = http();
    let mut list = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let v: serde_json::Value = h
            .get(&format!(
                "{}/api/v1/builds?state=runnable&limit=50",
                second.client
            ))
            .call()
            .expect("list")
            .into_json()
            .unwrap();
        list.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(v.as_array().map(|a| a.len()), Some(50));
    }
    list.sort_by(|a, b| a.total_cmp(b));
    let work = work_requests(&second, if quick { 100 } else { 500 });
    // Where the start-up time went, from the coordinator's own log.
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("loaded") || l.contains("filled"))
    {
        eprintln!("coordinator: {l}");
    }
    let out = serde_json::json!({
        "queued": n,
        "fill_seconds": fill_s,
        "first_start_build": got_first,
        "first_start_is_highest_priority": got_first == expected_first,
        "restart_ready_file_seconds": ready_s,
        "restart_first_work_response_seconds": first_work_s,
        "first_work_build": got,
        "expected_build": expected,
        "first_work_is_highest_priority": got == expected,
        "sled_cache_capacity_mb": CACHE_MB,
        "rss_kib_after_restart": rss,
        "rss_bytes_per_queued_build": (rss * 1024) as f64 / n as f64,
        "list_runnable_50_ms_p50": list[list.len() / 2],
        "list_runnable_50_ms_max": list.last().copied().unwrap_or(0.0),
        "work_requests": work.len(),
        "work_request_with_lease_ms_p50": work[work.len() / 2],
        "work_request_with_lease_ms_p99": work[(work.len() * 99 / 100).min(work.len() - 1)],
        "work_request_with_lease_ms_max": work.last().copied().unwrap_or(0.0),
    });
    println!("{out}");
}
