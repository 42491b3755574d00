//! `AgentSession`: one per agent that opened a session, supervised one-for-one by the
//! [`super::registry::AgentRegistry`]. It owns the agent's liveness and its requests for work:
//! it asks the allocator for candidates, the build queue for leases, and turns leases into
//! assignments (the `.drv` and the closure of inputs to fetch). An agent silent for the agent
//! timeout is lost: its leases expire. Time the coordinator's own loop spent lagging is not
//! counted against the agent.
//!
//! Supervision: every handler and the liveness tick run under the panic guard. A restart
//! builds a fresh session for the same agent and systems: it owns nothing in sled (its leases
//! are the build queue's), so what it loses is its pending commands and its lag allowance; its
//! liveness verdict is recomputed from the shared last-seen time at the next tick.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::allocator::{Allocator, TakeWork};
use super::build_queue::{AgentLost, Allocate, BuildQueue};
use super::guard::{catch, guard_future, Guarded, Rebuild};
use super::restarts::Restarts;
use super::ActorError;
use crate::protocol::{AgentCommand, Assignment, Bytes64, OutputSpec, PathInfo, WorkReply};
use crate::store::records::{BuildRecord, DrvRecord, OutputRecord};
use crate::store::{Store, StoreError, TreeId};

use super::registry::Liveness;

const NAME: &str = "agent session";

/// How often liveness is checked.
const TICK: Duration = Duration::from_millis(250);

pub struct AgentSession {
    pub agent_id: u64,
    pub name: String,
    pub systems: Vec<String>,
    queue: Addr<BuildQueue>,
    allocator: Addr<Allocator>,
    store: Store,
    restarts: Arc<Restarts>,
    /// Shared with the HTTP layer, which stamps every authenticated request of this agent.
    liveness: Arc<Liveness>,
    timeout: Duration,
    /// When the last tick ran, to detect (and forgive) loop lag.
    last_tick: Instant,
    /// Time the agent is excused for because the coordinator could not run its loop.
    forgiven: Duration,
    lost: bool,
    /// Commands to deliver with the next heartbeat or work reply.
    pending: VecDeque<AgentCommand>,
}

impl AgentSession {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        agent_id: u64,
        name: String,
        systems: Vec<String>,
        queue: Addr<BuildQueue>,
        allocator: Addr<Allocator>,
        store: Store,
        restarts: Arc<Restarts>,
        liveness: Arc<Liveness>,
        timeout: Duration,
    ) -> AgentSession {
        AgentSession {
            agent_id,
            name,
            systems,
            queue,
            allocator,
            store,
            restarts,
            liveness,
            timeout,
            last_tick: Instant::now(),
            forgiven: Duration::ZERO,
            lost: false,
            pending: VecDeque::new(),
        }
    }

    fn tick(&mut self, _ctx: &mut Context<Self>) {
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
            self.liveness.set_lost(self.agent_id, true);
            tracing::warn!(agent = %self.name, silent_ms = silent.as_millis() as u64, "agent lost; its leases expire");
            metrics::counter!("kiln_agents_lost_total").increment(1);
            self.queue.do_send(AgentLost {
                agent_id: self.agent_id,
            });
        } else if self.lost && silent <= self.timeout {
            self.lost = false;
            self.liveness.set_lost(self.agent_id, false);
        }
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
            self.systems.clone(),
            self.queue.clone(),
            self.allocator.clone(),
            self.store.clone(),
            self.restarts.clone(),
            self.liveness.clone(),
            self.timeout,
        ))
    }
}

impl Supervised for AgentSession {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        super::guard::restart(self);
    }
}

/// The session was (re)opened: new systems and commands to deliver.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Opened {
    pub systems: Vec<String>,
    pub commands: Vec<AgentCommand>,
}

impl Handler<Opened> for AgentSession {
    type Result = ();
    fn handle(&mut self, msg: Opened, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            self.systems = msg.systems;
            self.lost = false;
            self.pending.extend(msg.commands);
        });
    }
}

/// A heartbeat: answer pending commands.
#[derive(Message)]
#[rtype(result = "Vec<AgentCommand>")]
pub struct Beat;

impl Handler<Beat> for AgentSession {
    type Result = Guarded<Beat>;
    fn handle(&mut self, _msg: Beat, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| self.pending.drain(..).collect())
    }
}

/// The agent asks for up to `max` builds.
#[derive(Message)]
#[rtype(result = "Result<WorkReply, ActorError>")]
pub struct RequestWork {
    pub max: u32,
}

impl Handler<RequestWork> for AgentSession {
    type Result = ResponseActFuture<Self, Result<WorkReply, ActorError>>;

    fn handle(&mut self, msg: RequestWork, ctx: &mut Context<Self>) -> Self::Result {
        let Some(commands) = catch(NAME, ctx, |_| self.pending.drain(..).collect::<Vec<_>>())
        else {
            return Box::pin(actix::fut::ready(Err(super::guard::unavailable(NAME))));
        };
        let allocator = self.allocator.clone();
        let queue = self.queue.clone();
        let store = self.store.clone();
        let systems = self.systems.clone();
        let agent_id = self.agent_id;
        let max = msg.max.min(64) as usize;
        Box::pin(guard_future::<Self, _, _>(NAME, async move {
            let mut builds = Vec::new();
            if max > 0 {
                let unavailable =
                    |_| ActorError::Unavailable("the allocator is restarting; retry".into());
                let ids = allocator
                    .send(TakeWork { systems, max })
                    .await
                    .map_err(unavailable)?;
                if !ids.is_empty() {
                    let leased = queue
                        .send(Allocate {
                            agent_id,
                            candidates: ids,
                        })
                        .await
                        .map_err(|_| {
                            ActorError::Unavailable("the build queue is restarting; retry".into())
                        })
                        .and_then(|r| r);
                    let leased = match leased {
                        Ok(l) => l,
                        Err(e) => {
                            // The proposed builds left the index but were not leased: rebuild
                            // the index from sled so none of them is forgotten.
                            allocator.do_send(super::allocator::Resync);
                            return Err(e);
                        }
                    };
                    builds = tokio::task::spawn_blocking(move || assignments(&store, leased))
                        .await
                        .map_err(|e| ActorError::Internal(e.to_string()))??;
                }
            }
            Ok(WorkReply { builds, commands })
        }))
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
        });
    }
    Ok(out)
}

/// The available paths `roots` and everything they reference, sorted by path.
pub fn closure(store: &Store, roots: &[String]) -> Result<Vec<PathInfo>, StoreError> {
    let mut seen: BTreeMap<String, PathInfo> = BTreeMap::new();
    let mut todo: Vec<String> = roots.to_vec();
    while let Some(p) = todo.pop() {
        if seen.contains_key(&p) {
            continue;
        }
        let key = crate::store::keys::output_key(&p);
        let Some(o) = store.get::<OutputRecord>(TreeId::Outputs, key.as_bytes())? else {
            continue;
        };
        todo.extend(o.references.iter().filter(|r| **r != p).cloned());
        seen.insert(p, path_info(&o));
    }
    Ok(seen.into_values().collect())
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
