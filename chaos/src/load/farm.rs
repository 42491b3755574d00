//! The `farm` benchmark (`kiln-chaos load bench farm`, [4/8] "500 builds with real agents",
//! [7/8] item 2 with `--tls`): a real `kiln coordinator` on a fresh work directory and N real
//! `kiln-agent` processes (native executor, `--max-parallel-builds` slots each) on 127.0.0.1,
//! then two measured phases on the same farm:
//!
//! 1. `builds` independent trivial derivations (`/bin/sh -c 'echo … > $out'`), submitted with
//!    one `kiln submit`; from the submission to the last success: builds/s, the coordinator's
//!    CPU per build (its own utime+stime from `/proc/PID/stat`), the agents' CPU per build (the
//!    agent processes' own time) and the builders' (the agents' `cutime+cstime`: reaped
//!    children).
//! 2. a chain of `chain` derivations, each reading the previous one's output: ms per hop
//!    (total / links) and the distribution of hops from the build records' `finished_ms`.
//!
//! Everything the driver asks of the coordinator goes through the binaries under test: the
//! `kiln` CLI of that build registers the agents (`kiln agent new`) and submits (`kiln
//! submit --json`), so the same driver runs an older build. What it reads itself is what both
//! versions serve alike: `/metrics` (`kiln_builds_finished_total`, polled every
//! [`POLL`]), `GET /api/v1/agents` and `GET /api/v1/builds/{id}` (read as plain JSON). The
//! one adaptation per version: a `kiln` without `token`/`tls` commands ([`Cli::Legacy`], e.g.
//! `ea69c00`) gets no `[tls]` section and no client token (it has neither), and `--tls` is
//! refused for it.
//!
//! `--tls`: `kiln tls init` certificates; both listeners serve TLS, the agent listener asks
//! for client certificates (mutual TLS, the agents present `agent.pem`), the client API needs
//! an admin token (made offline with `kiln token new --state-dir`), agents and the CLI trust
//! only the CA (`--ca-file`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln::derivation::{drv_path, Derivation, DerivationOutput, PathComputer, StoreDir, StorePath};
use serde::Serialize;

use super::coordinator::LoadCoordinator;
use super::stats::{cpu_ms, cpu_with_children_ms, loadavg, round3, Latencies, LatencySummary};
use crate::procs::{log_tail, Child};

/// How often the driver reads the coordinator's `/metrics` while it waits for builds.
pub const POLL: Duration = Duration::from_millis(50);

/// Which `kiln` the driver talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cli {
    /// Has `kiln token` and `kiln tls` (client tokens, TLS): today's code.
    Current,
    /// Has neither (commit `ea69c00`, [2/8]): no TLS, no client tokens.
    Legacy,
}

/// How to run the farm benchmark.
#[derive(Debug, Clone)]
pub struct FarmOptions {
    pub quick: bool,
    pub kiln: PathBuf,
    pub agent: PathBuf,
    /// Work directory (state, store, logs); kept. A temporary one (removed) when `None`.
    pub work_dir: Option<PathBuf>,
    /// Independent builds (default 500, quick 20).
    pub builds: Option<u64>,
    /// Agent processes (default 4, quick 2).
    pub agents: Option<usize>,
    /// Build slots per agent (default 4).
    pub slots: Option<u32>,
    /// Links of the dependency chain (default 50, quick 5; 0 = no chain).
    pub chain: Option<usize>,
    pub tls: bool,
    /// Record `perf` profiles (cpu-clock, flat: release builds have no frame pointers) of the coordinator and of the first
    /// agent during phase 1 into this directory (`coordinator.data`, `agent.data`).
    pub perf_dir: Option<PathBuf>,
}

/// Phase 1: independent builds.
#[derive(Debug, Clone, Serialize)]
pub struct BuildsPhase {
    pub builds: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// From just before `kiln submit` started to the poll that saw the last success.
    pub elapsed_s: f64,
    pub builds_per_s: f64,
    /// How long `kiln submit` took (its answer, not the builds).
    pub submit_s: f64,
    pub coordinator_cpu_ms: f64,
    pub coordinator_cpu_ms_per_build: f64,
    /// Sum over the agent processes, their own time (children excluded).
    pub agents_cpu_ms: f64,
    pub agent_cpu_ms_per_build: f64,
    /// The builders: the agents' reaped children (`cutime+cstime`).
    pub builders_cpu_ms: f64,
    pub builder_cpu_ms_per_build: f64,
    /// `/metrics` reads during the phase (their CPU is in the coordinator's figure; see
    /// `FarmReport::scrape_cpu_ms_each`).
    pub scrapes: u64,
}

/// Phase 2: the dependency chain.
#[derive(Debug, Clone, Serialize)]
pub struct ChainPhase {
    pub links: usize,
    pub succeeded: usize,
    pub total_ms: f64,
    /// `total_ms / links`.
    pub ms_per_hop: f64,
    /// One per link: its `finished_ms` minus the one before's (the first: minus the
    /// submission's start), from the coordinator's build records (ms resolution).
    pub hops: LatencySummary,
    pub hop_ms: Vec<u64>,
    /// One per link: `started_ms` minus the previous link's `finished_ms` (handing out the
    /// next build), and `finished_ms - started_ms` (running, uploading, reporting).
    pub handoff: LatencySummary,
    pub run: LatencySummary,
    pub coordinator_cpu_ms_per_hop: f64,
    pub agents_cpu_ms_per_hop: f64,
    /// Links that did not succeed: `<id> <state>: <reason>` (at most 5).
    pub failures: Vec<String>,
}

/// The report of one farm run.
#[derive(Debug, Clone, Serialize)]
pub struct FarmReport {
    pub workload: &'static str,
    pub mode: &'static str,
    pub cli: Cli,
    pub kiln: String,
    pub tls: bool,
    pub agents: usize,
    pub slots: u32,
    pub load_before: String,
    pub load_after: String,
    pub system: String,
    /// The coordinator's CPU per `/metrics` read, measured on the idle farm before phase 1.
    pub scrape_cpu_ms_each: f64,
    pub phase_builds: BuildsPhase,
    pub phase_chain: Option<ChainPhase>,
    pub coordinator_rss_bytes_after: Option<u64>,
    pub coordinator_stopped_cleanly: bool,
    /// Every build succeeded, every chain link succeeded, the coordinator stopped cleanly.
    pub passed: bool,
}

/// Which `kiln` this is: `kiln token --help` exists only where client tokens do.
pub fn detect_cli(kiln: &Path) -> anyhow::Result<Cli> {
    let st = Command::new(kiln)
        .args(["token", "--help"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .with_context(|| format!("failed to run {} token --help", kiln.display()))?;
    Ok(if st.success() {
        Cli::Current
    } else {
        Cli::Legacy
    })
}

/// One generated derivation: written to the store dir for `kiln submit`.
struct Made {
    drv_path: String,
    out_path: String,
}

/// A trivial derivation called `name`; with `prev`, it reads `prev`'s output (a chain link).
fn make_drv(
    store: &StoreDir,
    system: &str,
    name: &str,
    prev: Option<&Made>,
) -> anyhow::Result<Made> {
    let script = match prev {
        None => "echo \"$name\" > \"$out\"",
        // Shell builtins only: builders run with PATH=/path-not-set, as Nix's do.
        Some(_) => "read -r x < \"$prev\" && echo \"$name after ${x%% *}\" > \"$out\"",
    };
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"builder".to_vec(), b"/bin/sh".to_vec()),
        (b"name".to_vec(), name.as_bytes().to_vec()),
        (b"out".to_vec(), Vec::new()),
        (b"system".to_vec(), system.as_bytes().to_vec()),
    ];
    if let Some(p) = prev {
        env.push((b"prev".to_vec(), p.out_path.clone().into_bytes()));
    }
    env.sort();
    let mut drv = Derivation {
        outputs: vec![(b"out".to_vec(), DerivationOutput::default())],
        input_drvs: prev
            .map(|p| vec![(p.drv_path.clone().into_bytes(), vec![b"out".to_vec()])])
            .unwrap_or_default(),
        input_srcs: vec![],
        platform: system.as_bytes().to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), script.as_bytes().to_vec()],
        env,
    };
    // Inputs (the chain before this link) are read back from the store dir, where they were
    // written: the modulo hash recurses through all of them.
    let mut loader = |p: &StorePath| -> anyhow::Result<Derivation> {
        let full = store.full_path(p);
        let bytes = std::fs::read(&full).with_context(|| format!("failed to read {full}"))?;
        Derivation::parse(&bytes).with_context(|| format!("{full} is not a valid .drv"))
    };
    let mut pc = PathComputer::new(store.clone(), &mut loader);
    let out = pc
        .output_paths(&drv)
        .with_context(|| format!("failed to compute the output path of {name}"))?
        .into_iter()
        .next()
        .and_then(|(_, p)| p)
        .with_context(|| format!("{name} has no input-addressed output path"))?;
    let out_path = store.full_path(&out);
    drv.outputs[0].1.path = out_path.clone().into_bytes();
    if let Some((_, v)) = drv.env.iter_mut().find(|(k, _)| k == b"out") {
        *v = out_path.clone().into_bytes();
    }
    let path = drv_path(store, &drv)
        .with_context(|| format!("failed to compute the .drv path of {name}"))?;
    let drv_path = store.full_path(&path);
    std::fs::write(&drv_path, drv.print())
        .with_context(|| format!("failed to write {drv_path}"))?;
    Ok(Made { drv_path, out_path })
}

/// The running farm: the coordinator, the agents, and how to reach them.
struct Farm {
    kiln: PathBuf,
    cli: Cli,
    coord: Option<LoadCoordinator>,
    agents: Vec<Child>,
    /// `--token-file` and `--ca-file` for the CLI (TLS runs).
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    /// Client certificate and key (mutual TLS on the agent listener).
    identity: Option<(PathBuf, PathBuf)>,
    /// The `/metrics` reader (with the CA and the client certificate under TLS).
    http: ureq::Agent,
    client: kiln::client::http::Client,
}

impl Farm {
    fn coord(&self) -> anyhow::Result<&LoadCoordinator> {
        self.coord
            .as_ref()
            .context("the coordinator was already stopped")
    }

    /// Run `kiln ARGS… --coordinator <client url> [--token-file --ca-file]`; its stdout.
    fn kiln_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.kiln);
        cmd.args(args)
            .args(["--coordinator", &self.coord()?.client_url]);
        if let Some(t) = &self.token_file {
            cmd.arg("--token-file").arg(t);
        }
        if let Some(c) = &self.ca_file {
            cmd.arg("--ca-file").arg(c);
        }
        let out = cmd
            .env_remove("KILN_TOKEN")
            .output()
            .with_context(|| format!("failed to run {} {}", self.kiln.display(), args[0]))?;
        anyhow::ensure!(
            out.status.success(),
            "`kiln {}` failed ({}): {}",
            args.iter().take(3).cloned().collect::<Vec<_>>().join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8(out.stdout).context("kiln printed something that is not UTF-8")
    }

    /// `kiln_builds_finished_total` by result: (succeeded, failed).
    fn finished(&self) -> anyhow::Result<(u64, u64)> {
        let url = format!("{}/metrics", self.coord()?.agent_url);
        let text = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(10))
            .call()
            .with_context(|| format!("failed to read {url}"))?
            .into_string()
            .with_context(|| format!("failed to read the body of {url}"))?;
        let (mut ok, mut failed) = (0.0, 0.0);
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if !name.starts_with("kiln_builds_finished_total{") {
                continue;
            }
            let v = value.trim().parse::<f64>().unwrap_or(0.0);
            if name.contains("result=\"succeeded\"") {
                ok += v;
            } else if name.contains("result=\"failed\"") {
                failed += v;
            }
        }
        Ok((ok as u64, failed as u64))
    }

    /// Poll `/metrics` until `want` builds succeeded in all (error on a failure or at the
    /// deadline); returns the reads made.
    fn wait_succeeded(&self, want: u64, deadline: Instant) -> anyhow::Result<(u64, u64)> {
        let mut reads = 0;
        // Bounded by `deadline`.
        loop {
            let (ok, failed) = self.finished()?;
            reads += 1;
            if ok >= want || failed > 0 {
                return Ok((reads, failed));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {ok} of {want} builds succeeded before the deadline; see the logs in the work directory"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Own and children CPU of the coordinator and of the agents (sums), in ms.
    fn cpu(&self) -> anyhow::Result<(f64, f64, f64)> {
        let coord = cpu_ms(self.coord()?.pid)?;
        let (mut own, mut children) = (0.0, 0.0);
        for a in &self.agents {
            let (o, c) = cpu_with_children_ms(a.pid())?;
            own += o;
            children += c;
        }
        Ok((coord, own, children))
    }

    /// `kiln submit --json` of `paths`; the build id of each `.drv` path, in order.
    fn submit(&self, store: &Path, paths: &[String]) -> anyhow::Result<Vec<String>> {
        let store = store.to_str().context("the store dir is not UTF-8")?;
        let mut args = vec!["submit", "--json", "--store-dir", store];
        args.extend(paths.iter().map(String::as_str));
        let out = self.kiln_cli(&args)?;
        let v: serde_json::Value =
            serde_json::from_str(&out).context("`kiln submit --json` printed no JSON")?;
        let builds = v["builds"]
            .as_array()
            .context("`kiln submit --json` printed no `builds` list")?;
        let mut ids = std::collections::BTreeMap::new();
        for b in builds {
            let id = match &b["id"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if let Some(p) = b["drv_path"].as_str() {
                ids.insert(p.to_string(), id);
            }
        }
        paths
            .iter()
            .map(|p| {
                ids.get(p)
                    .cloned()
                    .with_context(|| format!("`kiln submit` returned no build for {p}"))
            })
            .collect()
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.stop(Duration::from_secs(10));
        }
    }
}

/// Run the farm benchmark.
pub fn run_farm(opts: &FarmOptions) -> anyhow::Result<FarmReport> {
    let tmp;
    let dir: &Path = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("failed to create {}", d.display()))?;
            d.as_path()
        }
        None => {
            tmp = super::bench::TempDir::new()?;
            tmp.path()
        }
    };
    let cli = detect_cli(&opts.kiln)?;
    anyhow::ensure!(
        !(opts.tls && cli == Cli::Legacy),
        "{} has no `kiln tls` or client tokens: --tls needs today's kiln",
        opts.kiln.display()
    );
    let builds = opts.builds.unwrap_or(if opts.quick { 20 } else { 500 });
    let n_agents = opts.agents.unwrap_or(if opts.quick { 2 } else { 4 });
    let slots = opts.slots.unwrap_or(4);
    let links = opts.chain.unwrap_or(if opts.quick { 5 } else { 50 });
    anyhow::ensure!(
        builds > 0 && n_agents > 0,
        "--builds and --agents must be at least 1"
    );
    let deadline_total = Duration::from_secs(if opts.quick { 120 } else { 900 });
    let started = Instant::now();
    let load_before = loadavg();
    let system = kiln::client::graph::default_system();

    // The derivations, written to the store dir before anything starts.
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("failed to create {}", store_dir.display()))?;
    let store = StoreDir::new(&store_dir)
        .with_context(|| format!("{} cannot be a store directory", store_dir.display()))?;
    let mut independent = Vec::with_capacity(builds as usize);
    for i in 0..builds {
        independent.push(make_drv(&store, &system, &format!("farm-{i}"), None)?.drv_path);
    }
    let mut chain: Vec<Made> = Vec::with_capacity(links);
    for i in 0..links {
        let m = make_drv(&store, &system, &format!("chain-{i}"), chain.last())?;
        chain.push(m);
    }

    // The coordinator.
    let state_dir = dir.join("state");
    let mut config = format!(
        "# Written by kiln-chaos load bench farm; keys in docs/configuration.md.\n\
         store_dir = {}\n",
        toml::Value::String(
            store_dir
                .to_str()
                .context("the store dir is not UTF-8")?
                .into()
        )
    );
    let (mut token_file, mut ca_file, mut identity) = (None, None, None);
    if opts.tls {
        let tls_dir = dir.join("tls");
        let files = kiln::http::tls::init(&tls_dir, &["localhost".into(), "127.0.0.1".into()])
            .with_context(|| format!("failed to make certificates in {}", tls_dir.display()))?;
        let s = |p: &Path| -> anyhow::Result<String> {
            Ok(
                toml::Value::String(p.to_str().context("a TLS path is not UTF-8")?.into())
                    .to_string(),
            )
        };
        config.push_str(&format!(
            "\n[tls]\ncert_file = {}\nkey_file = {}\nagent_client_ca_file = {}\n",
            s(&files.server_cert)?,
            s(&files.server_key)?,
            s(&files.ca)?
        ));
        let tf = dir.join("admin.token");
        let created = kiln::client::cli::create_token_offline(
            &state_dir,
            "farm",
            kiln::protocol::Scope::Admin,
        )
        .context("failed to make the admin client token")?;
        kiln::client::cli::write_secret(&tf, &created.token)?;
        token_file = Some(tf);
        ca_file = Some(files.ca.clone());
        identity = Some((files.agent_cert.clone(), files.agent_key.clone()));
    }
    let config_path = dir.join("coordinator.toml");
    std::fs::write(&config_path, &config)
        .with_context(|| format!("failed to write {}", config_path.display()))?;
    let coord = LoadCoordinator::launch(
        &opts.kiln,
        dir,
        &config_path,
        store_dir.clone(),
        String::new(),
        opts.tls,
    )?;
    let mut http = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10));
    if let (Some(ca), Some((cert, key))) = (&ca_file, &identity) {
        kiln::http::tls::install_default_provider();
        let c = kiln::http::tls::client_config(ca, Some((cert, key)))?;
        http = http.tls_config(std::sync::Arc::new(c));
    }
    let token = match &token_file {
        Some(t) => Some(
            std::fs::read_to_string(t)
                .with_context(|| format!("failed to read {}", t.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let client = kiln::client::http::Client::with_ca(&coord.client_url, token, ca_file.as_deref())?;
    let mut farm = Farm {
        kiln: opts.kiln.clone(),
        cli,
        coord: Some(coord),
        agents: Vec::new(),
        token_file,
        ca_file,
        identity,
        http: http.build(),
        client,
    };
    let result = run_phases(
        &mut farm,
        opts,
        dir,
        &store_dir,
        &independent,
        &chain,
        builds,
        n_agents,
        slots,
        started + deadline_total,
    );
    for a in &mut farm.agents {
        a.stop(Duration::from_secs(30));
    }
    let coord = farm.coord.take().context("the coordinator is gone")?;
    let rss = coord.rss_bytes();
    let log = coord.log.clone();
    let clean = coord.stop(Duration::from_secs(60));
    let (phase_builds, phase_chain, scrape_cpu) =
        result.with_context(|| format!("the coordinator's log is {}", log.display()))?;
    let passed = clean
        && phase_builds.succeeded == builds
        && phase_builds.failed == 0
        && phase_chain
            .as_ref()
            .is_none_or(|c| c.succeeded == c.links && c.hop_ms.len() == c.links);
    Ok(FarmReport {
        workload: "farm",
        mode: if opts.quick { "quick" } else { "full" },
        cli: farm.cli,
        kiln: opts.kiln.display().to_string(),
        tls: opts.tls,
        agents: n_agents,
        slots,
        load_before,
        load_after: loadavg(),
        system,
        scrape_cpu_ms_each: scrape_cpu,
        phase_builds,
        phase_chain,
        coordinator_rss_bytes_after: rss,
        coordinator_stopped_cleanly: clean,
        passed,
    })
}

/// Register and start the agents, then the two phases.
#[allow(clippy::too_many_arguments)]
fn run_phases(
    farm: &mut Farm,
    opts: &FarmOptions,
    dir: &Path,
    store_dir: &Path,
    independent: &[String],
    chain: &[Made],
    builds: u64,
    n_agents: usize,
    slots: u32,
    deadline: Instant,
) -> anyhow::Result<(BuildsPhase, Option<ChainPhase>, f64)> {
    let system = kiln::client::graph::default_system();
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    for i in 1..=n_agents {
        let name = format!("agent-{i}");
        let secret = dir.join(format!("{name}.secret"));
        let secret_s = secret.to_str().context("the work dir is not UTF-8")?;
        farm.kiln_cli(&[
            "agent",
            "new",
            &name,
            "--system",
            &system,
            "--secret-file",
            secret_s,
        ])?;
        let state = dir.join("agents").join(&name);
        std::fs::create_dir_all(&state)
            .with_context(|| format!("failed to create {}", state.display()))?;
        let mut cmd = Command::new(&opts.agent);
        cmd.arg("--coordinator")
            .arg(&farm.coord()?.agent_url)
            .args(["--name", &name])
            .arg("--secret-file")
            .arg(&secret)
            .args(["--system", &system])
            .arg("--store-dir")
            .arg(store_dir)
            .arg("--state-dir")
            .arg(&state)
            .args(["--executor", "native"])
            .args(["--max-parallel-builds", &slots.to_string()])
            .env("RUST_LOG", "warn");
        if let Some(ca) = &farm.ca_file {
            cmd.arg("--ca-file").arg(ca);
        }
        if let Some((cert, key)) = &farm.identity {
            cmd.arg("--client-cert")
                .arg(cert)
                .arg("--client-key")
                .arg(key);
        }
        let log = logs.join(format!("{name}.log"));
        farm.agents.push(Child::spawn(&name, cmd, &log)?);
    }
    // Every agent connected (its session open) before anything is measured.
    let connected_by = Instant::now() + Duration::from_secs(60);
    // Bounded by `connected_by`.
    loop {
        let v: serde_json::Value = farm
            .client
            .get_json("agents", &[])
            .context("failed to list the agents")?;
        let connected = v
            .as_array()
            .map(|a| a.iter().filter(|x| x["status"] == "connected").count())
            .unwrap_or(0);
        if connected == n_agents {
            break;
        }
        for a in &mut farm.agents {
            if let Some(st) = a.exited() {
                anyhow::bail!(
                    "{} exited ({st}) before it connected; the end of its log:\n{}",
                    a.name,
                    log_tail(&a.log, 20)
                );
            }
        }
        anyhow::ensure!(
            Instant::now() < connected_by,
            "only {connected} of {n_agents} agents connected within 60 s; see {}",
            logs.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // What one `/metrics` read costs the coordinator, on the idle farm.
    let pid = farm.coord()?.pid;
    let c0 = cpu_ms(pid)?;
    const CALIBRATION_READS: u32 = 40;
    for _ in 0..CALIBRATION_READS {
        farm.finished()?;
    }
    let scrape_cpu = round3((cpu_ms(pid)? - c0) / f64::from(CALIBRATION_READS));

    // Phase 1.
    let perf = match &opts.perf_dir {
        Some(d) => Some(start_perf(d, pid, farm.agents[0].pid())?),
        None => None,
    };
    let (c0, a0, b0) = farm.cpu()?;
    let t0 = Instant::now();
    farm.submit(store_dir, independent)?;
    let submit_s = t0.elapsed().as_secs_f64();
    let (scrapes, failed) = farm.wait_succeeded(builds, deadline)?;
    let elapsed = t0.elapsed().as_secs_f64();
    let (c1, a1, b1) = farm.cpu()?;
    if let Some(p) = perf {
        stop_perf(p);
    }
    let (succeeded, failed_now) = farm.finished()?;
    let per = |v: f64| round3(v / builds as f64);
    let phase_builds = BuildsPhase {
        builds,
        succeeded,
        failed: failed.max(failed_now),
        elapsed_s: round3(elapsed),
        builds_per_s: round3(builds as f64 / elapsed),
        submit_s: round3(submit_s),
        coordinator_cpu_ms: round3(c1 - c0),
        coordinator_cpu_ms_per_build: per(c1 - c0),
        agents_cpu_ms: round3(a1 - a0),
        agent_cpu_ms_per_build: per(a1 - a0),
        builders_cpu_ms: round3(b1 - b0),
        builder_cpu_ms_per_build: per(b1 - b0),
        scrapes,
    };
    if chain.is_empty() || phase_builds.failed > 0 {
        return Ok((phase_builds, None, scrape_cpu));
    }

    // Phase 2.
    let paths: Vec<String> = chain.iter().map(|m| m.drv_path.clone()).collect();
    let (c0, a0, _) = farm.cpu()?;
    let submit_ms = kiln::client::cli::now_ms();
    let t0 = Instant::now();
    let ids = farm.submit(store_dir, &paths)?;
    farm.wait_succeeded(builds + chain.len() as u64, deadline)?;
    let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (c1, a1, _) = farm.cpu()?;
    let (mut hops, mut handoff, mut run) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let mut hop_ms = Vec::with_capacity(ids.len());
    let mut succeeded = 0;
    let mut failures = Vec::new();
    let mut prev_finished = submit_ms;
    for id in &ids {
        let d: serde_json::Value = farm
            .client
            .get_json(&format!("builds/{id}"), &[])
            .with_context(|| format!("failed to read build {id}"))?;
        if d["summary"]["state"] == "succeeded" {
            succeeded += 1;
        } else if failures.len() < 5 {
            failures.push(format!(
                "{id} {}: {}",
                d["summary"]["state"],
                d["reason"].as_str().unwrap_or("no reason given")
            ));
        }
        let (Some(s), Some(f)) = (d["started_ms"].as_u64(), d["finished_ms"].as_u64()) else {
            continue;
        };
        let hop = f.saturating_sub(prev_finished);
        hop_ms.push(hop);
        hops.push(Duration::from_millis(hop));
        handoff.push(Duration::from_millis(s.saturating_sub(prev_finished)));
        run.push(Duration::from_millis(f.saturating_sub(s)));
        prev_finished = f;
    }
    let links = chain.len();
    Ok((
        phase_builds,
        Some(ChainPhase {
            links,
            succeeded,
            total_ms: round3(total_ms),
            ms_per_hop: round3(total_ms / links as f64),
            hops: hops.summary(),
            hop_ms,
            handoff: handoff.summary(),
            run: run.summary(),
            coordinator_cpu_ms_per_hop: round3((c1 - c0) / links as f64),
            agents_cpu_ms_per_hop: round3((a1 - a0) / links as f64),
            failures,
        }),
        scrape_cpu,
    ))
}

/// `perf record` of the coordinator and of one agent (cpu-clock, the only event this VM has).
fn start_perf(
    dir: &Path,
    coordinator: i32,
    agent: i32,
) -> anyhow::Result<Vec<std::process::Child>> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut out = Vec::new();
    for (what, pid) in [("coordinator", coordinator), ("agent", agent)] {
        let data = dir.join(format!("{what}.data"));
        let c = Command::new("perf")
            .args(["record", "-q", "-F", "999", "-e", "cpu-clock", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("failed to start perf (is /usr/bin/perf there?)")?;
        out.push(c);
    }
    // perf needs a moment to attach; a bounded sleep, not synchronisation of the farm.
    std::thread::sleep(Duration::from_millis(500));
    Ok(out)
}

/// SIGINT each `perf record` (it writes its file) and wait for it, at most 30 s each.
fn stop_perf(children: Vec<std::process::Child>) {
    for mut c in children {
        // SAFETY: kill with a pid we started and a constant signal.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGINT);
        }
        let until = Instant::now() + Duration::from_secs(30);
        // Bounded by `until`.
        while Instant::now() < until {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
