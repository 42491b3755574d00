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
use kiln_agent::limits::WorkLimits;
use kiln_agent::session::{self, Agent, Settings};
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

/// The registration token, and the secret this agent registers (or registered) with: read
/// from the secret file, or made and written there first (mode 0600, never replacing a file
/// another process wrote meanwhile), so that a registration whose reply was lost is retried
/// with the same secret and finds the agent registered.
fn registration(args: &Args, token_file: &Path) -> anyhow::Result<(String, String)> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| {
            format!(
                "failed to read the registration token file {}",
                token_file.display()
            )
        })?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "the registration token file {} is empty: put the token printed by `kiln agent registration-token new` in it",
        token_file.display()
    );
    let path = args.secret_path();
    if path.exists() {
        return Ok((token, read_secret(&path)?));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("failed to create {}", tmp.display()))?;
    f.write_all(secret.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("failed to write {}", tmp.display()))?;
    // A hard link fails if the file appeared meanwhile: then that one is the secret.
    match std::fs::hard_link(&tmp, &path) {
        Ok(()) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::info!(secret_file = %path.display(), "made a secret to register with");
            Ok((token, secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&tmp);
            Ok((token, read_secret(&path)?))
        }
        Err(e) => Err(e).with_context(|| format!("failed to create {}", path.display())),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.executor != ExecutorKind::Native {
        let name = format!("{:?}", args.executor).to_lowercase();
        anyhow::bail!("the {name} executor is not implemented yet: it is planned in issue [8/8]; use --executor native");
    }
    let (registration_token, secret) = match &args.registration_token_file {
        Some(t) => {
            let (token, secret) = registration(&args, t)?;
            (Some(token), secret)
        }
        None => (None, read_secret(&args.secret_path())?),
    };
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
            registration_token,
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
            kill_grace: Duration::from_secs(args.kill_grace),
        };
        let limit_dirs = vec![store_dir.clone(), state_dir.clone()];
        let executor = NativeExecutor::new(store_dir, limits);
        tracing::info!(name = %args.name, coordinator = %args.coordinator, systems = ?args.systems(), "agent starting");
        let settings = Settings {
            max_builds: args.max_parallel_builds,
            max_allocated: args.max_allocated_builds(),
            max_uploads: args.max_parallel_uploads,
            work_wait: Duration::from_millis(args.work_wait_ms),
            limits: WorkLimits {
                max_load: args.max_load,
                min_free_disk: args.min_free_disk_mb.saturating_mul(1 << 20),
                dirs: limit_dirs,
                max_waiting_uploads: args.max_waiting_uploads() as usize,
            },
            input_cache: args.input_cache_mb.saturating_mul(1 << 20),
        };
        tracing::info!(
            max_parallel_builds = settings.max_builds,
            max_allocated_builds = settings.max_allocated,
            max_parallel_uploads = settings.max_uploads,
            max_waiting_uploads = settings.limits.max_waiting_uploads,
            max_load = ?settings.limits.max_load,
            min_free_disk_mb = args.min_free_disk_mb,
            work_wait_ms = args.work_wait_ms,
            input_cache_mb = args.input_cache_mb,
            "agent limits"
        );
        let agent = Agent::new(coordinator, executor, state, held, settings);
        session::run(agent, rx, pending).await
    })
}
