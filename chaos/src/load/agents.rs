//! Simulated agents: many agents in one process, each speaking the agent protocol over real
//! HTTP with the agent's own client (`kiln_agent::client::Coordinator`: sessions, retries,
//! registration with a registration token). No builder runs: for each assignment an agent
//! reports the start, uploads a NAR made on the spot (one regular file of `nar_bytes` bytes
//! whose text names the build, zstd-compressed, with its FileHash, NarHash and NarSize), checks
//! that the coordinator verified it with the same NarHash and NarSize, and reports success.
//!
//! The run ends when `builds` builds succeeded (or at the deadline); what each request took,
//! the coordinator's CPU time and its flushes and commits over the run are the report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln::derivation::Hash;
use kiln::nar::narinfo::NarInfo;
use kiln::protocol::{
    Assignment, BuiltOutput, Outcome, ResultAck, ResultReport, StartReport, UploadQuery,
    UploadStatus, WorkReply, WorkRequest, SESSION_HEADER,
};
use kiln_agent::client::{decode, send, Coordinator, Held, Identity};
use kiln_agent::retry::CallError;
use serde::Serialize;

use super::stats::{cpu_ms, round3, CoordinatorFigures, Latencies, LatencySummary, Watch};

/// What `kiln-chaos load agents` runs.
#[derive(Debug, Clone)]
pub struct AgentsOptions {
    /// The coordinator's agent listener (`http://127.0.0.1:PORT`).
    pub agent_url: String,
    pub agents: usize,
    /// Builds asked for per work request, handled at once (an agent's slots).
    pub slots: u32,
    /// Stop once this many builds succeeded.
    pub builds: u64,
    /// Bytes of the file in each output NAR (at least 1024).
    pub nar_bytes: usize,
    pub system: String,
    /// A registration token the coordinator knows: each simulated agent registers itself.
    pub registration_token: String,
    /// Agent names are `<prefix>-<i>`.
    pub name_prefix: String,
    /// Long-poll wait of each work request.
    pub wait_ms: u64,
    /// Report the start (`POST …/start`) before uploading, as `kiln-agent` does.
    pub report_start: bool,
    /// The whole run ends by then, whatever happened.
    pub deadline: Duration,
    pub watch: Watch,
}

/// A build the simulated agents completed: what its narinfo must say.
#[derive(Debug, Clone)]
pub struct Completed {
    pub build_id: u64,
    pub out_path: String,
    pub nar_hash: String,
    pub nar_size: u64,
}

/// The JSON report of `kiln-chaos load agents`.
#[derive(Debug, Clone, Serialize)]
pub struct AgentsReport {
    pub agents: usize,
    pub slots: u32,
    pub builds_wanted: u64,
    pub builds_succeeded: u64,
    /// Builds given up on: a request refused for good, or an upload not verified as sent.
    pub builds_failed: u64,
    /// Seconds to open (and register) every session, before the measured interval.
    pub sessions_s: f64,
    /// From the first work request to the last success.
    pub elapsed_s: f64,
    pub builds_per_s: f64,
    /// Agent-API requests sent in the measured interval (each work, start, upload, result).
    pub requests: u64,
    pub requests_per_s: f64,
    /// Work requests that came back with no build.
    pub empty_work_replies: u64,
    pub nar_bytes: usize,
    pub latency: AgentLatencies,
    pub coordinator: CoordinatorFigures,
    /// CPU ms (user + system) this load generator used in the measured interval: on a small
    /// machine it competes with the coordinator for the same cores.
    pub generator_cpu_ms: Option<f64>,
    /// The first few errors, verbatim.
    pub errors: Vec<String>,
    /// True when the deadline ended the run before `builds_wanted` succeeded.
    pub timed_out: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentLatencies {
    pub work: LatencySummary,
    pub start: LatencySummary,
    pub upload: LatencySummary,
    pub result: LatencySummary,
    /// From the work reply that assigned it to the result's acknowledgement.
    pub build: LatencySummary,
}

#[derive(Default)]
struct Recorded {
    work: Latencies,
    start: Latencies,
    upload: Latencies,
    result: Latencies,
    build: Latencies,
    completed: Vec<Completed>,
    errors: Vec<String>,
    last_success: Option<Instant>,
}

struct Shared {
    wanted: u64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    requests: AtomicU64,
    empty: AtomicU64,
    stop: AtomicBool,
    rec: Mutex<Recorded>,
}

impl Shared {
    fn rec(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.rec.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, e: String) {
        tracing::warn!(error = %e, "load agent request failed");
        let mut r = self.rec();
        if r.errors.len() < 20 {
            r.errors.push(e);
        }
    }
}

/// Run the simulated agents; returns the report and every completed build.
pub async fn run_agents(opts: &AgentsOptions) -> anyhow::Result<(AgentsReport, Vec<Completed>)> {
    anyhow::ensure!(
        opts.nar_bytes >= 1024,
        "--nar-bytes {} is below 1024: each build uploads at least 1 KB",
        opts.nar_bytes
    );
    anyhow::ensure!(opts.agents > 0, "--agents must be at least 1");
    anyhow::ensure!(
        (1..=64).contains(&opts.slots),
        "--slots {} is not between 1 and 64 (the coordinator's cap per work request)",
        opts.slots
    );
    let run_deadline = Instant::now() + opts.deadline;
    let t0 = Instant::now();
    let mut coordinators = Vec::with_capacity(opts.agents);
    for i in 0..opts.agents {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let identity = Identity {
            name: format!("{}-{i}", opts.name_prefix),
            secret: secret_for(&opts.name_prefix, i),
            systems: vec![opts.system.clone()],
            max_parallel_builds: opts.slots,
            registration_token: Some(opts.registration_token.clone()),
        };
        coordinators.push(Arc::new(
            Coordinator::new(&opts.agent_url, identity, Held::default(), tx)
                .context("failed to make the agent's HTTP client")?,
        ));
    }
    // Open every session (registering the agents); the coordinator checks secrets two at a
    // time, so this is not part of the measured interval.
    let opens = coordinators.iter().map(|c| c.open_session());
    let opened =
        tokio::time::timeout_at(run_deadline.into(), futures_util::future::join_all(opens))
            .await
            .context("the deadline passed while the simulated agents opened their sessions")?;
    for (i, r) in opened.into_iter().enumerate() {
        r.with_context(|| format!("agent {}-{i} could not open a session", opts.name_prefix))?;
    }
    let sessions_s = t0.elapsed().as_secs_f64();

    let shared = Arc::new(Shared {
        wanted: opts.builds,
        succeeded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        empty: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        rec: Mutex::new(Recorded::default()),
    });
    let watch = opts.watch.clone();
    let before = tokio::task::spawn_blocking(move || watch.read())
        .await
        .context("the metrics reader panicked")?;
    let own_before = cpu_ms(std::process::id() as i32).ok();
    let started = Instant::now();
    let tasks: Vec<_> = coordinators
        .iter()
        .map(|c| tokio::spawn(agent_loop(c.clone(), opts.clone(), shared.clone())))
        .collect();
    // Bounded by the deadline: wait for the wanted successes.
    while !shared.stop.load(Ordering::SeqCst) && Instant::now() < run_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let timed_out = !shared.stop.load(Ordering::SeqCst);
    let own_after = cpu_ms(std::process::id() as i32).ok();
    shared.stop.store(true, Ordering::SeqCst);
    let watch = opts.watch.clone();
    let after = tokio::task::spawn_blocking(move || watch.read())
        .await
        .context("the metrics reader panicked")?;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let succeeded = shared.succeeded.load(Ordering::SeqCst);
    let failed = shared.failed.load(Ordering::SeqCst);
    let requests = shared.requests.load(Ordering::SeqCst);
    let mut rec = std::mem::take(&mut *shared.rec());
    let end = rec.last_success.unwrap_or_else(Instant::now);
    let elapsed = end.duration_since(started).as_secs_f64().max(1e-9);
    rec.completed.sort_by_key(|c| c.build_id);
    let report = AgentsReport {
        agents: opts.agents,
        slots: opts.slots,
        builds_wanted: opts.builds,
        builds_succeeded: succeeded,
        builds_failed: failed,
        sessions_s: round3(sessions_s),
        elapsed_s: round3(elapsed),
        builds_per_s: round3(succeeded as f64 / elapsed),
        requests,
        requests_per_s: round3(requests as f64 / elapsed),
        empty_work_replies: shared.empty.load(Ordering::SeqCst),
        nar_bytes: opts.nar_bytes,
        latency: AgentLatencies {
            work: rec.work.summary(),
            start: rec.start.summary(),
            upload: rec.upload.summary(),
            result: rec.result.summary(),
            build: rec.build.summary(),
        },
        coordinator: before.until(&after, succeeded),
        generator_cpu_ms: own_before.zip(own_after).map(|(a, b)| round3(b - a)),
        errors: rec.errors.clone(),
        timed_out,
    };
    Ok((report, rec.completed))
}

/// A secret of 64 hex characters, fixed per agent name (a rerun against the same coordinator
/// opens the same agents' sessions again).
fn secret_for(prefix: &str, i: usize) -> String {
    let h = Hash::sha256(format!("kiln-chaos load agent {prefix}-{i}").as_bytes());
    h.to_base16()
}

/// One agent: ask for work (long poll), handle what came, until told to stop.
async fn agent_loop(c: Arc<Coordinator>, opts: AgentsOptions, shared: Arc<Shared>) {
    let wait = Duration::from_millis(opts.wait_ms);
    // Bounded: the run's loop aborts this task at its deadline, and `stop` ends it.
    while !shared.stop.load(Ordering::SeqCst) {
        let req = WorkRequest {
            max_builds: opts.slots,
            request_id: Some(kiln_agent::client::new_request_id()),
            wait_ms: opts.wait_ms,
        };
        let t = Instant::now();
        let reply: Result<WorkReply, CallError> = c
            .post_within("work", "work", &req, wait + Duration::from_secs(30))
            .await;
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                shared.error(format!("work request: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let got = Instant::now();
        shared.rec().work.push(got - t);
        if reply.builds.is_empty() {
            shared.empty.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let jobs = reply
            .builds
            .iter()
            .map(|a| one_build(&c, &opts, &shared, a));
        for (a, r) in reply
            .builds
            .iter()
            .zip(futures_util::future::join_all(jobs).await)
        {
            match r {
                Ok(done) => {
                    let n = shared.succeeded.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut rec = shared.rec();
                    rec.build.push(got.elapsed());
                    rec.completed.push(done);
                    if n >= shared.wanted {
                        if n == shared.wanted {
                            rec.last_success = Some(Instant::now());
                        }
                        shared.stop.store(true, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    shared.failed.fetch_add(1, Ordering::SeqCst);
                    shared.error(format!("build {} attempt {}: {e:#}", a.build_id, a.attempt));
                }
            }
        }
    }
}

/// The NAR of one regular file holding `contents`.
pub fn regular_file_nar(contents: &[u8]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    }
    let mut out = Vec::with_capacity(contents.len() + 160);
    for s in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
    ] {
        put(&mut out, s);
    }
    put(&mut out, contents);
    put(&mut out, b")");
    out
}

/// `len` bytes naming the build, then bytes drawn from its id (poorly compressible, like real
/// outputs).
fn output_contents(a: &Assignment, len: usize) -> Vec<u8> {
    let mut v = format!(
        "kiln-chaos load: build {} attempt {} of {}\n",
        a.build_id, a.attempt, a.drv_path
    )
    .into_bytes();
    let mut x = a.build_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Start, upload, check, report one build.
async fn one_build(
    c: &Coordinator,
    opts: &AgentsOptions,
    shared: &Shared,
    a: &Assignment,
) -> anyhow::Result<Completed> {
    let id = a.build_id;
    let attempt = a.attempt;
    if opts.report_start {
        let t = Instant::now();
        let r: Result<serde_json::Value, CallError> = c
            .post(
                "start",
                &format!("builds/{id}/start"),
                &StartReport { attempt },
            )
            .await;
        shared.requests.fetch_add(1, Ordering::Relaxed);
        r.context("start report")?;
        shared.rec().start.push(t.elapsed());
    }
    let mut outputs = Vec::with_capacity(a.outputs.len());
    for o in &a.outputs {
        let nar = regular_file_nar(&output_contents(a, opts.nar_bytes));
        let nar_hash = Hash::sha256(&nar).to_nix_string();
        let nar_size = nar.len() as u64;
        let file = bytes::Bytes::from(
            zstd::bulk::compress(&nar, 1).context("failed to zstd-compress the NAR")?,
        );
        let file_hash = Hash::sha256(&file).to_nix_string();
        let query = UploadQuery {
            attempt,
            file_hash: file_hash.clone(),
            file_size: file.len() as u64,
            offset: 0,
        };
        let url = c.agent_url(&format!("builds/{id}/outputs/{}", o.name));
        let t = Instant::now();
        let status: Result<UploadStatus, CallError> = c
            .call("upload output", |token| {
                let rb = c
                    .http()
                    .put(&url)
                    .query(&query)
                    .header(SESSION_HEADER, token)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(file.clone())
                    .timeout(Duration::from_secs(60));
                async move { decode::<UploadStatus>(send(rb).await?) }
            })
            .await;
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let status = status.with_context(|| format!("upload of output {}", o.name))?;
        shared.rec().upload.push(t.elapsed());
        anyhow::ensure!(
            status.verified
                && status.nar_hash.as_deref() == Some(nar_hash.as_str())
                && status.nar_size == Some(nar_size),
            "the coordinator did not verify output {} as sent (sent NarHash {nar_hash}, NarSize \
             {nar_size}; got {status:?})",
            o.name
        );
        outputs.push(BuiltOutput {
            name: o.name.clone(),
            path: o.path.clone(),
            nar_hash,
            nar_size,
            file_hash,
            file_size: file.len() as u64,
            references: Vec::new(),
        });
    }
    let first = outputs
        .first()
        .map(|o| (o.path.clone(), o.nar_hash.clone(), o.nar_size))
        .with_context(|| format!("build {id} has no output"))?;
    let report = ResultReport {
        attempt,
        outcome: Outcome::Succeeded { outputs },
    };
    let t = Instant::now();
    let ack: Result<ResultAck, CallError> = c
        .post("result", &format!("builds/{id}/result"), &report)
        .await;
    shared.requests.fetch_add(1, Ordering::Relaxed);
    ack.context("result report")?;
    shared.rec().result.push(t.elapsed());
    Ok(Completed {
        build_id: id,
        out_path: first.0,
        nar_hash: first.1,
        nar_size: first.2,
    })
}

/// Fetch the narinfo of every completed build from the agent listener and check it names
/// the output with the NarHash and NarSize the agent uploaded. Returns how many were checked.
pub fn verify_narinfos(agent_url: &str, done: &[Completed]) -> anyhow::Result<usize> {
    for d in done {
        let base = d
            .out_path
            .rsplit('/')
            .next()
            .with_context(|| format!("{} is not a store path", d.out_path))?;
        let hash_part = base
            .get(..32)
            .with_context(|| format!("{} has no 32-character hash part", d.out_path))?;
        let url = format!("{}/{hash_part}.narinfo", agent_url.trim_end_matches('/'));
        let text = ureq::get(&url)
            .timeout(Duration::from_secs(30))
            .call()
            .with_context(|| format!("no narinfo for build {} at {url}", d.build_id))?
            .into_string()
            .with_context(|| format!("failed to read {url}"))?;
        let info = NarInfo::parse(&text)
            .with_context(|| format!("{url} is not a valid narinfo: {text:?}"))?;
        anyhow::ensure!(
            info.store_path == d.out_path
                && info.nar_hash.to_nix_string() == d.nar_hash
                && info.nar_size == d.nar_size,
            "{url} says {} with NarHash {} and NarSize {}; build {} uploaded {} with {} and {}",
            info.store_path,
            info.nar_hash.to_nix_string(),
            info.nar_size,
            d.build_id,
            d.out_path,
            d.nar_hash,
            d.nar_size
        );
    }
    Ok(done.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nar_of_a_file_is_valid_and_restores_to_its_contents() {
        let contents = b"hello, nar of more than eight bytes";
        let nar = regular_file_nar(contents);
        assert_eq!(nar.len() % 8, 0);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        kiln::nar::restore(&mut &nar[..], &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), contents);
        // And it is the NAR Kiln itself writes for that file.
        let mut again = Vec::new();
        kiln::nar::dump(&dest, &mut again).unwrap();
        assert_eq!(again, nar);
    }
}
