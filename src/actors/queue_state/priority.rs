//! Derived priority: a build's effective priority (what the allocator orders by) is the highest
//! of its own priority and the effective priority of every live build that waits on its
//! outputs, so a high-priority build pulls its inputs ahead of the queue.
//!
//! The edges are the blocked builds' missing inputs: build D waits on path p (`waiting`), and
//! the live build producing p (`producers`) is one of D's inputs. Only blocked builds have
//! inputs; an input that is built (or was never queued) is no edge.
//!
//! Kept current on every change of an edge or an own priority, by work proportional to the
//! builds whose effective priority can change, never to the queue:
//! - raising (a submission, `kiln build priority` up): from the build, walk its inputs
//!   breadth first with a visited set, raising each one below the new value; an input already
//!   at or above it stops the walk (its own inputs are at least as high). Cost: O(raised
//!   builds + their input edges), one record read (sled's cache) per raised build.
//! - lowering (`kiln build priority` down, a blocked build canceled or failed): only builds
//!   whose effective priority equals the old value, reached through builds that also had it,
//!   can fall. They are collected depth first (iterative, visited set) and recomputed in
//!   reverse post-order (a build after every build that waits on it), each from its own
//!   priority and its waiters' current values. Cost: O(those builds + their edges), two
//!   record reads each.
//!
//! Only own priorities are stored (`BuildRecord::priority`); effective priorities are derived,
//! and recomputed by the load (`compute_effective`) in O(live builds + edges): builds in
//! descending own priority each raise their inputs, so each build is raised at most once.

use std::collections::{HashMap, HashSet};

use super::{Effects, QueueError, QueueState};
use crate::actors::symbols::PathDigest;
use crate::protocol::{BuildId, BuildState, BuildSummary};
use crate::store::keys::u64_key;
use crate::store::records::BuildRecord;
use crate::store::{StoreError, TreeId};

/// How a walk finds a build's inputs: from its stored record (`inputs_of`) at run time, from
/// the missing paths the scan saw at load.
type Inputs<'a> = dyn Fn(&QueueState, BuildId) -> Result<Vec<BuildId>, StoreError> + 'a;

impl QueueState {
    /// The live builds producing the inputs `id` still waits for.
    pub(super) fn inputs_of(&self, id: BuildId) -> Result<Vec<BuildId>, StoreError> {
        if self
            .live
            .get(&id)
            .is_none_or(|l| l.state != BuildState::Blocked)
        {
            return Ok(Vec::new());
        }
        let Some(r) = self.stored(id)? else {
            return Ok(Vec::new());
        };
        let digests: Vec<PathDigest> = r.needs.iter().map(|n| PathDigest::of(n)).collect();
        Ok(self.producers_waited_by(id, &digests))
    }

    /// The producers of those of `paths` that `id` waits for, each once.
    fn producers_waited_by(&self, id: BuildId, paths: &[PathDigest]) -> Vec<BuildId> {
        let mut out = Vec::new();
        for d in paths {
            if !self.waiting.get(d).is_some_and(|s| s.contains(&id)) {
                continue;
            }
            if let Some(p) = self.producers.get(d) {
                if *p != id && self.live.contains_key(p) && !out.contains(p) {
                    out.push(*p);
                }
            }
        }
        out
    }

    /// The highest effective priority of the live builds waiting on `outputs`.
    pub(super) fn waiters_max(&self, outputs: &[PathDigest]) -> Option<i32> {
        outputs
            .iter()
            .filter_map(|d| self.waiting.get(d))
            .flatten()
            .filter_map(|w| self.live.get(w).map(|l| l.effective))
            .max()
    }

    /// What `id`'s effective priority should be, from its own and its waiters'.
    fn derived(&self, id: BuildId) -> Result<i32, StoreError> {
        let Some(own) = self.live.get(&id).map(|l| l.priority) else {
            return Ok(i32::MIN);
        };
        let Some(r) = self.stored(id)? else {
            return Ok(own);
        };
        let outputs: Vec<PathDigest> = r.outputs.iter().map(|(_, o)| PathDigest::of(o)).collect();
        Ok(self.waiters_max(&outputs).map_or(own, |w| w.max(own)))
    }

    /// Set a live build's effective priority; a runnable build is re-keyed in the allocator.
    fn set_effective(&mut self, id: BuildId, e: i32, fx: Option<&mut Effects>) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        if l.effective == e {
            return;
        }
        l.effective = e;
        if l.state == BuildState::Runnable {
            if let Some(fx) = fx {
                fx.rekeyed.push(l.entry(id));
            }
        }
    }

    /// Raise the inputs of `start` (transitively) to at least `e` (see the module doc).
    pub(super) fn raise_inputs(
        &mut self,
        start: BuildId,
        e: i32,
        mut fx: Option<&mut Effects>,
        inputs: &Inputs<'_>,
    ) -> Result<(), StoreError> {
        let mut visited: HashSet<BuildId> = HashSet::from([start]);
        let mut queue = inputs(self, start)?;
        while let Some(p) = queue.pop() {
            if !visited.insert(p) {
                continue;
            }
            if self.live.get(&p).is_none_or(|l| l.effective >= e) {
                continue;
            }
            self.set_effective(p, e, fx.as_deref_mut());
            queue.extend(inputs(self, p)?);
        }
        Ok(())
    }

    /// Some builds waiting on `roots` had effective priority `old` and now have less (or are
    /// gone): recompute every build whose value can fall (see the module doc).
    pub(super) fn lower_inputs(
        &mut self,
        roots: Vec<BuildId>,
        old: i32,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        // Can fall: had `old` through a waiter (its own priority is lower).
        let can_fall = |q: &QueueState, id: BuildId| {
            q.live
                .get(&id)
                .is_some_and(|l| l.effective == old && l.priority < old)
        };
        let mut visited: HashSet<BuildId> = HashSet::new();
        let mut post: Vec<BuildId> = Vec::new();
        for root in roots {
            if !can_fall(self, root) || !visited.insert(root) {
                continue;
            }
            // Iterative depth-first walk: (build, its inputs, next input to look at).
            let mut stack: Vec<(BuildId, Vec<BuildId>, usize)> =
                vec![(root, self.inputs_of(root)?, 0)];
            while let Some((id, ins, i)) = stack.last_mut() {
                if let Some(next) = ins.get(*i).copied() {
                    *i += 1;
                    if can_fall(self, next) && visited.insert(next) {
                        let ins = self.inputs_of(next)?;
                        stack.push((next, ins, 0));
                    }
                } else {
                    post.push(*id);
                    stack.pop();
                }
            }
        }
        for id in post.into_iter().rev() {
            let e = self.derived(id)?;
            self.set_effective(id, e, Some(fx));
        }
        Ok(())
    }

    /// Effective priorities of every live build, from the own priorities and the edges the
    /// load found (`missing`: each blocked build's missing paths). Returns the runnable builds
    /// whose value rose (to re-key).
    pub(super) fn compute_effective(
        &mut self,
        missing: &HashMap<BuildId, Vec<PathDigest>>,
    ) -> Result<Vec<BuildId>, StoreError> {
        let mut sources: Vec<(i32, BuildId)> = missing
            .keys()
            .filter_map(|id| Some((self.live.get(id)?.priority, *id)))
            .collect();
        sources.sort_unstable_by(|a, b| b.cmp(a));
        let inputs = |q: &QueueState, id: BuildId| -> Result<Vec<BuildId>, StoreError> {
            Ok(missing
                .get(&id)
                .map(|ps| q.producers_waited_by(id, ps))
                .unwrap_or_default())
        };
        let mut fx = Effects::default();
        for (_, id) in sources {
            let Some(e) = self.live.get(&id).map(|l| l.effective) else {
                continue;
            };
            self.raise_inputs(id, e, Some(&mut fx), &inputs)?;
        }
        Ok(fx.rekeyed.into_iter().map(|e| e.id).collect())
    }

    /// `kiln build priority ID N`: set a live build's own priority; its effective priority
    /// and its inputs' follow.
    pub fn set_priority(
        &mut self,
        id: BuildId,
        priority: i32,
    ) -> Result<(Effects, BuildSummary), QueueError> {
        let Some(l) = self.live.get_mut(&id) else {
            let r: Option<BuildRecord> = self.store.get(TreeId::Builds, &u64_key(id))?;
            return Err(match r {
                None => QueueError::NoSuchBuild(id),
                Some(r) => QueueError::WrongState(
                    id,
                    r.state,
                    "it has already finished; resubmit it to build it again".into(),
                ),
            });
        };
        let mut fx = Effects::default();
        let before = l.priority;
        let old = l.effective;
        l.priority = priority;
        let r = self.put_live(&mut fx, id)?;
        let new = self.derived(id)?;
        self.set_effective(id, new, Some(&mut fx));
        if new > old {
            self.raise_inputs(id, new, Some(&mut fx), &|q, b| q.inputs_of(b))?;
        } else if new < old {
            let roots = self.inputs_of(id)?;
            self.lower_inputs(roots, old, &mut fx)?;
        }
        fx.batch.event(
            "build-reprioritized",
            id,
            0,
            serde_json::json!({"build_id": id, "drv_path": r.drv_path, "priority": priority,
                "previous": before, "effective": new}),
        );
        tracing::info!(
            build_id = id,
            priority,
            previous = before,
            effective = new,
            "build reprioritized"
        );
        Ok((fx, super::summary(&r)))
    }
}
