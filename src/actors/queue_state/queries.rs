//! Read-only questions to the queue: a build's record and detail (with why a blocked build
//! waits), pages of listings, and the builds an agent holds. Kept apart from the transitions
//! in `mod.rs`; none of these change state, and none looks at more builds than it answers
//! about (a listing of a live state pages through the per-state index; terminal states and
//! "every build" are read from sled by the caller, off the actor's thread).

use super::{summary, QueueError, QueueState};
use crate::actors::symbols::PathDigest;
use crate::protocol::{BuildDetail, BuildId, BuildState, MissingInput, OutputSpec};
use crate::store::keys::u64_key;
use crate::store::records::BuildRecord;
use crate::store::TreeId;

/// A page of live build ids in one state: `(id, state, priority)` as memory has them now, and
/// whether more follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub builds: Vec<(BuildId, BuildState, i32)>,
    pub more: bool,
}

impl QueueState {
    /// Builds currently leased to an agent, in id order (from the lease index: no scan).
    pub fn leased_to(&self, agent_id: u64) -> Vec<BuildId> {
        self.leases
            .get(&agent_id)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The record of any build, live (memory over sled) or finished.
    pub fn record(&self, id: BuildId) -> Result<Option<BuildRecord>, QueueError> {
        Ok(self.full(id)?)
    }

    /// Up to `limit` live builds in state `s` after id `after` (a live state; see
    /// [`ListPage`]).
    pub fn list_live(&self, s: BuildState, after: BuildId, limit: usize) -> ListPage {
        let (ids, more) = self.by_state.page(s, after, limit);
        ListPage {
            builds: ids
                .into_iter()
                .filter_map(|id| {
                    let l = self.live.get(&id)?;
                    Some((id, l.state, l.priority))
                })
                .collect(),
            more,
        }
    }

    /// The live state and priority of each of `ids` that is live (a listing read from sled
    /// shows memory's newer state for these).
    pub fn live_states(&self, ids: &[BuildId]) -> Vec<(BuildId, BuildState, i32)> {
        ids.iter()
            .filter_map(|id| {
                let l = self.live.get(id)?;
                Some((*id, l.state, l.priority))
            })
            .collect()
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
                // What it waits on: a path it is indexed as waiting for (also one whose
                // record exists but whose NAR was lost), or one that is not available.
                let waits = self
                    .waiting
                    .get(&PathDigest::of(n))
                    .is_some_and(|s| s.contains(&id));
                if !waits && self.available(n)? {
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
            retries: b.retries,
            builder_retries: b.builder_retries,
            defer_until_ms: (b.defer_until_ms != 0).then_some(b.defer_until_ms),
        })
    }

    /// Explain why a path is missing: who would make it, and how that is going. The live
    /// producer from memory, else the last build of that output from the `output_builds`
    /// index: one lookup, no scan.
    fn missing_input(&self, path: &str) -> Result<MissingInput, QueueError> {
        if let Some(id) = self.producers.get(&PathDigest::of(path)) {
            if let Some(l) = self.live.get(id) {
                let st = l.state;
                return Ok(MissingInput {
                    path: path.to_string(),
                    build: Some(*id),
                    build_state: Some(st),
                    note: format!("input build {id} is {st}"),
                });
            }
        }
        let last: Option<BuildRecord> = match self.store.last_build_of(path)? {
            Some(id) => self
                .store
                .get::<BuildRecord>(TreeId::Builds, &u64_key(id))?
                .filter(|r| r.outputs.iter().any(|(_, p)| p == path)),
            None => None,
        };
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
}
