//! `kiln-agent`: one per build machine. Parses the command line, sets up the private store
//! view while the process is still single-threaded, then runs the session loop on a
//! current-thread tokio runtime (builders are forked from that one thread, which is what
//! `PR_SET_PDEATHSIG` ties their life to). That thread also sends the heartbeats, so nothing
//! that blocks runs on it: file work (tree removal, fsync, hashing, compression) goes to
//! tokio's blocking pool (see docs/agent.md, "Threads").

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kiln_agent::cli::{Args, ExecutorKind, LogFormat};
use kiln_agent::client::{Coordinator, Held, Identity};
use kiln_agent::executor::{Limits, NativeExecutor};
use kiln_agent::session::{self, Agent};
use kiln_agent::state::StateDir;
use kiln_agent::{metrics, store_view};

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kiln-agent failed");
            eprintln!("kiln-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    let secret = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the secret file {}", path.display()))?;
    let secret = secret.trim().to_owned();
    anyhow::ensure!(
        !secret.is_empty(),
        "the secret file {} is empty: put the secret printed by `kiln agent new` in it",
        path.display()
    );
    Ok(secret)
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.executor != ExecutorKind::Native {
        let name = format!("{:?}", args.executor).to_lowercase();
        anyhow::bail!("the {name} executor is not implemented yet: it is planned in issue [8/8]; use --executor native");
    }
    let secret = read_secret(&args.secret_file)?;
    let store_dir =
        std::path::absolute(&args.store_dir).context("failed to resolve --store-dir")?;
    let state_dir =
        std::path::absolute(&args.state_dir).context("failed to resolve --state-dir")?;
    let state = StateDir::open(&state_dir)?;
    let _state_lock = store_view::lock_exclusive(&state_dir.join(".lock")).with_context(|| {
        format!(
            "another kiln-agent uses the state dir {}: give each agent its own --state-dir",
            state_dir.display()
        )
    })?;
    // Before the runtime: unshare(CLONE_NEWNS) fails once the process has threads.
    let _view = store_view::establish(&store_dir, &state_dir)?;
    let pending = state.recover()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        if let Some(addr) = args.metrics_addr {
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(addr).await {
                    tracing::error!(error = format!("{e:#}"), "metrics server stopped");
                }
            });
        }
        let held = Held::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let identity = Identity {
            name: args.name.clone(),
            secret,
            systems: args.systems(),
            max_parallel_builds: args.max_parallel_builds,
        };
        let mut coordinator = Coordinator::new(&args.coordinator, identity, held.clone(), tx)?;
        coordinator.set_transfer_stall(Duration::from_secs(args.transfer_stall_timeout));
        coordinator.set_tls(&kiln_agent::client::TlsOptions {
            ca_file: args.ca_file.clone(),
            client_cert: args.client_cert.clone().zip(args.client_key.clone()),
        })?;
        let limits = Limits {
            timeout: Duration::from_secs(args.timeout),
            max_silent: Duration::from_secs(args.max_silent_time),
            kill_grace: Duration::from_secs(5),
        };
        let executor = NativeExecutor::new(store_dir, limits);
        tracing::info!(name = %args.name, coordinator = %args.coordinator, systems = ?args.systems(), "agent starting");
        let agent = Agent::new(coordinator, executor, state, held, args.max_parallel_builds, args.max_parallel_uploads);
        session::run(agent, rx, pending).await
    })
}
