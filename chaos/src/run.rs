//! One scenario run, start to report: generate the graph, start the coordinator, a proxy per
//! agent and the agents, submit (from a thread of its own, so a coordinator kill can land in
//! the middle of a submission), play the fault schedule while watching the builds, then stop
//! everything and check the invariants ([`crate::check`]).
//!
//! The build phase ends when every acknowledged build is done, or at the scenario's time
//! bound; the final checks are bounded too (hooks 30 s, each HTTP call 120 s, agents 20 s,
//! the coordinator 30 s), so every run ends by itself.
//!
//! Children are spawned from the calling thread (their parent-death signal follows it), so
//! call [`run`] from a thread that outlives the run: the harness uses its main thread.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln::client::procs::TempDir;
use kiln::nar::signing::SecretKey;

use crate::check::Loss;
use crate::evidence;
use crate::farm::Farm;
use crate::finish::finish;
use crate::graph::{self, ChaosGraph};
use crate::proxy::{FaultPlan, Mode, Proxy, ProxyConfig, ProxyTls};
use crate::report::Report;
use crate::rng::Rng;
use crate::scenario::Scenario;
use crate::schedule::{timeline, Step};
use crate::submitter::{submit_batches, Submissions};

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides the scenario's seed.
    pub seed: Option<u64>,
    /// Run here instead of a fresh temporary directory (never removed).
    pub work_dir: Option<PathBuf>,
    /// Keep the temporary directory even when the run passes.
    pub keep: bool,
    /// Where `kiln` and `kiln-agent` are (else `KILN_BIN_DIR`, else next to this executable).
    pub bin_dir: Option<OsString>,
    /// The scenario file, for the "reproduce" line.
    pub scenario_path: Option<PathBuf>,
    /// Run over TLS even if the scenario does not say `tls = true` (`--tls`).
    pub tls: bool,
}

/// A fresh seed from the clock and the pid.
pub fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Rng::derive(t, &[u64::from(std::process::id())]).next_u64() % 1_000_000_000
}

pub(crate) fn now_ms() -> u64 {
    kiln::client::cli::now_ms()
}

/// Build id -> state, from the client API (`None` while the coordinator is down).
pub(crate) fn poll_states(
    h: &ureq::Agent,
    client_url: &str,
    token: &str,
) -> Option<BTreeMap<u64, String>> {
    let v: serde_json::Value = h
        .get(&format!("{client_url}/api/v1/builds"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .ok()?
        .into_json()
        .ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter_map(|b| {
                Some((
                    b.get("id")?.as_u64()?,
                    b.get("state")?.as_str()?.to_string(),
                ))
            })
            .collect(),
    )
}

fn count_building(h: &ureq::Agent, client_url: &str, token: &str) -> Option<usize> {
    let v: serde_json::Value = h
        .get(&format!("{client_url}/api/v1/builds?state=building"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .ok()?
        .into_json()
        .ok()?;
    Some(v.as_array()?.len())
}

pub(crate) fn scrape(h: &ureq::Agent, url: &str) -> Option<String> {
    h.get(url).call().ok()?.into_string().ok()
}

/// Everything mutable the run keeps while it plays.
pub(crate) struct Live {
    pub(crate) farm: Farm,
    pub(crate) proxies: Vec<Proxy>,
    /// Agent kills, and every loss (kills and window starts), for the checker.
    pub(crate) kills: Vec<Loss>,
    pub(crate) losses: Vec<Loss>,
    /// Processes that died unasked, and other problems that break `no-process-died-unasked`.
    pub(crate) crashes: Vec<String>,
    pub(crate) notes: Vec<String>,
    /// (agent index, incarnation) -> (retries, reconnects) last scraped.
    pub(crate) agent_metrics: BTreeMap<(usize, u32), (f64, f64)>,
    /// Faults the harness itself made (kills, windows), by kind.
    pub(crate) faults: BTreeMap<String, u64>,
}

impl Live {
    fn bump(&mut self, k: &str) {
        *self.faults.entry(k.to_string()).or_default() += 1;
    }

    pub(crate) fn scrape_agent(&mut self, h: &ureq::Agent, i: usize) {
        let a = &self.farm.agents[i];
        if a.child.is_none() {
            return;
        }
        if let Some(text) = scrape(h, &format!("http://{}/metrics", a.metrics_addr)) {
            let retries = evidence::metric_sum(&text, "kiln_agent_retries_total").unwrap_or(0.0);
            let reconnects =
                evidence::metric_sum(&text, "kiln_agent_reconnects_total").unwrap_or(0.0);
            self.agent_metrics
                .insert((i, a.incarnations), (retries, reconnects));
        }
    }

    fn kill_agent(&mut self, h: &ureq::Agent, i: usize, kind: &str) {
        self.scrape_agent(h, i);
        self.farm.kill_agent(i);
        let loss = Loss {
            t_ms: now_ms(),
            agent: self.farm.agents[i].name.clone(),
            kind: kind.to_string(),
        };
        self.kills.push(loss.clone());
        self.losses.push(loss);
        self.bump("agent_kills");
    }
}

/// Run `scenario` and report. `Err` only when the harness itself could not run (a missing
/// binary, a coordinator that never starts); broken invariants are in the report.
pub fn run(
    scenario: &Scenario,
    opts: &RunOptions,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Report> {
    let seed = opts.seed.or(scenario.seed).unwrap_or_else(fresh_seed);
    let bins = kiln::client::demo::find_binaries(
        opts.bin_dir
            .clone()
            .or_else(|| std::env::var_os("KILN_BIN_DIR")),
        false,
    )?;
    let mut temp = None;
    let dir = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("failed to create {}", d.display()))?;
            d.clone()
        }
        None => {
            let t = TempDir::new(&format!("kiln-chaos-{}", scenario.name))?;
            let p = t.path().to_path_buf();
            temp = Some(t);
            p
        }
    };
    eprintln!(
        "kiln-chaos: scenario {} seed {seed} in {}",
        scenario.name,
        dir.display()
    );
    let started = Instant::now();
    let tls = opts.tls || scenario.tls;
    let result = run_in(scenario, seed, tls, &dir, bins, rt);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(t) = &mut temp {
                t.keep();
            }
            return Err(e.context(format!(
                "kiln-chaos could not run scenario {} (seed {seed}); its files are in {}",
                scenario.name,
                dir.display()
            )));
        }
    };
    report.total_s = round1(started.elapsed().as_secs_f64());
    let reproduce_path = opts
        .scenario_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("chaos/scenarios/{}.toml", scenario.name));
    let tls_flag = if opts.tls && !scenario.tls {
        " --tls"
    } else {
        ""
    };
    report.reproduce = format!("kiln-chaos run {reproduce_path} --seed {seed}{tls_flag}");
    report.work_dir = dir.display().to_string();
    let json = serde_json::to_string_pretty(&report).context("failed to encode the report")?;
    std::fs::write(dir.join("report.json"), json)
        .with_context(|| format!("failed to write {}", dir.join("report.json").display()))?;
    std::fs::write(dir.join("report.txt"), report.text())
        .with_context(|| format!("failed to write {}", dir.join("report.txt").display()))?;
    if let Some(t) = &mut temp {
        if !report.passed || opts.keep {
            t.keep();
        } else {
            report.work_dir = format!("{} (removed)", report.work_dir);
        }
    }
    Ok(report)
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn run_in(
    s: &Scenario,
    seed: u64,
    tls: bool,
    dir: &Path,
    bins: kiln::client::demo::Binaries,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Report> {
    let kiln_bin = bins.kiln.clone();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    let system = kiln::client::graph::default_system();
    let graph = graph::generate(
        &dir.join("store"),
        &dir.join("stamps"),
        &s.graph,
        seed,
        &system,
    )?;
    let key = SecretKey::generate("kiln-chaos-1").context("failed to generate a signing key")?;
    let key_file = dir.join("signing.key");
    std::fs::write(&key_file, key.to_string())
        .with_context(|| format!("failed to write {}", key_file.display()))?;
    let hook_file = dir.join("hook-runs");
    crate::procs::touch(&hook_file)?;

    let mut farm = Farm::new(
        bins,
        dir,
        &dir.join("store"),
        &s.coordinator,
        &hook_file,
        &key_file,
    )?;
    if tls {
        farm.enable_tls()?;
    }
    farm.start_coordinator()?;
    // Each proxy serves the run's server certificate to its agent (it names 127.0.0.1, where
    // agents dial the proxies) and verifies the coordinator's as `localhost`.
    let proxy_tls = farm
        .tls
        .as_ref()
        .map(|t| ProxyTls::from_files(&t.cert, &t.key, &t.ca, "localhost"))
        .transpose()?;
    let upstream = farm
        .agent_addr
        .context("the coordinator gave no agent address")?;
    let plan = FaultPlan {
        seed,
        latency_ms: (s.proxy.latency_ms[0], s.proxy.latency_ms[1]),
        bandwidth: s.proxy.bandwidth_kib_s * 1024,
        connection_reset_probability: s.proxy.connection_reset_probability,
        connection_reset_after_bytes: (
            s.proxy.connection_reset_after_bytes[0],
            s.proxy.connection_reset_after_bytes[1],
        ),
        rules: s.rules(),
    };
    let mut proxies = Vec::new();
    for i in 0..s.agents.count {
        let name = format!("agent-{}", i + 1);
        let config = ProxyConfig {
            log_file: Some(logs.join(format!("proxy-{name}.jsonl"))),
            name,
            index: i as u64,
            plan: plan.clone(),
            tls: proxy_tls.clone(),
        };
        proxies.push(rt.block_on(Proxy::start(config, upstream))?);
    }
    let urls: Vec<String> = proxies.iter().map(Proxy::url).collect();
    farm.create_agents(&s.agents, &system, &urls)?;
    for i in 0..s.agents.count {
        farm.start_agent(i, &s.agents)?;
    }

    let mut live = Live {
        farm,
        proxies,
        kills: Vec::new(),
        losses: Vec::new(),
        crashes: Vec::new(),
        notes: Vec::new(),
        agent_metrics: BTreeMap::new(),
        faults: BTreeMap::new(),
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(s.time_bound_s);
    let subs = Arc::new(Submissions::default());
    let submitter = submit_batches(
        live.farm.client(),
        &graph,
        s.graph.batches,
        Duration::from_secs(s.graph.submit_spread_s),
        deadline,
        subs.clone(),
    );
    let states = play(s, seed, &graph, &mut live, &subs, t0, deadline)?;
    let build_phase = t0.elapsed();
    let _ = submitter.join();
    finish(
        s,
        seed,
        &graph,
        live,
        &subs,
        states,
        build_phase,
        dir,
        &kiln_bin,
        &key,
    )
}

/// Play the schedule until the builds are done or the deadline; returns the last states seen.
#[allow(clippy::too_many_arguments)]
fn play(
    s: &Scenario,
    seed: u64,
    graph: &ChaosGraph,
    live: &mut Live,
    subs: &Submissions,
    t0: Instant,
    deadline: Instant,
) -> anyhow::Result<BTreeMap<u64, String>> {
    let h = live
        .farm
        .http(Duration::from_secs(2), Duration::from_secs(10));
    let client_url = live.farm.client_url();
    let mut steps = timeline(s, seed);
    steps.reverse();
    let mut states: BTreeMap<u64, String> = BTreeMap::new();
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    let mut last_scrape = Instant::now();
    let mut last_counts = (usize::MAX, usize::MAX);
    // (when the kill was due, its restart delay range, its repetition key)
    let mut armed: Option<(Instant, Option<[f64; 2]>, u64)> = None;
    let mut building_seen: (Instant, usize) = (Instant::now(), 0);
    // Bounded by `deadline`: every turn sleeps at least 5 ms.
    while Instant::now() < deadline {
        let now = Instant::now();
        while steps.last().is_some_and(|(at, _)| t0 + *at <= now) {
            let Some((_, step)) = steps.pop() else { break };
            apply(s, seed, live, &h, step, t0, &mut steps, &mut armed);
        }
        if let Some((_, restart, rep)) = armed {
            if now.duration_since(building_seen.0) > Duration::from_millis(100) {
                building_seen = (
                    now,
                    count_building(&h, &client_url, &live.farm.token).unwrap_or(0),
                );
            }
            let uploading: u64 = live.proxies.iter().map(Proxy::uploads_in_flight).sum();
            if building_seen.1 >= 1 && uploading >= 1 {
                armed = None;
                kill_coordinator(seed, live, restart, rep)?;
                building_seen = (Instant::now(), 0);
            }
        }
        for (i, why) in live.farm.crashed_agents() {
            live.crashes.push(why);
            live.farm.start_agent(i, &s.agents)?;
        }
        if let Some(why) = live.farm.coordinator_crashed() {
            live.crashes.push(why);
            live.farm.start_coordinator()?;
        }
        if now.duration_since(last_poll) >= Duration::from_millis(500) {
            last_poll = now;
            if let Some(st) = poll_states(&h, &client_url, &live.farm.token) {
                states = st;
            }
            let acked = subs
                .acknowledged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut done = 0;
            // Builds behind a failing builder end `failed` too (input failed).
            for (id, _) in &acked {
                let st = states.get(id).map(String::as_str).unwrap_or("");
                if matches!(st, "succeeded" | "failed" | "canceled") {
                    done += 1;
                }
            }
            if (done, acked.len()) != last_counts {
                last_counts = (done, acked.len());
                eprintln!(
                    "[{:5.1} s] {done}/{} done, {} submitted",
                    t0.elapsed().as_secs_f64(),
                    graph.drvs.len(),
                    acked.len()
                );
            }
            let all_in = subs.done.load(Ordering::SeqCst);
            if all_in && done == acked.len() {
                break;
            }
        }
        if now.duration_since(last_scrape) >= Duration::from_secs(2) {
            last_scrape = now;
            for i in 0..live.farm.agents.len() {
                live.scrape_agent(&h, i);
            }
        }
        let tick = if armed.is_some() { 5 } else { 50 };
        std::thread::sleep(Duration::from_millis(tick));
    }
    if let Some((due, _, _)) = armed {
        live.notes.push(format!(
            "a coordinator kill due at {:.1} s never found a build building with an upload in flight",
            due.duration_since(t0).as_secs_f64()
        ));
    }
    let restarts_only = steps
        .iter()
        .all(|(_, step)| matches!(step, Step::RestartAgent(_) | Step::Heal { .. }));
    if !restarts_only {
        live.notes.push(format!(
            "{} schedule steps never ran: the build phase ended first",
            steps
                .iter()
                .filter(|(_, st)| !matches!(st, Step::RestartAgent(_) | Step::Heal { .. }))
                .count()
        ));
    }
    for p in &live.proxies {
        p.set_mode(Mode::Normal);
    }
    Ok(states)
}

#[allow(clippy::too_many_arguments)]
fn apply(
    s: &Scenario,
    seed: u64,
    live: &mut Live,
    h: &ureq::Agent,
    step: Step,
    t0: Instant,
    steps: &mut Vec<(Duration, Step)>,
    armed: &mut Option<(Instant, Option<[f64; 2]>, u64)>,
) {
    match step {
        Step::Window {
            agents,
            mode,
            hold,
            due,
            hold_wait,
            length,
            control_lag,
        } => {
            let now = t0.elapsed();
            if !hold.is_empty() {
                let ready = hold
                    .iter()
                    .all(|&(i, min)| live.proxies[i].held_builds() >= min);
                if !ready && now < due + hold_wait {
                    // Not yet: look again shortly (bounded by `hold_wait`).
                    let at = now + Duration::from_millis(50);
                    let pos = steps.partition_point(|(t, _)| *t > at);
                    let step = Step::Window {
                        agents,
                        mode,
                        hold,
                        due,
                        hold_wait,
                        length,
                        control_lag,
                    };
                    steps.insert(pos, (at, step));
                    return;
                }
                if !ready {
                    live.notes.push(format!(
                        "a window due at {:.1} s started after waiting {:.1} s without the agents it waits for holding their builds",
                        due.as_secs_f64(),
                        hold_wait.as_secs_f64()
                    ));
                }
                let at = now + length;
                let pos = steps.partition_point(|(t, _)| *t > at);
                steps.insert(
                    pos,
                    (
                        at,
                        Step::Heal {
                            agents: agents.clone(),
                            control_lag,
                        },
                    ),
                );
            }
            let kind = if mode == Mode::Blackhole {
                "partition"
            } else {
                "refuse"
            };
            live.bump(&format!("{kind}_windows"));
            for i in agents {
                live.proxies[i].set_mode(mode);
                live.losses.push(Loss {
                    t_ms: now_ms(),
                    agent: live.farm.agents[i].name.clone(),
                    kind: kind.to_string(),
                });
            }
        }
        Step::Heal {
            agents,
            control_lag,
        } => {
            for i in agents {
                if !control_lag.is_zero() {
                    live.proxies[i].lag_control(control_lag);
                }
                live.proxies[i].set_mode(Mode::Normal);
            }
        }
        Step::KillAgents {
            agents,
            restart,
            rep,
            random,
        } => {
            // An agent the seed picked that is down (killed before, not restarted yet) is
            // replaced by the next one up, so that a kill is never lost to the draw; an agent
            // named explicitly is not replaced.
            let n = live.farm.agents.len();
            let mut chosen: Vec<usize> = Vec::new();
            for i in agents {
                let up = |j: usize| live.farm.agents[j].child.is_some();
                let pick = if up(i) || !random {
                    Some(i)
                } else {
                    (1..n)
                        .map(|k| (i + k) % n)
                        .find(|&j| up(j) && !chosen.contains(&j))
                };
                if let Some(j) = pick.filter(|&j| up(j) && !chosen.contains(&j)) {
                    chosen.push(j);
                }
            }
            for i in chosen {
                live.kill_agent(h, i, "kill");
                if let Some(r) = restart {
                    let mut rng = Rng::derive(seed, &[0x72_73_74, rep, i as u64]);
                    let after = Duration::from_secs_f64(rng.between_f(r[0], r[1]));
                    let at = t0.elapsed() + after;
                    let pos = steps.partition_point(|(t, _)| *t > at);
                    steps.insert(pos, (at, Step::RestartAgent(i)));
                }
            }
        }
        Step::RestartAgent(i) => {
            if live.farm.agents[i].child.is_none() {
                match live.farm.start_agent(i, &s.agents) {
                    Ok(()) => live.bump("agent_restarts"),
                    Err(e) => live
                        .crashes
                        .push(format!("failed to restart agent {}: {e:#}", i + 1)),
                }
            }
        }
        Step::KillCoordinator { restart, rep } => {
            *armed = Some((Instant::now(), restart, rep));
        }
    }
}

fn kill_coordinator(
    seed: u64,
    live: &mut Live,
    restart: Option<[f64; 2]>,
    rep: u64,
) -> anyhow::Result<()> {
    live.farm.kill_coordinator();
    live.bump("coordinator_kills");
    let r = restart.unwrap_or([1.0, 1.0]);
    let mut rng = Rng::derive(seed, &[0x63_6b, rep]);
    std::thread::sleep(Duration::from_secs_f64(rng.between_f(r[0], r[1])));
    live.farm
        .start_coordinator()
        .context("the coordinator did not come back after a SIGKILL")
}
