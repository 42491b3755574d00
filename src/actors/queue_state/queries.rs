//! Read-only questions to the queue: a build's record and detail (with why a blocked build
//! waits), listings, and the builds an agent holds. Kept apart from the transitions in
//! `mod.rs`; none of these change state.

use super::{summary, QueueError, QueueState};
use crate::protocol::{BuildDetail, BuildId, BuildState, BuildSummary, MissingInput, OutputSpec};
use crate::store::keys::u64_key;
use crate::store::records::BuildRecord;
use crate::store::TreeId;

impl QueueState {
    /// Builds currently leased to an agent, in id order (from the lease index: no scan).
    pub fn leased_to(&self, agent_id: u64) -> Vec<BuildId> {
        self.leases
            .get(&agent_id)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The record of any build, live or finished.
    pub fn record(&self, id: BuildId) -> Result<Option<BuildRecord>, QueueError> {
        if let Some(b) = self.live.get(&id) {
            return Ok(Some(b.clone()));
        }
        Ok(self.store.get(TreeId::Builds, &u64_key(id))?)
    }

    /// Everything `kiln build show` prints.
    pub fn detail(
        &self,
        id: BuildId,
        agent_name: &dyn Fn(u64) -> Option<String>,
    ) -> Result<BuildDetail, QueueError> {
        let b = self.record(id)?.ok_or(QueueError::NoSuchBuild(id))?;
        let mut waiting_for = Vec::new();
        if b.state == BuildState::Blocked {
            for n in &b.needs {
                if self.available(n)? {
                    continue;
                }
                waiting_for.push(self.missing_input(n)?);
            }
        }
        Ok(BuildDetail {
            summary: summary(&b),
            attempt: b.attempt,
            agent: (b.agent_id != 0)
                .then(|| agent_name(b.agent_id).unwrap_or_else(|| b.agent_id.to_string())),
            outputs: b
                .outputs
                .iter()
                .map(|(n, p)| OutputSpec {
                    name: n.clone(),
                    path: p.clone(),
                })
                .collect(),
            tags: b.tags.clone(),
            created_ms: b.created_ms,
            started_ms: (b.started_ms != 0).then_some(b.started_ms),
            finished_ms: (b.finished_ms != 0).then_some(b.finished_ms),
            reason: (!b.reason.is_empty()).then(|| b.reason.clone()),
            waiting_for,
            has_log: b.log_attempt != 0,
        })
    }

    /// Explain why a path is missing: who would make it, and how that is going.
    fn missing_input(&self, path: &str) -> Result<MissingInput, QueueError> {
        if let Some(id) = self.producers.get(path) {
            let st = self.live[id].state;
            return Ok(MissingInput {
                path: path.to_string(),
                build: Some(*id),
                build_state: Some(st),
                note: format!("input build {id} is {st}"),
            });
        }
        // The latest finished build that produced it, if any.
        let mut last: Option<BuildRecord> = None;
        for r in self.store.scan::<BuildRecord>(TreeId::Builds) {
            let (_, r) = r?;
            if r.outputs.iter().any(|(_, p)| p == path) {
                last = Some(r);
            }
        }
        Ok(match last {
            Some(r) => MissingInput {
                path: path.to_string(),
                build: Some(r.id),
                build_state: Some(r.state),
                note: if r.reason.is_empty() {
                    format!("input build {} {}", r.id, r.state)
                } else {
                    format!("input build {} {}: {}", r.id, r.state, r.reason)
                },
            },
            None => MissingInput {
                path: path.to_string(),
                build: None,
                build_state: None,
                note: "no build produces it: submit its derivation".into(),
            },
        })
    }

    /// Builds in id order, optionally of one state.
    pub fn list(
        &self,
        state: Option<BuildState>,
        limit: usize,
    ) -> Result<Vec<BuildSummary>, QueueError> {
        let mut out = Vec::new();
        for r in self.store.scan::<BuildRecord>(TreeId::Builds) {
            let (_, r) = r?;
            // Live builds may be ahead of sled by an uncommitted transition: prefer memory.
            let r = self.live.get(&r.id).cloned().unwrap_or(r);
            if state.is_none_or(|s| s == r.state) {
                out.push(summary(&r));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}
