//! Cancellation: of a queued build (`blocked`, `runnable`), of a running one (`allocated`,
//! `building`, `uploading`), and, on request, of every live build that waits on it.
//!
//! A canceled build is terminal at once: its record says `canceled` with the reason, its lease
//! (if any) ends with the transition, and nothing an agent reports afterwards changes it. The
//! agent that held it is told to stop it with [`AgentCommand::Cancel`]; the transition returns
//! those commands ([`Canceled::stops`]) for the caller to route to the agent's session once
//! the cancel is durable. The command needs no delivery guarantee: the agent's next heartbeat
//! lists the build, and reconciliation answers `cancel` for a build canceled at the attempt the
//! agent holds (`leases.rs`), also after a restart of the session or the coordinator.
//!
//! The agent stops the builder and delivers what it has of that attempt: its log upload is
//! taken (what the builder printed before it was stopped is worth reading), and its failure
//! result (`canceled`) is answered as a duplicate that links that log to the record
//! (`log_attempt`) without changing the state. Its other reports (start, outputs, a success
//! result) are refused as stale: it drops the build.
//!
//! Until the cancel's commit lands, sled still has the running record; the canceled build is
//! then kept among the accepted results (`uncommitted_finishes`, marked `canceled`), so a
//! failure report of that attempt arriving meanwhile waits for the commit and is answered as a
//! duplicate, like every later one (see `finish.rs`).
//!
//! Dependents: without `dependents`, the builds waiting on a canceled build stay `blocked`
//! (they wait for its outputs, which a resubmission of its derivation can still produce). With
//! it, every live build that waits on it, transitively, is canceled too, with the reason
//! `canceled: input build N was canceled` (N the input it waited on).

use std::collections::BTreeSet;

use super::{summary, Accepted, Effects, QueueError, QueueState};
use crate::actors::symbols::PathDigest;
use crate::protocol::{AgentCommand, AgentId, BuildId, BuildState, BuildSummary};
use crate::store::keys::u64_key;
use crate::store::records::BuildRecord;
use crate::store::TreeId;

/// The reason of a build canceled by a client's request.
pub const CANCELED_BY_REQUEST: &str = "canceled by request";

/// The reason of a build canceled because input build `input` was canceled (`--dependents`).
pub fn input_canceled_reason(input: BuildId) -> String {
    format!("canceled: input build {input} was canceled")
}

/// What a cancel did.
#[derive(Debug, Clone)]
pub struct Canceled {
    /// The build asked for, now `canceled`.
    pub build: BuildSummary,
    /// The dependents canceled with it, by id (empty without `dependents`).
    pub dependents: Vec<BuildSummary>,
    /// `cancel` commands for the agents that held a canceled build: deliver them once the
    /// cancel is durable.
    pub stops: Vec<(AgentId, AgentCommand)>,
}

impl QueueState {
    /// Cancel build `id`, whatever live state it is in; with `dependents`, also every live
    /// build that waits on it, transitively. A finished build is refused (`WrongState`).
    pub fn cancel(
        &mut self,
        id: BuildId,
        dependents: bool,
        now: u64,
    ) -> Result<(Effects, Canceled), QueueError> {
        if !self.live.contains_key(&id) {
            return Err(self.not_cancelable(id)?);
        }
        let mut fx = Effects::default();
        let mut stops = Vec::new();
        let rec = self.cancel_one(&mut fx, id, CANCELED_BY_REQUEST, None, now, &mut stops)?;
        let mut deps = Vec::new();
        if dependents {
            let mut work: Vec<(BuildId, Vec<PathDigest>)> = vec![(id, output_digests(&rec))];
            while let Some((input, outs)) = work.pop() {
                let mut waiting = BTreeSet::new();
                for o in &outs {
                    if let Some(set) = self.waiting.get(o) {
                        waiting.extend(set.iter().copied());
                    }
                }
                for d in waiting {
                    if !self.live.contains_key(&d) {
                        continue; // reached through another input already
                    }
                    let reason = input_canceled_reason(input);
                    let r = self.cancel_one(&mut fx, d, &reason, Some(input), now, &mut stops)?;
                    work.push((d, output_digests(&r)));
                    deps.push(summary(&r));
                }
            }
            deps.sort_by_key(|s| s.id);
        }
        Ok((
            fx,
            Canceled {
                build: summary(&rec),
                dependents: deps,
                stops,
            },
        ))
    }

    /// Was build `id` canceled while `agent_id` held it at `attempt` (its cancel committed or
    /// in flight)? Its log upload is then taken (see `check_lease`).
    pub(super) fn canceled_holder(
        &self,
        agent_id: AgentId,
        id: BuildId,
        attempt: u32,
    ) -> Result<bool, QueueError> {
        if self.live.contains_key(&id) {
            return Ok(false);
        }
        if let Some(a) = self.uncommitted_finishes.get(&id) {
            return Ok(a.canceled && a.agent_id == agent_id && a.attempt == attempt);
        }
        let r: Option<BuildRecord> = self.store.get(TreeId::Builds, &u64_key(id))?;
        Ok(r.is_some_and(|r| {
            r.state == BuildState::Canceled && r.agent_id == agent_id && r.attempt == attempt
        }))
    }

    /// Why build `id`, which is not live, cannot be canceled.
    fn not_cancelable(&self, id: BuildId) -> Result<QueueError, QueueError> {
        // A result accepted whose commit is in flight: sled still has the running record.
        if let Some(a) = self.uncommitted_finishes.get(&id) {
            let state = match (a.canceled, a.succeeded) {
                (true, _) => BuildState::Canceled,
                (false, true) => BuildState::Succeeded,
                (false, false) => BuildState::Failed,
            };
            return Ok(QueueError::WrongState(
                id,
                state,
                "it has already finished; nothing to cancel".into(),
            ));
        }
        let r: Option<BuildRecord> = self.store.get(TreeId::Builds, &u64_key(id))?;
        Ok(match r {
            None => QueueError::NoSuchBuild(id),
            Some(r) => QueueError::WrongState(
                id,
                r.state,
                "it has already finished; nothing to cancel".into(),
            ),
        })
    }

    /// Cancel one live build: terminal with `reason`, out of every index, its lease ended; a
    /// `cancel` command for its holder if it was leased.
    fn cancel_one(
        &mut self,
        fx: &mut Effects,
        id: BuildId,
        reason: &str,
        input: Option<BuildId>,
        now: u64,
        stops: &mut Vec<(AgentId, AgentCommand)>,
    ) -> Result<BuildRecord, QueueError> {
        let Some(b) = self.live.get(&id) else {
            return Err(QueueError::NoSuchBuild(id));
        };
        let (was, old, agent_id, attempt) = (b.state, b.effective, b.agent_id, b.attempt);
        let inputs = self.inputs_of(id)?;
        let mut rec = self.live_record(id)?;
        // Out of the live set, the lease index and the request index: the lease ends here.
        self.retire_with(&rec, fx);
        // Its inputs no longer inherit its priority.
        self.lower_inputs(inputs, old, fx)?;
        rec.state = BuildState::Canceled;
        rec.finished_ms = now;
        rec.reason = reason.to_string();
        fx.batch.put(TreeId::Builds, &u64_key(id), &rec)?;
        let running = was.is_leased();
        let mut event = serde_json::json!({"build_id": id, "drv_path": rec.drv_path,
            "reason": rec.reason, "was": was});
        if running {
            event["agent_id"] = agent_id.into();
            event["attempt"] = attempt.into();
        }
        if let Some(input) = input {
            event["input_build"] = input.into();
        }
        fx.batch.event(
            "build-canceled",
            id,
            if running { agent_id } else { 0 },
            event,
        );
        if was == BuildState::Runnable {
            fx.unrunnable.push(id);
        }
        if running {
            stops.push((
                agent_id,
                AgentCommand::Cancel {
                    build_id: id,
                    attempt,
                },
            ));
            // Until the commit lands, a failure report of this attempt waits for it and is a
            // duplicate then; reconciliation answers `cancel` (see the module doc).
            let landing = fx.landing();
            self.uncommitted_finishes.insert(
                id,
                Accepted {
                    attempt,
                    agent_id,
                    succeeded: false,
                    canceled: true,
                    landing,
                },
            );
            fx.finished.push(id);
        }
        tracing::info!(
            build_id = id,
            was = %was,
            agent_id,
            attempt,
            reason,
            "build canceled"
        );
        Ok(rec)
    }
}

/// The digests of a build's output paths.
fn output_digests(b: &BuildRecord) -> Vec<PathDigest> {
    b.outputs.iter().map(|(_, o)| PathDigest::of(o)).collect()
}
