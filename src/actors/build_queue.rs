//! `BuildQueue`: the only actor that decides build state. A thin shell over
//! [`QueueState`]: each handler runs one transition in memory, hands its writes to the
//! committer, and answers only after the flush; then it tells the allocator what became
//! runnable and writes narinfos for new outputs. A failed commit stops the actor, and the
//! restart reloads memory from sled, so memory never keeps a change sled refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::allocator::{
    Allocator, BuildsRunnable, BuildsUnrunnable, Fill, RefillAllocator, Rekey, RequestAlive,
};
use super::guard::{catch, guard_future, guard_map, unavailable, Guarded, Rebuild};
use super::queue_state::{
    Canceled, Effects, FinishAnswer, ListPage, QueueState, Unheld, LIVE_STATES,
};
use super::restarts::Restarts;
use super::submission::{prepare, Prepared, SubmitError};
use super::symbols::Symbols;
use super::{guarded, ActorError};
use crate::config::{PriorityRule, RetryConfig};
use crate::derivation::store_path::StoreDir;
use crate::protocol::{
    AgentCommand, BuildDetail, BuildId, BuildState, BuildSummary, HeldBuild, ResultAck,
    SubmitBuilds, Submitted,
};
use crate::store::committer::Permit;
use crate::store::nar_cache::NarCache;
use crate::store::records::{AgentRecord, BuildRecord};
use crate::store::{meta, now_ms, Committer, Store, TreeId};

const NAME: &str = "build queue";

/// How often the queue looks whether the earliest deferral ended (the granularity of
/// backoffs and `defer_until`).
const WAKE_TICK: std::time::Duration = std::time::Duration::from_millis(100);

pub struct BuildQueue {
    store: Store,
    committer: Committer,
    allocator: Addr<Allocator>,
    nars: Arc<NarCache>,
    restarts: Arc<Restarts>,
    symbols: Arc<Symbols>,
    /// Rebuilt from sled in `started` (at start and at every restart), before any message is
    /// handled: the actor's mailbox holds requests meanwhile.
    state: QueueState,
    /// The store dir this coordinator serves, once fixed (config, env, or first submission).
    store_dir: Option<StoreDir>,
    /// `[[scheduling.priority_rules]]` (handed to every state this actor loads).
    rules: Arc<[PriorityRule]>,
    /// `[scheduling.retries]` (handed to every state this actor loads).
    retry: RetryConfig,
}

impl BuildQueue {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        committer: Committer,
        allocator: Addr<Allocator>,
        nars: Arc<NarCache>,
        restarts: Arc<Restarts>,
        symbols: Arc<Symbols>,
        store_dir: Option<StoreDir>,
        rules: Arc<[PriorityRule]>,
        retry: RetryConfig,
    ) -> BuildQueue {
        BuildQueue {
            state: QueueState::unloaded(store.clone(), symbols.clone()),
            rules,
            retry,
            store,
            committer,
            allocator,
            nars,
            restarts,
            symbols,
            store_dir,
        }
    }

    /// Load the state from sled in one scan, commit the index writes an old state dir lacks,
    /// and fill the allocator's index from the same scan: runnable builds are handed over in
    /// chunks while the scan goes on, so the allocator indexes them on its own thread.
    fn load(&mut self) -> Result<(), ActorError> {
        let started = Instant::now();
        let allocator = self.allocator.clone();
        let mut first = true;
        let mut handed = 0usize;
        let (mut state, rekeyed) = QueueState::load_streaming(
            self.store.clone(),
            self.symbols.clone(),
            now_ms(),
            &mut |entries| {
                handed += entries.len();
                allocator.do_send(Fill {
                    entries,
                    first: std::mem::take(&mut first),
                    last: false,
                });
            },
        )?;
        for batch in state.take_migration() {
            self.committer.commit_blocking(batch)?;
        }
        state.set_rules(self.rules.clone());
        state.set_retry(self.retry);
        self.state = state;
        if !rekeyed.is_empty() {
            self.allocator.do_send(Rekey(rekeyed));
        }
        self.allocator.do_send(Fill {
            entries: Vec::new(),
            first,
            last: true,
        });
        tracing::info!(
            live = self.state.live_len(),
            runnable = handed,
            seconds = started.elapsed().as_secs_f64(),
            "build queue loaded"
        );
        Ok(())
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
            submitted,
            rekeyed,
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
            if !rekeyed.is_empty() {
                allocator.do_send(Rekey(rekeyed));
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
                    act.state
                        .committed(&made_available, &finished, &requests, &submitted);
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

    /// Offer the builds whose deferral (a submission's `defer_until`, a retry's backoff) has
    /// ended. The timer checks only the earliest deferral, so a tick costs nothing when none
    /// is due.
    fn wake_deferred(&mut self) {
        let now = now_ms();
        if self.state.next_wake().is_some_and(|t| t <= now) {
            let due = self.state.wake(now);
            if !due.is_empty() {
                tracing::debug!(builds = due.len(), "deferrals ended");
                self.allocator.do_send(BuildsRunnable(due));
            }
        }
    }

    /// Live builds per state, from the per-state index (no scan).
    fn update_gauges(&self) {
        for st in LIVE_STATES {
            metrics::gauge!("kiln_builds", "state" => st.as_str()).set(self.state.count(st) as f64);
        }
    }
}

impl Actor for BuildQueue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |ctx| {
            if let Err(e) = self.load() {
                // The state cannot be read: serving from it would answer wrongly.
                self.restarts.escalate(super::restarts::GaveUp {
                    actor: <Self as Rebuild>::ACTOR,
                    restarts: 0,
                    reason: format!("the build queue cannot load the state from sled: {e}"),
                });
                return;
            }
            self.update_gauges();
            ctx.run_interval(std::time::Duration::from_secs(2), |act, ctx| {
                catch(NAME, ctx, |_| act.update_gauges());
            });
            ctx.run_interval(WAKE_TICK, |act, ctx| {
                catch(NAME, ctx, |_| act.wake_deferred());
            });
        });
    }
}

impl Rebuild for BuildQueue {
    const ACTOR: &'static str = "build_queue";

    fn restarts(&self) -> Arc<Restarts> {
        self.restarts.clone()
    }

    /// Lets every write the old actor handed over land, then builds a fresh queue (with the
    /// recorded store dir); its `started` reloads the builds from sled and refills the
    /// allocator's index, since the old actor's notifications after its last commits are lost.
    fn rebuild(&self) -> Result<BuildQueue, ActorError> {
        self.committer.barrier_blocking();
        let store_dir = match self.store.meta_str(meta::STORE_DIR)? {
            Some(d) => Some(StoreDir::new(&d).map_err(|e| {
                ActorError::Internal(format!("the recorded store dir {d:?} is not valid: {e}"))
            })?),
            None => None,
        };
        Ok(BuildQueue::new(
            self.store.clone(),
            self.committer.clone(),
            self.allocator.clone(),
            self.nars.clone(),
            self.restarts.clone(),
            self.symbols.clone(),
            store_dir,
            self.rules.clone(),
            self.retry,
        ))
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
        let defer_until_ms = req.defer_until_ms;
        // Parsing and hashing run off this loop: a big submission's on a thread of its own at
        // a lower priority (so the requests answered meanwhile keep the CPU), a small one's on
        // the blocking pool. The decision runs on this loop.
        let big = req.derivations.len().max(req.builds.len()) > ONE_COMMIT;
        let check = async move {
            let work = move || {
                let (priority, tags) = (req.priority, req.tags.clone());
                let p = prepare(&store, store_dir.as_ref(), req);
                (p, priority, tags)
            };
            let panicked = || ActorError::Internal("the submission check panicked".into());
            if big {
                super::submission::in_background("kiln-submit-check", work)
                    .map_err(|e| {
                        ActorError::Internal(format!(
                            "could not start a submission check thread: {e}"
                        ))
                    })?
                    .await
                    .map_err(|_| panicked())
            } else {
                tokio::task::spawn_blocking(work)
                    .await
                    .map_err(|_| panicked())
            }
        };
        Box::pin(guard_future::<Self, _, _>(NAME, check).then(guard_map(
            NAME,
            || Self::ready(Err(unavailable(NAME))),
            move |checked: Checked, act: &mut Self, ctx: &mut Context<Self>| {
                let (prepared, priority, tags) = match checked {
                    Ok(x) => x,
                    Err(e) => return Self::ready(Err(e)),
                };
                let prepared = match prepared {
                    Ok(p) => p,
                    Err(e) => return Self::ready(Err(e.into())),
                };
                let first = guarded::<Self, _>(NAME, ctx, |_| {
                    if let Some(d) = &act.store_dir {
                        if d != &prepared.store_dir {
                            return Err(ActorError::BadRequest(format!(
                                "this coordinator serves store dir {}, not {}",
                                d.as_str(),
                                prepared.store_dir.as_str()
                            )));
                        }
                        return Ok(None);
                    }
                    act.store_dir = Some(prepared.store_dir.clone());
                    Ok(Some(prepared.store_dir.as_str().to_string()))
                });
                let store_dir_record = match first {
                    Ok(r) => r,
                    Err(e) => return Self::ready(Err(e)),
                };
                let (reply, answer) = tokio::sync::oneshot::channel();
                // A small submission is one commit, as before chunking.
                let chunk = if prepared.new_drvs.len() <= ONE_COMMIT
                    && prepared.targets.len() <= ONE_COMMIT
                {
                    ONE_COMMIT
                } else {
                    SUBMIT_CHUNK
                };
                let chunks = Chunked {
                    chunk,
                    drvs: prepared.new_drvs.into(),
                    targets: prepared.targets.into(),
                    priority,
                    tags,
                    defer_until_ms,
                    store_dir_record,
                    out: Vec::new(),
                    reply,
                };
                act.next_chunk(chunks, ctx);
                Box::pin(actix::fut::wrap_future(async move {
                    answer.await.unwrap_or_else(|_| Err(unavailable(NAME)))
                }))
            },
        )))
    }
}

/// Derivations and targets per commit of a big submission: the decision step on the queue's
/// thread and the commit of one chunk stay short whatever the submission's size, so the
/// requests handled in between (work requests and their lease commits) wait for at most one
/// chunk. With 1,000 per chunk a chunk took ~85 ms on the 2-core machine and work requests
/// during a 100,000-build submission had a p99 of 150-250 ms; with 100, ~35 ms
/// (docs/performance.md, "One big submission").
const SUBMIT_CHUNK: usize = 100;

/// A submission with at most this many new `.drv`s and targets is one commit (the usual
/// `kiln submit`, and the load generator's 100-build requests).
const ONE_COMMIT: usize = 1000;

/// A checked submission being committed chunk by chunk: first every new `.drv` (so no build is
/// handed out before its `.drv` is stored), then the targets. Each chunk is decided and
/// committed before the next is taken, with other messages handled in between; the answer is
/// sent after the last chunk's commit, so a 200 still means every build of the submission is
/// durable. A failed chunk answers the error; the chunks before it stay (a retry of the
/// submission finds their builds as `existing`).
struct Chunked {
    /// `.drv`s, then targets, per commit.
    chunk: usize,
    drvs: std::collections::VecDeque<(String, Vec<u8>)>,
    targets: std::collections::VecDeque<super::queue_state::Target>,
    priority: i32,
    tags: Vec<(String, String)>,
    defer_until_ms: u64,
    store_dir_record: Option<String>,
    out: Vec<crate::protocol::BuildSummary>,
    reply: tokio::sync::oneshot::Sender<Result<Submitted, ActorError>>,
}

/// The next chunk of a submission (sent by the queue to itself, behind what waits in its
/// mailbox).
#[derive(Message)]
#[rtype(result = "()")]
struct NextChunk(Box<Chunked>);

impl Handler<NextChunk> for BuildQueue {
    type Result = ();

    fn handle(&mut self, msg: NextChunk, ctx: &mut Context<Self>) {
        self.next_chunk(*msg.0, ctx);
    }
}

impl BuildQueue {
    /// Decide and commit one chunk of a submission; then send the next to self, or answer.
    fn next_chunk(&mut self, mut c: Chunked, ctx: &mut Context<Self>) {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            let chunk = c.chunk;
            let n = c.drvs.len().min(chunk);
            let drvs: Vec<(String, Vec<u8>)> = c.drvs.drain(..n).collect();
            // The targets ride with the last of the `.drv`s.
            let targets: Vec<super::queue_state::Target> = if c.drvs.is_empty() {
                let n = c.targets.len().min(chunk);
                c.targets.drain(..n).collect()
            } else {
                Vec::new()
            };
            let (mut fx, builds) = self.state.submit_deferred(
                targets,
                drvs,
                c.priority,
                c.tags.clone(),
                c.defer_until_ms,
                now_ms(),
            )?;
            if let Some(d) = c.store_dir_record.take() {
                fx.batch
                    .put_raw(TreeId::Meta, meta::STORE_DIR, d.as_bytes());
            }
            metrics::counter!("kiln_builds_submitted_total")
                .increment(builds.iter().filter(|b| !b.existing).count() as u64);
            Ok((permit, fx, builds))
        });
        let (permit, fx, builds) = match r {
            Ok(x) => x,
            Err(e) => {
                let _ = c.reply.send(Err(e));
                return;
            }
        };
        c.out.extend(builds);
        let committed = self.commit(permit, fx, ()).map(
            move |res, _act: &mut Self, ctx: &mut Context<Self>| match res {
                Err(e) => {
                    let _ = c.reply.send(Err(e));
                }
                Ok(()) if c.drvs.is_empty() && c.targets.is_empty() => {
                    // (The HTTP route hands a big submission's memory back once its answer
                    // is made.)
                    let _ = c.reply.send(Ok(Submitted { builds: c.out }));
                }
                Ok(()) => ctx.address().do_send(NextChunk(Box::new(c))),
            },
        );
        ctx.spawn(committed);
    }
}

/// Lease proposed builds to an agent; answers the leased records. With a work request id the
/// agent already used, answers that request's leases again (see `QueueState::allocate`). When
/// the HTTP request it serves went away (`alive`), nothing is leased and the candidates go
/// back to the allocator.
#[derive(Message)]
#[rtype(result = "Result<Leases, ActorError>")]
pub struct Allocate {
    pub agent_id: u64,
    pub request: Option<String>,
    pub candidates: Vec<BuildId>,
    pub alive: Option<RequestAlive>,
}

/// What an `Allocate` leased.
#[derive(Debug, Default)]
pub struct Leases {
    pub builds: Vec<BuildRecord>,
    /// The answer to a retried work request (its earlier leases).
    pub replayed: bool,
}

impl Handler<Allocate> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<Leases, ActorError>>;

    fn handle(&mut self, msg: Allocate, ctx: &mut Context<Self>) -> Self::Result {
        if msg.alive.as_ref().is_some_and(RequestAlive::gone) {
            let back = catch(NAME, ctx, |_| {
                msg.candidates
                    .iter()
                    .filter_map(|id| {
                        let l = self.state.live_entry(*id)?;
                        (l.state() == BuildState::Runnable).then(|| l.entry(*id))
                    })
                    .collect::<Vec<_>>()
            });
            if let Some(back) = back.filter(|b| !b.is_empty()) {
                self.allocator.do_send(BuildsRunnable(back));
            }
            return Self::ready(Ok(Leases::default()));
        }
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
            Ok((permit, (fx, a))) => self.commit(
                permit,
                fx,
                Leases {
                    builds: a.leased,
                    replayed: a.replayed,
                },
            ),
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
    pub outcome: super::queue_state::ReportedOutcome,
    /// The attempt whose log is stored, if one was uploaded.
    pub log_attempt: u32,
    /// The references found in each output's NAR (success reports; see
    /// [`super::queue_state::Scanned`]).
    pub scanned: Option<super::queue_state::Scanned>,
    /// Of a setup failure: the inputs the coordinator was found to have lost (in the build's
    /// input closure, NAR file missing); see `queue_state/lost_inputs.rs`.
    pub lost_inputs: Vec<String>,
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
                    &msg.lost_inputs,
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
            Ok((permit, (fx, FinishAnswer::Requeued))) => {
                metrics::counter!("kiln_builds_finished_total", "result" => "requeued")
                    .increment(1);
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

/// Cancel a build (queued or running); with `dependents`, also every live build that waits on
/// it. Answered once the cancel is durable; the `cancel` commands for the agents that held a
/// canceled build are in the answer, for the caller to route to their sessions.
#[derive(Message)]
#[rtype(result = "Result<Canceled, ActorError>")]
pub struct Cancel {
    pub id: BuildId,
    pub dependents: bool,
}

impl Handler<Cancel> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<Canceled, ActorError>>;

    fn handle(&mut self, msg: Cancel, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            Ok((permit, self.state.cancel(msg.id, msg.dependents, now_ms())?))
        });
        match r {
            Ok((permit, (fx, c))) => {
                metrics::counter!("kiln_builds_finished_total", "result" => "canceled")
                    .increment(1 + c.dependents.len() as u64);
                self.commit(permit, fx, c)
            }
            Err(e) => Self::ready(Err(e)),
        }
    }
}

/// Set a live build's own priority (`kiln build priority ID N`).
#[derive(Message)]
#[rtype(result = "Result<BuildSummary, ActorError>")]
pub struct SetPriority {
    pub id: BuildId,
    pub priority: i32,
}

impl Handler<SetPriority> for BuildQueue {
    type Result = ResponseActFuture<Self, Result<BuildSummary, ActorError>>;

    fn handle(&mut self, msg: SetPriority, ctx: &mut Context<Self>) -> Self::Result {
        let r = guarded::<Self, _>(NAME, ctx, |_| {
            let permit = self.reserve()?;
            Ok((permit, self.state.set_priority(msg.id, msg.priority)?))
        });
        match r {
            Ok((permit, (fx, s))) => self.commit(permit, fx, s),
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
            Ok((permit, self.state.agent_lost(msg.agent_id, now_ms())?))
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

/// A page of live builds in one live state (`kiln builds --state S`): ids after `after`, at
/// most `limit`, from the per-state index.
#[derive(Message)]
#[rtype(result = "ListPage")]
pub struct ListLive {
    pub state: BuildState,
    pub after: BuildId,
    pub limit: usize,
}

impl Handler<ListLive> for BuildQueue {
    type Result = Guarded<ListLive>;

    fn handle(&mut self, msg: ListLive, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| {
            self.state.list_live(msg.state, msg.after, msg.limit)
        })
    }
}

/// Memory's state and priority of those of these builds that are live (a listing read from
/// sled shows them).
#[derive(Message)]
#[rtype(result = "Vec<(BuildId, BuildState, i32)>")]
pub struct LiveStates(pub Vec<BuildId>);

impl Handler<LiveStates> for BuildQueue {
    type Result = Guarded<LiveStates>;

    fn handle(&mut self, msg: LiveStates, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| self.state.live_states(&msg.0))
    }
}

/// Agents that hold leases (the registry awaits them after a start).
#[derive(Message)]
#[rtype(result = "Vec<u64>")]
pub struct LeaseHolders;

impl Handler<LeaseHolders> for BuildQueue {
    type Result = Guarded<LeaseHolders>;

    fn handle(&mut self, _msg: LeaseHolders, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| self.state.lease_holders())
    }
}

impl Handler<RefillAllocator> for BuildQueue {
    type Result = ();

    fn handle(&mut self, _msg: RefillAllocator, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            self.allocator.do_send(Fill {
                entries: self.state.runnable(),
                first: true,
                last: true,
            });
        });
    }
}

/// Builds leased to one agent (`Some(id)`) or to each agent holding leases (`None`), from
/// the lease index.
#[derive(Message)]
#[rtype(result = "HashMap<u64, Vec<BuildId>>")]
pub struct LeasedTo(pub Option<u64>);

impl Handler<LeasedTo> for BuildQueue {
    type Result = Guarded<LeasedTo>;

    fn handle(&mut self, msg: LeasedTo, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| {
            let agents = match msg.0 {
                Some(a) => vec![a],
                None => self.state.lease_holders(),
            };
            agents
                .into_iter()
                .map(|a| (a, self.state.leased_to(a)))
                .collect()
        })
    }
}

/// The live builds as memory makes them (memory's fields over sled's records; tests compare
/// them with sled). Reads every live record: for tests only.
#[derive(Message)]
#[rtype(result = "HashMap<BuildId, BuildRecord>")]
pub struct LiveBuilds;

impl Handler<LiveBuilds> for BuildQueue {
    type Result = Guarded<LiveBuilds>;

    fn handle(&mut self, _msg: LiveBuilds, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| self.state.live_records().unwrap_or_default())
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
        self.state.corrupt();
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
