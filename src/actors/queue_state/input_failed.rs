//! Dependents of a failed build: they cannot be built, so instead of staying blocked forever
//! they fail too, transitively, each with the reason `input build N failed` (N the input it
//! waited on) and a `build-failed` event. If that input's outputs are later built (the input
//! resubmitted, or another build of it succeeded), they are requeued: the same build, live
//! again (`blocked` or `runnable`), with a `build-requeued` event.
//!
//! Such a build is recognised in sled by its record alone: `failed` at attempt 0 (it never
//! ran: a blocked build is never allocated) with a reason `input build N failed`. Memory keeps
//! `input_failed`: each missing path of such a build -> the builds failed behind it. The load
//! rebuilds it from those records (their paths that are still not available), so it never
//! holds anything sled does not. It grows with the failed-by-input builds never requeued (a
//! digest and an id per missing path) and empties as their inputs get built.
//!
//! Cost: failing walks the blocked builds behind the failed one (each once: it leaves the
//! live set); requeuing walks the failed-by-input builds behind the new outputs, with one
//! record read and one availability check per need of each.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{Effects, LiveBuild, QueueError, QueueState};
use crate::actors::symbols::PathDigest;
use crate::protocol::{BuildId, BuildState};
use crate::store::keys::u64_key;
use crate::store::records::BuildRecord;
use crate::store::TreeId;

/// The reason of a build failed because input build `input` failed.
pub fn input_failed_reason(input: BuildId) -> String {
    format!("input build {input} failed")
}

/// Did this build fail because one of its inputs failed (see the module doc)?
pub fn is_input_failed(state: BuildState, attempt: u32, reason: &str) -> bool {
    state == BuildState::Failed
        && attempt == 0
        && reason
            .strip_prefix("input build ")
            .and_then(|r| r.strip_suffix(" failed"))
            .is_some_and(|n| n.parse::<u64>().is_ok())
}

impl QueueState {
    /// Build `failed` (whose outputs are `outputs`) failed: fail every blocked build waiting
    /// on it, and theirs in turn.
    pub(super) fn fail_dependents(
        &mut self,
        failed: BuildId,
        outputs: Vec<PathDigest>,
        now: u64,
        fx: &mut Effects,
    ) -> Result<(), QueueError> {
        let mut work: Vec<(BuildId, Vec<PathDigest>)> = vec![(failed, outputs)];
        while let Some((input, outs)) = work.pop() {
            let mut deps = BTreeSet::new();
            for o in &outs {
                if let Some(set) = self.waiting.get(o) {
                    deps.extend(set.iter().copied());
                }
            }
            for d in deps {
                let Some(l) = self.live.get(&d) else {
                    continue;
                };
                if l.state != BuildState::Blocked {
                    continue;
                }
                let old = l.effective;
                let inputs = self.inputs_of(d)?;
                let mut rec = self.live_record(d)?;
                let missing: Vec<PathDigest> = rec
                    .needs
                    .iter()
                    .map(|n| PathDigest::of(n))
                    .filter(|p| self.waiting.get(p).is_some_and(|s| s.contains(&d)))
                    .collect();
                self.retire_with(&rec, fx);
                // Its other inputs no longer inherit its priority.
                self.lower_inputs(inputs, old, fx)?;
                rec.state = BuildState::Failed;
                rec.finished_ms = now;
                rec.reason = input_failed_reason(input);
                fx.batch.put(TreeId::Builds, &u64_key(d), &rec)?;
                fx.batch.event(
                    "build-failed",
                    d,
                    0,
                    serde_json::json!({"build_id": d, "attempt": 0, "agent_id": 0,
                        "drv_path": rec.drv_path, "reason": rec.reason, "input_build": input}),
                );
                tracing::info!(
                    build_id = d,
                    input_build = input,
                    "build failed: an input build failed"
                );
                for p in missing {
                    self.input_failed.entry(p).or_default().insert(d);
                }
                let outs = rec.outputs.iter().map(|(_, o)| PathDigest::of(o)).collect();
                work.push((d, outs));
            }
        }
        Ok(())
    }

    /// Forget a failed-by-input build in the index (it is requeued, or another build of its
    /// derivation is live).
    fn unindex_failed(&mut self, rec: &BuildRecord) {
        for n in &rec.needs {
            let p = PathDigest::of(n);
            if let Some(set) = self.input_failed.get_mut(&p) {
                set.remove(&rec.id);
                if set.is_empty() {
                    self.input_failed.remove(&p);
                }
            }
        }
    }

    /// Is this missing path's last producer a failed build that is not live (so a build
    /// needing it cannot go on)? Its id if so.
    fn dead_producer(&self, path: &str) -> Result<Option<BuildId>, QueueError> {
        if self.producers.contains_key(&PathDigest::of(path)) {
            return Ok(None);
        }
        let Some(b) = self.store.last_build_of(path)? else {
            return Ok(None);
        };
        let r: Option<BuildRecord> = self.store.get(TreeId::Builds, &u64_key(b))?;
        Ok(r.filter(|r| r.state == BuildState::Failed).map(|r| r.id))
    }

    /// `fresh` paths became available: requeue the builds that failed behind them (and, in
    /// turn, those that failed behind those), unless another of their inputs is still failed.
    pub(super) fn requeue_failed_dependents(
        &mut self,
        fresh: &[PathDigest],
        fx: &mut Effects,
    ) -> Result<(), QueueError> {
        let mut work: Vec<PathDigest> = fresh.to_vec();
        while let Some(p) = work.pop() {
            let Some(ids) = self.input_failed.remove(&p) else {
                continue;
            };
            for d in ids {
                let Some(mut rec) = self.stored(d)? else {
                    continue;
                };
                if !is_input_failed(rec.state, rec.attempt, &rec.reason)
                    || self.by_drv.contains_key(&PathDigest::of(&rec.drv_path))
                {
                    self.unindex_failed(&rec);
                    continue;
                }
                let mut missing = Vec::new();
                let mut dead = None;
                for n in &rec.needs {
                    if self.available(n)? {
                        continue;
                    }
                    missing.push(PathDigest::of(n));
                    if dead.is_none() {
                        dead = self.dead_producer(n)?;
                    }
                }
                if dead.is_some() {
                    // Still behind a failed input: stays failed, indexed under what it lacks.
                    for m in missing {
                        self.input_failed.entry(m).or_default().insert(d);
                    }
                    continue;
                }
                self.unindex_failed(&rec);
                let state = if missing.is_empty() {
                    BuildState::Runnable
                } else {
                    BuildState::Blocked
                };
                rec.state = state;
                rec.reason.clear();
                rec.finished_ms = 0;
                fx.batch.put(TreeId::Builds, &u64_key(d), &rec)?;
                fx.batch.event(
                    "build-requeued",
                    d,
                    0,
                    serde_json::json!({"build_id": d, "drv_path": rec.drv_path, "state": state}),
                );
                tracing::info!(build_id = d, state = %state, "build requeued: its failed input was built");
                let outs: Vec<PathDigest> =
                    rec.outputs.iter().map(|(_, o)| PathDigest::of(o)).collect();
                let rdeps: usize = outs
                    .iter()
                    .map(|o| self.waiting.get(o).map_or(0, |s| s.len()))
                    .sum();
                let effective = self
                    .waiters_max(&outs)
                    .map_or(rec.priority, |w| w.max(rec.priority));
                let l = LiveBuild {
                    state,
                    system: self.symbols.system(&rec.system),
                    tags: self.symbols.tag_set(&rec.tags),
                    attempt: rec.attempt,
                    priority: rec.priority,
                    effective,
                    rdeps: rdeps.min(u32::MAX as usize) as u32,
                    missing: missing.len() as u32,
                    retries: rec.retries,
                    builder_retries: rec.builder_retries,
                    agent_id: 0,
                    allocated_ms: 0,
                    started_ms: 0,
                    defer_until_ms: 0,
                };
                self.by_drv.insert(PathDigest::of(&rec.drv_path), d);
                for o in &outs {
                    self.producers.insert(*o, d);
                }
                self.add_live(d, l);
                for m in missing {
                    self.wait_on(d, m, fx);
                }
                self.raise_inputs(d, effective, Some(fx), &|q, b| q.inputs_of(b))?;
                self.offer(d, fx);
                // Until this commit lands, sled still has the failed record.
                self.pending.insert(d, Arc::new(rec));
                fx.submitted.push(d);
                work.extend(outs);
            }
        }
        // A build made runnable above may have been raised by one requeued after it.
        for e in &mut fx.runnable {
            if let Some(l) = self.live.get(&e.id) {
                *e = l.entry(e.id);
            }
        }
        Ok(())
    }
}
