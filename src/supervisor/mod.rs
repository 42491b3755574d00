//! Starting and restarting the coordinator's actors. Each actor runs under
//! `actix::Supervisor`, which restarts an actor that stops (keeping its mailbox); every actor's
//! `Supervised::restarting` counts the restart in [`Restarts`] and reloads its state from sled.
//! `BuildQueue`, `Allocator` and `HookProcessor` get arbiters (threads) of their own, so a slow
//! one cannot stall the others; each arbiter's loop lag is measured.

mod restarts;

pub use restarts::Restarts;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::actors::allocator::Allocator;
use crate::actors::build_queue::BuildQueue;
use crate::actors::event_log::{Committed, EventLog};
use crate::actors::hook_processor::HookProcessor;
use crate::actors::registry::{AgentRegistry, Liveness, Sessions};
use crate::actors::ActorError;
use crate::config::Config;
use crate::derivation::store_path::StoreDir;
use crate::store::nar_cache::NarCache;
use crate::store::records::EventRecord;
use crate::store::{Committer, Store};

/// Addresses of the running actors.
pub struct Actors {
    pub queue: Addr<BuildQueue>,
    pub allocator: Addr<Allocator>,
    pub registry: Addr<AgentRegistry>,
    pub event_log: Addr<EventLog>,
    pub hooks: Addr<HookProcessor>,
    pub sessions: Arc<Sessions>,
    pub liveness: Arc<Liveness>,
    pub restarts: Arc<Restarts>,
    /// The arbiters the actors run on; stopped at shutdown.
    pub arbiters: Vec<Arbiter>,
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

/// Start every actor. Must run inside an actix system.
pub fn start(
    config: &Config,
    store: Store,
    committer: Committer,
    nars: Arc<NarCache>,
    store_dir: Option<StoreDir>,
    sink: EventSink,
) -> Result<Actors, ActorError> {
    let restarts = Arc::new(Restarts::new());
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

    let (s, r) = (store.clone(), restarts.clone());
    let allocator =
        actix::Supervisor::start_in_arbiter(&alloc_arbiter.handle(), move |_| Allocator::new(s, r));

    let (s, c, r, h) = (
        store.clone(),
        committer.clone(),
        restarts.clone(),
        config.hooks.clone(),
    );
    let hooks = actix::Supervisor::start_in_arbiter(&hooks_arbiter.handle(), move |_| {
        HookProcessor::new(s, c, h, r)
    });

    let event_log = actix::Supervisor::start({
        let (s, h, r) = (store.clone(), hooks.clone(), restarts.clone());
        move |_| EventLog::new(s, Some(h), r)
    });
    let _ = sink.set(event_log.clone().recipient());

    // Built here so a failure to load is an error at start, not a panic in the arbiter.
    let queue_actor = BuildQueue::new(
        store.clone(),
        committer.clone(),
        allocator.clone(),
        nars,
        restarts.clone(),
        store_dir,
    )?;
    let queue = actix::Supervisor::start_in_arbiter(&queue_arbiter.handle(), move |_| queue_actor);

    let sessions = Arc::new(Sessions::default());
    let liveness = Arc::new(Liveness::default());
    let registry = actix::Supervisor::start({
        let (s, c, q, a, r) = (
            store,
            committer,
            queue.clone(),
            allocator.clone(),
            restarts.clone(),
        );
        let (se, l) = (sessions.clone(), liveness.clone());
        let timeout = Duration::from_millis(config.timeouts.agent_timeout_ms);
        let hb = Duration::from_millis(config.timeouts.heartbeat_interval_ms);
        let unheld = Duration::from_millis(config.timeouts.unheld_lease());
        move |_| AgentRegistry::new(s, c, q, a, r, se, l, timeout, hb, unheld)
    });
    Ok(Actors {
        queue,
        allocator,
        registry,
        event_log,
        hooks,
        sessions,
        liveness,
        restarts,
        arbiters: vec![queue_arbiter, alloc_arbiter, hooks_arbiter],
    })
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
