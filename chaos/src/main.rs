//! `kiln-chaos`: run chaos scenarios against real Kiln processes.
//!
//! `kiln-chaos run SCENARIO...` runs each scenario file once and prints its report;
//! `kiln-chaos soak --minutes N` rotates through every scenario of a directory with fresh
//! seeds until the time is up. The exit status is 0 only when every run held every invariant
//! and met its coverage; a failing run prints its seed and the command that reproduces it.
//!
//! `kiln-chaos load submit|agents|bench …` is the load generator (docs/performance.md): it
//! prints one JSON report on stdout and exits 0 only when every build it asked for went
//! through.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kiln_chaos::report::Report;
use kiln_chaos::run::{fresh_seed, run, RunOptions};
use kiln_chaos::scenario::Scenario;

/// Kiln's chaos harness: real coordinator and agents behind fault-injecting proxies.
#[derive(Debug, Parser)]
#[command(name = "kiln-chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenario files, one after the other.
    Run {
        /// Scenario files (TOML, see docs/chaos.md).
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        /// Use this seed instead of the scenario's (or a fresh one).
        #[arg(long)]
        seed: Option<u64>,
        /// Run in this directory (kept) instead of a fresh temporary one.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Keep the temporary directory even when the run passes.
        #[arg(long)]
        keep: bool,
        /// Print each report as JSON on stdout instead of text.
        #[arg(long)]
        json: bool,
        /// Run every scenario over TLS (as if it said `tls = true`).
        #[arg(long)]
        tls: bool,
    },
    /// Rotate through every scenario of a directory with fresh seeds for a while.
    Soak {
        #[arg(long)]
        minutes: u64,
        /// Directory of scenario files.
        #[arg(long, default_value = "chaos/scenarios")]
        scenarios: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The load generator: simulated agents, a submitter, and the benchmarks built on them.
    Load {
        #[command(subcommand)]
        command: LoadCommand,
    },
}

#[derive(Debug, Subcommand)]
enum LoadCommand {
    /// Fill a running coordinator's queue: N builds, in requests of `--per-request` builds,
    /// from `--clients` concurrent clients; counts builds at the 200 OK.
    Submit {
        /// The coordinator's client listener, e.g. http://127.0.0.1:8746.
        #[arg(long)]
        client_url: String,
        /// A file holding a client token with the `submit` scope (none: no token is sent).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The coordinator's store dir (the derivations' paths are computed in it).
        #[arg(long)]
        store_dir: String,
        #[arg(long)]
        builds: u64,
        #[arg(long, default_value_t = 100)]
        per_request: usize,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Approximate size of each .drv in bytes.
        #[arg(long, default_value_t = 1536)]
        drv_bytes: usize,
        /// Input derivations every build uses (submitted once, before the measurement).
        #[arg(long, default_value_t = 0)]
        inputs: usize,
        /// The builds' system (default: this machine's).
        #[arg(long)]
        system: Option<String>,
        /// Names this run's derivations; a rerun against the same coordinator needs another.
        #[arg(long)]
        run: Option<String>,
        #[arg(long, default_value_t = 600)]
        deadline_s: u64,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Simulated agents against a running coordinator: each registers with a registration
    /// token, asks for work, reports the start, uploads a NAR and reports success, until
    /// `--builds` builds succeeded.
    Agents {
        /// The coordinator's agent listener, e.g. http://127.0.0.1:8745.
        #[arg(long)]
        agent_url: String,
        /// A file holding a registration token the coordinator knows.
        #[arg(long)]
        registration_token_file: PathBuf,
        #[arg(long)]
        builds: u64,
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// Builds per work request, handled at once.
        #[arg(long, default_value_t = 1)]
        slots: u32,
        /// Bytes of the file in each output NAR (at least 1024).
        #[arg(long, default_value_t = 1024)]
        nar_bytes: usize,
        #[arg(long)]
        system: Option<String>,
        /// Agent names are PREFIX-0, PREFIX-1, ...
        #[arg(long, default_value = "load")]
        name_prefix: String,
        /// Long-poll wait of each work request, in ms.
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
        /// Skip the start report (the first upload or the result records the start).
        #[arg(long)]
        no_start: bool,
        /// Afterwards, fetch every build's narinfo and check its NarHash and NarSize.
        #[arg(long)]
        verify_narinfos: bool,
        #[arg(long, default_value_t = 600)]
        deadline_s: u64,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Start a release coordinator, run a benchmark workload, stop it (scripts/bench).
    Bench {
        #[arg(value_enum)]
        workload: kiln_chaos::load::bench::Workload,
        /// About 1 % of the full workload (CI).
        #[arg(long)]
        quick: bool,
        /// Directory of the `kiln` binary to run (default: next to kiln-chaos, or KILN_BIN_DIR).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Keep the coordinator's state and logs here (default: a temporary directory).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Override the number of builds.
        #[arg(long)]
        builds: Option<u64>,
        /// Override the number of simulated agents (lifecycle) or real agents (farm).
        #[arg(long)]
        agents: Option<usize>,
        /// farm: build slots per agent (default 4).
        #[arg(long)]
        slots: Option<u32>,
        /// farm: links of the dependency chain (default 50, quick 5; 0 = none).
        #[arg(long)]
        chain: Option<usize>,
        /// farm: TLS on both listeners, mutual TLS for agents, a client token (today's kiln).
        #[arg(long)]
        tls: bool,
        /// farm: record perf profiles of the coordinator and one agent during the builds.
        #[arg(long)]
        perf_dir: Option<PathBuf>,
    },
}

/// Where the coordinator's figures come from.
#[derive(Debug, clap::Args)]
struct WatchArgs {
    /// The coordinator's pid: its CPU time (/proc/PID/stat) goes into the report.
    #[arg(long)]
    coordinator_pid: Option<i32>,
    /// The coordinator's agent listener, for /metrics (flushes, commits); `load agents`
    /// defaults to --agent-url.
    #[arg(long)]
    metrics_url: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_CHAOS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match main_inner() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kiln-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main_inner() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    {
        let _guard = rt.enter();
        kiln_chaos::procs::install_guards();
    }
    match cli.command {
        Command::Run {
            scenarios,
            seed,
            work_dir,
            keep,
            json,
            tls,
        } => {
            let mut reports = Vec::new();
            for path in &scenarios {
                let s = Scenario::load(path)?;
                let opts = RunOptions {
                    seed,
                    work_dir: work_dir.as_ref().map(|d| d.join(&s.name)),
                    keep,
                    bin_dir: None,
                    scenario_path: Some(path.clone()),
                    tls,
                };
                let r = run(&s, &opts, &rt)?;
                print_report(&r, json)?;
                reports.push(r);
            }
            summary(&reports);
            Ok(reports.iter().all(|r| r.passed))
        }
        Command::Soak {
            minutes,
            scenarios,
            json,
        } => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&scenarios)
                .with_context(|| format!("failed to read {}", scenarios.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            anyhow::ensure!(
                !files.is_empty(),
                "{} holds no scenario (*.toml)",
                scenarios.display()
            );
            let loaded = files
                .iter()
                .map(|p| Scenario::load(p).map(|s| (p.clone(), s)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let end = Instant::now() + Duration::from_secs(minutes * 60);
            let mut reports = Vec::new();
            // Bounded by the time: a new run starts only before `end`.
            for (path, s) in loaded.iter().cycle() {
                if Instant::now() >= end {
                    break;
                }
                let opts = RunOptions {
                    seed: Some(fresh_seed()),
                    scenario_path: Some(path.clone()),
                    ..RunOptions::default()
                };
                let r = run(s, &opts, &rt)?;
                print_report(&r, json)?;
                reports.push(r);
            }
            summary(&reports);
            Ok(reports.iter().all(|r| r.passed))
        }
        Command::Load { command } => load(command, &rt),
    }
}

fn print_report(r: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string(r).context("failed to encode the report")?
        );
    } else {
        print!("{}", r.text());
    }
    Ok(())
}

fn summary(reports: &[Report]) {
    if reports.len() < 2 {
        return;
    }
    eprintln!("kiln-chaos: {} runs", reports.len());
    for r in reports {
        eprintln!(
            "  {:<28} seed {:<10} {:>6.1} s  {}",
            r.scenario,
            r.seed,
            r.total_s,
            if r.passed { "passed" } else { "FAILED" }
        );
    }
}

fn read_secret(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the {what} file {}", path.display()))?;
    let s = s.trim().to_string();
    anyhow::ensure!(!s.is_empty(), "the {what} file {} is empty", path.display());
    Ok(s)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).context("failed to encode the report")?
    );
    Ok(())
}

/// `kiln-chaos load …`: true when every build asked for went through.
fn load(command: LoadCommand, rt: &tokio::runtime::Runtime) -> anyhow::Result<bool> {
    use kiln_chaos::load::{agents, bench, stats::Watch, submit};
    let run_id = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| format!("{:x}", d.as_millis()))
            .unwrap_or_else(|_| std::process::id().to_string())
    };
    match command {
        LoadCommand::Submit {
            client_url,
            token_file,
            store_dir,
            builds,
            per_request,
            clients,
            drv_bytes,
            inputs,
            system,
            run,
            deadline_s,
            watch,
        } => {
            let token = token_file
                .map(|p| read_secret(&p, "client token"))
                .transpose()?;
            let r = submit::run_submit(&submit::SubmitOptions {
                client_url,
                token,
                store_dir,
                system: system.unwrap_or_else(kiln::client::graph::default_system),
                builds,
                per_request,
                clients,
                drv_bytes,
                inputs,
                run: run.unwrap_or_else(run_id),
                deadline: Duration::from_secs(deadline_s),
                watch: Watch {
                    pid: watch.coordinator_pid,
                    metrics_url: watch.metrics_url,
                },
            })?;
            print_json(&r)?;
            Ok(r.builds_acknowledged == builds && r.errors.is_empty())
        }
        LoadCommand::Agents {
            agent_url,
            registration_token_file,
            builds,
            agents: count,
            slots,
            nar_bytes,
            system,
            name_prefix,
            wait_ms,
            no_start,
            verify_narinfos,
            deadline_s,
            watch,
        } => {
            let opts = agents::AgentsOptions {
                registration_token: read_secret(&registration_token_file, "registration token")?,
                agents: count,
                slots,
                builds,
                nar_bytes,
                system: system.unwrap_or_else(kiln::client::graph::default_system),
                name_prefix,
                wait_ms,
                report_start: !no_start,
                deadline: Duration::from_secs(deadline_s),
                watch: Watch {
                    pid: watch.coordinator_pid,
                    metrics_url: Some(watch.metrics_url.unwrap_or_else(|| agent_url.clone())),
                },
                agent_url,
            };
            let (report, done) = rt.block_on(agents::run_agents(&opts))?;
            let verified = if verify_narinfos {
                Some(agents::verify_narinfos(&opts.agent_url, &done)?)
            } else {
                None
            };
            print_json(&serde_json::json!({
                "agents": &report,
                "narinfos_verified": verified,
            }))?;
            Ok(report.builds_succeeded >= builds && report.builds_failed == 0)
        }
        LoadCommand::Bench {
            workload,
            quick,
            bin_dir,
            work_dir,
            builds,
            agents,
            slots,
            chain,
            tls,
            perf_dir,
        } => {
            let bin_dir = bin_dir
                .map(|d| d.into_os_string())
                .or_else(|| std::env::var_os("KILN_BIN_DIR"));
            if workload == bench::Workload::Farm {
                let bins = kiln::client::demo::find_binaries(bin_dir, false)?;
                let r = kiln_chaos::load::farm::run_farm(&kiln_chaos::load::farm::FarmOptions {
                    quick,
                    kiln: bins.kiln,
                    agent: bins
                        .agent
                        .context("kiln-agent was not found next to kiln")?,
                    work_dir,
                    builds,
                    agents,
                    slots,
                    chain,
                    tls,
                    perf_dir,
                })?;
                print_json(&r)?;
                if !r.passed {
                    eprintln!("kiln-chaos: the farm benchmark did not pass: see the report");
                }
                return Ok(r.passed);
            }
            let bins = kiln::client::demo::find_binaries(bin_dir, true)?;
            let r = bench::run_bench(
                workload,
                &bench::BenchOptions {
                    quick,
                    kiln: bins.kiln,
                    work_dir,
                    builds,
                    agents,
                },
                rt,
            )?;
            print_json(&r)?;
            if !r.passed {
                eprintln!("kiln-chaos: the {workload:?} benchmark did not pass: see the report");
            }
            Ok(r.passed)
        }
    }
}
