//! `Allocator`: the in-memory index of runnable builds, by system then priority, that answers
//! "work for an agent of these systems, up to N builds" in O(N · systems · log n). It owns no
//! state of its own: `BuildQueue` tells it what became runnable or stopped being runnable
//! (after the commit), and on (re)start it rebuilds the index from sled. Taking a build out of
//! the index is only a proposal: `BuildQueue` decides whether it is still runnable.
//!
//! Supervision: every handler runs under the panic guard; a restart replaces the actor with a
//! fresh one (empty index) and `started` rebuilds the index from the `builds` tree.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use actix::prelude::*;

use super::guard::{catch, Guarded, Rebuild};
use super::queue_state::RunnableEntry;
use super::restarts::Restarts;
use super::ActorError;
use crate::protocol::{BuildId, BuildState};
use crate::store::records::BuildRecord;
use crate::store::{Store, TreeId};

const NAME: &str = "allocator";

/// The index itself: a plain structure, tested without actix.
#[derive(Debug, Default)]
pub struct RunnableIndex {
    by_system: HashMap<String, BTreeSet<(Reverse<i32>, BuildId)>>,
    entries: HashMap<BuildId, (String, i32)>,
}

impl RunnableIndex {
    pub fn insert(&mut self, e: RunnableEntry) {
        self.remove(e.id);
        self.by_system
            .entry(e.system.clone())
            .or_default()
            .insert((Reverse(e.priority), e.id));
        self.entries.insert(e.id, (e.system, e.priority));
    }

    pub fn remove(&mut self, id: BuildId) {
        if let Some((system, priority)) = self.entries.remove(&id) {
            if let Some(set) = self.by_system.get_mut(&system) {
                set.remove(&(Reverse(priority), id));
                if set.is_empty() {
                    self.by_system.remove(&system);
                }
            }
        }
    }

    /// Remove and return up to `max` builds of the given systems, highest priority first,
    /// then oldest (lowest id) first.
    pub fn take(&mut self, systems: &[String], max: usize) -> Vec<BuildId> {
        let mut out = Vec::new();
        while out.len() < max {
            let best = systems
                .iter()
                .filter_map(|s| self.by_system.get(s).and_then(|set| set.first()).copied())
                .min();
            let Some((_, id)) = best else { break };
            self.remove(id);
            out.push(id);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Runnable builds per system (for metrics).
    pub fn counts(&self) -> Vec<(String, usize)> {
        self.by_system
            .iter()
            .map(|(s, v)| (s.clone(), v.len()))
            .collect()
    }
}

pub struct Allocator {
    store: Store,
    index: RunnableIndex,
    restarts: Arc<Restarts>,
}

impl Allocator {
    pub fn new(store: Store, restarts: Arc<Restarts>) -> Allocator {
        Allocator {
            store,
            index: RunnableIndex::default(),
            restarts,
        }
    }

    /// Fill the index from the `builds` tree.
    fn reload_index(&mut self) {
        self.index = RunnableIndex::default();
        for r in self.store.scan::<BuildRecord>(TreeId::Builds) {
            match r {
                Ok((_, b)) if b.state == BuildState::Runnable => self.index.insert(RunnableEntry {
                    id: b.id,
                    system: b.system,
                    priority: b.priority,
                }),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "allocator cannot read a build record"),
            }
        }
        metrics::gauge!("kiln_runnable_builds").set(self.index.len() as f64);
    }
}

impl Actor for Allocator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            self.reload_index();
            tracing::info!(runnable = self.index.len(), "allocator index built");
        });
    }
}

impl Rebuild for Allocator {
    const ACTOR: &'static str = "allocator";

    fn restarts(&self) -> Arc<Restarts> {
        self.restarts.clone()
    }

    /// An empty index; `started` fills it from sled.
    fn rebuild(&self) -> Result<Allocator, ActorError> {
        Ok(Allocator::new(self.store.clone(), self.restarts.clone()))
    }
}

impl Supervised for Allocator {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        super::guard::restart(self);
    }
}

/// Builds became runnable (sent after their commit).
#[derive(Message)]
#[rtype(result = "()")]
pub struct BuildsRunnable(pub Vec<RunnableEntry>);

/// Builds stopped being runnable (canceled).
#[derive(Message)]
#[rtype(result = "()")]
pub struct BuildsUnrunnable(pub Vec<BuildId>);

/// Rebuild the index from sled (after the build queue restarted).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync;

/// Propose up to `max` builds for an agent of `systems`.
#[derive(Message)]
#[rtype(result = "Vec<BuildId>")]
pub struct TakeWork {
    pub systems: Vec<String>,
    pub max: usize,
}

impl Handler<BuildsRunnable> for Allocator {
    type Result = ();
    fn handle(&mut self, msg: BuildsRunnable, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            for e in msg.0 {
                self.index.insert(e);
            }
            metrics::gauge!("kiln_runnable_builds").set(self.index.len() as f64);
        });
    }
}

impl Handler<BuildsUnrunnable> for Allocator {
    type Result = ();
    fn handle(&mut self, msg: BuildsUnrunnable, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            for id in msg.0 {
                self.index.remove(id);
            }
            metrics::gauge!("kiln_runnable_builds").set(self.index.len() as f64);
        });
    }
}

impl Handler<Resync> for Allocator {
    type Result = ();
    fn handle(&mut self, _msg: Resync, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| self.reload_index());
    }
}

impl Handler<TakeWork> for Allocator {
    type Result = Guarded<TakeWork>;
    fn handle(&mut self, msg: TakeWork, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| {
            let started = std::time::Instant::now();
            let ids = self.index.take(&msg.systems, msg.max);
            metrics::histogram!("kiln_allocation_seconds").record(started.elapsed().as_secs_f64());
            metrics::gauge!("kiln_runnable_builds").set(self.index.len() as f64);
            ids
        })
    }
}

/// The runnable builds the index holds, sorted (tests compare them with sled).
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "Vec<BuildId>")]
pub struct IndexSnapshot;

#[cfg(feature = "fault-points")]
impl Handler<IndexSnapshot> for Allocator {
    type Result = Guarded<IndexSnapshot>;
    fn handle(&mut self, _msg: IndexSnapshot, ctx: &mut Context<Self>) -> Self::Result {
        Guarded::run(NAME, ctx, |_| {
            let mut ids: Vec<BuildId> = self.index.entries.keys().copied().collect();
            ids.sort_unstable();
            ids
        })
    }
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
        self.index = RunnableIndex::default();
        self.index.insert(RunnableEntry {
            id: u64::MAX,
            system: "fault-point".into(),
            priority: 0,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: u64, system: &str, priority: i32) -> RunnableEntry {
        RunnableEntry {
            id,
            system: system.into(),
            priority,
        }
    }

    #[test]
    fn takes_highest_priority_then_oldest_across_systems_only_of_the_agents_systems() {
        let mut ix = RunnableIndex::default();
        ix.insert(e(1, "x86_64-linux", 0));
        ix.insert(e(2, "i586-gnu", 5));
        ix.insert(e(3, "x86_64-linux", 5));
        ix.insert(e(4, "aarch64-linux", 9));
        ix.insert(e(5, "x86_64-linux", 0));
        let got = ix.take(&["x86_64-linux".into(), "i586-gnu".into()], 10);
        assert_eq!(got, vec![2, 3, 1, 5]);
        // The aarch64 build never reaches an agent without that system.
        assert_eq!(ix.len(), 1);
        assert!(ix.take(&["i586-gnu".into()], 1).is_empty());
        ix.remove(4);
        assert!(ix.is_empty());
    }
}
