//! Automatic retries and deferral: which failed attempts put a build back in the queue, how
//! many times, and when it may be offered again.
//!
//! - An infrastructure failure (the lease ended because the agent was lost, disconnected or
//!   no longer held the build; the agent reported a setup or upload failure; the result's
//!   upload was not there) counts in `retries`. Up to `scheduling.retries.infrastructure` of
//!   them put the build back in the queue; the next one fails it ("gave up after ...").
//! - A builder failure is final, unless `scheduling.retries.builder` allows retries; those
//!   count in `builder_retries`.
//! - A retry waits: the first is offered at once, each later one after
//!   `backoff_initial_ms` doubled per retry (capped by `backoff_max_ms`). The wait is the
//!   build's `defer_until_ms`, the same "not before" a submission's `defer_until` sets.
//! - A re-adoption (the agent that lost the lease still runs the build and nobody took it) is
//!   not a new failure: the count the release added stays, and the build leaves its backoff.
//!
//! A deferred build is `runnable` but not in the allocator's index: it waits in
//! [`QueueState::deferred`], ordered by time, and [`QueueState::wake`] hands the builds whose
//! time came to the allocator (the actor calls it from a timer on the earliest entry; nothing
//! scans the builds). Deferral is in the record, so a restart restores it (`load.rs`).

use super::{Effects, QueueError, QueueState};
use crate::actors::runnable_index::RunnableEntry;
use crate::config::RetryConfig;
use crate::protocol::{BuildId, BuildState};
use crate::store::keys::u64_key;
use crate::store::TreeId;

/// The reason of a build failed because it ran out of infrastructure retries starts with this.
pub const GAVE_UP: &str = "gave up after ";

/// Which cap a failed attempt counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Agent lost or disconnected, lease not held, setup or upload failure.
    Infrastructure,
    /// The builder failed.
    Builder,
}

/// What becomes of a build after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retry {
    /// Back in the queue (deferred until `not_before` when above 0).
    Requeued { not_before: u64 },
    /// Out of retries: fail it with this reason.
    GiveUp(String),
}

impl QueueState {
    /// The retry policy failed attempts are judged by from now on.
    pub fn set_retry(&mut self, retry: RetryConfig) {
        self.retry = retry;
    }

    /// Is live build `id` waiting for its deferral to end?
    pub fn is_deferred(&self, id: BuildId) -> bool {
        self.live.get(&id).is_some_and(|l| {
            l.defer_until_ms != 0 && self.deferred.contains(&(l.defer_until_ms, id))
        })
    }

    /// Do not offer `id` before `until` (ms since the epoch): recorded in the build and queued
    /// on the timer.
    pub(super) fn defer(&mut self, id: BuildId, until: u64) {
        self.undefer(id);
        if let Some(l) = self.live.get_mut(&id) {
            l.defer_until_ms = until;
            if until != 0 {
                self.deferred.insert((until, id));
            }
        }
    }

    /// Take `id` off the timer (it is leased again, or no longer live); its record keeps the
    /// time.
    pub(super) fn undefer(&mut self, id: BuildId) {
        if let Some(l) = self.live.get(&id) {
            if l.defer_until_ms != 0 {
                self.deferred.remove(&(l.defer_until_ms, id));
            }
        }
    }

    /// Tell the allocator that runnable build `id` may be offered, unless it is deferred (the
    /// timer offers it then).
    pub(super) fn offer(&self, id: BuildId, fx: &mut Effects) {
        if let Some(l) = self.live.get(&id) {
            if l.state == BuildState::Runnable && !self.is_deferred(id) {
                fx.runnable.push(l.entry(id));
            }
        }
    }

    /// When the earliest deferral ends (the actor's timer sleeps until then).
    pub fn next_wake(&self) -> Option<u64> {
        self.deferred.first().map(|(t, _)| *t)
    }

    /// Builds whose deferral ended by `now`: off the timer, and the runnable ones for the
    /// allocator. Memory only (the record already has the time).
    pub fn wake(&mut self, now: u64) -> Vec<RunnableEntry> {
        let mut out = Vec::new();
        while let Some(&(t, id)) = self.deferred.first() {
            if t > now {
                break;
            }
            self.deferred.remove(&(t, id));
            if let Some(l) = self.live.get(&id) {
                if l.state == BuildState::Runnable {
                    tracing::debug!(build_id = id, "deferral ended: offering the build");
                    out.push(l.entry(id));
                }
            }
        }
        out
    }

    /// Count a failed attempt of live build `id` against its cap: within it, the build is
    /// deferred by the backoff; beyond it, the answer says to give up (with the reason).
    /// `why` says what failed (for the reason).
    pub(super) fn count_failure(
        &mut self,
        id: BuildId,
        class: FailureClass,
        why: &str,
        now: u64,
    ) -> Retry {
        let cfg = self.retry;
        let Some(l) = self.live.get_mut(&id) else {
            return Retry::Requeued { not_before: 0 };
        };
        let (n, cap) = match class {
            FailureClass::Infrastructure => {
                l.retries = l.retries.saturating_add(1);
                (l.retries, cfg.infrastructure)
            }
            // Without builder retries nothing is counted: the failure is simply final.
            FailureClass::Builder if cfg.builder == 0 => return Retry::GiveUp(why.to_string()),
            FailureClass::Builder => {
                l.builder_retries = l.builder_retries.saturating_add(1);
                (l.builder_retries, cfg.builder)
            }
        };
        if n > cap {
            let failures = if n == 1 { "failure" } else { "failures" };
            return Retry::GiveUp(match class {
                FailureClass::Infrastructure => {
                    format!("{GAVE_UP}{n} infrastructure {failures} ({cap} retries; last: {why})")
                }
                FailureClass::Builder => {
                    format!("{why} (gave up after {n} builder {failures}, {cap} retries)")
                }
            });
        }
        let wait = cfg.backoff_ms(n);
        let not_before = if wait == 0 {
            0
        } else {
            now.saturating_add(wait)
        };
        self.defer(id, not_before);
        Retry::Requeued { not_before }
    }

    /// Fail live build `id` (runnable, its lease already ended) because it ran out of
    /// retries: recorded with `reason`, its dependents failed behind it.
    pub(super) fn give_up(
        &mut self,
        fx: &mut Effects,
        id: BuildId,
        reason: String,
        now: u64,
    ) -> Result<(), QueueError> {
        self.undefer(id);
        let mut rec = self.live_record(id)?;
        rec.state = BuildState::Failed;
        rec.finished_ms = now;
        rec.reason = reason.clone();
        fx.batch.put(TreeId::Builds, &u64_key(id), &rec)?;
        fx.batch.event(
            "build-failed",
            id,
            rec.agent_id,
            serde_json::json!({"build_id": id, "attempt": rec.attempt, "agent_id": rec.agent_id,
                "drv_path": rec.drv_path, "reason": reason, "retries": rec.retries,
                "builder_retries": rec.builder_retries}),
        );
        tracing::warn!(build_id = id, attempt = rec.attempt, retries = rec.retries, reason = %reason, "out of retries; the build fails");
        fx.unrunnable.push(id);
        let outs = rec
            .outputs
            .iter()
            .map(|(_, o)| crate::actors::symbols::PathDigest::of(o))
            .collect();
        self.retire(&rec);
        self.fail_dependents(id, outs, now, fx)?;
        Ok(())
    }
}
