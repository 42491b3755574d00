//! Inputs the coordinator lost: an agent's setup failed because the coordinator answered 404
//! for an input's NAR (the file is gone from its cache: deleted, a disk fault, restored from
//! an older backup), and the HTTP layer checked that the file is indeed missing and that the
//! path is in the build's input closure (`missing_inputs` of the failure report).
//!
//! Instead of retrying a build that cannot succeed until the input is back, the build goes
//! back to `blocked`, waiting on the lost paths (added to its `needs` when they were only in
//! the closure of one), and each lost path gets a build of the derivation that made it (its
//! `OutputRecord.deriver`), unless a live build already makes it. The path's record is kept:
//! builds of other derivations that need it find its NAR missing the same way and join the
//! wait; the rebuild's success overwrites the record and unblocks them all. No retry is
//! counted (the agent did nothing wrong). A lost path no stored derivation makes (an input
//! source) cannot come back this way: the build fails, naming the file to put back.

use std::collections::BTreeSet;

use super::{Effects, QueueError, QueueState};
use crate::actors::submission::stored_target;
use crate::actors::symbols::PathDigest;
use crate::protocol::{BuildId, BuildState};
use crate::store::keys::output_key;
use crate::store::records::OutputRecord;
use crate::store::TreeId;

/// What became of a setup failure that named lost inputs.
#[derive(Debug, PartialEq, Eq)]
pub enum LostInputs {
    /// None of them is one to act on: an ordinary setup failure.
    NotLost,
    /// The build waits for them again (rebuilds submitted where needed).
    Waiting,
    /// One of them cannot be built again: the build fails with this reason.
    Fail(String),
}

impl QueueState {
    /// Build `id` (leased to the reporting agent, its record `b`) cannot be set up because
    /// `lost` (checked by the caller: in its input closure, NAR file missing) are gone.
    pub(super) fn inputs_lost(
        &mut self,
        fx: &mut Effects,
        id: BuildId,
        lost: &[String],
        reason: &str,
        now: u64,
    ) -> Result<LostInputs, QueueError> {
        let lost: BTreeSet<&String> = lost
            .iter()
            .filter(|p| !self.uncommitted_outputs.contains(&PathDigest::of(p)))
            .collect();
        if lost.is_empty() {
            return Ok(LostInputs::NotLost);
        }
        // Who makes each path again: a live build, or a new build of its deriver.
        let mut rebuild = Vec::new();
        for p in &lost {
            if self.producers.contains_key(&PathDigest::of(p)) {
                continue;
            }
            let rec: Option<OutputRecord> =
                self.store.get(TreeId::Outputs, output_key(p).as_bytes())?;
            let file = rec
                .as_ref()
                .map(|r| crate::store::nar_cache::nar_url(&r.file_hash));
            let deriver = rec.map(|r| r.deriver).filter(|d| !d.is_empty());
            let target = match &deriver {
                Some(d) => stored_target(&self.store, d).ok(),
                None => None,
            };
            match target {
                Some(t) => rebuild.push(t),
                None => {
                    return Ok(LostInputs::Fail(format!(
                        "input {p} is gone from the coordinator (its NAR file {} is missing from the cache) and no derivation the coordinator stores builds it{}: put the file back (from a backup) and resubmit",
                        file.unwrap_or_default(),
                        deriver
                            .map(|d| format!(" ({d} is not stored or does not resolve)"))
                            .unwrap_or_default()
                    )));
                }
            }
        }

        // The build: lease ended, blocked on the lost paths, which join its needs.
        let Some(agent_id) = self.live.get(&id).map(|l| l.agent_id) else {
            return Err(QueueError::NoSuchBuild(id));
        };
        let mut rec = self.live_record(id)?;
        let mut needs_changed = false;
        for p in &lost {
            if !rec.needs.contains(p) {
                rec.needs.push((*p).clone());
                needs_changed = true;
            }
        }
        rec.needs.sort();
        self.forget_request(id);
        self.lease_off(agent_id, id);
        self.request_of.remove(&id);
        self.set_state(id, BuildState::Blocked);
        if let Some(l) = self.live.get_mut(&id) {
            l.agent_id = 0;
        }
        let mut waits = 0u32;
        for p in &lost {
            let d = PathDigest::of(p);
            if !self.waiting.get(&d).is_some_and(|s| s.contains(&id)) {
                waits += 1;
            }
            self.wait_on(id, d, fx);
        }
        if let Some(l) = self.live.get_mut(&id) {
            l.missing = l.missing.saturating_add(waits);
        }
        rec.state = BuildState::Blocked;
        rec.agent_id = 0;
        rec.request = String::new();
        fx.batch
            .put(TreeId::Builds, &crate::store::keys::u64_key(id), &rec)?;
        if needs_changed {
            // Until this commit lands, sled still has the old needs.
            self.pending.insert(id, std::sync::Arc::new(rec.clone()));
            fx.submitted.push(id);
        }
        let lost_list: Vec<&String> = lost.iter().copied().collect();
        fx.batch.event(
            "lease-expired",
            id,
            agent_id,
            serde_json::json!({"build_id": id, "attempt": rec.attempt, "agent_id": agent_id,
                "reason": format!("setup failure: {reason}"), "retries": rec.retries,
                "lost_inputs": lost_list, "state": "blocked"}),
        );
        tracing::warn!(build_id = id, attempt = rec.attempt, agent_id, lost = ?lost_list, "inputs lost by the coordinator; the build waits for them to be built again");

        // The rebuilds: as a submission of each derivation alone would make them, after the
        // wait above so they start at the waiting build's priority.
        let tag_set = self.symbols.tag_set::<String>(&[]);
        for p in &lost {
            fx.batch.event(
                "output-lost",
                id,
                0,
                serde_json::json!({"path": p, "needed_by": id}),
            );
        }
        for t in rebuild {
            self.submit_one(fx, t, 0, &[], tag_set, 0, now)?;
        }
        fx.batch.put_raw(
            TreeId::Meta,
            crate::store::meta::NEXT_BUILD_ID,
            &self.next_build_id.to_be_bytes(),
        );
        // The build waits at its effective priority: its inputs get at least that.
        let effective = self.live.get(&id).map_or(0, |l| l.effective);
        self.raise_inputs(id, effective, Some(fx), &|q, b| q.inputs_of(b))?;
        for e in &mut fx.runnable {
            if let Some(l) = self.live.get(&e.id) {
                *e = l.entry(e.id);
            }
        }
        Ok(LostInputs::Waiting)
    }
}
