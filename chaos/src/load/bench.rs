//! The benchmarks behind `scripts/bench`: each starts a real coordinator (the `kiln` binary
//! given, a release build in the script) on a fresh work directory on 127.0.0.1, runs one
//! workload with the load generator, checks that it did what it claims, stops the
//! coordinator (SIGTERM) and returns a JSON report. `quick` runs about 1 % of the full
//! workload (seconds; what CI runs to prove the commands work).
//!
//! - `submission` ([4/8] "durable submission"): 100 builds per request, ~1.5 KB derivations
//!   with 5 input derivations each, 4 concurrent clients, builds/s counted at the 200 OK.
//!   Full: 100,000 builds; quick: 1,000.
//! - `lifecycle` ([4/8] "full lifecycle with 100 simulated agents"): the queue is filled
//!   first (not measured), then 100 simulated agents (10 in quick mode) each ask for one build
//!   at a time (long poll), report its start, upload a 1 KiB NAR and report success; a hook
//!   runs on every `build-succeeded`. Builds/s, requests/s, flushes/s, coordinator CPU per
//!   build; afterwards every build's narinfo is fetched and checked. Full: 20,000 builds;
//!   quick: 200.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use super::agents::{run_agents, verify_narinfos, AgentsOptions, AgentsReport};
use super::coordinator::LoadCoordinator;
use super::stats::{loadavg, Watch};
use super::submit::{run_submit, SubmitOptions, SubmitReport};

/// Which workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    Submission,
    Lifecycle,
    /// Real agents: [`super::farm`] (`run_farm`), not [`run_bench`].
    Farm,
}

/// How to run a benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub quick: bool,
    /// The `kiln` binary to run as the coordinator.
    pub kiln: PathBuf,
    /// Work directory (state, store, logs); kept. A temporary one (removed) when `None`.
    pub work_dir: Option<PathBuf>,
    /// Override the number of builds.
    pub builds: Option<u64>,
    /// Override the number of simulated agents (lifecycle).
    pub agents: Option<usize>,
}

/// The report of one benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub workload: Workload,
    pub mode: &'static str,
    /// `/proc/loadavg` when the run started and when it ended.
    pub load_before: String,
    pub load_after: String,
    pub system: String,
    pub submit: SubmitReport,
    pub agents: Option<AgentsReport>,
    /// Narinfos fetched and checked after the run (lifecycle).
    pub narinfos_verified: Option<usize>,
    pub coordinator_rss_bytes_after: Option<u64>,
    pub coordinator_stopped_cleanly: bool,
    /// True when every build the run asked for was acknowledged (and, for lifecycle, built
    /// and its narinfo checked) and no request failed for good.
    pub passed: bool,
}

/// Hooks on every success, so each build writes hook work (as the [4/8] workload asks).
const HOOK: &str = "[[hooks]]\nname = \"bench\"\nevents = [\"build-succeeded\"]\n\
                    exec = [\"/bin/true\"]\nparallelism = 4\n";

/// Run one benchmark. `rt` runs the simulated agents.
pub fn run_bench(
    w: Workload,
    opts: &BenchOptions,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        w != Workload::Farm,
        "the farm workload runs real agents: use load::farm::run_farm"
    );
    let tmp;
    let dir: &Path = match &opts.work_dir {
        Some(d) => d.as_path(),
        None => {
            tmp = TempDir::new()?;
            tmp.0.as_path()
        }
    };
    let load_before = loadavg();
    let system = kiln::client::graph::default_system();
    let extra = match w {
        Workload::Submission | Workload::Farm => "",
        Workload::Lifecycle => HOOK,
    };
    let coord = LoadCoordinator::start(&opts.kiln, dir, extra)?;
    let watch = Watch {
        pid: Some(coord.pid),
        metrics_url: Some(coord.agent_url.clone()),
    };
    let store_dir = coord
        .store_dir
        .to_str()
        .context("the store dir is not UTF-8")?
        .to_string();
    let deadline = Duration::from_secs(if opts.quick { 120 } else { 1800 });
    let result = (|| -> anyhow::Result<BenchReport> {
        let (builds, inputs) = match w {
            Workload::Submission | Workload::Farm => (if opts.quick { 1_000 } else { 100_000 }, 5),
            Workload::Lifecycle => (if opts.quick { 200 } else { 20_000 }, 0),
        };
        let builds = opts.builds.unwrap_or(builds);
        let submit = run_submit(&SubmitOptions {
            client_url: coord.client_url.clone(),
            token: None,
            store_dir: store_dir.clone(),
            system: system.clone(),
            builds,
            per_request: 100,
            clients: 4,
            drv_bytes: 1536,
            inputs,
            run: "bench".to_string(),
            deadline,
            watch: watch.clone(),
        })?;
        let mut passed = submit.builds_acknowledged == builds && submit.errors.is_empty();
        let (agents, narinfos) = match w {
            Workload::Submission | Workload::Farm => (None, None),
            Workload::Lifecycle => {
                let a = AgentsOptions {
                    agent_url: coord.agent_url.clone(),
                    agents: opts.agents.unwrap_or(if opts.quick { 10 } else { 100 }),
                    slots: 1,
                    builds,
                    nar_bytes: 1024,
                    system: system.clone(),
                    registration_token: coord.registration_token.clone(),
                    name_prefix: "load".to_string(),
                    wait_ms: 5_000,
                    report_start: true,
                    deadline,
                    watch: watch.clone(),
                };
                let (report, done) = rt.block_on(run_agents(&a))?;
                let verified = verify_narinfos(&coord.agent_url, &done)?;
                passed &= report.builds_succeeded == builds
                    && report.builds_failed == 0
                    && verified as u64 == builds;
                (Some(report), Some(verified))
            }
        };
        Ok(BenchReport {
            workload: w,
            mode: if opts.quick { "quick" } else { "full" },
            load_before: load_before.clone(),
            load_after: loadavg(),
            system: system.clone(),
            submit,
            agents,
            narinfos_verified: narinfos,
            coordinator_rss_bytes_after: coord.rss_bytes(),
            coordinator_stopped_cleanly: false,
            passed,
        })
    })();
    let log = coord.log.clone();
    let clean = coord.stop(Duration::from_secs(60));
    let mut report =
        result.with_context(|| format!("the coordinator's log is {}", log.display()))?;
    report.coordinator_stopped_cleanly = clean;
    report.passed &= clean;
    Ok(report)
}

/// A temporary directory, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn new() -> anyhow::Result<TempDir> {
        let base = std::env::temp_dir().join(format!(
            "kiln-load-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&base)
            .with_context(|| format!("failed to create {}", base.display()))?;
        Ok(TempDir(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
