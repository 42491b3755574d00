//! The [`AgentRegistry`]'s handlers for the agent controls ([`super::agent_controls`]):
//! `kiln agent pause|resume|drain` ([`SetMode`]), the infrastructure outcomes that count
//! towards a quarantine ([`InfraOutcome`], one small message per result or lost agent), the
//! stored "last session opening" of each agent, and the paged expiry sweep.
//!
//! The registry is the only writer of [`AgentControls`]; every change that must survive a
//! restart is committed as the agent's whole [`AgentControlRecord`], taken from memory after
//! the change, so commits in the registry's order leave sled with the latest state.
//!
//! Expiry: every `expire_after/4` (between 200 ms and 1 min) the registry reads one page of
//! agent records ([`SWEEP_PAGE`]) after its cursor on the blocking pool, picks those not seen
//! for `agents.expire_after_ms` ([`super::agent_controls::expired`]), and expires them one at
//! a time: their leases are released first (as for a lost agent), then their record, name and
//! controls are deleted with an `agent-expired` event, and their session ends. The sweep goes
//! round the whole tree a page per tick, so no tick costs more than a page.

use actix::prelude::*;

use super::agent_controls::{AgentControls, Control, Mode};
use super::build_queue::{AgentLost, LeasedTo};
use super::guard::{guard_future, guard_map, unavailable};
use super::registry::AgentRegistry;
use super::{guarded, ActorError};
use crate::protocol::{AgentCommand, AgentId, AgentInfo, BuildId};
use crate::store::keys::u64_key;
use crate::store::records::AgentRecord;
use crate::store::{now_ms, Batch, Committer, TreeId};

const NAME: &str = "agent registry";

/// What expiring a page did: the agents removed, and the error that stopped it, if one did.
type Swept = (Vec<(AgentId, String)>, Option<ActorError>);

/// How stale the stored session opening time may be: an eighth of the expiry period, at most
/// an hour. An agent that reopens sessions often costs a write per this, not per opening.
pub fn seen_slack_ms(expire_after_ms: u64) -> u64 {
    (expire_after_ms / 8).min(3_600_000)
}

/// Agent records read per expiry tick.
pub const SWEEP_PAGE: usize = 256;

/// What `kiln agent pause|resume|drain` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Drain,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Drain => "drain",
        }
    }
}

/// The control shown for an agent: its mode, `drained` for a draining agent that holds no
/// builds, and the end of its quarantine while it lasts.
pub fn shown_control(
    controls: &AgentControls,
    agent: AgentId,
    builds: &[BuildId],
) -> (String, Option<u64>) {
    let c = controls.get(agent);
    let mode = match c.mode {
        Mode::Draining if builds.is_empty() => "drained",
        m => m.as_str(),
    };
    let until = c.quarantined(now_ms()).then_some(c.quarantined_until_ms);
    (mode.to_string(), until)
}

/// Commit an agent's controls as they are in memory now, with an event; logged if it fails
/// (the memory state holds for this run; what is lost is its survival of a restart).
fn persist(
    committer: &Committer,
    agent: AgentId,
    c: &Control,
    event: Option<(&str, serde_json::Value)>,
) -> impl std::future::Future<Output = Result<(), ActorError>> {
    let mut b = Batch::new();
    let put = b.put(TreeId::AgentControls, &u64_key(agent), &c.record());
    if let Some((kind, data)) = event {
        b.event(kind, 0, agent, data);
    }
    let committer = committer.clone();
    async move {
        put?;
        committer.commit(b).await?;
        Ok(())
    }
}

/// `POST /api/v1/agents/{name}/pause|resume|drain`: set the agent's mode (resume also lifts
/// a quarantine), durably, then tell its session, which sends the agent `pause` or `resume`.
/// Answers the agent as `kiln agents` shows it.
#[derive(Message)]
#[rtype(result = "Result<AgentInfo, ActorError>")]
pub struct SetMode {
    pub name: String,
    pub action: Action,
}

impl AgentRegistry {
    /// The record of the agent registered as `name`, or a not-found error saying where the
    /// names are listed.
    pub(super) fn agent_by_name(&self, name: &str) -> Result<AgentRecord, ActorError> {
        let not_found = || {
            ActorError::NotFound(format!(
                "no agent named {name:?}: see `kiln agents` for the registered names"
            ))
        };
        let id = self.store.agent_id(name)?.ok_or_else(not_found)?;
        self.store
            .get(TreeId::Agents, &u64_key(id))?
            .ok_or_else(not_found)
    }
}

impl Handler<SetMode> for AgentRegistry {
    type Result = ResponseActFuture<Self, Result<AgentInfo, ActorError>>;

    fn handle(&mut self, msg: SetMode, ctx: &mut Context<Self>) -> Self::Result {
        let name = msg.name;
        let action = msg.action;
        let found = guarded::<Self, _>(NAME, ctx, |_| {
            let rec = self.agent_by_name(&name)?;
            let (_, c) = self.controls.update(rec.id, |c| match action {
                Action::Pause => c.mode = Mode::Paused,
                Action::Drain => c.mode = Mode::Draining,
                Action::Resume => c.resume(),
            });
            Ok((rec, c))
        });
        let (rec, c) = match found {
            Ok(r) => r,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        tracing::info!(agent = %rec.name, agent_id = rec.id, action = action.as_str(), mode = c.mode.as_str(), "agent control set");
        let data = serde_json::json!({"agent_id": rec.id, "name": rec.name, "action": action.as_str(), "mode": c.mode.as_str()});
        let stored = persist(&self.committer, rec.id, &c, Some(("agent-control", data)));
        let (queue, liveness, controls) = (
            self.queue.clone(),
            self.liveness.clone(),
            self.controls.clone(),
        );
        let session = self.actors_get(rec.id);
        let fut = async move {
            stored.await?;
            if let Some(s) = session {
                let cmd = match c.mode {
                    Mode::Active => AgentCommand::Resume,
                    Mode::Paused | Mode::Draining => AgentCommand::Pause,
                };
                s.do_send(super::agent_session::Command(cmd));
            }
            let mut leases = queue.send(LeasedTo(Some(rec.id))).await.map_err(|_| {
                ActorError::Unavailable("the build queue is restarting; retry".into())
            })?;
            let builds = leases.remove(&rec.id).unwrap_or_default();
            let (status, ago) = liveness.status(rec.id);
            let (control, quarantined_until_ms) = shown_control(&controls, rec.id, &builds);
            Ok(AgentInfo {
                id: rec.id,
                name: rec.name,
                systems: rec.systems,
                status,
                last_seen_ms_ago: ago,
                builds,
                control,
                quarantined_until_ms,
            })
        };
        Box::pin(guard_future::<Self, _, _>(NAME, fut).map(guard_map(
            NAME,
            || Err(unavailable(NAME)),
            |r, _act: &mut Self, _ctx: &mut Context<Self>| r,
        )))
    }
}

/// An outcome that counts towards an agent's quarantine: an infrastructure failure (its
/// leases lost with it, a setup or an upload failure) or a success. O(1).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct InfraOutcome {
    pub agent_id: AgentId,
    pub failure: bool,
}

impl Handler<InfraOutcome> for AgentRegistry {
    type Result = ();

    fn handle(&mut self, msg: InfraOutcome, ctx: &mut Context<Self>) {
        let policy = self.controls.policy;
        let now = now_ms();
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            Ok(self.controls.update(msg.agent_id, |c| {
                if msg.failure {
                    (c.failure(&policy, now), false)
                } else {
                    (None, c.success())
                }
            }))
        });
        let Ok(((started, reset), c)) = r else {
            return;
        };
        let event = if let Some(pause_ms) = started {
            tracing::warn!(
                agent_id = msg.agent_id,
                pause_ms,
                until_ms = c.quarantined_until_ms,
                level = c.level,
                "agent quarantined after consecutive infrastructure failures; it gets no work until the quarantine ends or `kiln agent resume`"
            );
            metrics::counter!("kiln_agents_quarantined_total").increment(1);
            Some((
                "agent-quarantined",
                serde_json::json!({"agent_id": msg.agent_id, "pause_ms": pause_ms,
                    "until_ms": c.quarantined_until_ms, "level": c.level}),
            ))
        } else if reset {
            None
        } else {
            return;
        };
        let stored = persist(&self.committer, msg.agent_id, &c, event);
        let agent_id = msg.agent_id;
        ctx.spawn(actix::fut::wrap_future::<_, Self>(async move {
            if let Err(e) = stored.await {
                tracing::warn!(agent_id, error = %e, "could not store the agent's quarantine; it holds for this run only");
            }
        }));
    }
}

impl AgentRegistry {
    /// A session was opened: store when (for expiry), and the command that keeps a paused
    /// or draining agent from asking for work, if it is one.
    /// The opening time is stored only while expiry is on, and at most once per
    /// [`seen_slack_ms`] (the sweep adds that slack, so it never expires an agent early).
    pub(super) fn opened(&mut self, agent: AgentId, ctx: &mut Context<Self>) -> Vec<AgentCommand> {
        let now = now_ms();
        let slack = seen_slack_ms(self.expire_after_ms);
        let (due, c) = self.controls.update(agent, |c| {
            let due = now.saturating_sub(c.last_seen_ms) >= slack;
            if due {
                c.last_seen_ms = now;
            }
            due
        });
        if self.expire_after_ms > 0 && due {
            let stored = persist(&self.committer, agent, &c, None);
            ctx.spawn(actix::fut::wrap_future::<_, Self>(async move {
                if let Err(e) = stored.await {
                    tracing::warn!(agent_id = agent, error = %e, "could not store the agent's session opening time");
                }
            }));
        }
        match c.mode {
            Mode::Active => Vec::new(),
            Mode::Paused | Mode::Draining => vec![AgentCommand::Pause],
        }
    }

    /// One expiry tick: read the next page of agents on the blocking pool, expire those due.
    pub(super) fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping || self.expire_after_ms == 0 {
            return;
        }
        self.sweeping = true;
        let (store, after) = (self.store.clone(), self.sweep_cursor);
        let read = tokio::task::spawn_blocking(move || {
            let mut page = Vec::new();
            for r in store
                .scan_after::<AgentRecord>(TreeId::Agents, &u64_key(after))
                .take(SWEEP_PAGE)
            {
                let (_, a) = r?;
                page.push((a.id, a.name, a.created_ms));
            }
            Ok::<_, ActorError>(page)
        });
        let fut = guard_future::<Self, _, _>(NAME, async move {
            read.await
                .map_err(|e| ActorError::Internal(format!("the expiry page read did not finish: {e}")))?
        })
        .map(guard_map(
            NAME,
            || Err(unavailable(NAME)),
            |r: Result<Vec<(AgentId, String, u64)>, ActorError>, act: &mut Self, _ctx| {
                let page = r?;
                act.sweep_cursor = if page.len() < SWEEP_PAGE {
                    0
                } else {
                    page.last().map(|p| p.0).unwrap_or(0)
                };
                let now = now_ms();
                Ok(page
                    .into_iter()
                    .filter(|(id, _, created)| {
                        let heard = act
                            .liveness
                            .last_seen(*id)
                            .map(|t| t.elapsed().as_millis() as u64);
                        let slack = seen_slack_ms(act.expire_after_ms);
                        super::agent_controls::expired(
                            act.expire_after_ms,
                            *created,
                            act.controls.stored_last_seen(*id).saturating_add(slack),
                            heard,
                            now,
                        )
                    })
                    .collect::<Vec<_>>())
            },
        ))
        .then(|due: Result<Vec<(AgentId, String, u64)>, ActorError>, act: &mut Self, _ctx| {
            let (queue, committer) = (act.queue.clone(), act.committer.clone());
            let expire_after_ms = act.expire_after_ms;
            guard_future::<Self, _, _>(NAME, async move {
                let mut done = Vec::new();
                for (id, name, _) in due? {
                    match expire_one(&queue, &committer, id, &name, expire_after_ms).await {
                        Ok(()) => done.push((id, name)),
                        // Those expired so far are cleaned up; the rest wait for the next round.
                        Err(e) => return Ok((done, Some(e))),
                    }
                }
                Ok((done, None))
            })
        })
        .map(guard_map(
            NAME,
            || (),
            |r: Result<Swept, ActorError>,
             act: &mut Self,
             _ctx| {
                act.sweeping = false;
                let (done, err) = match r {
                    Ok(d) => d,
                    Err(e) => (Vec::new(), Some(e)),
                };
                for (id, name) in done {
                    act.sessions.end(id);
                    act.liveness.forget(id);
                    act.controls.remove(id);
                    act.forget_session_actor(id);
                    metrics::counter!("kiln_agents_expired_total").increment(1);
                    tracing::info!(agent = %name, agent_id = id, expire_after_ms = act.expire_after_ms, "agent not seen for the expiry period: removed, its credentials revoked");
                }
                if let Some(e) = err {
                    tracing::warn!(error = %e, "expiry sweep stopped; the next tick tries again");
                }
            },
        ));
        ctx.spawn(fut);
    }
}

/// Expire one agent: its leases released first (as for a lost agent: its builds go back to
/// the queue), then its record, name and controls deleted, with an `agent-expired` event.
async fn expire_one(
    queue: &Addr<super::build_queue::BuildQueue>,
    committer: &Committer,
    id: AgentId,
    name: &str,
    expire_after_ms: u64,
) -> Result<(), ActorError> {
    queue
        .send(AgentLost { agent_id: id })
        .await
        .map_err(|_| ActorError::Unavailable("the build queue is restarting".into()))??;
    let mut b = Batch::new();
    b.delete(TreeId::Agents, &u64_key(id));
    b.delete(TreeId::AgentNames, name.as_bytes());
    b.delete(TreeId::AgentControls, &u64_key(id));
    b.event(
        "agent-expired",
        0,
        id,
        serde_json::json!({"agent_id": id, "name": name, "expire_after_ms": expire_after_ms}),
    );
    committer.commit(b).await?;
    Ok(())
}
