//! Results: accepting a report (and unblocking dependents), recognising the same report sent
//! again, and refusing a report in a way that leaves the build in a defined state.
//!
//! - Accepted: the build is `succeeded` or `failed` with the agent's reason. Its marker (for
//!   duplicates) is set only once the report passed verification.
//! - The same report again: `duplicate`, answered only after the first one's commit landed (a
//!   repeat that arrives while it is in flight waits for it; if it fails, 503).
//! - A failure report of the attempt a build was canceled at (its agent stopped the builder
//!   and reports `canceled`): `duplicate` too; the build stays `canceled` (see `cancel.rs`).
//! - Refused for good (`bad_result`: an output missing or extra, a path or NarHash that is
//!   not the verified upload's, references that are not the ones the coordinator found in the
//!   uploaded NAR): the build is `failed`, its reason the refusal.
//! - Refused for now (`output_not_uploaded`: no verified upload with that file hash, e.g. the
//!   upload's file vanished): the lease is released, the build is `runnable` again at the
//!   same attempt, and runs again on the next allocation. An upload failure: it counts toward
//!   the retry cap and waits out the backoff (`retries.rs`); past the cap the build fails.
//! - A failure report of kind `setup` or `upload` (infrastructure), or of kind `builder` when
//!   builder retries are configured: within the cap, the build goes back to the queue like a
//!   refusal for now (answered as accepted: the agent drops it); past it, it fails.
//!
//! Either refusal is committed like any transition (record, event, hook work) before the
//! agent is answered, so an agent that drops the build on that answer leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};

use super::lost_inputs::LostInputs;
use super::{Accepted, Effects, FailureClass, QueueError, QueueState, Retry};
use crate::actors::symbols::PathDigest;
use crate::protocol::{BuildId, BuildState, BuiltOutput, FailureKind, HeldPhase};
use crate::store::keys::{output_key, u64_key};
use crate::store::records::{BuildRecord, NarFileRecord, OutputRecord};
use crate::store::TreeId;

/// Failure reasons the coordinator writes when it refuses a result start with this.
pub const REFUSED: &str = "result refused: ";

/// What the coordinator found in each reported output's uploaded NAR, by FileHash: the store
/// paths (of the build's input closure and outputs) whose hash part appears in it. Scanned
/// off the queue's thread before the report reaches it (`NarCache::scan_references`); a
/// FileHash missing here has no verified file.
pub type Scanned = BTreeMap<String, BTreeSet<String>>;

/// How a result report was answered.
#[derive(Debug)]
pub enum FinishAnswer {
    /// Recorded now: answer after the commit.
    Accepted,
    /// Already recorded (or being recorded: then `Effects::after` holds the first commit).
    Duplicate,
    /// Refused; the build's new state is in the effects. Answer the error after the commit.
    Refused(QueueError),
    /// A failure the build is retried after: back in the queue (acknowledged to the agent,
    /// which drops the build, after the commit).
    Requeued,
}

/// A reported outcome: the outputs, or why and where it failed.
pub type ReportedOutcome = Result<Vec<BuiltOutput>, (String, FailureKind)>;

impl QueueState {
    /// Take a result report whose references were not scanned, a failure being the
    /// builder's (tests of the state machine).
    pub fn finish(
        &mut self,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
        outcome: Result<Vec<BuiltOutput>, String>,
        log_attempt: u32,
        now: u64,
    ) -> Result<(Effects, FinishAnswer), QueueError> {
        let outcome = outcome.map_err(|r| (r, FailureKind::Builder));
        self.finish_scanned(agent_id, id, attempt, outcome, log_attempt, None, &[], now)
    }

    /// Take a result report; with `scanned`, each output's listed references must be the
    /// ones found in its NAR. `lost_inputs`: of a setup failure, the inputs the coordinator
    /// was found to have lost (`lost_inputs.rs`).
    #[allow(clippy::too_many_arguments)]
    pub fn finish_scanned(
        &mut self,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
        outcome: ReportedOutcome,
        log_attempt: u32,
        scanned: Option<&Scanned>,
        lost_inputs: &[String],
        now: u64,
    ) -> Result<(Effects, FinishAnswer), QueueError> {
        let mut fx = Effects::default();
        if let Some(a) = self.uncommitted_finishes.get(&id) {
            if a.attempt == attempt && a.agent_id == agent_id && a.succeeded == outcome.is_ok() {
                fx.after = Some(a.landing.clone());
                return Ok((fx, FinishAnswer::Duplicate));
            }
        }
        if !self.live.contains_key(&id) {
            if let Some(r) = self
                .store
                .get::<BuildRecord>(TreeId::Builds, &u64_key(id))?
            {
                let same_end = match &outcome {
                    Ok(_) => r.state == BuildState::Succeeded,
                    // A failure the coordinator wrote when it refused a report is not a
                    // failure this agent reported.
                    Err(_) => r.state == BuildState::Failed && !r.reason.starts_with(REFUSED),
                };
                if same_end && r.attempt == attempt && r.agent_id == agent_id {
                    return Ok((fx, FinishAnswer::Duplicate));
                }
                // Canceled while this agent held it at this attempt (`cancel.rs`): its failure
                // report (`canceled`, or whatever ended the builder) is taken as read; only
                // the log it uploaded is linked, the state stays. A success report is refused
                // as stale below: the build is no longer the agent's, and it drops it.
                if r.state == BuildState::Canceled
                    && outcome.is_err()
                    && r.attempt == attempt
                    && r.agent_id == agent_id
                {
                    if log_attempt != 0 && r.log_attempt != log_attempt {
                        let mut r = r;
                        r.log_attempt = log_attempt;
                        fx.batch.put(TreeId::Builds, &u64_key(id), &r)?;
                    }
                    return Ok((fx, FinishAnswer::Duplicate));
                }
            }
        }
        self.readopt_reported(
            &mut fx,
            agent_id,
            id,
            attempt,
            Some(HeldPhase::Reporting),
            now,
        )?;
        let never_started = self.leased(agent_id, id, attempt)?.state() == BuildState::Allocated;
        let b = self.live_record(id)?;
        if never_started {
            // A result with no start report before it is the start too (folded start).
            fx.batch.event(
                "build-started",
                id,
                agent_id,
                serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id,
                    "drv_path": b.drv_path}),
            );
        }
        let mut done = b.clone();
        done.finished_ms = now;
        done.log_attempt = log_attempt;
        let outcome = match outcome {
            Ok(o) => Ok(o),
            Err((reason, kind)) => {
                let lost = if kind == FailureKind::Setup && !lost_inputs.is_empty() {
                    self.inputs_lost(&mut fx, id, lost_inputs, &reason, now)?
                } else {
                    LostInputs::NotLost
                };
                match lost {
                    LostInputs::Waiting => return Ok((fx, FinishAnswer::Requeued)),
                    LostInputs::Fail(why) => Err(why),
                    LostInputs::NotLost => {
                        let (class, why) = match kind {
                            FailureKind::Builder => (FailureClass::Builder, reason),
                            k => (
                                FailureClass::Infrastructure,
                                format!("{} failure: {reason}", k.as_str()),
                            ),
                        };
                        match self.count_failure(id, class, &why, now) {
                            Retry::Requeued { not_before } => {
                                self.requeue_reported(&mut fx, id, &why, not_before)?;
                                return Ok((fx, FinishAnswer::Requeued));
                            }
                            Retry::GiveUp(reason) => {
                                // The counts as they are now (the record read above predates
                                // them).
                                if let Some(l) = self.live.get(&id) {
                                    done.retries = l.retries;
                                    done.builder_retries = l.builder_retries;
                                }
                                Err(reason)
                            }
                        }
                    }
                }
            }
        };
        match outcome {
            Ok(outputs) => {
                let records = match self.verify_outputs(&b, &outputs, scanned, now) {
                    Ok(r) => r,
                    Err(e @ QueueError::BadResult(_)) => {
                        self.refuse_for_good(&mut fx, done, &e, now)?;
                        return Ok((fx, FinishAnswer::Refused(e)));
                    }
                    Err(e @ QueueError::NotUploaded { .. }) => {
                        let why = format!("{REFUSED}{e}");
                        match self.count_failure(id, FailureClass::Infrastructure, &why, now) {
                            Retry::Requeued { not_before } => {
                                self.requeue_reported(&mut fx, id, &why, not_before)?
                            }
                            Retry::GiveUp(reason) => self.give_up(&mut fx, id, reason, now)?,
                        }
                        return Ok((fx, FinishAnswer::Refused(e)));
                    }
                    Err(e) => return Err(e),
                };
                done.state = BuildState::Succeeded;
                for o in &records {
                    fx.batch
                        .put(TreeId::Outputs, output_key(&o.path).as_bytes(), o)?;
                }
                fx.batch.put(TreeId::Builds, &u64_key(id), &done)?;
                fx.batch.event(
                    "build-succeeded",
                    id,
                    agent_id,
                    serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id,
                        "drv_path": b.drv_path,
                        "outputs": records.iter().map(|o| &o.path).collect::<Vec<_>>()}),
                );
                self.retire(&b);
                let fresh: Vec<PathDigest> =
                    records.iter().map(|o| PathDigest::of(&o.path)).collect();
                self.uncommitted_outputs.extend(fresh.iter().copied());
                self.unblock(&fresh, &mut fx)?;
                self.requeue_failed_dependents(&fresh, &mut fx)?;
                fx.new_outputs = records;
            }
            Err(reason) => {
                done.state = BuildState::Failed;
                done.reason = reason.clone();
                fx.batch.put(TreeId::Builds, &u64_key(id), &done)?;
                fx.batch.event(
                    "build-failed",
                    id,
                    agent_id,
                    serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id,
                        "drv_path": b.drv_path, "reason": reason}),
                );
                self.retire(&b);
                self.fail_dependents(id, digests(&b), now, &mut fx)?;
            }
        }
        // The marker of an accepted result, only now that it passed verification.
        let landing = fx.landing();
        self.uncommitted_finishes.insert(
            id,
            Accepted {
                attempt,
                agent_id,
                succeeded: done.state == BuildState::Succeeded,
                canceled: false,
                landing,
            },
        );
        fx.finished.push(id);
        Ok((fx, FinishAnswer::Accepted))
    }

    /// A report that can never be right for this attempt: the build fails with the refusal as
    /// its reason. Its dependents fail behind it, as after any failure.
    fn refuse_for_good(
        &mut self,
        fx: &mut Effects,
        mut done: BuildRecord,
        e: &QueueError,
        now: u64,
    ) -> Result<(), QueueError> {
        let reason = format!("{REFUSED}{e}");
        done.state = BuildState::Failed;
        done.reason = reason.clone();
        fx.batch.put(TreeId::Builds, &u64_key(done.id), &done)?;
        fx.batch.event(
            "build-failed",
            done.id,
            done.agent_id,
            serde_json::json!({"build_id": done.id, "attempt": done.attempt,
                "agent_id": done.agent_id, "drv_path": done.drv_path, "reason": reason,
                "refused": true}),
        );
        tracing::warn!(build_id = done.id, attempt = done.attempt, agent_id = done.agent_id, reason = %reason, "result refused; the build fails");
        self.retire(&done);
        self.fail_dependents(done.id, digests(&done), now, fx)?;
        Ok(())
    }

    /// A report after which the build is retried (an upload is missing, a setup or upload
    /// failure, a builder failure with retries configured; already counted): the lease is
    /// released and the build is runnable again, same attempt, offered from `not_before` on
    /// (0: at once). The agent drops it on the answer, so it is nobody's to re-adopt: no last
    /// holder, no work request (a heartbeat sent before the agent read the answer gets
    /// `abandon`, not the lease back).
    fn requeue_reported(
        &mut self,
        fx: &mut Effects,
        id: BuildId,
        why: &str,
        not_before: u64,
    ) -> Result<(), QueueError> {
        let Some(agent_id) = self.live.get(&id).map(|b| b.agent_id) else {
            return Err(QueueError::NoSuchBuild(id));
        };
        self.forget_request(id);
        self.lease_off(agent_id, id);
        self.set_state(id, BuildState::Runnable);
        self.request_of.remove(&id);
        let Some(b) = self.live.get_mut(&id) else {
            return Err(QueueError::NoSuchBuild(id));
        };
        b.agent_id = 0;
        let (attempt, retries) = (b.attempt, b.retries);
        self.put_live(fx, id)?;
        fx.batch.event(
            "lease-expired",
            id,
            agent_id,
            serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id,
                "reason": why, "retries": retries, "defer_until_ms": not_before}),
        );
        self.offer(id, fx);
        tracing::warn!(build_id = id, attempt, agent_id, retries, defer_until_ms = not_before, reason = %why, "attempt failed; the build goes back to the queue");
        Ok(())
    }

    /// Check a success report against the build's outputs and the verified uploads.
    fn verify_outputs(
        &self,
        b: &BuildRecord,
        outputs: &[BuiltOutput],
        scanned: Option<&Scanned>,
        now: u64,
    ) -> Result<Vec<OutputRecord>, QueueError> {
        if outputs.len() != b.outputs.len() {
            return Err(QueueError::BadResult(format!(
                "the result of build {} lists {} outputs; the derivation has {}",
                b.id,
                outputs.len(),
                b.outputs.len()
            )));
        }
        let mut records = Vec::new();
        for (name, path) in &b.outputs {
            let o = outputs.iter().find(|o| &o.name == name).ok_or_else(|| {
                QueueError::BadResult(format!(
                    "the result of build {} does not list output {name:?} ({path})",
                    b.id
                ))
            })?;
            if &o.path != path {
                return Err(QueueError::BadResult(format!(
                    "output {name:?} of build {} is {path}, not {}",
                    b.id, o.path
                )));
            }
            let nar: Option<NarFileRecord> =
                self.store.get(TreeId::NarFiles, o.file_hash.as_bytes())?;
            let nar = nar.ok_or_else(|| QueueError::NotUploaded {
                build: b.id,
                output: name.clone(),
                file_hash: o.file_hash.clone(),
            })?;
            if nar.nar_hash != o.nar_hash || nar.nar_size != o.nar_size {
                return Err(QueueError::BadResult(format!(
                    "output {name:?} of build {}: the report claims NarHash {} ({} bytes) but the uploaded file holds {} ({} bytes)",
                    b.id, o.nar_hash, o.nar_size, nar.nar_hash, nar.nar_size
                )));
            }
            if let Some(scanned) = scanned {
                let found = scanned
                    .get(&o.file_hash)
                    .ok_or_else(|| QueueError::NotUploaded {
                        build: b.id,
                        output: name.clone(),
                        file_hash: o.file_hash.clone(),
                    })?;
                let listed: BTreeSet<String> = o.references.iter().cloned().collect();
                if &listed != found {
                    let show =
                        |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
                    return Err(QueueError::BadResult(format!(
                        "output {name:?} of build {}: the report lists references [{}] but its NAR refers to [{}] (of the build's inputs and outputs); report the references the output holds",
                        b.id,
                        show(&listed),
                        show(found)
                    )));
                }
            }
            records.push(OutputRecord {
                path: path.clone(),
                nar_hash: nar.nar_hash,
                nar_size: nar.nar_size,
                file_hash: o.file_hash.clone(),
                file_size: nar.file_size,
                references: o.references.clone(),
                deriver: b.drv_path.clone(),
                system: b.system.clone(),
                build_id: b.id,
                created_ms: now,
            });
        }
        Ok(records)
    }

    /// Make runnable every blocked build whose last missing input is among `fresh`. Costs time
    /// proportional to the number of builds waiting on those paths.
    fn unblock(&mut self, fresh: &[PathDigest], fx: &mut Effects) -> Result<(), QueueError> {
        let mut candidates = BTreeSet::new();
        for p in fresh {
            if let Some(set) = self.waiting.remove(p) {
                for id in set {
                    if let Some(b) = self.live.get_mut(&id) {
                        b.missing = b.missing.saturating_sub(1);
                        candidates.insert(id);
                    }
                }
            }
        }
        for id in candidates {
            let Some(b) = self.live.get(&id) else {
                continue;
            };
            if b.state != BuildState::Blocked || b.missing > 0 {
                continue;
            }
            self.set_state(id, BuildState::Runnable);
            self.put_live(fx, id)?;
            self.offer(id, fx);
        }
        Ok(())
    }
}

/// The digests of a build's output paths.
fn digests(b: &BuildRecord) -> Vec<PathDigest> {
    b.outputs.iter().map(|(_, o)| PathDigest::of(o)).collect()
}
