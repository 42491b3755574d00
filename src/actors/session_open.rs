//! Session opening: how the [`AgentRegistry`] authenticates an agent (or registers it with a
//! registration token) and opens its session, in short steps on the registry's loop around
//! the slow hash (on the blocking pool, behind the [`credentials::HashGate`]) and the commits,
//! so that no agent's request waits behind another's Argon2id.

use std::sync::Arc;

use actix::prelude::*;

use super::agent_session::{AgentSession, Opened};
use super::build_queue::Reconcile;
use super::credentials::{self, Grant, Verdict};
use super::guard::{guard_future, guard_map, unavailable};
use super::queue_state::Unheld;
use super::registry::{registration, valid_agent_name, AgentRegistry};
use super::runnable_index::AgentMatch;
use super::{guarded, ActorError};
use crate::protocol::{OpenSession, SessionOpened, PROTOCOL_VERSION};
use crate::store::keys::u64_key;
use crate::store::records::{AgentRecord, SecretHash};
use crate::store::{now_ms, Batch, TreeId};

const NAME: &str = "agent registry";

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
        req: &OpenSession,
        registry: Recipient<super::agent_admin::InfraOutcome>,
    ) -> Result<(AgentRecord, String, AgentMatch, Addr<AgentSession>), ActorError> {
        let held = req.builds.len();
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
        let agent = AgentMatch {
            systems: p.claimed,
            offers: req.offers.clone(),
            requires: req.requires.clone(),
        };
        let session = self.session_actor(&rec, agent.clone(), registry);
        tracing::info!(agent = %rec.name, held, "agent session opened");
        Ok((rec, token, agent, session))
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
                      ctx: &mut Context<Self>| {
                    let (p, committed) = r?;
                    match committed {
                        Ok(c) => {
                            let registry = ctx.address().recipient();
                            let issued = act.issue(p, c, &r5, registry)?;
                            let control = act.opened(issued.0.id, ctx);
                            Ok((issued, control))
                        }
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
                    let ((rec, token, agent, session), control) = issued?;
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
                    let mut commands = commands;
                    commands.extend(control);
                    session.do_send(Opened {
                        agent,
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
