//! `kiln coordinator`: opens the state, starts the committer, the actors and both listeners,
//! writes the ready file, and runs until SIGINT/SIGTERM (then stops the listeners, lets the
//! committer finish, and exits 0) — or until an actor goes past the restart intensity (then the
//! same clean shutdown, with exit status 70), or a commit's flush fails (the committer stops the
//! process at once with exit status 74, answering no one).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;

use crate::config::Config;
use crate::derivation::store_path::StoreDir;
use crate::store::committer::CommitterOptions;
use crate::store::nar_cache::{atomic_write, NarCache};
use crate::store::{meta, Committer, Store, StoreOptions, TreeId};
use crate::supervisor::EXIT_RESTART_INTENSITY;

/// Command-line overrides of the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CoordinatorArgs {
    /// The TOML config file (docs/configuration.md); defaults apply without one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where all state lives (default ./kiln-state).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Agents, substitutes and /metrics (default 0.0.0.0:8745; :0 picks a port).
    #[arg(long)]
    pub listen: Option<String>,
    /// Client API and events (default 127.0.0.1:8746).
    #[arg(long)]
    pub client_listen: Option<String>,
    /// Written with {"listen": ..., "client_listen": ...} once both listeners are bound.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

/// Set up `tracing` (and bridge the `log` crate, through which sled reports its errors).
pub fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    // Colours only on a terminal: a log file or a journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The config with command-line overrides applied.
pub fn effective_config(args: &CoordinatorArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(d) = &args.state_dir {
        config.state_dir = d.clone();
    }
    if let Some(l) = &args.listen {
        config.listen = l.clone();
    }
    if let Some(l) = &args.client_listen {
        config.client_listen = l.clone();
    }
    if config.store_dir.is_none() {
        if let Some(d) = std::env::var_os("KILN_STORE_DIR").filter(|d| !d.is_empty()) {
            config.store_dir = Some(PathBuf::from(d));
        }
    }
    Ok(config)
}

/// Run the coordinator until it is told to stop.
pub fn run(args: CoordinatorArgs) -> anyhow::Result<i32> {
    init_logging(&args.log_format);
    crate::supervisor::install_panic_hook();
    let config = effective_config(&args)?;
    let prometheus = crate::telemetry::install()?;
    let system = actix::System::new();
    system.block_on(serve(config, args.ready_file, prometheus))
}

async fn serve(
    config: Config,
    ready_file: Option<PathBuf>,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<i32> {
    let store = Store::open(
        &config.state_dir,
        &StoreOptions {
            background_flush_ms: (config.store.background_flush_ms > 0)
                .then_some(config.store.background_flush_ms),
            cache_capacity_bytes: config.store.cache_capacity_mb << 20,
        },
    )
    .with_context(|| {
        format!(
            "failed to open the state dir {}",
            config.state_dir.display()
        )
    })?;
    let store_dir = resolve_store_dir(&config, &store)?;
    let unrecorded = store_dir.is_some() && store.meta_str(meta::STORE_DIR)?.is_none();
    let mut hook_routes: std::collections::HashMap<String, Vec<String>> = Default::default();
    for h in &config.hooks {
        for e in &h.events {
            hook_routes
                .entry(e.clone())
                .or_default()
                .push(h.name.clone());
        }
    }
    let sink: crate::supervisor::EventSink = Arc::new(OnceLock::new());
    let committer = Committer::start(
        store.clone(),
        CommitterOptions {
            fsync: config.store.fsync,
            max_batch: config.store.max_batch,
            max_queued: config.store.max_queued,
            hook_routes,
        },
        crate::supervisor::event_listener(sink.clone()),
    )?;
    if let (true, Some(d)) = (unrecorded, &store_dir) {
        // Fix the store dir in the state dir, so a later start without the setting keeps it.
        let mut b = crate::store::Batch::new();
        b.put_raw(TreeId::Meta, meta::STORE_DIR, d.as_str().as_bytes());
        committer.commit(b).await?;
    }
    let key = match &config.signing_key_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("failed to read signing key file {}", f.display()))?;
            // The key never leaves the coordinator: not logged (its Debug form is redacted),
            // not in the state dir; its file should be private too.
            crate::config::warn_if_others_can_read(f, "signing key");
            Some(
                crate::nar::signing::SecretKey::parse(text.trim()).map_err(|e| {
                    anyhow::anyhow!(
                        "signing key file {} is not a Nix secret key: {e}",
                        f.display()
                    )
                })?,
            )
        }
        None => None,
    };
    let nars = Arc::new(
        NarCache::new(&config.state_dir, store.clone(), committer.clone(), key)?
            .with_transfer_timeouts(
                std::time::Duration::from_millis(config.timeouts.transfer_stall_ms),
                std::time::Duration::from_millis(config.timeouts.partial_upload_expiry_ms),
            ),
    );
    let swept = nars.sweep_at_start();
    if swept > 0 {
        tracing::info!(
            removed = swept,
            "removed abandoned uploads and temporary files"
        );
    }
    spawn_upload_sweeper(nars.clone());
    if let Some(d) = &store_dir {
        nars.write_cache_info(d.as_str())?;
    }
    // Rewriting narinfo files missing after a crash looks at every output: it runs on a
    // blocking thread while the coordinator serves (narinfos are served from sled; the files
    // are for nginx).
    let repair = nars.clone();
    tokio::task::spawn_blocking(move || match repair.repair_narinfos() {
        Ok(0) => {}
        Ok(repaired) => tracing::warn!(repaired, "rewrote missing narinfo files"),
        Err(e) => tracing::error!(error = %e, "failed to rewrite missing narinfo files"),
    });
    let actors = crate::supervisor::start(
        &config,
        store.clone(),
        committer.clone(),
        nars.clone(),
        store_dir,
        sink,
    )?;
    let config = Arc::new(config);
    let state = actix_web::web::Data::new(crate::http::AppState {
        queue: actors.queue.clone(),
        registry: actors.registry.clone(),
        event_log: actors.event_log.clone(),
        sessions: actors.sessions.clone(),
        liveness: actors.liveness.clone(),
        nars,
        store: store.clone(),
        committer: committer.clone(),
        upload_slots: crate::http::limits::UploadSlots::new(
            config.limits.max_uploads_per_agent,
            config.limits.max_uploads,
        ),
        config: config.clone(),
        prometheus,
        #[cfg(feature = "fault-points")]
        faults: crate::http::faults::Targets {
            allocator: actors.allocator.clone(),
            hooks: actors.hooks.clone(),
            committer: committer.clone(),
        },
    });
    let (tls, certs) = tls_servers(&config)?;
    let tls_on = tls.is_some();
    let (agent_srv, client_srv, listen, client_listen) =
        crate::http::bind(state, &config.listen, &config.client_listen, tls)?;
    spawn_cert_reloader(certs);
    tracing::info!(listen = %listen, client_listen = %client_listen, tls = tls_on, state_dir = %config.state_dir.display(), "coordinator ready");
    if let Some(f) = &ready_file {
        let body =
            serde_json::json!({"listen": listen, "client_listen": client_listen, "tls": tls_on})
                .to_string();
        write_ready_file(f, &body)?;
    }
    let (agent_handle, client_handle) = (agent_srv.handle(), client_srv.handle());
    let servers = Box::pin(async move { tokio::join!(agent_srv, client_srv) });
    let restarts = actors.restarts.clone();
    let escalation = Box::pin(async move { restarts.gave_up().await });
    use futures_util::future::{select, Either};
    let (a, c, exit) = match select(servers, escalation).await {
        Either::Left(((a, c), _)) => (a, c, 0),
        Either::Right((gave_up, servers)) => {
            tracing::error!(
                actor = gave_up.actor,
                restarts = gave_up.restarts,
                "stopping the listeners: an actor went past the restart intensity"
            );
            // Graceful: requests in flight get their answers (bounded by the servers'
            // shutdown timeout). The stop commands are sent now; the servers' own futures
            // carry them out, so they are awaited together.
            let stopped =
                futures_util::future::join(agent_handle.stop(true), client_handle.stop(true));
            let ((a, c), _) = futures_util::future::join(servers, stopped).await;
            (a, c, EXIT_RESTART_INTENSITY)
        }
    };
    a.context("agent listener failed")?;
    c.context("client listener failed")?;
    tracing::info!("listeners stopped; finishing pending commits");
    let c2 = committer.clone();
    let _ = tokio::task::spawn_blocking(move || c2.shutdown_blocking()).await;
    tracing::info!("committer drained");
    for arb in actors.arbiters {
        arb.stop();
    }
    actix::System::current().stop();
    if exit != 0 {
        tracing::error!(
            exit_status = exit,
            "coordinator stopped after the restart intensity was exceeded; see the error above for the actor and its restarts"
        );
    }
    Ok(exit)
}

/// The listeners' TLS configs (none when `tls.cert_file` is unset), and the certificates that
/// SIGHUP reloads.
fn tls_servers(
    config: &Config,
) -> anyhow::Result<(
    Option<crate::http::TlsServers>,
    Vec<Arc<crate::http::tls::ReloadingCert>>,
)> {
    use crate::http::tls::{server_config, ReloadingCert};
    let t = &config.tls;
    let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
        return Ok((None, Vec::new()));
    };
    crate::http::tls::install_default_provider();
    let main = ReloadingCert::load(cert, key)?;
    let client_cert = match (&t.client_listener_cert_file, &t.client_listener_key_file) {
        (Some(c), Some(k)) => ReloadingCert::load(c, k)?,
        _ => main.clone(),
    };
    let mut certs = vec![main.clone()];
    if !Arc::ptr_eq(&main, &client_cert) {
        certs.push(client_cert.clone());
    }
    let servers = crate::http::TlsServers {
        agent: server_config(main, t.agent_client_ca_file.as_deref())?,
        client: server_config(client_cert, None)?,
    };
    if let Some(ca) = &t.agent_client_ca_file {
        tracing::info!(client_ca = %ca.display(), "agent listener requires client certificates (mutual TLS)");
    }
    Ok((Some(servers), certs))
}

/// On SIGHUP, re-read the listeners' certificate files; new connections get the new
/// certificate. A file that does not load leaves the old certificate in service.
fn spawn_cert_reloader(certs: Vec<Arc<crate::http::tls::ReloadingCert>>) {
    use tokio::signal::unix::{signal, SignalKind};
    if certs.is_empty() {
        return;
    }
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP: certificates will not reload");
            return;
        }
    };
    actix::spawn(async move {
        while hup.recv().await.is_some() {
            for c in &certs {
                match c.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %c.cert_file().display(), "reloaded the TLS certificate")
                    }
                    Err(e) => {
                        tracing::error!(cert = %c.cert_file().display(), error = %format!("{e:#}"), "failed to reload the TLS certificate; keeping the old one")
                    }
                }
            }
        }
    });
}

/// Removes partial uploads nobody resumes, every `NarCache::sweep_interval`, on a blocking
/// thread (it lists and deletes files).
fn spawn_upload_sweeper(nars: Arc<NarCache>) {
    actix::spawn(async move {
        let mut tick = tokio::time::interval(nars.sweep_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let n = nars.clone();
            match tokio::task::spawn_blocking(move || n.sweep_uploads()).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "removed partial uploads nobody resumed"),
                Err(e) => tracing::error!(error = %e, "the partial-upload sweep failed"),
            }
        }
    });
}

fn write_ready_file(path: &Path, body: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    atomic_write(path, body.as_bytes())
        .with_context(|| format!("failed to write the ready file {}", path.display()))
}

/// The store dir: from the config (or KILN_STORE_DIR), else the one recorded in the state dir
/// by an earlier submission; a config that contradicts the recorded one is an error.
fn resolve_store_dir(config: &Config, store: &Store) -> anyhow::Result<Option<StoreDir>> {
    let recorded = store.meta_str(meta::STORE_DIR)?;
    let configured = match &config.store_dir {
        Some(d) => {
            Some(StoreDir::new(d).map_err(|e| anyhow::anyhow!("store_dir {}: {e}", d.display()))?)
        }
        None => None,
    };
    match (configured, recorded) {
        (Some(c), Some(r)) if c.as_str() != r => anyhow::bail!(
            "the state dir {} serves store dir {r}, but the config says {}: use a state dir per store dir",
            config.state_dir.display(),
            c.as_str()
        ),
        (Some(c), _) => Ok(Some(c)),
        (None, Some(r)) => Ok(Some(StoreDir::new(&r).map_err(|e| anyhow::anyhow!("recorded store dir {r}: {e}"))?)),
        (None, None) => Ok(None),
    }
}
