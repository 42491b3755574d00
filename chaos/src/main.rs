//! `kiln-chaos`: run chaos scenarios against real Kiln processes.
//!
//! `kiln-chaos run SCENARIO...` runs each scenario file once and prints its report;
//! `kiln-chaos soak --minutes N` rotates through every scenario of a directory with fresh
//! seeds until the time is up. The exit status is 0 only when every run held every invariant
//! and met its coverage; a failing run prints its seed and the command that reproduces it.

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
