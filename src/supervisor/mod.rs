//! Starting the coordinator's actors under supervision, and the process-wide panic hook.
//!
//! Each actor is built by its factory here first (so a state that cannot be loaded is an error
//! at start, not a panic on an arbiter), then runs under `actix::Supervisor`, which restarts an
//! actor that stops and keeps its mailbox. Every piece of actor code runs under the panic guard
//! (`actors::guard`), and every `Supervised::restarting` rebuilds the actor from its factory
//! and counts the restart in [`Restarts`], which escalates past the restart intensity
//! (`[supervision]`); `kiln coordinator` waits for that escalation to shut down with a
//! non-zero exit. `BuildQueue`, `Allocator` and `HookProcessor` get arbiters (threads) of their
//! own, so a slow one cannot stall the others; each arbiter's loop lag is measured.
//! docs/adr/003-supervision.md records the design.

pub use crate::actors::restarts::{GaveUp, Intensity, Restarts, EXIT_RESTART_INTENSITY};

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::actors::agent_controls::{AgentControls, Control, Policy};
use crate::actors::allocator::{Allocator, RefillHandle};
use crate::actors::build_queue::BuildQueue;
use crate::actors::credentials::{Credentials, Grant};
use crate::actors::event_log::{Committed, EventLog};
use crate::actors::hook_processor::HookProcessor;
use crate::actors::registry::{AgentRegistry, Liveness, SessionActors, Sessions};
use crate::actors::symbols::Symbols;
use crate::actors::ActorError;
use crate::config::{AgentsConfig, Config};
use crate::derivation::store_path::StoreDir;
use crate::store::nar_cache::NarCache;
use crate::store::records::{AgentControlRecord, EventRecord};
use crate::store::{Committer, Store, TreeId};

/// Addresses of the running actors.
pub struct Actors {
    pub queue: Addr<BuildQueue>,
    pub allocator: Addr<Allocator>,
    pub registry: Addr<AgentRegistry>,
    pub event_log: Addr<EventLog>,
    pub hooks: Addr<HookProcessor>,
    pub sessions: Arc<Sessions>,
    pub liveness: Arc<Liveness>,
    /// The registry's running session actors (kept across registry restarts).
    pub session_actors: Arc<SessionActors>,
    pub restarts: Arc<Restarts>,
    /// The systems and tag sets the queue and the allocator share.
    pub symbols: Arc<Symbols>,
    /// The arbiters the actors run on; stopped at shutdown.
    pub arbiters: Vec<Arbiter>,
}

/// The registration tokens of the config file, read from their files.
fn registration_grants(config: &Config) -> anyhow::Result<Vec<Grant>> {
    config
        .registration_tokens
        .iter()
        .map(|t| {
            let token = t.read_token()?;
            Ok(crate::actors::enrollment::config_grant(
                &token,
                t.systems.clone(),
                t.tag_pairs()?,
            ))
        })
        .collect()
}

/// Where the committer sends events once the event log exists (the committer starts first,
/// because the actors need it to start).
pub type EventSink = Arc<OnceLock<Recipient<Committed>>>;

/// A committer listener that forwards to the event log once it is set.
pub fn event_listener(sink: EventSink) -> crate::store::committer::Listener {
    Box::new(move |events: &[EventRecord]| {
        if let Some(r) = sink.get() {
            r.do_send(Committed(events.to_vec()));
        }
    })
}

/// The actor kinds, as named in `kiln_actor_restarts_total{actor}`.
pub const ACTORS: [&str; 6] = [
    "build_queue",
    "allocator",
    "agent_registry",
    "agent_session",
    "event_log",
    "hook_processor",
];

/// Start every actor. Must run inside an actix system. A store dir given here must already be
/// recorded in sled (`meta/store_dir`; `kiln coordinator` records it before): a restarting
/// `BuildQueue` reads it from there.
pub fn start(
    config: &Config,
    store: Store,
    committer: Committer,
    nars: Arc<NarCache>,
    store_dir: Option<StoreDir>,
    sink: EventSink,
) -> Result<Actors, ActorError> {
    let restarts = Arc::new(Restarts::new(Intensity {
        max_restarts: config.supervision.max_restarts,
        window: Duration::from_secs(config.supervision.window_s),
    }));
    for actor in ACTORS {
        // Exported from the start, so a dashboard sees 0 rather than no series.
        metrics::counter!("kiln_actor_restarts_total", "actor" => actor).increment(0);
    }
    let queue_arbiter = Arbiter::new();
    let alloc_arbiter = Arbiter::new();
    let hooks_arbiter = Arbiter::new();
    for (name, arb) in [
        ("build_queue", &queue_arbiter),
        ("allocator", &alloc_arbiter),
        ("hooks", &hooks_arbiter),
    ] {
        measure_lag(name, arb);
    }
    measure_lag_here("system");

    // Each actor is built by its factory before it is started; a restart calls the same
    // factory again (`Rebuild::rebuild`).
    let symbols = Arc::new(Symbols::default());
    let refill: RefillHandle = Arc::new(OnceLock::new());
    let allocator_actor = Allocator::new(
        symbols.clone(),
        Arc::from(config.scheduling.matched_tags.clone()),
        restarts.clone(),
        refill.clone(),
        Duration::from_millis(config.timeouts.work_wait_max_ms),
    );
    let allocator =
        actix::Supervisor::start_in_arbiter(&alloc_arbiter.handle(), move |_| allocator_actor);

    let hooks_actor = HookProcessor::new(
        store.clone(),
        committer.clone(),
        config.hooks.clone(),
        restarts.clone(),
    );
    let hooks = actix::Supervisor::start_in_arbiter(&hooks_arbiter.handle(), move |_| hooks_actor);

    let event_log_actor = EventLog::new(store.clone(), Some(hooks.clone()), restarts.clone());
    let event_log = actix::Supervisor::start(move |_| event_log_actor);
    let _ = sink.set(event_log.clone().recipient());

    // Built cheaply here; it loads the builds in `started`, on its own arbiter, while the
    // listeners already answer (requests for it wait in its mailbox).
    let queue_actor = BuildQueue::new(
        store.clone(),
        committer.clone(),
        allocator.clone(),
        nars,
        restarts.clone(),
        symbols.clone(),
        store_dir,
        Arc::from(config.scheduling.priority_rules.clone()),
        config.scheduling.retries,
    );
    let queue = actix::Supervisor::start_in_arbiter(&queue_arbiter.handle(), move |_| queue_actor);
    let _ = refill.set(queue.clone().recipient());

    let sessions = Arc::new(Sessions::default());
    let liveness = Arc::new(Liveness::default());
    let session_actors = Arc::new(SessionActors::default());
    let grants = registration_grants(config).map_err(|e| ActorError::Internal(format!("{e:#}")))?;
    let credentials = Arc::new(Credentials::new(grants));
    let controls = Arc::new(load_controls(&store, &config.agents)?);
    let registry_actor = AgentRegistry::new(
        store,
        committer,
        queue.clone(),
        allocator.clone(),
        restarts.clone(),
        sessions.clone(),
        liveness.clone(),
        session_actors.clone(),
        credentials,
        Duration::from_millis(config.timeouts.agent_timeout_ms),
        Duration::from_millis(config.timeouts.heartbeat_interval_ms),
        Duration::from_millis(config.timeouts.unheld_lease()),
        controls,
        config.agents.expire_after_ms,
    );
    let registry = actix::Supervisor::start(move |_| registry_actor);
    Ok(Actors {
        queue,
        allocator,
        registry,
        event_log,
        hooks,
        sessions,
        liveness,
        session_actors,
        restarts,
        symbols,
        arbiters: vec![queue_arbiter, alloc_arbiter, hooks_arbiter],
    })
}

/// The agents' controls as stored (one read of the `agent_controls` tree at start; it holds
/// only agents an operator or a quarantine touched, or that opened a session).
fn load_controls(store: &Store, c: &AgentsConfig) -> Result<AgentControls, ActorError> {
    let mut loaded = HashMap::new();
    for r in store.scan::<AgentControlRecord>(TreeId::AgentControls) {
        let (k, rec) = r?;
        if let Some(id) = k.as_u64() {
            loaded.insert(id, Control::from_record(&rec));
        }
    }
    Ok(AgentControls::new(Policy::from_config(c), loaded))
}

/// Log every panic through `tracing`, with its place, thread and a backtrace, before it
/// unwinds (so a panic the actor guard catches is still on the record, with where it came
/// from). Replaces the default hook, which would print to stderr outside the log format.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::force_capture();
        let thread = std::thread::current();
        let payload = crate::actors::guard::panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        tracing::error!(
            panic = %payload,
            location = %location,
            thread = thread.name().unwrap_or("unnamed"),
            backtrace = %backtrace,
            "panic"
        );
    }));
}

const LAG_TICK: Duration = Duration::from_millis(100);

/// Measure how late an arbiter's loop runs a 100 ms timer (its lag).
fn measure_lag(name: &'static str, arb: &Arbiter) {
    arb.spawn(async move { lag_loop(name).await });
}

fn measure_lag_here(name: &'static str) {
    actix::spawn(async move { lag_loop(name).await });
}

async fn lag_loop(name: &'static str) {
    loop {
        let t = Instant::now();
        tokio::time::sleep(LAG_TICK).await;
        let lag = t.elapsed().saturating_sub(LAG_TICK);
        metrics::gauge!("kiln_arbiter_lag_seconds", "arbiter" => name).set(lag.as_secs_f64());
    }
}
