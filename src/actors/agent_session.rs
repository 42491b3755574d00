//! `AgentSession`: one per agent that opened a session, supervised one-for-one by the
//! [`super::registry::AgentRegistry`]. It owns the agent's liveness and its requests for work:
//! it asks the allocator for candidates, the build queue for leases, and turns leases into
//! assignments (the `.drv` and the closure of inputs to fetch); an agent that is paused,
//! draining or quarantined ([`super::agent_controls`]) gets none. Each heartbeat's list of held
//! builds goes to the build queue, which reconciles it with the agent's leases. An agent silent
//! for the agent timeout is lost: its leases expire. Time the coordinator's own loop spent
//! lagging is not counted against the agent.
//!
//! Every lease has an end that needs no message from its holder: a heartbeat that does not
//! list it (after the unheld bound), the agent timeout (a silent agent), and, for an agent that
//! talks but sends no heartbeats, the unheld bound on leases never started.
//!
//! Supervision: every handler and the liveness tick run under the panic guard. A restart
//! builds a fresh session for the same agent and systems: it owns nothing in sled (its leases
//! are the build queue's), so what it loses is its pending commands, its lag allowance and
//! its `must_reconcile` flag; its liveness verdict is recomputed from the shared last-seen
//! time at the next tick.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::agent_admin::InfraOutcome;
use super::agent_controls::AgentControls;
use super::allocator::{Allocator, BuildsRunnable, RequestAlive, TakeWork};
use super::build_queue::{
    AgentLost, Allocate, BuildQueue, LeasedTo, Leases, Reconcile, ReleaseUnstarted,
};
use super::guard::{catch, guard_future, guard_map, unavailable, Rebuild};
use super::queue_state::Unheld;
use super::restarts::Restarts;
use super::runnable_index::{AgentMatch, RunnableEntry};
use super::ActorError;
use crate::protocol::{
    AgentCommand, Assignment, Bytes64, HeldBuild, OutputSpec, PathInfo, WorkReply,
};
use crate::store::records::{BuildRecord, DrvRecord, OutputRecord};
use crate::store::{now_ms, Store, StoreError, TreeId};

use super::registry::Liveness;

const NAME: &str = "agent session";

/// How often liveness is checked.
const TICK: Duration = Duration::from_millis(250);

pub struct AgentSession {
    pub agent_id: u64,
    pub name: String,
    /// The agent's systems and tags, as its session opening declared them.
    pub agent: AgentMatch,
    queue: Addr<BuildQueue>,
    allocator: Addr<Allocator>,
    store: Store,
    restarts: Arc<Restarts>,
    /// Shared with the HTTP layer, which stamps every authenticated request of this agent.
    liveness: Arc<Liveness>,
    timeout: Duration,
    /// A lease the agent's heartbeats do not list ends once it was handed to the agent longer
    /// ago than this (`timeouts.unheld_lease_ms`).
    unheld: Duration,
    /// When the last heartbeat (or the session opening) was handled.
    last_beat: Instant,
    /// When leases never started were last checked for an agent without heartbeats.
    last_unstarted_check: Instant,
    /// When the last tick ran, to detect (and forgive) loop lag.
    last_tick: Instant,
    /// Time the agent is excused for because the coordinator could not run its loop.
    forgiven: Duration,
    lost: bool,
    /// Set when the agent is declared lost; cleared by its next heartbeat or session opening.
    /// Until then its work requests get no new builds: a build released when it was lost must
    /// first be offered back to it (re-adoption, decided by the build queue on that heartbeat),
    /// or it would be handed to the same agent again under a new attempt and built twice.
    must_reconcile: bool,
    /// Commands to deliver with the next heartbeat or work reply.
    pending: VecDeque<AgentCommand>,
    /// Pause, drain and quarantine, read on every work request (the registry writes them).
    controls: Arc<AgentControls>,
    /// Where a loss of held leases is counted towards a quarantine.
    registry: Recipient<InfraOutcome>,
}

impl AgentSession {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        agent_id: u64,
        name: String,
        agent: AgentMatch,
        queue: Addr<BuildQueue>,
        allocator: Addr<Allocator>,
        store: Store,
        restarts: Arc<Restarts>,
        liveness: Arc<Liveness>,
        timeout: Duration,
        unheld: Duration,
        controls: Arc<AgentControls>,
        registry: Recipient<InfraOutcome>,
    ) -> AgentSession {
        AgentSession {
            agent_id,
            name,
            agent,
            queue,
            allocator,
            store,
            restarts,
            liveness,
            timeout,
            unheld,
            last_beat: Instant::now(),
            last_unstarted_check: Instant::now(),
            last_tick: Instant::now(),
            forgiven: Duration::ZERO,
            lost: false,
            must_reconcile: false,
            pending: VecDeque::new(),
            controls,
            registry,
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let lag = now.duration_since(self.last_tick).saturating_sub(TICK);
        self.last_tick = now;
        metrics::histogram!("kiln_loop_lag_seconds", "arbiter" => "agents")
            .record(lag.as_secs_f64());
        if lag > TICK {
            // The coordinator could not run this loop: do not blame the agent for it.
            self.forgiven += lag;
        }
        let Some(seen) = self.liveness.last_seen(self.agent_id) else {
            return;
        };
        if seen > now.checked_sub(self.forgiven).unwrap_or(seen) {
            self.forgiven = Duration::ZERO;
        }
        let silent = now.duration_since(seen).saturating_sub(self.forgiven);
        if !self.lost && silent > self.timeout {
            self.lost = true;
            self.must_reconcile = true;
            self.liveness.set_lost(self.agent_id, true);
            tracing::warn!(agent = %self.name, silent_ms = silent.as_millis() as u64, "agent lost; its leases expire");
            metrics::counter!("kiln_agents_lost_total").increment(1);
            // Asked before the leases end (the queue answers in order): an agent lost with
            // builds counts an infrastructure failure towards its quarantine.
            let (held, registry, agent_id) = (
                self.queue.send(LeasedTo(Some(self.agent_id))),
                self.registry.clone(),
                self.agent_id,
            );
            self.queue.do_send(AgentLost { agent_id });
            ctx.spawn(actix::fut::wrap_future::<_, Self>(async move {
                if let Ok(h) = held.await {
                    if h.get(&agent_id).is_some_and(|b| !b.is_empty()) {
                        registry.do_send(InfraOutcome {
                            agent_id,
                            failure: true,
                        });
                    }
                }
            }));
        } else if self.lost && silent <= self.timeout {
            self.lost = false;
            self.liveness.set_lost(self.agent_id, false);
        }
        self.check_unstarted(seen, now);
    }

    /// An agent heard from (by other requests) after more than the unheld bound without a
    /// heartbeat: heartbeats cannot end its unreceived leases, so leases it never started end
    /// after the bound. Checked at most once per bound.
    fn check_unstarted(&mut self, seen: Instant, now: Instant) {
        let beats_missing = seen.saturating_duration_since(self.last_beat) > self.unheld;
        if self.lost
            || !beats_missing
            || now.duration_since(self.last_unstarted_check) < self.unheld
        {
            return;
        }
        self.last_unstarted_check = now;
        tracing::warn!(agent = %self.name, "agent sends no heartbeats; its leases never started end after the unheld bound");
        self.queue.do_send(ReleaseUnstarted {
            agent_id: self.agent_id,
            bound_ms: self.unheld.as_millis() as u64,
        });
    }
}

impl Actor for AgentSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.last_tick = Instant::now();
        ctx.run_interval(TICK, |act, ctx| {
            catch(NAME, ctx, |ctx| act.tick(ctx));
        });
    }
}

impl Rebuild for AgentSession {
    const ACTOR: &'static str = "agent_session";

    fn restarts(&self) -> Arc<Restarts> {
        self.restarts.clone()
    }

    fn rebuild(&self) -> Result<AgentSession, ActorError> {
        Ok(AgentSession::new(
            self.agent_id,
            self.name.clone(),
            self.agent.clone(),
            self.queue.clone(),
            self.allocator.clone(),
            self.store.clone(),
            self.restarts.clone(),
            self.liveness.clone(),
            self.timeout,
            self.unheld,
            self.controls.clone(),
            self.registry.clone(),
        ))
    }
}

impl Supervised for AgentSession {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        super::guard::restart(self);
    }
}

/// The session was (re)opened: new systems and tags, and commands to deliver.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Opened {
    pub agent: AgentMatch,
    pub commands: Vec<AgentCommand>,
}

impl Handler<Opened> for AgentSession {
    type Result = ();
    fn handle(&mut self, msg: Opened, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            self.agent = msg.agent;
            self.lost = false;
            self.must_reconcile = false;
            self.last_beat = Instant::now();
            self.pending.extend(msg.commands);
        });
    }
}

/// A command for the agent, delivered with its next heartbeat or work reply: `pause` or
/// `resume` from `kiln agent ...` (only the latest of the two counts), `cancel` of a build a
/// client canceled (sent once). Not durable: a command that must outlive a restart of this
/// actor is also given by reconciliation (see `queue_state::cancel`) or by the session reply
/// of a paused agent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Command(pub AgentCommand);

impl Handler<Command> for AgentSession {
    type Result = ();
    fn handle(&mut self, msg: Command, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            if matches!(msg.0, AgentCommand::Pause | AgentCommand::Resume) {
                self.pending
                    .retain(|c| !matches!(c, AgentCommand::Pause | AgentCommand::Resume));
            }
            if !self.pending.contains(&msg.0) {
                self.pending.push_back(msg.0);
            }
        });
    }
}

/// The agent was removed (expired): the session stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

impl Handler<Retire> for AgentSession {
    type Result = ();
    fn handle(&mut self, _msg: Retire, ctx: &mut Context<Self>) {
        tracing::info!(agent = %self.name, "agent removed; its session stops");
        ctx.stop();
    }
}

/// A heartbeat with the builds the agent holds: reconciled by the build queue; answers the
/// commands that come of it and those pending.
#[derive(Message)]
#[rtype(result = "Result<Vec<AgentCommand>, ActorError>")]
pub struct Beat {
    pub held: Vec<HeldBuild>,
}

impl Handler<Beat> for AgentSession {
    type Result = ResponseActFuture<Self, Result<Vec<AgentCommand>, ActorError>>;

    fn handle(&mut self, msg: Beat, ctx: &mut Context<Self>) -> Self::Result {
        let asked = catch(NAME, ctx, |_| {
            self.last_beat = Instant::now();
            self.queue.send(Reconcile {
                agent_id: self.agent_id,
                held: msg.held,
                unheld: Unheld::ReleaseAfter(self.unheld.as_millis() as u64),
            })
        });
        let Some(ask) = asked else {
            return Box::pin(actix::fut::ready(Err(unavailable(NAME))));
        };
        let reconciled = async move {
            ask.await.map_err(|_| {
                ActorError::Unavailable("the build queue is restarting; retry".into())
            })?
        };
        Box::pin(guard_future::<Self, _, _>(NAME, reconciled).map(guard_map(
            NAME,
            || Err(unavailable(NAME)),
            |r: Result<Vec<AgentCommand>, ActorError>, act: &mut Self, _ctx: &mut Context<Self>| {
                let from_queue = r?;
                // Reconciled (and committed): what the agent still runs is its own again, so
                // new work may flow.
                act.must_reconcile = false;
                // Pending commands leave only with an answer that carries them.
                let mut commands: Vec<AgentCommand> = act.pending.drain(..).collect();
                // Reconciliation may repeat a pending command (a canceled build): once each.
                for c in from_queue {
                    if !commands.contains(&c) {
                        commands.push(c);
                    }
                }
                Ok(commands)
            },
        )))
    }
}

/// Longest work request id accepted.
const MAX_REQUEST_ID: usize = 128;

/// The agent asks for up to `max` builds. `request` names the logical request: a retry with
/// the same id gets the same assignments. With `wait`, an agent that gets nothing at once
/// waits up to that long (capped by `timeouts.work_wait_max_ms`) for a build to become
/// runnable (long poll). `alive` tells whether the HTTP request is still there: a build is
/// only leased for a request that is.
#[derive(Message)]
#[rtype(result = "Result<WorkReply, ActorError>")]
pub struct RequestWork {
    pub max: u32,
    pub request: Option<String>,
    pub wait: Duration,
    pub alive: Option<RequestAlive>,
}

/// How long an agent back from lost waits before its empty answer (it must heartbeat first).
const RECONCILE_PAUSE: Duration = Duration::from_secs(1);

/// The longest a paused, draining or quarantined agent's empty answer waits.
const STOPPED_WAIT: Duration = Duration::from_secs(20);

impl Handler<RequestWork> for AgentSession {
    type Result = ResponseActFuture<Self, Result<WorkReply, ActorError>>;

    fn handle(&mut self, msg: RequestWork, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(r) = &msg.request {
            let ok = !r.is_empty()
                && r.len() <= MAX_REQUEST_ID
                && r.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
            if !ok {
                let r = r.chars().take(MAX_REQUEST_ID + 1).collect::<String>();
                return Box::pin(actix::fut::ready(Err(ActorError::BadRequest(format!(
                    "work request id {r:?} is not valid: use 1 to {MAX_REQUEST_ID} letters, digits, '.', '_' or '-' (or null)"
                )))));
            }
        }
        let Some(commands) = catch(NAME, ctx, |_| self.pending.drain(..).collect::<Vec<_>>())
        else {
            return Box::pin(actix::fut::ready(Err(unavailable(NAME))));
        };
        let work = Work {
            allocator: self.allocator.clone(),
            queue: self.queue.clone(),
            agent: self.agent.clone(),
            agent_id: self.agent_id,
            alive: msg.alive,
        };
        let store = self.store.clone();
        let held_back = self.must_reconcile;
        // Paused, draining or quarantined: no new builds, whatever the agent asks (an agent
        // that ignores `pause` gets nothing either).
        let stopped = !self.controls.accepts_work(self.agent_id, now_ms());
        let max = if held_back {
            tracing::info!(agent = %self.name, "agent back from lost: no new work before its heartbeat says what it holds");
            0
        } else if stopped {
            0
        } else {
            msg.max.min(64) as usize
        };
        let (request, wait) = (msg.request, msg.wait);
        Box::pin(guard_future::<Self, _, _>(NAME, async move {
            let leased = work.find(max, request, wait).await?;
            if leased.builds.is_empty() && held_back && !wait.is_zero() {
                tokio::time::sleep(wait.min(RECONCILE_PAUSE)).await;
            } else if leased.builds.is_empty() && stopped && !wait.is_zero() {
                // Its long poll (bounded), so an agent that keeps asking does not spin.
                tokio::time::sleep(wait.min(STOPPED_WAIT)).await;
            }
            let builds = if leased.builds.is_empty() {
                Vec::new()
            } else {
                let records = leased.builds;
                tokio::task::spawn_blocking(move || assignments(&store, records))
                    .await
                    .map_err(|e| ActorError::Internal(e.to_string()))??
            };
            Ok(WorkReply { builds, commands })
        }))
    }
}

/// What a work request needs, off the session's own state.
struct Work {
    allocator: Addr<Allocator>,
    queue: Addr<BuildQueue>,
    agent: AgentMatch,
    agent_id: u64,
    alive: Option<RequestAlive>,
}

impl Work {
    /// Propose builds from the index (waiting up to `wait` when there are none).
    async fn take(&self, max: usize, wait: Duration) -> Result<Vec<RunnableEntry>, ActorError> {
        self.allocator
            .send(TakeWork {
                agent: self.agent.clone(),
                max,
                wait,
                alive: self.alive.clone(),
            })
            .await
            .map_err(|_| ActorError::Unavailable("the allocator is restarting; retry".into()))?
    }

    /// Lease the proposed builds; any that were not leased because the lease failed go back
    /// to the index, exactly those (never a rescan).
    async fn lease(
        &self,
        request: Option<String>,
        proposed: Vec<RunnableEntry>,
    ) -> Result<Leases, ActorError> {
        let leased = self
            .queue
            .send(Allocate {
                agent_id: self.agent_id,
                request,
                candidates: proposed.iter().map(|e| e.id).collect(),
                alive: self.alive.clone(),
            })
            .await
            .map_err(|_| ActorError::Unavailable("the build queue is restarting; retry".into()))
            .and_then(|r| r);
        if leased.is_err() && !proposed.is_empty() {
            self.allocator.do_send(BuildsRunnable(proposed));
        }
        leased
    }

    /// The leases that answer this request: a retry's earlier ones, else builds from the
    /// index now, else (with `wait`) the first that become runnable within it.
    async fn find(
        &self,
        max: usize,
        request: Option<String>,
        wait: Duration,
    ) -> Result<Leases, ActorError> {
        let proposed = if max > 0 {
            self.take(max, Duration::ZERO).await?
        } else {
            Vec::new()
        };
        // A request with an id always reaches the queue: it may be the retry of one whose
        // reply was lost, to be answered with the same leases (and never made to wait).
        if !proposed.is_empty() || request.is_some() {
            let leased = self.lease(request.clone(), proposed).await?;
            if !leased.builds.is_empty() || leased.replayed {
                return Ok(leased);
            }
        }
        if max == 0 || wait.is_zero() {
            return Ok(Leases::default());
        }
        let proposed = self.take(max, wait).await?;
        if proposed.is_empty() {
            return Ok(Leases::default());
        }
        self.lease(request, proposed).await
    }
}

/// Fault point `agent_session.corrupt_memory_and_stop`: queue commands nobody decided and a
/// huge lag allowance, then stop. After the restart the session delivers none of them.
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct CorruptMemoryAndStop;

#[cfg(feature = "fault-points")]
impl Handler<CorruptMemoryAndStop> for AgentSession {
    type Result = ();
    fn handle(&mut self, _msg: CorruptMemoryAndStop, ctx: &mut Context<Self>) {
        tracing::warn!(agent = %self.name, "fault point agent_session.corrupt_memory_and_stop fired");
        self.pending.push_back(AgentCommand::Abandon {
            build_id: u64::MAX,
            attempt: u32::MAX,
        });
        self.forgiven = Duration::from_secs(3600);
        ctx.stop();
    }
}

#[cfg(feature = "fault-points")]
impl Handler<super::guard::faults::InjectPanic> for AgentSession {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;
    fn handle(
        &mut self,
        m: super::guard::faults::InjectPanic,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        super::guard::faults::inject_panic(NAME, m.0, ctx)
    }
}

/// Turn leased builds into assignments: the `.drv` bytes and every input path's closure.
fn assignments(store: &Store, leased: Vec<BuildRecord>) -> Result<Vec<Assignment>, StoreError> {
    let mut out = Vec::with_capacity(leased.len());
    for b in leased {
        let drv: Option<DrvRecord> = store.get(TreeId::Derivations, b.drv_path.as_bytes())?;
        let drv = drv.map(|d| d.contents).unwrap_or_default();
        out.push(Assignment {
            build_id: b.id,
            attempt: b.attempt,
            drv_path: b.drv_path.clone(),
            drv: Bytes64(drv),
            system: b.system.clone(),
            outputs: b
                .outputs
                .iter()
                .map(|(n, p)| OutputSpec {
                    name: n.clone(),
                    path: p.clone(),
                })
                .collect(),
            inputs: closure(store, &b.needs)?,
            priority: b.priority,
        });
    }
    Ok(out)
}

/// The available paths `roots` and everything they reference, sorted by path. Each root's
/// closure is computed once and cached (see [`ClosureCache`]).
pub fn closure(store: &Store, roots: &[String]) -> Result<Vec<PathInfo>, StoreError> {
    let mut seen: BTreeMap<String, PathInfo> = BTreeMap::new();
    for root in roots {
        if seen.contains_key(root) {
            continue;
        }
        let one = match CLOSURES.get(root) {
            Some(c) => c,
            None => {
                let (c, complete) = closure_of(store, root)?;
                let c = Arc::new(c);
                // Only a closure whose every path is available is cached: a missing one may
                // become available later.
                if complete {
                    CLOSURES.put(root, c.clone());
                }
                c
            }
        };
        for p in one.iter() {
            seen.entry(p.path.clone()).or_insert_with(|| p.clone());
        }
    }
    Ok(seen.into_values().collect())
}

/// The closure of one path, read from the `outputs` tree, and whether every path in it was
/// available.
fn closure_of(store: &Store, root: &str) -> Result<(Vec<PathInfo>, bool), StoreError> {
    let mut seen: BTreeMap<String, PathInfo> = BTreeMap::new();
    let mut todo: Vec<String> = vec![root.to_string()];
    let mut complete = true;
    while let Some(p) = todo.pop() {
        if seen.contains_key(&p) {
            continue;
        }
        let key = crate::store::keys::output_key(&p);
        let Some(o) = store.get::<OutputRecord>(TreeId::Outputs, key.as_bytes())? else {
            complete = false;
            continue;
        };
        todo.extend(o.references.iter().filter(|r| **r != p).cloned());
        seen.insert(p, path_info(&o));
    }
    Ok((seen.into_values().collect(), complete))
}

/// Closures of input paths, shared by every session: a farm's builds share most of their
/// inputs, so a work reply reads each closure from sled once, not once per build. An
/// available path's closure changes only when the coordinator lost a path's NAR and builds
/// it again (its record is then rewritten, perhaps with another NAR): [`forget_closures`]
/// empties the cache when a loss is found and when a rebuild replaces a record. It is also
/// emptied when it reaches [`CLOSURE_CACHE_ENTRIES`] to bound its memory.
struct ClosureCache(std::sync::Mutex<std::collections::HashMap<String, Arc<Vec<PathInfo>>>>);

const CLOSURE_CACHE_ENTRIES: usize = 4096;

static CLOSURES: std::sync::LazyLock<ClosureCache> =
    std::sync::LazyLock::new(|| ClosureCache(Default::default()));

impl ClosureCache {
    fn get(&self, root: &str) -> Option<Arc<Vec<PathInfo>>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(root)
            .cloned()
    }

    fn put(&self, root: &str, c: Arc<Vec<PathInfo>>) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= CLOSURE_CACHE_ENTRIES {
            m.clear();
        }
        m.insert(root.to_string(), c);
    }
}

/// Empty the closure cache (a path was lost, or its record replaced: see [`ClosureCache`]).
pub fn forget_closures() {
    CLOSURES.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// An output record as the agent sees it.
pub fn path_info(o: &OutputRecord) -> PathInfo {
    PathInfo {
        path: o.path.clone(),
        nar_hash: o.nar_hash.clone(),
        nar_size: o.nar_size,
        file_hash: o.file_hash.clone(),
        file_size: o.file_size,
        compression: "zstd".into(),
        url: crate::store::nar_cache::nar_url(&o.file_hash),
        references: o.references.clone(),
    }
}
