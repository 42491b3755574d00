//! The load submitter: fills a coordinator's queue through the client API, the way `kiln
//! submit` does (`POST /api/v1/builds` with the `.drv` files in the body), from several
//! concurrent clients, and counts builds at the 200 OK (a submission is answered only once it
//! is durable).
//!
//! Every request body is made before the measured interval (derivations generated with
//! correct store paths, serialized to JSON), so the submitter's own CPU on a shared machine is
//! mostly the HTTP exchange.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln::derivation::StoreDir;
use kiln::protocol::{Bytes64, SubmitBuilds, Submitted, SubmittedDrv};
use serde::Serialize;

use super::drvs::{DrvGen, GenDrv};
use super::stats::{cpu_ms, round3, CoordinatorFigures, Latencies, LatencySummary, Watch};

/// What `kiln-chaos load submit` runs.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    /// The coordinator's client listener (`http://127.0.0.1:PORT`).
    pub client_url: String,
    /// A client token with the `submit` scope; none when the coordinator has no token yet.
    pub token: Option<String>,
    /// The coordinator's store dir.
    pub store_dir: String,
    pub system: String,
    pub builds: u64,
    pub per_request: usize,
    pub clients: usize,
    /// Approximate size of each `.drv`.
    pub drv_bytes: usize,
    /// Input derivations every build uses (submitted once before the measured interval).
    pub inputs: usize,
    /// Names the run's derivations (distinct runs, distinct derivations).
    pub run: String,
    pub deadline: Duration,
    pub watch: Watch,
}

/// The JSON report of `kiln-chaos load submit`.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitReport {
    pub clients: usize,
    pub builds_per_request: usize,
    pub inputs_per_build: usize,
    pub builds_wanted: u64,
    /// Builds in 200 OK answers (new ones; `existing` ones are counted apart).
    pub builds_acknowledged: u64,
    /// Builds answered as already queued (a rerun of the same run id): should be 0.
    pub builds_existing: u64,
    pub requests: u64,
    /// 503 answers (`overloaded`, `unavailable`) that were retried.
    pub retries: u64,
    pub drv_bytes_mean: f64,
    pub request_bytes_mean: f64,
    pub prepare_s: f64,
    pub elapsed_s: f64,
    pub builds_per_s: f64,
    pub requests_per_s: f64,
    /// Per request, from send to the 200 OK.
    pub latency: LatencySummary,
    pub coordinator: CoordinatorFigures,
    /// CPU ms (user + system) this submitter used in the measured interval.
    pub generator_cpu_ms: Option<f64>,
    pub errors: Vec<String>,
    pub timed_out: bool,
}

struct Prepared {
    bodies: Vec<Vec<u8>>,
    builds: Vec<usize>,
    drv_bytes_mean: f64,
}

fn prepare(opts: &SubmitOptions, gen: &DrvGen) -> anyhow::Result<Prepared> {
    let per = opts.per_request.max(1);
    let n = opts.builds as usize;
    let mut bodies = Vec::with_capacity(n.div_ceil(per));
    let mut builds = Vec::with_capacity(n.div_ceil(per));
    let mut drv_total = 0usize;
    let mut i = 0usize;
    while i < n {
        let k = per.min(n - i);
        let drvs: Vec<GenDrv> = (i..i + k)
            .map(|j| gen.make(j as u64))
            .collect::<anyhow::Result<_>>()?;
        drv_total += drvs.iter().map(|d| d.bytes.len()).sum::<usize>();
        bodies.push(body(drvs)?);
        builds.push(k);
        i += k;
    }
    Ok(Prepared {
        bodies,
        builds,
        drv_bytes_mean: if n > 0 {
            drv_total as f64 / n as f64
        } else {
            0.0
        },
    })
}

fn body(drvs: Vec<GenDrv>) -> anyhow::Result<Vec<u8>> {
    let req = SubmitBuilds {
        builds: drvs.iter().map(|d| d.drv_path.clone()).collect(),
        derivations: drvs
            .into_iter()
            .map(|d| SubmittedDrv {
                path: d.drv_path,
                contents: Bytes64(d.bytes),
            })
            .collect(),
        priority: 0,
        tags: Vec::new(),
        defer_until_ms: 0,
        related: false,
    };
    serde_json::to_vec(&req).context("failed to encode a submission")
}

/// One submission, retried on 503 until `deadline`; returns the reply and the retries.
fn post(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    body: &[u8],
    deadline: Instant,
) -> anyhow::Result<(Submitted, u64)> {
    let mut retries = 0;
    // Bounded by the deadline.
    loop {
        let mut req = agent
            .post(url)
            .set("Content-Type", "application/json")
            .timeout(Duration::from_secs(300));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.send_bytes(body) {
            Ok(resp) => {
                let s: Submitted = resp
                    .into_json()
                    .with_context(|| format!("the answer of {url} is not a submission reply"))?;
                return Ok((s, retries));
            }
            Err(ureq::Error::Status(503, resp)) if Instant::now() < deadline => {
                let wait = resp
                    .header("Retry-After")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(5);
                retries += 1;
                std::thread::sleep(Duration::from_millis(wait * 1000 / 4 + 50));
            }
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                anyhow::bail!("{url} answered {code}: {text}");
            }
            Err(e) => return Err(anyhow::anyhow!("{url} failed: {e}")),
        }
    }
}

/// Submit `opts.builds` builds; returns the report.
pub fn run_submit(opts: &SubmitOptions) -> anyhow::Result<SubmitReport> {
    anyhow::ensure!(opts.clients > 0, "--clients must be at least 1");
    let deadline = Instant::now() + opts.deadline;
    let t0 = Instant::now();
    let store_dir = StoreDir::new(&opts.store_dir)
        .with_context(|| format!("{} cannot be a store dir", opts.store_dir))?;
    let mut gen = DrvGen::new(store_dir, &opts.system, &opts.run, opts.drv_bytes);
    let url = format!("{}/api/v1/builds", opts.client_url.trim_end_matches('/'));
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .build();
    let token = opts.token.as_deref();
    if opts.inputs > 0 {
        let inputs = gen.make_inputs(opts.inputs)?;
        post(&agent, &url, token, &body(inputs)?, deadline)
            .context("failed to submit the input derivations")?;
    }
    let prepared = Arc::new(prepare(opts, &gen)?);
    let prepare_s = t0.elapsed().as_secs_f64();
    let request_bytes_mean = if prepared.bodies.is_empty() {
        0.0
    } else {
        prepared.bodies.iter().map(Vec::len).sum::<usize>() as f64 / prepared.bodies.len() as f64
    };

    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let existing = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Latencies::default()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let before = opts.watch.read();
    let own_before = cpu_ms(std::process::id() as i32).ok();
    let started = Instant::now();
    let threads: Vec<_> = (0..opts.clients)
        .map(|_| {
            let (p, next, acked, existing, retries, requests, lat, errors) = (
                prepared.clone(),
                next.clone(),
                acked.clone(),
                existing.clone(),
                retries.clone(),
                requests.clone(),
                lat.clone(),
                errors.clone(),
            );
            let url = url.clone();
            let token = opts.token.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_secs(10))
                    .build();
                let mut mine = Latencies::default();
                // Bounded by the number of requests and the deadline.
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= p.bodies.len() || Instant::now() >= deadline {
                        break;
                    }
                    let t = Instant::now();
                    match post(&agent, &url, token.as_deref(), &p.bodies[i], deadline) {
                        Ok((s, r)) => {
                            mine.push(t.elapsed());
                            requests.fetch_add(1 + r, Ordering::Relaxed);
                            retries.fetch_add(r, Ordering::Relaxed);
                            let old = s.builds.iter().filter(|b| b.existing).count() as u64;
                            existing.fetch_add(old, Ordering::Relaxed);
                            acked.fetch_add(s.builds.len() as u64 - old, Ordering::Relaxed);
                            if s.builds.len() != p.builds[i] {
                                push(
                                    &errors,
                                    format!(
                                        "request {i}: {} builds answered for {} submitted",
                                        s.builds.len(),
                                        p.builds[i]
                                    ),
                                );
                            }
                        }
                        Err(e) => {
                            requests.fetch_add(1, Ordering::Relaxed);
                            push(&errors, format!("request {i}: {e:#}"));
                        }
                    }
                }
                lat.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
            })
        })
        .collect();
    for t in threads {
        if t.join().is_err() {
            push(&errors, "a submitting thread panicked".to_string());
        }
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let own_after = cpu_ms(std::process::id() as i32).ok();
    let after = opts.watch.read();
    let acked = acked.load(Ordering::SeqCst);
    let requests = requests.load(Ordering::SeqCst);
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let latency = lat.lock().unwrap_or_else(|p| p.into_inner()).summary();
    Ok(SubmitReport {
        clients: opts.clients,
        builds_per_request: opts.per_request,
        inputs_per_build: opts.inputs,
        builds_wanted: opts.builds,
        builds_acknowledged: acked,
        builds_existing: existing.load(Ordering::SeqCst),
        requests,
        retries: retries.load(Ordering::SeqCst),
        drv_bytes_mean: round3(prepared.drv_bytes_mean),
        request_bytes_mean: round3(request_bytes_mean),
        prepare_s: round3(prepare_s),
        elapsed_s: round3(elapsed),
        builds_per_s: round3(acked as f64 / elapsed),
        requests_per_s: round3(requests as f64 / elapsed),
        latency,
        coordinator: before.until(&after, acked),
        generator_cpu_ms: own_before.zip(own_after).map(|(a, b)| round3(b - a)),
        timed_out: Instant::now() >= deadline && acked < opts.builds,
        errors,
    })
}

fn push(v: &Mutex<Vec<String>>, s: String) {
    tracing::warn!(error = %s, "load submission failed");
    let mut v = v.lock().unwrap_or_else(|p| p.into_inner());
    if v.len() < 20 {
        v.push(s);
    }
}
