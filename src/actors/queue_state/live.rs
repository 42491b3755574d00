//! The compact live entry of a queued build, and the per-state index of live build ids.
//!
//! A live build in memory is a [`LiveBuild`]: numbers and interned ids, about 72 bytes, no
//! strings. What never changes after submission (the `.drv` path, outputs, needs, tags, the
//! system's name, the creation time) stays in sled and is read when a full record is needed
//! (an assignment, `kiln build show`, a transition that rewrites the record); every field a
//! transition changes is here, so memory plus sled always make the current record.

use std::collections::BTreeSet;

use crate::actors::runnable_index::{Group, RunnableEntry};
use crate::actors::symbols::{SystemId, TagSetId};
use crate::protocol::{AgentId, BuildId, BuildState};

/// A live (non-terminal) build (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveBuild {
    pub(super) state: BuildState,
    pub system: SystemId,
    pub tags: TagSetId,
    /// The fencing token (see `BuildRecord::attempt`).
    pub attempt: u32,
    /// The build's own priority.
    pub priority: i32,
    /// The priority the allocator orders by: the build's own, or higher when a build that
    /// needs it has a higher one (the scheduling rules set it; today it equals `priority`).
    pub effective: i32,
    /// How many blocked builds wait on this build's outputs (tie-break after `effective`).
    pub rdeps: u32,
    /// For a blocked build: how many of its inputs are still missing.
    pub missing: u32,
    /// Infrastructure failures so far (see `retries.rs`; `BuildRecord::retries`).
    pub retries: u32,
    /// Builder failures so far that were retried (`BuildRecord::builder_retries`).
    pub builder_retries: u32,
    /// The lease holder, or the last holder of a released lease (see `BuildRecord`).
    pub agent_id: AgentId,
    pub allocated_ms: u64,
    pub started_ms: u64,
    /// Not to be allocated before this time (ms since the epoch; 0 = no deferral): the
    /// submission's `defer_until` or a retry's backoff. Only a build also on the queue's timer
    /// (`QueueState::deferred`) is held back; the time stays for `kiln build show`.
    pub defer_until_ms: u64,
}

impl LiveBuild {
    pub fn state(&self) -> BuildState {
        self.state
    }

    /// The allocator's entry for this build.
    pub fn entry(&self, id: BuildId) -> RunnableEntry {
        RunnableEntry {
            id,
            group: Group {
                system: self.system,
                tags: self.tags,
            },
            effective: self.effective,
            rdeps: self.rdeps,
        }
    }
}

/// The live states, in the order of [`StateIndex`]'s sets.
pub const LIVE_STATES: [BuildState; 5] = [
    BuildState::Blocked,
    BuildState::Runnable,
    BuildState::Allocated,
    BuildState::Building,
    BuildState::Uploading,
];

fn slot(s: BuildState) -> Option<usize> {
    LIVE_STATES.iter().position(|x| *x == s)
}

/// Live build ids by state, kept in step with every state change: listings of a live state
/// and the gauges read it without looking at other builds.
#[derive(Debug, Default)]
pub struct StateIndex {
    sets: [BTreeSet<BuildId>; 5],
}

impl StateIndex {
    pub fn insert(&mut self, id: BuildId, s: BuildState) {
        if let Some(i) = slot(s) {
            self.sets[i].insert(id);
        }
    }

    pub fn remove(&mut self, id: BuildId, s: BuildState) {
        if let Some(i) = slot(s) {
            self.sets[i].remove(&id);
        }
    }

    /// Live builds in state `s` (0 for a terminal state).
    pub fn count(&self, s: BuildState) -> usize {
        slot(s).map(|i| self.sets[i].len()).unwrap_or(0)
    }

    /// Up to `limit` ids in state `s` above `after`, in id order; and whether more follow.
    pub fn page(&self, s: BuildState, after: BuildId, limit: usize) -> (Vec<BuildId>, bool) {
        let Some(i) = slot(s) else {
            return (Vec::new(), false);
        };
        let mut it = self.sets[i].range(after.saturating_add(1)..);
        let ids: Vec<BuildId> = it.by_ref().take(limit).copied().collect();
        let more = it.next().is_some();
        (ids, more)
    }
}
