//! `BuildQueue`: the only actor that decides build state. A thin shell over
//! [`QueueState`]: each handler runs one transition in memory, hands its writes to the
//! committer, and answers only after the flush; then it tells the allocator what became
//! runnable and writes narinfos for new outputs. A failed commit stops the actor, and the
//! restart reloads memory from sled, so memory never keeps a change sled refused.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::allocator::{Allocator, BuildsRunnable, BuildsUnrunnable, Resync};
use super::guard::{catch, guard_future, guard_map, unavailable, Guarded, Rebuild};
use super::queue_state::{Effects, FinishAnswer, QueueState, Unheld};
use super::restarts::Restarts;
use super::submission::{prepare, Prepared, SubmitError};
use super::{guarded, ActorError};
use crate::derivation::store_path::StoreDir;
use crate::protocol::{
    AgentCommand, BuildDetail, BuildId, BuildState, BuildSummary, BuiltOutput, HeldBuild,
    ResultAck, SubmitBuilds, Submitted,
};
use crate::store::committer::Permit;
use crate::store::nar_cache::NarCache;
use crate::store::records::{AgentRecord, BuildRecord};
use crate::store::{meta, now_ms, Committer, Store, TreeId};

const NAME: &str = "build queue";

pub struct BuildQueue {
    store: Store,
    committer: Committer,
    allocator: Addr<Allocator>,
    nars: Arc<NarCache>,
    restarts: Arc<Restarts>,
    /// Rebuilt from sled at start and at every restart.
    state: QueueState,
    /// The store dir this coordinator serves, once fixed (config, env, or first submission).
    store_dir: Option<StoreDir>,
}

impl BuildQueue {
    pub fn new(
        store: Store,
        committer: Committer,
        allocator: Addr<Allocator>,
        nars: Arc<NarCache>,
        restarts: Arc<Restarts>,
        store_dir: Option<StoreDir>,
    ) -> Result<BuildQueue, ActorError> {
        let state = QueueState::load(store.clone())?;
        Ok(BuildQueue {
            store,
            committer,
            allocator,
            nars,
            restarts,
            state,
            store_dir,
        })
    }

    /// A place in the committer's queue, taken before a transition changes memory, so a full
    /// queue refuses the request (503 + `Retry-After`) with memory untouched.
    fn reserve(&self) -> Result<Permit, ActorError> {
        Ok(self.committer.reserve()?)
    }

    /// Commit a transition's effects in the place `permit` holds; answer `value` after the
    /// flush (and, for a request that repeats one still in flight, after that one's commit
    /// too). A failed commit stops the actor (memory is ahead of sled), and the supervisor
    /// rebuilds it from sled.
    fn commit<T: 'static>(
        &mut self,
        permit: Permit,
        fx: Effects,
        value: T,
    ) -> ResponseActFuture<Self, Result<T, ActorError>> {
        let allocator = self.allocator.clone();
        let nars = self.nars.clone();
        let Effects {
            batch,
            runnable,
            unrunnable,
            new_outputs,
            finished,
            requests,
            landing,
            after,
        } = fx;
        if !unrunnable.is_empty() {
            // Before the commit: nobody is proposed a build this transition took. If the
            // commit fails, the restart resyncs the allocator from sled.
            allocator.do_send(BuildsUnrunnable(unrunnable));
        }
        let made_available: Vec<String> = new_outputs.iter().map(|o| o.path.clone()).collect();
        // Yields the answer, and whether this transition's own writes landed.
        let fut = async move {
            if batch.is_empty() {
                drop(permit);
            } else if let Err(e) = permit.commit(batch).await {
                return Ok((Err(ActorError::from(e)), false));
            }
            if !runnable.is_empty() {
                allocator.do_send(BuildsRunnable(runnable));
            }
            if !new_outputs.is_empty() {
                // The narinfo files are for serving with nginx; the coordinator serves from
                // sled. Written after the commit, rewritten at start if missing.
                let written =
                    tokio::task::spawn_blocking(move || nars.write_narinfos(&new_outputs)).await;
                if let Ok(Err(e)) = written {
                    tracing::error!(error = %e, "failed to write narinfo files");
                }
            }
            if let Some(first) = after {
                // A repeat of a request whose commit was in flight: answer only once that
                // commit landed. (When this transition wrote something too, the committer
                // applied it after the first, so this merely reads the outcome.)
                if !first.landed().await {
                    return Ok((
                        Err(ActorError::Unavailable(
                            "the first copy of this request could not be recorded; retry".into(),
                        )),
                        true,
                    ));
                }
            }
            Ok((Ok(value), true))
        };
        Box::pin(guard_future::<Self, _, _>(NAME, fut).map(guard_map(
            NAME,
            || Err(unavailable(NAME)),
            move |out: Result<(Result<T, ActorError>, bool), ActorError>,
                  act: &mut Self,
                  ctx: &mut Context<Self>| {
                let (res, landed) = match out {
                    Ok(x) => x,
                    // A panic in the future: the guard already stopped the actor.
                    Err(e) => (Err(e), false),
                };
                if landed {
                    act.state.committed(&made_available, &finished, &requests);
                } else if matches!(res, Err(ActorError::Commit(_))) {
                    tracing::error!(error = ?res.as_ref().err(), "commit failed; restarting the build queue from sled");
                    ctx.stop();
                }
                if let Some(tx) = landing {
                    tx.send_replace(Some(landed));
                }
                res
            },
        )))
    }

    fn ready<T: 'static>(
        r: Result<T, ActorError>,
    ) -> ResponseActFuture<Self, Result<T, ActorError>> {
        Box::pin(actix::fut::ready(r))
    }

    fn update_gauges(&self) {
        let mut counts: HashMap<(BuildState, &str), u64> = HashMap::new();
        for b in self.state.live().values() {
            *counts.entry((b.state, b.system.as_str())).or_default() += 1;
        }
        for st in [
            BuildState::Blocked,
            BuildState::Runnable,
            BuildState::Allocated,
            BuildState::Building,
            BuildState::Uploading,
        ] {
            let total: u64 = counts
                .iter()
                .filter(|((s, _), _)| *s == st)
                .map(|(_, n)| n)
                .sum();
            metrics::gauge!("kiln_builds", "state" => st.as_str()).set(total as f64);
        }
    }
}

impl Actor for BuildQueue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |ctx| {
            tracing::info!(live = self.state.live().len(), "build queue started");
            self.update_gauges();
            ctx.run_interval(std::time::Duration::from_secs(2), |act, ctx| {
                catch(NAME, ctx, |_| act.update_gauges());
            });
        });
    }
}

impl Rebuild for BuildQueue {
    const ACTOR: &'static str = "build_queue";

    fn restarts(&self) -> Arc<Restarts> {
        self.restarts.clone()
    }

    /// Lets every write the old actor handed over land, then builds a fresh queue from sled
    /// (builds and the recorded store dir) and has the allocator rebuild its index, since the
    /// old actor's notifications after its last commits are lost.
    fn rebuild(&self) -> Result<BuildQueue, ActorError> {
        self.committer.barrier_blocking();
        let store_dir = match self.store.meta_str(meta::STORE_DIR)? {
            Some(d) => Some(StoreDir::new(&d).map_err(|e| {
                ActorError::Internal(format!("the recorded store dir {d:?} is not valid: {e}"))
            })?),
            None => None,
        };
        let fresh = BuildQueue::new(
            self.store.clone(),
            self.committer.clone(),
            self.allocator.clone(),
            self.nars.clone(),
            self.restarts.clone(),
            store_dir,
        )?;
        self.allocator.do_send(Resync);
        Ok(fresh)
    }
}

impl Supervised for BuildQueue {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        super::guard::restart(self);
    }
}

/// A submission checked on a blocking thread, with its priority and tags.
type Checked = Result<(Result<Prepared, SubmitError>, i32, Vec<(String, String)>), ActorError>;

/// Queue builds (`POST /api/v1/builds`).
#[derive(Message)]
#[rtype(result = "Result<Submitted, ActorError>")]
pub struct Submit(pub SubmitBuilds);

impl Handler<Submit> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<Submitted, ActorError>>;

    fn handle(&mut self, msg: Submit, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let store_dir = self.store_dir.clone();
        let req = msg.0;
        // Parsing and hashing run on a blocking thread; the decision runs on this loop.
        let check = async move {
            let r = tokio::task::spawn_blocking(move || {
                let p = prepare(&store, store_dir.as_ref(), &req);
                (p, req.priority, req.tags)
            })
            .await;
            r.map_err(|e| ActorError::Internal(format!("submission check failed: {e}")))
        };
        Box::pin(guard_future::<Self, _, _>(NAME, check).then(guard_map(
            NAME,
            || Self::ready(Err(unavailable(NAME))),
            |checked: Checked, act: &mut Self, ctx: &mut Context<Self>| {
                let (prepared, priority, tags) = match checked {
                    Ok(x) => x,
                    Err(e) => return Self::ready(Err(e)),
                };
                let prepared = match prepared {
                    Ok(p) => p,
                    Err(e) => return Self::ready(Err(e.into())),
                };
                let r = guarded::<Self, _>(NAME, ctx, |_| {
                    let permit = act.reserve()?;
                    if let Some(d) = &act.store_dir {
                        if d != &prepared.store_dir {
                            return Err(ActorError::BadRequest(format!(
                                "this coordinator serves store dir {}, not {}",
                                d.as_str(),
                                prepared.store_dir.as_str()
                            )));
                        }
                    }
                    let (mut fx, builds) = act.state.submit(
                        prepared.targets,
                        prepared.new_drvs,
                        priority,
                        tags,
                        now_ms(),
                    )?;
                    if act.store_dir.is_none() {
                        fx.batch.put_raw(
                            TreeId::Meta,
                            meta::STORE_DIR,
                            prepared.store_dir.as_str().as_bytes(),
                        );
                        act.store_dir = Some(prepared.store_dir.clone());
                    }
                    metrics::counter!("kiln_builds_submitted_total")
                        .increment(builds.iter().filter(|b| !b.existing).count() as u64);
                    Ok((permit, fx, builds))
                });
                match r {
                    Ok((permit, fx, builds)) => act.commit(permit, fx, Submitted { builds }),
                    Err(e) => Self::ready(Err(e)),
                }
            },
        )))
    }
}

/// Lease proposed builds to an agent; answers the leased records. With a work request id the
/// agent already used, answers that request's leases again (see `QueueState::allocate`).
#[derive(Message)]
#[rtype(result = "Result<Vec<BuildRecord>, ActorError>")]
pub struct Allocate {
    pub agent_id: u64,
    pub request: Option<String>,
    pub candidates: Vec<BuildId>,
}

impl Handler<Allocate> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<Vec<BuildRecord>, ActorError>>;

    fn handle(&mut self, msg: Allocate, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            Ok((
                permit,
                self.state.allocate(
                    msg.agent_id,
                    msg.request.as_deref(),
                    &msg.candidates,
                    now_ms(),
                )?,
            ))
        });
        match r {
            Ok((permit, (fx, a))) => self.commit(permit, fx, a.leased),
            Err(e) => Self::ready(Err(e)),
        }
    }
}

/// An agent reports progress on a build: `Building` (start) or `Uploading` (first upload);
/// with `to = None` only checks that the agent holds the lease at that attempt.
#[derive(Message)]
#[rtype(result = "Result<(), ActorError>")]
pub struct Progress {
    pub agent_id: u64,
    pub build_id: BuildId,
    pub attempt: u32,
    pub to: Option<BuildState>,
}

impl Handler<Progress> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;

    fn handle(&mut self, msg: Progress, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            let fx = match msg.to {
                None => {
                    self.state
                        .check_lease(msg.agent_id, msg.build_id, msg.attempt, now_ms())?
                }
                Some(to) => {
                    self.state
                        .advance(msg.agent_id, msg.build_id, msg.attempt, to, now_ms())?
                }
            };
            Ok((permit, fx))
        });
        match r {
            Ok((permit, fx)) => self.commit(permit, fx, ()),
            Err(e) => Self::ready(Err(e)),
        }
    }
}

/// An agent reports a build's result.
#[derive(Message)]
#[rtype(result = "Result<ResultAck, ActorError>")]
pub struct Finish {
    pub agent_id: u64,
    pub build_id: BuildId,
    pub attempt: u32,
    pub outcome: Result<Vec<BuiltOutput>, String>,
    /// The attempt whose log is stored, if one was uploaded.
    pub log_attempt: u32,
    /// The references found in each output's NAR (success reports; see
    /// [`super::queue_state::Scanned`]).
    pub scanned: Option<super::queue_state::Scanned>,
}

impl Handler<Finish> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<ResultAck, ActorError>>;

    fn handle(&mut self, msg: Finish, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            Ok((
                permit,
                self.state.finish_scanned(
                    msg.agent_id,
                    msg.build_id,
                    msg.attempt,
                    msg.outcome,
                    msg.log_attempt,
                    msg.scanned.as_ref(),
                    now_ms(),
                )?,
            ))
        });
        match r {
            Ok((permit, (fx, FinishAnswer::Duplicate))) => {
                self.commit(permit, fx, ResultAck { duplicate: true })
            }
            Ok((permit, (fx, FinishAnswer::Accepted))) => {
                let result = if fx.new_outputs.is_empty() {
                    "failed"
                } else {
                    "succeeded"
                };
                metrics::counter!("kiln_builds_finished_total", "result" => result).increment(1);
                self.commit(permit, fx, ResultAck { duplicate: false })
            }
            Ok((permit, (fx, FinishAnswer::Refused(e)))) => Box::pin(
                self.commit(permit, fx, ())
                    .map(move |r, _, _| r.and_then(|()| Err(ActorError::Queue(e)))),
            ),
            Err(e) => Self::ready(Err(e)),
        }
    }
}

/// Cancel a queued build.
#[derive(Message)]
#[rtype(result = "Result<BuildSummary, ActorError>")]
pub struct Cancel(pub BuildId);

impl Handler<Cancel> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<BuildSummary, ActorError>>;

    fn handle(&mut self, msg: Cancel, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            Ok((permit, self.state.cancel(msg.0, now_ms())?))
        });
        match r {
            Ok((permit, (fx, s))) => {
                metrics::counter!("kiln_builds_finished_total", "result" => "canceled")
                    .increment(1);
                self.commit(permit, fx, s)
            }
            Err(e) => Self::ready(Err(e)),
        }
    }
}

/// The agent is lost: every lease it holds expires.
#[derive(Message)]
#[rtype(result = "Result<(), ActorError>")]
pub struct AgentLost {
    pub agent_id: u64,
}

impl Handler<AgentLost> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;

    fn handle(&mut self, msg: AgentLost, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            Ok((permit, self.state.agent_lost(msg.agent_id)?))
        });
        match r {
            Ok((permit, fx)) => self.commit(permit, fx, ()),
            Err(e) => Self::ready(Err(e)),
        }
    }
}

/// An agent says which builds it holds: at a session opening (`unheld = Release`) or on a
/// heartbeat (`ReleaseAfter(bound)`). Leases it holds are kept, builds it still runs that
/// nobody else took are re-adopted, leases it does not hold end (per `unheld`), and builds it
/// holds that are not its own come back as `abandon` commands.
#[derive(Message)]
#[rtype(result = "Result<Vec<AgentCommand>, ActorError>")]
pub struct Reconcile {
    pub agent_id: u64,
    pub held: Vec<HeldBuild>,
    pub unheld: Unheld,
}

impl Handler<Reconcile> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<Vec<AgentCommand>, ActorError>>;

    fn handle(&mut self, msg: Reconcile, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            let (fx, cmds) = self
                .state
                .reconcile(msg.agent_id, &msg.held, msg.unheld, now_ms())?;
            Ok((permit, fx, cmds))
        });
        match r {
            Ok((permit, fx, cmds)) => self.commit(permit, fx, cmds),
            Err(e) => Self::ready(Err(e)),
        }
    }
}

/// The agent is heard from but has sent no heartbeat for `bound_ms`: its leases that were
/// never started and were handed to it longer ago than that end.
#[derive(Message)]
#[rtype(result = "Result<(), ActorError>")]
pub struct ReleaseUnstarted {
    pub agent_id: u64,
    pub bound_ms: u64,
}

impl Handler<ReleaseUnstarted> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;

    fn handle(&mut self, msg: ReleaseUnstarted, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            Ok((
                permit,
                self.state
                    .release_unstarted(msg.agent_id, msg.bound_ms, now_ms())?,
            ))
        });
        match r {
            Ok((permit, fx)) => self.commit(permit, fx, ()),
            Err(e) => Self::ready(Err(e)),
        }
    }
}

/// `kiln build show`.
#[derive(Message)]
#[rtype(result = "Result<BuildDetail, ActorError>")]
pub struct Show(pub BuildId);

impl Handler<Show> for BuildQueue {
    type Result = Result<BuildDetail, ActorError>;

    fn handle(&mut self, msg: Show, ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let name = move |id: u64| {
            store
                .get::<AgentRecord>(TreeId::Agents, &crate::store::keys::u64_key(id))
                .ok()
                .flatten()
                .map(|a| a.name)
        };
        guarded::<Self, _>(NAME, ctx, |_| Ok(self.state.detail(msg.0, &name)?))
    }
}

/// A build's record, live or finished (for logs and uploads).
#[derive(Message)]
#[rtype(result = "Result<Option<BuildRecord>, ActorError>")]
pub struct GetRecord(pub BuildId);

impl Handler<GetRecord> for BuildQueue {
    type Result = Result<Option<BuildRecord>, ActorError>;

    fn handle(&mut self, msg: GetRecord, ctx: &mut Context<Self>) -> Self::Result {
        guarded::<Self, _>(NAME, ctx, |_| Ok(self.state.record(msg.0)?))
    }
}

/// `kiln builds`.
#[derive(Message)]
#[rtype(result = "Result<Vec<BuildSummary>, ActorError>")]
pub struct List {
    pub state: Option<BuildState>,
    pub limit: usize,
}

impl Handler<List> for BuildQueue {
    type Result = Result<Vec<BuildSummary>, ActorError>;

    fn handle(&mut self, msg: List, ctx: &mut Context<Self>) -> Self::Result {
        guarded::<Self, _>(NAME, ctx, |_| Ok(self.state.list(msg.state, msg.limit)?))
    }
}

/// Builds leased to an agent.
#[derive(Message)]
#[rtype(result = "Vec<BuildId>")]
pub struct LeasedTo(pub u64);

impl Handler<LeasedTo> for BuildQueue {
    type Result = Guarded<LeasedTo>;

    fn handle(&mut self, msg: LeasedTo, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| self.state.leased_to(msg.0))
    }
}

/// The live builds as memory holds them (tests compare them with sled).
#[derive(Message)]
#[rtype(result = "HashMap<BuildId, BuildRecord>")]
pub struct LiveBuilds;

impl Handler<LiveBuilds> for BuildQueue {
    type Result = Guarded<LiveBuilds>;

    fn handle(&mut self, _msg: LiveBuilds, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| self.state.live().clone())
    }
}

/// Fault point `build_queue.corrupt_memory_and_stop`: change memory without committing, then
/// stop, as a bug that leaves memory ahead of sled would. Test builds only.
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct CorruptMemoryAndStop;

#[cfg(feature = "fault-points")]
impl Handler<CorruptMemoryAndStop> for BuildQueue {
    type Result = ();

    fn handle(&mut self, _msg: CorruptMemoryAndStop, ctx: &mut Context<Self>) {
        tracing::warn!("fault point build_queue.corrupt_memory_and_stop fired");
        for b in self.state.live_mut().values_mut() {
            b.priority = b.priority.wrapping_add(1000);
            b.state = BuildState::Failed;
            b.reason = "fault point".into();
        }
        ctx.stop();
    }
}

/// Fault point `build_queue.panic_in_handler`: a handler that panics. The guard must turn it
/// into a stop (so the supervisor restarts the actor) and an `Unavailable` answer.
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "Result<(), ActorError>")]
pub struct PanicInHandler;

#[cfg(feature = "fault-points")]
impl Handler<PanicInHandler> for BuildQueue {
    type Result = Result<(), ActorError>;

    fn handle(&mut self, _msg: PanicInHandler, ctx: &mut Context<Self>) -> Self::Result {
        guarded::<Self, _>(NAME, ctx, |_| {
            panic!("fault point build_queue.panic_in_handler fired")
        })
    }
}

#[cfg(feature = "fault-points")]
impl Handler<super::guard::faults::InjectPanic> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;

    fn handle(
        &mut self,
        m: super::guard::faults::InjectPanic,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        super::guard::faults::inject_panic(NAME, m.0, ctx)
    }
}
