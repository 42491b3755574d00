//! `AgentRegistry`: agent records (create, authenticate, register with a token), session
//! tokens, and the supervisor of the per-agent [`AgentSession`] actors (one-for-one: a session
//! that stops is restarted alone). Session tokens live in memory only: after a coordinator
//! restart agents get `session_unknown` and open a new session with their secret, which
//! reconciles the builds they hold.
//!
//! Secrets are checked with a slow hash ([`super::credentials`]) on the blocking pool, never
//! on the registry's loop (the loop every agent's session opening goes through): a session
//! opening is a chain of short steps on the loop around the hash and the commits. Secret
//! rotation and registration tokens are in [`super::enrollment`].
//!
//! Supervision: every handler runs under the panic guard. A registry restart keeps the three
//! shared maps — [`Sessions`] (tokens, read by the HTTP layer), [`Liveness`] (stamped by the
//! HTTP layer) and [`SessionActors`] (its running children) — because they are not the
//! registry's own state: agents keep their sessions and their session actors keep running
//! through it. What the registry owns is in sled (agents, names, `meta/next_agent_id`); the
//! rebuild waits for the committer to land what the old registry handed over, then starts
//! fresh (the next id is read from sled on first use, no name is reserved).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use sha2::{Digest as _, Sha256};

use super::agent_admin::{shown_control, InfraOutcome};
use super::agent_controls::AgentControls;
use super::agent_session::AgentSession;
use super::allocator::Allocator;
use super::build_queue::{BuildQueue, LeaseHolders, LeasedTo};
use super::credentials::{self, Credentials, Grant};
use super::guard::{catch, guard_future, guard_map, guard_task, unavailable, Guarded, Rebuild};
use super::restarts::Restarts;
use super::runnable_index::AgentMatch;
pub use super::session_open::Open;
use super::{guarded, ActorError};
use crate::protocol::{AgentCreated, AgentId, AgentInfo, NewAgent};
use crate::store::keys::u64_key;
use crate::store::records::{AgentRecord, RegistrationTokenRecord};
use crate::store::{meta, now_ms, Batch, Committer, Store, TreeId};

const NAME: &str = "agent registry";

/// When each agent was last heard from; stamped by the HTTP layer on every authenticated
/// request, read by the agent's session actor. Not persisted (DESIGN: persist lease grants,
/// not heartbeats).
#[derive(Default)]
pub struct Liveness {
    inner: RwLock<HashMap<AgentId, (Instant, Seen)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Connected,
    Lost,
    /// Holds leases from before a coordinator restart and has not come back yet.
    Awaited,
}

impl Liveness {
    pub fn touch(&self, agent: AgentId) {
        if let Ok(mut m) = self.inner.write() {
            m.insert(agent, (Instant::now(), Seen::Connected));
        }
    }

    /// Start an agent's timeout clock now without having heard from it (leases that survived
    /// a coordinator restart get the agent timeout as their grace period).
    pub fn await_agent(&self, agent: AgentId) {
        if let Ok(mut m) = self.inner.write() {
            m.entry(agent).or_insert((Instant::now(), Seen::Awaited));
        }
    }

    pub fn last_seen(&self, agent: AgentId) -> Option<Instant> {
        self.inner.read().ok()?.get(&agent).map(|e| e.0)
    }

    pub fn set_lost(&self, agent: AgentId, lost: bool) {
        if let Ok(mut m) = self.inner.write() {
            if let Some(e) = m.get_mut(&agent) {
                e.1 = if lost { Seen::Lost } else { Seen::Connected };
            }
        }
    }

    /// True while `agent` is declared lost.
    pub fn is_lost(&self, agent: AgentId) -> bool {
        self.inner
            .read()
            .ok()
            .and_then(|m| m.get(&agent).map(|e| e.1 == Seen::Lost))
            .unwrap_or(false)
    }

    /// The agent was removed (expired): nothing more to know of it.
    pub fn forget(&self, agent: AgentId) {
        if let Ok(mut m) = self.inner.write() {
            m.remove(&agent);
        }
    }

    pub fn status(&self, agent: AgentId) -> (String, Option<u64>) {
        match self.inner.read().ok().and_then(|m| m.get(&agent).copied()) {
            None => ("never-seen".into(), None),
            Some((t, seen)) => {
                let s = match seen {
                    Seen::Connected => "connected",
                    Seen::Lost => "lost",
                    Seen::Awaited => "awaited",
                };
                (
                    s.into(),
                    (seen != Seen::Awaited).then(|| t.elapsed().as_millis() as u64),
                )
            }
        }
    }
}

/// Session token (as its SHA-256) -> agent. Read by the HTTP layer on every agent request.
#[derive(Default)]
pub struct Sessions {
    inner: RwLock<HashMap<[u8; 32], AgentId>>,
}

impl Sessions {
    pub fn lookup(&self, token: &str) -> Option<AgentId> {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.inner.read().ok()?.get(&h).copied()
    }

    pub(super) fn replace(&self, agent: AgentId, token: &str) {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Ok(mut m) = self.inner.write() {
            m.retain(|_, a| *a != agent);
            m.insert(h, agent);
        }
    }

    /// End the agent's session (its secret was rotated): its token stops working at once.
    pub(super) fn end(&self, agent: AgentId) {
        if let Ok(mut m) = self.inner.write() {
            m.retain(|_, a| *a != agent);
        }
    }
}

/// The running session actors, by agent: the registry's children. Shared rather than owned,
/// so a registry restart keeps knowing the children that keep running through it (a second
/// session actor for one agent would declare it lost on its own clock).
#[derive(Default)]
pub struct SessionActors {
    inner: std::sync::Mutex<HashMap<AgentId, Addr<AgentSession>>>,
}

impl SessionActors {
    pub fn get(&self, agent: AgentId) -> Option<Addr<AgentSession>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&agent)
            .cloned()
    }

    fn remove(&self, agent: AgentId) -> Option<Addr<AgentSession>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&agent)
    }

    fn insert(&self, agent: AgentId, addr: Addr<AgentSession>) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent, addr);
    }
}

pub struct AgentRegistry {
    pub(super) store: Store,
    pub(super) committer: Committer,
    pub(super) queue: Addr<BuildQueue>,
    allocator: Addr<Allocator>,
    restarts: Arc<Restarts>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) liveness: Arc<Liveness>,
    /// The hash gate and the config's registration tokens (shared with the next incarnation).
    pub(super) credentials: Arc<Credentials>,
    pub(super) agent_timeout: Duration,
    pub(super) heartbeat_interval: Duration,
    /// `timeouts.unheld_lease_ms`, for each agent's session.
    unheld_lease: Duration,
    /// Shared with the next incarnation (see [`SessionActors`]).
    actors: Arc<SessionActors>,
    /// The next agent id, once read from sled; ids are handed out here, one at a time, so two
    /// concurrent registrations cannot get the same id.
    next_agent_id: Option<u64>,
    /// Names being registered (commit in flight), so a second registration of one name is
    /// refused even before the first is durable.
    pub(super) reserved_names: HashSet<String>,
    /// Agents whose record is being rewritten (a secret rotation or rehash in flight): a
    /// second rewrite waits (503), and a session opening checked against the old secret is
    /// not completed meanwhile.
    pub(super) record_writes: HashSet<AgentId>,
    /// Pause, drain and quarantine of each agent (shared with its session, which enforces
    /// them; kept through a restart like [`Liveness`]).
    pub(super) controls: Arc<AgentControls>,
    /// `agents.expire_after_ms` (0 = never).
    pub(super) expire_after_ms: u64,
    /// The expiry sweep's place: the last agent id of the page it read last (0 = start).
    pub(super) sweep_cursor: u64,
    /// A sweep page is being read or its agents expired.
    pub(super) sweeping: bool,
}

impl AgentRegistry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        committer: Committer,
        queue: Addr<BuildQueue>,
        allocator: Addr<Allocator>,
        restarts: Arc<Restarts>,
        sessions: Arc<Sessions>,
        liveness: Arc<Liveness>,
        actors: Arc<SessionActors>,
        credentials: Arc<Credentials>,
        agent_timeout: Duration,
        heartbeat_interval: Duration,
        unheld_lease: Duration,
        controls: Arc<AgentControls>,
        expire_after_ms: u64,
    ) -> AgentRegistry {
        AgentRegistry {
            store,
            committer,
            queue,
            allocator,
            restarts,
            sessions,
            liveness,
            credentials,
            agent_timeout,
            heartbeat_interval,
            unheld_lease,
            actors,
            next_agent_id: None,
            reserved_names: HashSet::new(),
            record_writes: HashSet::new(),
            controls,
            expire_after_ms,
            sweep_cursor: 0,
            sweeping: false,
        }
    }

    pub(super) fn actors_get(&self, agent: AgentId) -> Option<Addr<AgentSession>> {
        self.actors.get(agent)
    }

    /// The agent was removed: its session actor stops (it is not restarted).
    pub(super) fn forget_session_actor(&self, agent: AgentId) {
        if let Some(a) = self.actors.remove(agent) {
            a.do_send(super::agent_session::Retire);
        }
    }

    /// The next agent id (read from sled the first time), handed out one at a time so two
    /// concurrent registrations cannot get the same id.
    pub(super) fn allocate_id(&mut self) -> Result<u64, ActorError> {
        let id = match self.next_agent_id {
            Some(id) => id,
            None => self.store.meta_u64(meta::NEXT_AGENT_ID)?.unwrap_or(1),
        };
        self.next_agent_id = Some(id + 1);
        Ok(id)
    }

    /// A name is taken once it is in sled or being registered.
    pub(super) fn name_taken(&self, name: &str) -> Result<bool, ActorError> {
        Ok(self.reserved_names.contains(name)
            || self.store.contains(TreeId::AgentNames, name.as_bytes())?)
    }

    /// The registration token `token` grants, if it is one: from the config, else sled.
    pub(super) fn grant(&self, token: &str) -> Result<Option<Grant>, ActorError> {
        let digest = credentials::token_digest(token);
        if let Some(g) = self
            .credentials
            .config_tokens
            .iter()
            .find(|g| g.digest == digest)
        {
            return Ok(Some(g.clone()));
        }
        let rec: Option<RegistrationTokenRecord> = self
            .store
            .get(TreeId::RegistrationTokens, digest.as_bytes())?;
        Ok(rec.map(|token| Grant { digest, token }))
    }

    pub(super) fn session_actor(
        &mut self,
        rec: &AgentRecord,
        agent: AgentMatch,
        registry: Recipient<InfraOutcome>,
    ) -> Addr<AgentSession> {
        if let Some(a) = self.actors.get(rec.id) {
            if a.connected() {
                return a;
            }
        }
        let (id, name) = (rec.id, rec.name.clone());
        let (queue, allocator, store) = (
            self.queue.clone(),
            self.allocator.clone(),
            self.store.clone(),
        );
        let (restarts, liveness, timeout, unheld) = (
            self.restarts.clone(),
            self.liveness.clone(),
            self.agent_timeout,
            self.unheld_lease,
        );
        let controls = self.controls.clone();
        let addr = actix::Supervisor::start(move |_| {
            AgentSession::new(
                id, name, agent, queue, allocator, store, restarts, liveness, timeout, unheld,
                controls, registry,
            )
        });
        self.actors.insert(rec.id, addr.clone());
        addr
    }

    /// Agents that hold leases (from before a restart) get a session actor now, with their
    /// timeout clock started: if they do not come back within the agent timeout, their leases
    /// expire. Agents that already have a running session actor keep it. The holders come
    /// from the build queue's lease index (no scan of the builds).
    fn await_lease_holders(&mut self, holders: Vec<AgentId>, registry: Recipient<InfraOutcome>) {
        for id in holders {
            match self.store.get::<AgentRecord>(TreeId::Agents, &u64_key(id)) {
                Ok(Some(rec)) => {
                    self.liveness.await_agent(id);
                    let agent = AgentMatch {
                        systems: rec.systems.clone(),
                        ..Default::default()
                    };
                    self.session_actor(&rec, agent, registry.clone());
                    tracing::info!(agent = %rec.name, "awaiting agent that holds leases");
                }
                _ => tracing::error!(agent_id = id, "leases held by an unknown agent"),
            }
        }
    }
}

impl Actor for AgentRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let ask = self.queue.send(LeaseHolders);
        let fut = guard_task::<Self, _, _>(NAME, ask).map(
            |holders, act: &mut Self, ctx: &mut Context<Self>| match holders {
                Some(Ok(h)) => {
                    let me = ctx.address().recipient();
                    catch(NAME, ctx, |_| act.await_lease_holders(h, me));
                }
                // The queue is restarting: its leases are awaited when it answers the next
                // registry start; an agent that comes back opens its session anyway.
                _ => tracing::warn!("could not ask the build queue for lease holders"),
            },
        );
        ctx.spawn(fut);
        if self.expire_after_ms > 0 {
            let every = Duration::from_millis(self.expire_after_ms / 4)
                .clamp(Duration::from_millis(200), Duration::from_secs(60));
            ctx.run_interval(every, |act, ctx| {
                catch(NAME, ctx, |ctx| act.sweep(ctx));
            });
        }
    }
}

impl Rebuild for AgentRegistry {
    const ACTOR: &'static str = "agent_registry";

    fn restarts(&self) -> Arc<Restarts> {
        self.restarts.clone()
    }

    /// Lets every registration the old registry handed over land (so its names are in sled,
    /// and `meta/next_agent_id` is past its ids), then a fresh registry over the same shared
    /// maps.
    fn rebuild(&self) -> Result<AgentRegistry, ActorError> {
        self.committer.barrier_blocking();
        Ok(AgentRegistry::new(
            self.store.clone(),
            self.committer.clone(),
            self.queue.clone(),
            self.allocator.clone(),
            self.restarts.clone(),
            self.sessions.clone(),
            self.liveness.clone(),
            self.actors.clone(),
            self.credentials.clone(),
            self.agent_timeout,
            self.heartbeat_interval,
            self.unheld_lease,
            self.controls.clone(),
            self.expire_after_ms,
        ))
    }
}

impl Supervised for AgentRegistry {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        super::guard::restart(self);
    }
}

pub(super) fn valid_agent_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

/// Register an agent (`POST /api/v1/agents`).
#[derive(Message)]
#[rtype(result = "Result<AgentCreated, ActorError>")]
pub struct CreateAgent(pub NewAgent);

impl Handler<CreateAgent> for AgentRegistry {
    type Result = ResponseActFuture<Self, Result<AgentCreated, ActorError>>;

    fn handle(&mut self, msg: CreateAgent, ctx: &mut Context<Self>) -> Self::Result {
        let req = msg.0;
        let checked = guarded::<Self, _>(NAME, ctx, |_| {
            if !valid_agent_name(&req.name) {
                return Err(ActorError::BadRequest(format!(
                    "agent name {:?} is not valid: use 1 to 128 letters, digits, '.', '_' or '-'",
                    req.name
                )));
            }
            if req.systems.is_empty() {
                return Err(ActorError::BadRequest(
                    "an agent needs at least one system (e.g. --system x86_64-linux)".into(),
                ));
            }
            if self.name_taken(&req.name)? {
                return Err(ActorError::Conflict(format!(
                    "an agent named {:?} already exists: pick another name",
                    req.name
                )));
            }
            self.allocate_id()
        });
        let id = match checked {
            Ok(id) => id,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        self.reserved_names.insert(req.name.clone());
        let committer = self.committer.clone();
        let gate = self.credentials.gate.clone();
        let name = req.name.clone();
        let fut = async move {
            let secret = credentials::random_hex(32);
            let s2 = secret.clone();
            let hashed = gate.run(move || credentials::hash_secret(&s2)).await?;
            let now = now_ms();
            let rec = AgentRecord {
                id,
                name: req.name.clone(),
                secret: hashed,
                systems: req.systems,
                created_ms: now,
                tags: None,
                registered_by: String::new(),
                secret_set_ms: now,
            };
            committer.commit(registration(&rec)?).await?;
            Ok(AgentCreated {
                id,
                name: rec.name,
                secret,
            })
        };
        Box::pin(guard_future::<Self, _, _>(NAME, fut).map(guard_map(
            NAME,
            || Err(unavailable(NAME)),
            move |r, act: &mut Self, _ctx: &mut Context<Self>| {
                act.reserved_names.remove(&name);
                r
            },
        )))
    }
}

/// The writes that register an agent: its record, its name, the next id and an
/// `agent-created` event.
pub(super) fn registration(rec: &AgentRecord) -> Result<Batch, ActorError> {
    let mut b = Batch::new();
    b.put(TreeId::Agents, &u64_key(rec.id), rec)?;
    b.put_raw(TreeId::AgentNames, rec.name.as_bytes(), &u64_key(rec.id));
    b.put_raw(TreeId::Meta, meta::NEXT_AGENT_ID, &u64_key(rec.id + 1));
    let mut data = serde_json::json!({"agent_id": rec.id, "name": rec.name});
    if !rec.registered_by.is_empty() {
        data["registration_token"] = rec.registered_by.clone().into();
    }
    b.event("agent-created", 0, rec.id, data);
    Ok(b)
}

/// The session actor of an authenticated agent.
#[derive(Message)]
#[rtype(result = "Option<Addr<AgentSession>>")]
pub struct SessionOf(pub AgentId);

impl Handler<SessionOf> for AgentRegistry {
    type Result = Guarded<SessionOf>;
    fn handle(&mut self, msg: SessionOf, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| self.actors.get(msg.0))
    }
}

/// `kiln agents`.
#[derive(Message)]
#[rtype(result = "Result<Vec<AgentInfo>, ActorError>")]
pub struct ListAgents;

impl Handler<ListAgents> for AgentRegistry {
    type Result = ResponseActFuture<Self, Result<Vec<AgentInfo>, ActorError>>;

    fn handle(&mut self, _msg: ListAgents, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let liveness = self.liveness.clone();
        let queue = self.queue.clone();
        let controls = self.controls.clone();
        Box::pin(guard_future::<Self, _, _>(NAME, async move {
            // One question to the queue, answered from its lease index.
            let mut leases = queue.send(LeasedTo(None)).await.map_err(|_| {
                ActorError::Unavailable("the build queue is restarting; retry".into())
            })?;
            let mut out = Vec::new();
            for r in store.scan::<AgentRecord>(TreeId::Agents) {
                let (_, a) = r?;
                let (status, ago) = liveness.status(a.id);
                let builds = leases.remove(&a.id).unwrap_or_default();
                let (control, quarantined_until_ms) = shown_control(&controls, a.id, &builds);
                out.push(AgentInfo {
                    id: a.id,
                    name: a.name,
                    systems: a.systems,
                    status,
                    last_seen_ms_ago: ago,
                    builds,
                    control,
                    quarantined_until_ms,
                });
            }
            metrics::gauge!("kiln_agents", "status" => "connected")
                .set(out.iter().filter(|a| a.status == "connected").count() as f64);
            Ok(out)
        }))
    }
}

/// What the registry holds in memory of what sled owns (tests compare it with sled after a
/// restart): the next agent id, if read yet, and the names being registered.
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "(Option<u64>, Vec<String>)")]
pub struct RegistrySnapshot;

#[cfg(feature = "fault-points")]
impl Handler<RegistrySnapshot> for AgentRegistry {
    type Result = Guarded<RegistrySnapshot>;
    fn handle(&mut self, _msg: RegistrySnapshot, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| {
            let mut names: Vec<String> = self.reserved_names.iter().cloned().collect();
            names.sort();
            (self.next_agent_id, names)
        })
    }
}

/// Fault point `agent_registry.corrupt_memory_and_stop`: a wrong next id and a name reserved
/// for ever, then a stop.
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct CorruptMemoryAndStop;

#[cfg(feature = "fault-points")]
impl Handler<CorruptMemoryAndStop> for AgentRegistry {
    type Result = ();
    fn handle(&mut self, _msg: CorruptMemoryAndStop, ctx: &mut Context<Self>) {
        tracing::warn!("fault point agent_registry.corrupt_memory_and_stop fired");
        self.next_agent_id = Some(1);
        self.reserved_names.insert("fault-point".into());
        ctx.stop();
    }
}

#[cfg(feature = "fault-points")]
impl Handler<super::guard::faults::InjectPanic> for AgentRegistry {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;
    fn handle(
        &mut self,
        m: super::guard::faults::InjectPanic,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        super::guard::faults::inject_panic(NAME, m.0, ctx)
    }
}
