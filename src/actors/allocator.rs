//! `Allocator`: the actor around the [`RunnableIndex`] of runnable builds, and the place idle
//! agents wait for work (long poll). It owns no state of its own: `BuildQueue` fills the index
//! from the one scan it makes at start (`Fill`), then tells it what became runnable or stopped
//! being runnable (after the commit) and which builds changed their ordering (`Rekey`).
//! Taking a build out of the index is only a proposal: `BuildQueue` decides whether it is
//! still runnable, and a proposal that was not leased comes back with `BuildsRunnable`.
//!
//! Push, not poll: a `TakeWork` that finds nothing and may wait becomes a waiter. Waiters are
//! served oldest first whenever builds enter the index, and answered empty at their deadline
//! (the agent's `wait_ms`, capped by `timeouts.work_wait_max_ms`). A waiter whose HTTP request
//! went away ([`RequestAlive`]) is dropped unserved, so no build is proposed to nobody. Before
//! the first fill every `TakeWork` waits (the listeners answer before the queue is loaded,
//! and an empty answer then would be a wrong one).
//!
//! Supervision: every handler runs under the panic guard; a restart replaces the actor with a
//! fresh, empty one, whose `started` asks the build queue to fill it again from memory (no
//! sled scan).

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::guard::{catch, Rebuild};
use super::registry::Liveness;
use super::restarts::Restarts;
use super::runnable_index::{AgentMatch, RunnableEntry, RunnableIndex};
use super::symbols::Symbols;
use super::ActorError;
use crate::protocol::{AgentId, BuildId};

pub use super::runnable_index::Group;

const NAME: &str = "allocator";

/// Longest a `TakeWork` waits for the first fill when its agent asked not to wait: the
/// queue's load at start (seconds with a million builds) is the only thing it waits for.
const FILL_WAIT: Duration = Duration::from_secs(60);

/// Whether the HTTP request a work request came from is still there: the handler holds the
/// `Arc<()>` for as long as it waits, the allocator and the queue hold this. Dropped requests
/// (the agent closed the connection) are never served nor leased; nor are those of an agent
/// declared lost meanwhile (with its liveness given): a stopped agent's connection stays
/// open, and a build handed to it would wait for nobody.
#[derive(Clone, Default)]
pub struct RequestAlive(pub Weak<()>, pub Option<(Arc<Liveness>, AgentId)>);

impl std::fmt::Debug for RequestAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestAlive")
            .field("gone", &self.gone())
            .finish()
    }
}

impl RequestAlive {
    pub fn gone(&self) -> bool {
        self.0.strong_count() == 0
            || self
                .1
                .as_ref()
                .is_some_and(|(liveness, agent)| liveness.is_lost(*agent))
    }
}

/// Where a restarted allocator asks to be filled again (the build queue, once it exists).
pub type RefillHandle = Arc<OnceLock<Recipient<RefillAllocator>>>;

/// The build queue should send a `Fill` with every runnable build (a restarted allocator).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RefillAllocator;

struct Waiter {
    agent: AgentMatch,
    max: usize,
    deadline: Instant,
    reply: oneshot::Sender<Vec<RunnableEntry>>,
    alive: Option<RequestAlive>,
}

impl Waiter {
    fn gone(&self) -> bool {
        self.reply.is_closed() || self.alive.as_ref().is_some_and(RequestAlive::gone)
    }
}

pub struct Allocator {
    index: RunnableIndex,
    symbols: Arc<Symbols>,
    matched_tags: Arc<[String]>,
    restarts: Arc<Restarts>,
    refill: RefillHandle,
    /// Whether the queue has filled the index since this actor started.
    filled: bool,
    /// A rebuilt actor (after a restart) asks the queue to fill it; the first one is filled
    /// by the queue's load.
    rebuilt: bool,
    /// Work requests waiting for a build, oldest first.
    waiters: VecDeque<Waiter>,
    max_wait: Duration,
}

impl Allocator {
    pub fn new(
        symbols: Arc<Symbols>,
        matched_tags: Arc<[String]>,
        restarts: Arc<Restarts>,
        refill: RefillHandle,
        max_wait: Duration,
    ) -> Allocator {
        Allocator {
            index: RunnableIndex::new(symbols.clone(), matched_tags.clone()),
            symbols,
            matched_tags,
            restarts,
            refill,
            filled: false,
            rebuilt: false,
            waiters: VecDeque::new(),
            max_wait,
        }
    }

    fn gauge(&self) {
        metrics::gauge!("kiln_runnable_builds").set(self.index.len() as f64);
        metrics::gauge!("kiln_work_waiters").set(self.waiters.len() as f64);
    }

    /// Serve waiters, oldest first, from what the index holds; drop those that went away.
    fn serve_waiters(&mut self) {
        if !self.filled {
            return;
        }
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].gone() {
                self.waiters.remove(i);
                continue;
            }
            if self.index.is_empty() {
                break;
            }
            let (agent, max) = (&self.waiters[i].agent, self.waiters[i].max);
            let got = self.index.take_for(agent, max);
            if got.is_empty() {
                i += 1;
                continue;
            }
            if let Some(w) = self.waiters.remove(i) {
                if let Err(back) = w.reply.send(got) {
                    // It went away between the check and the answer: nobody was told.
                    for e in back {
                        self.index.insert(e);
                    }
                }
            }
        }
        self.gauge();
    }

    /// Answer (empty) the waiters whose deadline passed.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        for w in self.waiters.drain(..) {
            if w.deadline <= now || w.gone() {
                let _ = w.reply.send(Vec::new());
            } else {
                kept.push_back(w);
            }
        }
        self.waiters = kept;
        self.gauge();
    }

    fn insert_all(&mut self, entries: Vec<RunnableEntry>) {
        for e in entries {
            self.index.insert(e);
        }
        self.serve_waiters();
    }
}

impl Actor for Allocator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |ctx| {
            // At the first start the queue fills the index after its load; after a restart
            // it is asked to.
            if self.rebuilt {
                if let Some(q) = self.refill.get() {
                    q.do_send(RefillAllocator);
                }
            }
            ctx.run_interval(Duration::from_millis(250), |act, ctx| {
                catch(NAME, ctx, |_| act.expire());
            });
        });
    }
}

impl Rebuild for Allocator {
    const ACTOR: &'static str = "allocator";

    fn restarts(&self) -> Arc<Restarts> {
        self.restarts.clone()
    }

    /// An empty index; `started` asks the queue to fill it. Waiters of the old actor are
    /// dropped (their work requests get an empty answer at once).
    fn rebuild(&self) -> Result<Allocator, ActorError> {
        let mut fresh = Allocator::new(
            self.symbols.clone(),
            self.matched_tags.clone(),
            self.restarts.clone(),
            self.refill.clone(),
            self.max_wait,
        );
        fresh.rebuilt = true;
        Ok(fresh)
    }
}

impl Supervised for Allocator {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        super::guard::restart(self);
    }
}

/// Runnable builds from the queue's load (in chunks, while it scans) or from its memory (a
/// refill): `first` empties the index before, `last` marks it filled (work requests are
/// served from then on).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fill {
    pub entries: Vec<RunnableEntry>,
    pub first: bool,
    pub last: bool,
}

/// Builds became runnable (sent after their commit), or proposed builds that were not leased
/// come back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BuildsRunnable(pub Vec<RunnableEntry>);

/// Builds stopped being runnable (canceled, re-adopted).
#[derive(Message)]
#[rtype(result = "()")]
pub struct BuildsUnrunnable(pub Vec<BuildId>);

/// Builds whose effective priority or waiting count changed; those in the index move.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Rekey(pub Vec<RunnableEntry>);

/// Propose up to `max` builds for an agent; with `wait`, wait that long (capped by the
/// server's maximum) for one to become runnable.
#[derive(Message)]
#[rtype(result = "Result<Vec<RunnableEntry>, ActorError>")]
pub struct TakeWork {
    pub agent: AgentMatch,
    pub max: usize,
    pub wait: Duration,
    pub alive: Option<RequestAlive>,
}

impl Handler<Fill> for Allocator {
    type Result = ();
    fn handle(&mut self, msg: Fill, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            if msg.first {
                self.index = RunnableIndex::new(self.symbols.clone(), self.matched_tags.clone());
                self.filled = false;
            }
            for e in msg.entries {
                self.index.insert(e);
            }
            if msg.last {
                self.filled = true;
                tracing::info!(runnable = self.index.len(), "allocator index filled");
                self.serve_waiters();
            }
        });
    }
}

impl Handler<BuildsRunnable> for Allocator {
    type Result = ();
    fn handle(&mut self, msg: BuildsRunnable, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| self.insert_all(msg.0));
    }
}

impl Handler<BuildsUnrunnable> for Allocator {
    type Result = ();
    fn handle(&mut self, msg: BuildsUnrunnable, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            for id in msg.0 {
                self.index.remove(id);
            }
            self.gauge();
        });
    }
}

impl Handler<Rekey> for Allocator {
    type Result = ();
    fn handle(&mut self, msg: Rekey, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            for e in msg.0 {
                self.index.rekey(e.id, e.effective, e.rdeps);
            }
        });
    }
}

impl Handler<TakeWork> for Allocator {
    type Result = ResponseFuture<Result<Vec<RunnableEntry>, ActorError>>;

    fn handle(&mut self, msg: TakeWork, ctx: &mut Context<Self>) -> Self::Result {
        let waiting = catch(NAME, ctx, |_| {
            if self.filled {
                let started = Instant::now();
                let got = self.index.take_for(&msg.agent, msg.max);
                metrics::histogram!("kiln_allocation_seconds")
                    .record(started.elapsed().as_secs_f64());
                self.gauge();
                if !got.is_empty() || msg.wait.is_zero() {
                    return Ok(got);
                }
            }
            let wait = if msg.wait.is_zero() {
                FILL_WAIT
            } else {
                msg.wait.min(self.max_wait)
            };
            let (reply, rx) = oneshot::channel();
            self.waiters.push_back(Waiter {
                agent: msg.agent,
                max: msg.max,
                deadline: Instant::now() + wait,
                reply,
                alive: msg.alive,
            });
            self.gauge();
            Err(rx)
        });
        Box::pin(async move {
            match waiting {
                None => Err(super::guard::unavailable(NAME)),
                Some(Ok(got)) => Ok(got),
                // A dropped sender (the actor restarted): nothing was proposed.
                Some(Err(rx)) => Ok(rx.await.unwrap_or_default()),
            }
        })
    }
}

/// The runnable builds the index holds, sorted (tests compare them with sled). Answered once
/// the index has been filled.
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "Vec<BuildId>")]
pub struct IndexSnapshot;

#[cfg(feature = "fault-points")]
impl Handler<IndexSnapshot> for Allocator {
    type Result = ResponseActFuture<Self, Vec<BuildId>>;
    fn handle(&mut self, _msg: IndexSnapshot, _ctx: &mut Context<Self>) -> Self::Result {
        let deadline = Instant::now() + FILL_WAIT;
        Box::pin(
            actix::fut::wrap_future::<_, Self>(async {})
                .then(move |(), act, _| wait_filled(act, deadline)),
        )
    }
}

/// Poll (every 10 ms, up to `deadline`) until the index was filled, then its ids.
#[cfg(feature = "fault-points")]
fn wait_filled(
    act: &mut Allocator,
    deadline: Instant,
) -> std::pin::Pin<Box<dyn ActorFuture<Allocator, Output = Vec<BuildId>>>> {
    if act.filled || Instant::now() >= deadline {
        return Box::pin(actix::fut::ready(act.index.ids()));
    }
    Box::pin(
        actix::fut::wrap_future::<_, Allocator>(tokio::time::sleep(Duration::from_millis(10)))
            .then(move |(), act, _| wait_filled(act, deadline)),
    )
}

/// Fault point `allocator.corrupt_memory_and_stop`: fill the index with builds sled does not
/// hold as runnable and drop the real ones, then stop, as a bug that leaves memory wrong would.
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct CorruptMemoryAndStop;

#[cfg(feature = "fault-points")]
impl Handler<CorruptMemoryAndStop> for Allocator {
    type Result = ();
    fn handle(&mut self, _msg: CorruptMemoryAndStop, ctx: &mut Context<Self>) {
        tracing::warn!("fault point allocator.corrupt_memory_and_stop fired");
        self.index = RunnableIndex::new(self.symbols.clone(), self.matched_tags.clone());
        self.index.insert(RunnableEntry {
            id: u64::MAX,
            group: Group {
                system: self.symbols.system("fault-point"),
                tags: 0,
            },
            effective: 0,
            rdeps: 0,
        });
        ctx.stop();
    }
}

#[cfg(feature = "fault-points")]
impl Handler<super::guard::faults::InjectPanic> for Allocator {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;
    fn handle(
        &mut self,
        m: super::guard::faults::InjectPanic,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        super::guard::faults::inject_panic(NAME, m.0, ctx)
    }
}
