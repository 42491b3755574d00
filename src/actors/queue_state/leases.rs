//! Leases: how they start (allocation, and the replay of a retried work request), how they end
//! without a result (agent lost, not held by its agent, never started), and how an agent gets
//! back a build it still runs (re-adoption). Every lookup goes through the per-agent lease
//! index and the per-request index of [`QueueState`], never through every build.
//!
//! The rules, in one place (docs/runtime-semantics.md states them for operators):
//! - A work request with an id is answered once: a retry of the same id by the same agent gets
//!   the same builds at the same attempts, as long as they are still leased to it (or released
//!   and not reallocated: then the retry re-adopts them).
//! - A lease the agent does not list in a heartbeat ends once it was handed to the agent more
//!   than the bound ago ([`Unheld::ReleaseAfter`]); at a session opening, at once.
//! - A build the agent lists that is runnable at that very attempt, last held by that agent,
//!   is re-adopted: leased to it again, same attempt. A build canceled while it held it at
//!   that attempt is answered with `cancel`; anything else it lists that is not its own is
//!   answered with `abandon`.
//! - A lease that ends without a result is an infrastructure failure: it counts toward the
//!   build's retry cap and the build waits out its backoff (`retries.rs`); past the cap the
//!   build fails. A re-adoption adds no failure and ends the backoff.

use std::collections::HashSet;
use std::sync::Arc;

use super::{Effects, FailureClass, QueueError, QueueState, Retry, GAVE_UP};
use crate::protocol::{AgentCommand, AgentId, BuildId, BuildState, HeldBuild, HeldPhase};
use crate::store::keys::u64_key;
use crate::store::records::BuildRecord;
use crate::store::TreeId;

/// What becomes of a lease the agent does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unheld {
    /// Release it now (a session opening: the agent says what it holds after a restart).
    Release,
    /// Release it when it was handed to the agent more than this many ms ago (a heartbeat:
    /// a work reply may still be on its way to the agent).
    ReleaseAfter(u64),
}

/// What a work request got: the leased builds, in the order of the assignments.
#[derive(Debug, Default)]
pub struct Allocation {
    pub leased: Vec<BuildRecord>,
    /// True when this answers a retry of a request already leased.
    pub replayed: bool,
}

impl QueueState {
    /// Is this work request one that already leased builds (so a retry is answered with
    /// them)?
    pub fn known_request(&self, agent_id: AgentId, request: &str) -> bool {
        self.requests.contains_key(&(agent_id, request.to_string()))
    }

    /// Lease runnable builds to an agent; builds no longer runnable are skipped. With a work
    /// request id that already leased builds, the candidates are given back to the allocator
    /// and the request's builds are answered again (the retry of a reply lost on the wire).
    pub fn allocate(
        &mut self,
        agent_id: AgentId,
        request: Option<&str>,
        candidates: &[BuildId],
        now: u64,
    ) -> Result<(Effects, Allocation), QueueError> {
        let request = request.filter(|r| !r.is_empty());
        if let Some(r) = request {
            let key = (agent_id, r.to_string());
            if self.requests.contains_key(&key) {
                return self.replay(key, candidates, now);
            }
        }
        let mut fx = Effects::default();
        let mut leased = Vec::new();
        let shared: Option<Arc<str>> = request.map(Arc::from);
        for id in candidates {
            if self.live.get(id).map(|b| b.state) != Some(BuildState::Runnable)
                || self.is_deferred(*id)
            {
                continue;
            }
            self.forget_request(*id);
            self.set_state(*id, BuildState::Allocated);
            let Some(b) = self.live.get_mut(id) else {
                continue;
            };
            b.attempt += 1;
            b.agent_id = agent_id;
            b.allocated_ms = now;
            b.started_ms = 0;
            let attempt = b.attempt;
            match &shared {
                Some(r) => {
                    self.request_of.insert(*id, r.clone());
                }
                None => {
                    self.request_of.remove(id);
                }
            }
            let rec = self.put_live(&mut fx, *id)?;
            fx.batch.event(
                "build-allocated",
                *id,
                agent_id,
                serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id}),
            );
            self.lease_on(*id, now);
            leased.push(rec);
        }
        if let (Some(r), false) = (request, leased.is_empty()) {
            let key = (agent_id, r.to_string());
            let landing = fx.landing();
            self.uncommitted_requests.insert(key.clone(), landing);
            fx.requests.push(key);
        }
        Ok((
            fx,
            Allocation {
                leased,
                replayed: false,
            },
        ))
    }

    /// Answer a retried work request with the builds it leased: those still leased to the
    /// agent under it, and those released since and not reallocated (re-adopted here). The
    /// new candidates go back to the allocator. The answer waits for the first commit.
    fn replay(
        &mut self,
        key: (AgentId, String),
        candidates: &[BuildId],
        now: u64,
    ) -> Result<(Effects, Allocation), QueueError> {
        let (agent_id, request) = (key.0, key.1.as_str());
        let mut fx = Effects::default();
        for id in candidates {
            self.offer(*id, &mut fx);
        }
        fx.after = self.uncommitted_requests.get(&key).cloned();
        let ids: Vec<BuildId> = self
            .requests
            .get(&key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut leased = Vec::new();
        for id in ids {
            let Some(b) = self.live.get(&id) else {
                continue;
            };
            let mine =
                b.agent_id == agent_id && self.request_of.get(&id).is_some_and(|r| &**r == request);
            if mine && b.state.is_leased() {
                self.lease_on(id, now);
                leased.push(self.live_record(id)?);
            } else if mine && b.state == BuildState::Runnable && b.attempt > 0 {
                self.readopt(&mut fx, id, None, "work request retried", now)?;
                leased.push(self.live_record(id)?);
            }
        }
        tracing::info!(
            agent_id,
            request,
            builds = leased.len(),
            "work request retried: answering its leases again"
        );
        Ok((
            fx,
            Allocation {
                leased,
                replayed: true,
            },
        ))
    }

    /// Lease a released build (runnable at its attempt, last held by its agent) to that
    /// agent again, at the same attempt, in the state its phase says.
    pub(super) fn readopt(
        &mut self,
        fx: &mut Effects,
        id: BuildId,
        phase: Option<HeldPhase>,
        why: &str,
        now: u64,
    ) -> Result<(), QueueError> {
        let Some(b) = self.live.get(&id) else {
            return Err(QueueError::NoSuchBuild(id));
        };
        let to = match (b.started_ms, phase) {
            (0, _) => BuildState::Allocated,
            (_, Some(HeldPhase::Uploading | HeldPhase::Reporting)) => BuildState::Uploading,
            _ => BuildState::Building,
        };
        let (agent_id, attempt) = (b.agent_id, b.attempt);
        self.set_state(id, to);
        // Not a new failure: the release counted; the backoff ends with the re-adoption.
        self.undefer(id);
        self.put_live(fx, id)?;
        fx.batch.event(
            "lease-readopted",
            id,
            agent_id,
            serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id,
                "state": to, "reason": why}),
        );
        fx.unrunnable.push(id);
        tracing::info!(
            build_id = id,
            attempt,
            agent_id,
            reason = why,
            "lease re-adopted"
        );
        self.lease_on(id, now);
        Ok(())
    }

    /// Return one leased build to the queue: runnable, same attempt, the agent kept as its
    /// last holder (which alone may re-adopt it). An infrastructure failure: counted, and the
    /// build waits out its backoff, or fails when that was one too many.
    fn release_one(
        &mut self,
        fx: &mut Effects,
        id: BuildId,
        why: &str,
        now: u64,
    ) -> Result<(), QueueError> {
        let Some(b) = self.live.get(&id) else {
            return Ok(());
        };
        if !b.state.is_leased() {
            return Ok(());
        }
        let (agent_id, attempt) = (b.agent_id, b.attempt);
        self.set_state(id, BuildState::Runnable);
        self.lease_off(agent_id, id);
        let retry = self.count_failure(id, FailureClass::Infrastructure, why, now);
        let retries = self.live.get(&id).map_or(0, |b| b.retries);
        let not_before = match &retry {
            Retry::Requeued { not_before } => {
                self.put_live(fx, id)?;
                *not_before
            }
            Retry::GiveUp(_) => 0,
        };
        fx.batch.event(
            "lease-expired",
            id,
            agent_id,
            serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id,
                "reason": why, "retries": retries, "defer_until_ms": not_before}),
        );
        tracing::info!(
            build_id = id,
            attempt,
            agent_id,
            retries,
            defer_until_ms = not_before,
            reason = why,
            "lease released"
        );
        match retry {
            Retry::Requeued { .. } => self.offer(id, fx),
            Retry::GiveUp(reason) => self.give_up(fx, id, reason, now)?,
        }
        Ok(())
    }
    /// The agent is lost: every lease it holds expires. The attempt is not raised here; it
    /// rises when the build is allocated again.
    pub fn agent_lost(&mut self, agent_id: AgentId, now: u64) -> Result<Effects, QueueError> {
        let mut fx = Effects::default();
        for id in self.leased_to(agent_id) {
            self.release_one(&mut fx, id, "agent lost", now)?;
        }
        fx.batch.event(
            "agent-lost",
            0,
            agent_id,
            serde_json::json!({"agent_id": agent_id}),
        );
        Ok(fx)
    }

    /// An agent that is heard from but sends no heartbeats: its leases still `allocated`
    /// (never started) that were handed to it more than `bound_ms` ago end. Started builds
    /// were received, and the agent timeout covers an agent that falls silent.
    pub fn release_unstarted(
        &mut self,
        agent_id: AgentId,
        bound_ms: u64,
        now: u64,
    ) -> Result<Effects, QueueError> {
        let mut fx = Effects::default();
        let old: Vec<BuildId> = self
            .leases
            .get(&agent_id)
            .into_iter()
            .flatten()
            .filter(|(_, handed)| now.saturating_sub(**handed) > bound_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            if self.live.get(&id).map(|b| b.state()) == Some(BuildState::Allocated) {
                self.release_one(&mut fx, id, "never started and no heartbeat", now)?;
            }
        }
        Ok(fx)
    }

    /// Reconcile what an agent says it holds (session opening, heartbeat) with its leases:
    /// keep what it holds, re-adopt what it still runs and nobody else took, release what it
    /// does not hold (per `unheld`), and answer `abandon` for what is not its own.
    pub fn reconcile(
        &mut self,
        agent_id: AgentId,
        held: &[HeldBuild],
        unheld: Unheld,
        now: u64,
    ) -> Result<(Effects, Vec<AgentCommand>), QueueError> {
        let mut fx = Effects::default();
        let mut commands = Vec::new();
        let listed: HashSet<(BuildId, u32)> =
            held.iter().map(|h| (h.build_id, h.attempt)).collect();
        for h in held {
            match self.held_verdict(agent_id, h)? {
                Verdict::Keep => {}
                Verdict::Readopt => self.readopt(
                    &mut fx,
                    h.build_id,
                    Some(h.phase),
                    "agent still runs it",
                    now,
                )?,
                Verdict::Abandon => commands.push(AgentCommand::Abandon {
                    build_id: h.build_id,
                    attempt: h.attempt,
                }),
                Verdict::Cancel => commands.push(AgentCommand::Cancel {
                    build_id: h.build_id,
                    attempt: h.attempt,
                }),
            }
        }
        let (bound, why) = match unheld {
            Unheld::Release => (None, "agent reconnected without it"),
            Unheld::ReleaseAfter(ms) => (Some(ms), "not held by its agent"),
        };
        let mine: Vec<(BuildId, u64)> = self
            .leases
            .get(&agent_id)
            .into_iter()
            .flatten()
            .map(|(id, handed)| (*id, *handed))
            .collect();
        for (id, handed) in mine {
            let Some(b) = self.live.get(&id) else {
                continue;
            };
            if listed.contains(&(id, b.attempt)) {
                continue;
            }
            if bound.is_none_or(|ms| now.saturating_sub(handed) > ms) {
                self.release_one(&mut fx, id, why, now)?;
            }
        }
        Ok((fx, commands))
    }

    /// What to do with one build an agent says it holds.
    fn held_verdict(&self, agent_id: AgentId, h: &HeldBuild) -> Result<Verdict, QueueError> {
        if let Some(b) = self.live.get(&h.build_id) {
            let same = b.agent_id == agent_id && b.attempt == h.attempt;
            return Ok(match b.state {
                s if s.is_leased() && same => Verdict::Keep,
                BuildState::Runnable if same && b.attempt > 0 => Verdict::Readopt,
                _ => Verdict::Abandon,
            });
        }
        // Its result was accepted (its commit may still be in flight): the agent gets or got
        // the acknowledgement; nothing to command.
        // A build canceled while the agent held it at this attempt is stopped with `cancel`.
        if let Some(a) = self.uncommitted_finishes.get(&h.build_id) {
            if a.agent_id == agent_id && a.attempt == h.attempt {
                return Ok(if a.canceled {
                    Verdict::Cancel
                } else {
                    Verdict::Keep
                });
            }
        }
        // Finished by this agent's own report at this attempt: the same.
        let rec: Option<BuildRecord> = self.store.get(TreeId::Builds, &u64_key(h.build_id))?;
        Ok(match rec {
            // A build failed because it ran out of retries was not finished by a report.
            Some(r)
                if matches!(r.state, BuildState::Succeeded | BuildState::Failed)
                    && r.agent_id == agent_id
                    && r.attempt == h.attempt
                    && !r.reason.starts_with(GAVE_UP) =>
            {
                Verdict::Keep
            }
            Some(r)
                if r.state == BuildState::Canceled
                    && r.agent_id == agent_id
                    && r.attempt == h.attempt =>
            {
                Verdict::Cancel
            }
            _ => Verdict::Abandon,
        })
    }
}

enum Verdict {
    Keep,
    Readopt,
    Abandon,
    /// Canceled while this agent held it at this attempt: stop it (`cancel.rs`).
    Cancel,
}
