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

use super::agent_session::{AgentSession, Opened};
use super::allocator::Allocator;
use super::build_queue::{BuildQueue, LeasedTo, Reconcile};
use super::credentials::{self, Credentials, Grant, Verdict};
use super::guard::{catch, guard_future, guard_map, unavailable, Guarded, Rebuild};
use super::queue_state::Unheld;
use super::restarts::Restarts;
use super::{guarded, ActorError};
use crate::protocol::{
    AgentCreated, AgentId, AgentInfo, NewAgent, OpenSession, SessionOpened, PROTOCOL_VERSION,
};
use crate::store::keys::u64_key;
use crate::store::records::{AgentRecord, RegistrationTokenRecord, SecretHash};
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

    fn replace(&self, agent: AgentId, token: &str) {
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
    queue: Addr<BuildQueue>,
    allocator: Addr<Allocator>,
    restarts: Arc<Restarts>,
    pub(super) sessions: Arc<Sessions>,
    liveness: Arc<Liveness>,
    /// The hash gate and the config's registration tokens (shared with the next incarnation).
    pub(super) credentials: Arc<Credentials>,
    agent_timeout: Duration,
    heartbeat_interval: Duration,
    /// `timeouts.unheld_lease_ms`, for each agent's session.
    unheld_lease: Duration,
    /// Shared with the next incarnation (see [`SessionActors`]).
    actors: Arc<SessionActors>,
    /// The next agent id, once read from sled; ids are handed out here, one at a time, so two
    /// concurrent registrations cannot get the same id.
    next_agent_id: Option<u64>,
    /// Names being registered (commit in flight), so a second registration of one name is
    /// refused even before the first is durable.
    reserved_names: HashSet<String>,
    /// Agents whose record is being rewritten (a secret rotation or rehash in flight): a
    /// second rewrite waits (503), and a session opening checked against the old secret is
    /// not completed meanwhile.
    pub(super) record_writes: HashSet<AgentId>,
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
        }
    }

    /// The next agent id (read from sled the first time), handed out one at a time so two
    /// concurrent registrations cannot get the same id.
    fn allocate_id(&mut self) -> Result<u64, ActorError> {
        let id = match self.next_agent_id {
            Some(id) => id,
            None => self.store.meta_u64(meta::NEXT_AGENT_ID)?.unwrap_or(1),
        };
        self.next_agent_id = Some(id + 1);
        Ok(id)
    }

    /// A name is taken once it is in sled or being registered.
    fn name_taken(&self, name: &str) -> Result<bool, ActorError> {
        Ok(self.reserved_names.contains(name)
            || self.store.contains(TreeId::AgentNames, name.as_bytes())?)
    }

    /// The registration token `token` grants, if it is one: from the config, else sled.
    fn grant(&self, token: &str) -> Result<Option<Grant>, ActorError> {
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

    fn session_actor(&mut self, rec: &AgentRecord, systems: Vec<String>) -> Addr<AgentSession> {
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
        let addr = actix::Supervisor::start(move |_| {
            AgentSession::new(
                id, name, systems, queue, allocator, store, restarts, liveness, timeout, unheld,
            )
        });
        self.actors.insert(rec.id, addr.clone());
        addr
    }

    /// Agents that hold leases (from before a restart) get a session actor now, with their
    /// timeout clock started: if they do not come back within the agent timeout, their leases
    /// expire. Agents that already have a running session actor keep it.
    fn await_lease_holders(&mut self) {
        let mut holders = HashSet::new();
        for r in self
            .store
            .scan::<crate::store::records::BuildRecord>(TreeId::Builds)
        {
            match r {
                Ok((_, b)) if b.state.is_leased() && b.agent_id != 0 => {
                    holders.insert(b.agent_id);
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot read a build record"),
            }
        }
        for id in holders {
            match self.store.get::<AgentRecord>(TreeId::Agents, &u64_key(id)) {
                Ok(Some(rec)) => {
                    self.liveness.await_agent(id);
                    let systems = rec.systems.clone();
                    self.session_actor(&rec, systems);
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
        catch(NAME, ctx, |_| self.await_lease_holders());
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
fn registration(rec: &AgentRecord) -> Result<Batch, ActorError> {
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

/// Authenticate an agent (or register it with a registration token) and open its session.
///
/// The steps, each on the registry's loop except the hash and the commits:
/// 1. [`AgentRegistry::plan_open`]: protocol, the record or the registration token (cheap);
/// 2. the slow hash on the blocking pool, behind the [`credentials::HashGate`];
/// 3. [`AgentRegistry::prepare_open`]: the record is still the one checked, the claimed
///    systems and tags are allowed; the writes of a registration or a rehash;
/// 4. those writes are committed;
/// 5. [`AgentRegistry::issue`]: the record is still unchanged (no rotation landed or is in
///    flight), then the token and the session actor;
/// 6. the held builds are reconciled before the reply.
#[derive(Message)]
#[rtype(result = "Result<SessionOpened, ActorError>")]
pub struct Open(pub OpenSession);

/// What step 2 must do.
enum Check {
    /// An agent that exists: check the secret against its stored hash.
    Verify(SecretHash),
    /// A new agent with a valid registration token: hash the secret it chose.
    Register(Grant),
    /// No such agent and no valid token: spend a verification's time, then refuse.
    Refuse,
}

/// What step 2 found.
enum Checked {
    Verified {
        stored: SecretHash,
        rehash: Option<SecretHash>,
    },
    Registered {
        grant: Grant,
        hashed: SecretHash,
    },
    Refused,
}

/// What steps 3 and 4 carry to step 5.
struct Prepared {
    rec: AgentRecord,
    /// The secret hash sled must hold at step 5 (the old one, or the rehash once committed).
    expect: SecretHash,
    /// Writes to commit at step 4, and whether they are a rehash (which may fail without
    /// failing the opening) or a registration (which may not).
    batch: Option<(Batch, bool)>,
    /// `expect` if the rehash batch lands.
    rehashed: Option<SecretHash>,
    claimed: Vec<String>,
}

fn unauthorized(name: &str) -> ActorError {
    ActorError::Unauthorized(format!(
        "unknown agent {name:?} or wrong secret: create it with `kiln agent new` (or give \
         kiln-agent a --registration-token-file) and pass its secret file"
    ))
}

impl AgentRegistry {
    /// Step 1.
    fn plan_open(&self, req: &OpenSession) -> Result<Check, ActorError> {
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(ActorError::BadRequest(format!(
                "unsupported_protocol: agent speaks protocol {}, this coordinator speaks {PROTOCOL_VERSION}; upgrade the older side",
                req.protocol_version
            )));
        }
        if req.secret.len() > credentials::MAX_SECRET_LEN {
            return Err(ActorError::BadRequest(format!(
                "the secret is {} bytes long; at most {} are accepted",
                req.secret.len(),
                credentials::MAX_SECRET_LEN
            )));
        }
        if req.secret.is_empty() {
            return Err(unauthorized(&req.name));
        }
        if let Some(id) = self.store.agent_id(&req.name)? {
            if let Some(rec) = self
                .store
                .get::<AgentRecord>(TreeId::Agents, &u64_key(id))?
            {
                return Ok(Check::Verify(rec.secret));
            }
        }
        let Some(token) = &req.registration_token else {
            return Ok(Check::Refuse);
        };
        let Some(grant) = self.grant(token)? else {
            return Ok(Check::Refuse);
        };
        if !valid_agent_name(&req.name) {
            return Err(ActorError::BadRequest(format!(
                "agent name {:?} is not valid: use 1 to 128 letters, digits, '.', '_' or '-'",
                req.name
            )));
        }
        if req.secret.len() < credentials::MIN_REGISTERED_SECRET_LEN {
            return Err(ActorError::BadRequest(format!(
                "a self-registered agent's secret needs at least {} characters (kiln-agent \
                 writes 64 random hex characters to its --secret-file)",
                credentials::MIN_REGISTERED_SECRET_LEN
            )));
        }
        match &grant.token.systems {
            Some(allowed) => credentials::check_systems(&req.name, &req.systems, allowed)?,
            None if req.systems.is_empty() => {
                return Err(ActorError::BadRequest(
                    "a self-registering agent must name its systems (--system) unless its \
                     registration token lists them"
                        .into(),
                ))
            }
            None => {}
        }
        credentials::check_tags(&req.name, &req.offers, grant.token.tags.as_deref())?;
        Ok(Check::Register(grant))
    }

    /// Step 3.
    fn prepare_open(
        &mut self,
        req: &OpenSession,
        checked: Checked,
    ) -> Result<Prepared, ActorError> {
        let (stored, rehash) = match checked {
            Checked::Refused => return Err(unauthorized(&req.name)),
            Checked::Registered { grant, hashed } => {
                return self.prepare_registration(req, grant, hashed)
            }
            Checked::Verified { stored, rehash } => (stored, rehash),
        };
        let rec = self
            .current(&req.name)?
            .ok_or_else(|| unauthorized(&req.name))?;
        if rec.secret != stored {
            // Rotated while the hash ran: the secret checked is not the agent's any more.
            return Err(unauthorized(&req.name));
        }
        if self.record_writes.contains(&rec.id) {
            return Err(ActorError::Unavailable(format!(
                "agent {:?}'s secret is being changed; retry",
                rec.name
            )));
        }
        let claimed = if req.systems.is_empty() {
            rec.systems.clone()
        } else {
            req.systems.clone()
        };
        credentials::check_systems(&rec.name, &claimed, &rec.systems)?;
        credentials::check_tags(&rec.name, &req.offers, rec.tags.as_deref())?;
        let mut batch = None;
        if let Some(new) = &rehash {
            let mut r = rec.clone();
            r.secret = new.clone();
            r.secret_set_ms = now_ms();
            let mut b = Batch::new();
            b.put(TreeId::Agents, &u64_key(r.id), &r)?;
            batch = Some((b, true));
            self.record_writes.insert(rec.id);
            tracing::info!(agent = %rec.name, from = %rec.secret.algorithm(), to = %new.algorithm(), "rehashing agent secret");
        }
        Ok(Prepared {
            expect: stored,
            rehashed: rehash,
            rec,
            batch,
            claimed,
        })
    }

    fn prepare_registration(
        &mut self,
        req: &OpenSession,
        grant: Grant,
        hashed: SecretHash,
    ) -> Result<Prepared, ActorError> {
        if self.name_taken(&req.name)? {
            // Registered meanwhile (by this agent's retry, or by someone else): the retry
            // that comes next checks the secret against that record.
            return Err(ActorError::Unavailable(format!(
                "agent {:?} is being registered; retry",
                req.name
            )));
        }
        let id = self.allocate_id()?;
        let now = now_ms();
        let systems = grant
            .token
            .systems
            .clone()
            .unwrap_or_else(|| req.systems.clone());
        let rec = AgentRecord {
            id,
            name: req.name.clone(),
            secret: hashed.clone(),
            systems: systems.clone(),
            created_ms: now,
            tags: grant.token.tags.clone(),
            registered_by: grant.token.id.clone(),
            secret_set_ms: now,
        };
        self.reserved_names.insert(rec.name.clone());
        tracing::info!(agent = %rec.name, agent_id = id, registration_token = %grant.token.id, "registering agent");
        let claimed = if req.systems.is_empty() {
            systems
        } else {
            req.systems.clone()
        };
        Ok(Prepared {
            batch: Some((registration(&rec)?, false)),
            expect: hashed,
            rehashed: None,
            rec,
            claimed,
        })
    }

    /// The agent record of `name` as sled holds it now.
    fn current(&self, name: &str) -> Result<Option<AgentRecord>, ActorError> {
        match self.store.agent_id(name)? {
            Some(id) => Ok(self.store.get(TreeId::Agents, &u64_key(id))?),
            None => Ok(None),
        }
    }

    /// Step 5: the record still holds the secret that was checked (or its rehash), and no
    /// rotation is in flight; then a token, liveness, and the session actor.
    fn issue(
        &mut self,
        p: Prepared,
        committed: bool,
        held: usize,
    ) -> Result<(AgentRecord, String, Vec<String>, Addr<AgentSession>), ActorError> {
        self.reserved_names.remove(&p.rec.name);
        if p.rehashed.is_some() {
            self.record_writes.remove(&p.rec.id);
        }
        let expect = match (&p.rehashed, committed) {
            (Some(new), true) => new,
            _ => &p.expect,
        };
        let rec = self
            .current(&p.rec.name)?
            .ok_or_else(|| unauthorized(&p.rec.name))?;
        if rec.id != p.rec.id || &rec.secret != expect {
            return Err(unauthorized(&p.rec.name));
        }
        if self.record_writes.contains(&rec.id) {
            return Err(ActorError::Unavailable(format!(
                "agent {:?}'s secret is being changed; retry",
                rec.name
            )));
        }
        let token = credentials::random_hex(32);
        self.sessions.replace(rec.id, &token);
        self.liveness.touch(rec.id);
        self.liveness.set_lost(rec.id, false);
        let session = self.session_actor(&rec, p.claimed.clone());
        tracing::info!(agent = %rec.name, held, "agent session opened");
        Ok((rec, token, p.claimed, session))
    }
}

impl Handler<Open> for AgentRegistry {
    type Result = ResponseActFuture<Self, Result<SessionOpened, ActorError>>;

    fn handle(&mut self, msg: Open, ctx: &mut Context<Self>) -> Self::Result {
        let req = Arc::new(msg.0);
        let check = match guarded::<Self, _>(NAME, ctx, |_| self.plan_open(&req)) {
            Ok(c) => c,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        // Step 2.
        let (gate, secret) = (self.credentials.gate.clone(), req.secret.clone());
        let hashing = gate.run(move || {
            Ok(match check {
                Check::Verify(stored) => match credentials::verify_secret(&stored, &secret)? {
                    Verdict::Valid { rehash } => Checked::Verified { stored, rehash },
                    Verdict::Invalid => Checked::Refused,
                },
                Check::Register(grant) => Checked::Registered {
                    grant,
                    hashed: credentials::hash_secret(&secret)?,
                },
                Check::Refuse => {
                    credentials::waste_a_verification(&secret);
                    Checked::Refused
                }
            })
        });
        let (r3, r5, r6) = (req.clone(), req.clone(), req);
        let committer = self.committer.clone();
        let queue = self.queue.clone();
        let (hb, timeout) = (self.heartbeat_interval, self.agent_timeout);
        let chain = guard_future::<Self, _, _>(NAME, hashing)
            // Step 3.
            .map(guard_map(
                NAME,
                || Err(unavailable(NAME)),
                move |checked: Result<Checked, ActorError>, act: &mut Self, _ctx| {
                    act.prepare_open(&r3, checked?)
                },
            ))
            // Step 4: the outer error is a refusal before anything was reserved; the inner one
            // a registration whose commit failed (step 5 releases its reservation).
            .then(move |prepared: Result<Prepared, ActorError>, _act, _ctx| {
                guard_future::<Self, _, _>(NAME, async move {
                    let mut p = prepared?;
                    let committed = match p.batch.take() {
                        None => Ok(false),
                        Some((b, rehash)) => match committer.commit(b).await {
                            Ok(_) => Ok(true),
                            Err(e) if rehash => {
                                tracing::warn!(agent = %p.rec.name, error = %e, "could not store the rehashed secret; the old hash stays until the next session");
                                Ok(false)
                            }
                            Err(e) => Err(ActorError::from(e)),
                        },
                    };
                    Ok((p, committed))
                })
            })
            // Step 5.
            .map(guard_map(
                NAME,
                || Err(unavailable(NAME)),
                move |r: Result<(Prepared, Result<bool, ActorError>), ActorError>,
                      act: &mut Self,
                      _ctx| {
                    let (p, committed) = r?;
                    match committed {
                        Ok(c) => act.issue(p, c, r5.builds.len()),
                        Err(e) => {
                            act.reserved_names.remove(&p.rec.name);
                            Err(e)
                        }
                    }
                },
            ))
            // Step 6.
            .then(move |issued, _act, _ctx| {
                guard_future::<Self, _, _>(NAME, async move {
                    let (rec, token, systems, session) = issued?;
                    let agent_id = rec.id;
                    let commands = queue
                        .send(Reconcile {
                            agent_id,
                            held: r6.builds.clone(),
                            unheld: Unheld::Release,
                        })
                        .await
                        .map_err(|_| {
                            ActorError::Unavailable("the build queue is restarting; retry".into())
                        })??;
                    session.do_send(Opened {
                        systems,
                        commands: Vec::new(),
                    });
                    Ok(SessionOpened {
                        agent_id,
                        session_token: token,
                        heartbeat_interval_ms: hb.as_millis() as u64,
                        agent_timeout_ms: timeout.as_millis() as u64,
                        commands,
                    })
                })
            });
        Box::pin(chain)
    }
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
        Box::pin(guard_future::<Self, _, _>(NAME, async move {
            let mut out = Vec::new();
            for r in store.scan::<AgentRecord>(TreeId::Agents) {
                let (_, a) = r?;
                let (status, ago) = liveness.status(a.id);
                let builds = queue.send(LeasedTo(a.id)).await.unwrap_or_default();
                out.push(AgentInfo {
                    id: a.id,
                    name: a.name,
                    systems: a.systems,
                    status,
                    last_seen_ms_ago: ago,
                    builds,
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
