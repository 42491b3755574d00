//! The build state machine, as plain data: the live (non-terminal) builds in memory, indexes
//! of who waits for which store path, and one method per transition. Each transition changes
//! memory and returns the [`Effects`] to commit (records, events) and to announce (builds that
//! became runnable or stopped being runnable). [`super::build_queue::BuildQueue`] is the thin
//! actor around it; on restart it rebuilds this from sled with [`QueueState::load`], which is
//! why memory never holds anything sled does not.

use std::collections::{BTreeSet, HashMap, HashSet};

mod queries;

use thiserror::Error;

use crate::protocol::{BuildId, BuildState, BuildSummary, BuiltOutput};
use crate::store::keys::{output_key, u64_key};
use crate::store::records::{BuildRecord, NarFileRecord, OutputRecord};
use crate::store::{meta, Batch, Store, StoreError, TreeId};

/// A build the allocator may hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnableEntry {
    pub id: BuildId,
    pub system: String,
    pub priority: i32,
}

/// What a transition asks the actor to do: commit `batch`, then tell the allocator.
#[derive(Debug, Default)]
pub struct Effects {
    pub batch: Batch,
    pub runnable: Vec<RunnableEntry>,
    pub unrunnable: Vec<BuildId>,
    /// Outputs made available (narinfos to write after the commit).
    pub new_outputs: Vec<OutputRecord>,
    /// Builds whose result this transition accepted (to confirm with
    /// [`QueueState::committed`] once durable).
    pub finished: Vec<BuildId>,
}

/// Why a request was refused. Mapped to HTTP statuses in `http::error`.
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("no build {0}")]
    NoSuchBuild(BuildId),
    #[error("build {build} attempt {got} is stale (the current attempt is {current}{holder}): the build is no longer yours; drop it")]
    StaleAttempt {
        build: BuildId,
        got: u32,
        current: u32,
        holder: String,
    },
    #[error("build {0} is {1}: {2}")]
    WrongState(BuildId, BuildState, String),
    #[error("{0}")]
    BadResult(String),
    #[error("output {output} of build {build} was not uploaded and verified (file {file_hash}): upload it first")]
    NotUploaded {
        build: BuildId,
        output: String,
        file_hash: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A derivation to build, checked and resolved by the submission step.
#[derive(Debug, Clone)]
pub struct Target {
    pub drv_path: String,
    pub system: String,
    pub outputs: Vec<(String, String)>,
    pub needs: Vec<String>,
}

/// The in-memory state of the queue.
pub struct QueueState {
    store: Store,
    /// Every non-terminal build.
    live: HashMap<BuildId, BuildRecord>,
    /// Missing store path -> blocked builds that need it.
    waiting: HashMap<String, BTreeSet<BuildId>>,
    /// Output path -> the live build that will produce it.
    producers: HashMap<String, BuildId>,
    /// drv path -> its live build.
    by_drv: HashMap<String, BuildId>,
    /// Outputs this state made available whose commit is not confirmed yet. Memory runs ahead
    /// of sled (a transition changes memory at once and commits later), so availability must
    /// count them: otherwise two inputs finishing back to back each see the other as missing
    /// and their dependent stays blocked forever. Cleared by [`QueueState::committed`]; a
    /// failed commit restarts the actor, which reloads without them.
    uncommitted_outputs: HashSet<String>,
    /// Results accepted whose commit is not confirmed yet: build -> (attempt, agent,
    /// succeeded). The same result sent again meanwhile is a duplicate, not a stale report.
    uncommitted_finishes: HashMap<BuildId, (u32, u64, bool)>,
    next_build_id: u64,
}

/// Is a store path available (an output or an uploaded source)?
pub fn is_available(store: &Store, path: &str) -> Result<bool, StoreError> {
    Ok(store
        .get::<OutputRecord>(TreeId::Outputs, output_key(path).as_bytes())?
        .is_some_and(|o| o.path == path))
}

impl QueueState {
    /// Rebuild the state from sled.
    pub fn load(store: Store) -> Result<QueueState, StoreError> {
        let mut s = QueueState {
            next_build_id: store.meta_u64(meta::NEXT_BUILD_ID)?.unwrap_or(1),
            store,
            live: HashMap::new(),
            waiting: HashMap::new(),
            producers: HashMap::new(),
            by_drv: HashMap::new(),
            uncommitted_outputs: HashSet::new(),
            uncommitted_finishes: HashMap::new(),
        };
        let records: Vec<BuildRecord> = s
            .store
            .scan::<BuildRecord>(TreeId::Builds)
            .map(|r| r.map(|(_, b)| b))
            .collect::<Result<_, _>>()?;
        for b in records {
            s.next_build_id = s.next_build_id.max(b.id + 1);
            if !b.state.is_terminal() {
                s.index(&b)?;
                s.live.insert(b.id, b);
            }
        }
        Ok(s)
    }

    /// Is a store path available, counting outputs whose commit is still under way?
    pub fn available(&self, path: &str) -> Result<bool, StoreError> {
        Ok(self.uncommitted_outputs.contains(path) || is_available(&self.store, path)?)
    }

    /// The commit that made these outputs available and accepted these results is durable:
    /// sled answers for them now.
    pub fn committed(&mut self, outputs: &[String], finished: &[BuildId]) {
        for p in outputs {
            self.uncommitted_outputs.remove(p);
        }
        for id in finished {
            self.uncommitted_finishes.remove(id);
        }
    }

    fn index(&mut self, b: &BuildRecord) -> Result<(), StoreError> {
        self.by_drv.insert(b.drv_path.clone(), b.id);
        for (_, p) in &b.outputs {
            self.producers.insert(p.clone(), b.id);
        }
        if b.state == BuildState::Blocked {
            for need in &b.needs {
                if !self.available(need)? {
                    self.waiting.entry(need.clone()).or_default().insert(b.id);
                }
            }
        }
        Ok(())
    }

    fn unindex(&mut self, b: &BuildRecord) {
        if self.by_drv.get(&b.drv_path) == Some(&b.id) {
            self.by_drv.remove(&b.drv_path);
        }
        for (_, p) in &b.outputs {
            if self.producers.get(p) == Some(&b.id) {
                self.producers.remove(p);
            }
        }
        for need in &b.needs {
            if let Some(set) = self.waiting.get_mut(need) {
                set.remove(&b.id);
                if set.is_empty() {
                    self.waiting.remove(need);
                }
            }
        }
    }

    /// Every runnable build, for the allocator's index.
    pub fn runnable(&self) -> Vec<RunnableEntry> {
        self.live
            .values()
            .filter(|b| b.state == BuildState::Runnable)
            .map(entry)
            .collect()
    }

    /// A live build (tests and the fault points compare this with sled).
    pub fn live(&self) -> &HashMap<BuildId, BuildRecord> {
        &self.live
    }

    #[cfg(feature = "fault-points")]
    pub fn live_mut(&mut self) -> &mut HashMap<BuildId, BuildRecord> {
        &mut self.live
    }

    /// Queue new builds (or return the live build of a derivation already queued).
    pub fn submit(
        &mut self,
        targets: Vec<Target>,
        drvs: Vec<(String, Vec<u8>)>,
        priority: i32,
        tags: Vec<(String, String)>,
        now: u64,
    ) -> Result<(Effects, Vec<BuildSummary>), QueueError> {
        let mut fx = Effects::default();
        for (path, contents) in drvs {
            fx.batch.put(
                TreeId::Derivations,
                path.as_bytes(),
                &crate::store::records::DrvRecord { contents },
            )?;
        }
        let mut out = Vec::new();
        for t in targets {
            if let Some(id) = self.by_drv.get(&t.drv_path) {
                let b = &self.live[id];
                let mut s = summary(b);
                s.existing = true;
                out.push(s);
                continue;
            }
            let mut missing = false;
            for n in &t.needs {
                if !self.available(n)? {
                    missing = true;
                    break;
                }
            }
            let id = self.next_build_id;
            self.next_build_id += 1;
            let b = BuildRecord {
                id,
                drv_path: t.drv_path,
                system: t.system,
                priority,
                tags: tags.clone(),
                state: if missing {
                    BuildState::Blocked
                } else {
                    BuildState::Runnable
                },
                attempt: 0,
                agent_id: 0,
                outputs: t.outputs,
                needs: t.needs,
                created_ms: now,
                allocated_ms: 0,
                started_ms: 0,
                finished_ms: 0,
                reason: String::new(),
                log_attempt: 0,
            };
            fx.batch.put(TreeId::Builds, &u64_key(id), &b)?;
            fx.batch.event(
                "build-submitted",
                id,
                0,
                serde_json::json!({"build_id": id, "drv_path": b.drv_path, "system": b.system,
                    "priority": b.priority, "state": b.state}),
            );
            if b.state == BuildState::Runnable {
                fx.runnable.push(entry(&b));
            }
            out.push(summary(&b));
            self.index(&b)?;
            self.live.insert(id, b);
        }
        fx.batch.put_raw(
            TreeId::Meta,
            meta::NEXT_BUILD_ID,
            &self.next_build_id.to_be_bytes(),
        );
        Ok((fx, out))
    }

    /// Lease runnable builds to an agent; builds no longer runnable are skipped.
    pub fn allocate(
        &mut self,
        agent_id: u64,
        candidates: &[BuildId],
        now: u64,
    ) -> Result<(Effects, Vec<BuildRecord>), QueueError> {
        let mut fx = Effects::default();
        let mut leased = Vec::new();
        for id in candidates {
            let Some(b) = self.live.get_mut(id) else {
                continue;
            };
            if b.state != BuildState::Runnable {
                continue;
            }
            b.state = BuildState::Allocated;
            b.attempt += 1;
            b.agent_id = agent_id;
            b.allocated_ms = now;
            fx.batch.put(TreeId::Builds, &u64_key(*id), &*b)?;
            fx.batch.event(
                "build-allocated",
                *id,
                agent_id,
                serde_json::json!({"build_id": id, "attempt": b.attempt, "agent_id": agent_id}),
            );
            leased.push(b.clone());
        }
        Ok((fx, leased))
    }

    /// The live build leased to `agent_id` at `attempt`, or why not.
    fn leased(
        &mut self,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
    ) -> Result<&mut BuildRecord, QueueError> {
        let b = match self.live.get_mut(&id) {
            Some(b) => b,
            None => {
                let rec: Option<BuildRecord> = self.store.get(TreeId::Builds, &u64_key(id))?;
                return Err(match rec {
                    None => QueueError::NoSuchBuild(id),
                    Some(r) => QueueError::StaleAttempt {
                        build: id,
                        got: attempt,
                        current: r.attempt,
                        holder: format!("; it is {}", r.state),
                    },
                });
            }
        };
        if !b.state.is_leased() || b.attempt != attempt || b.agent_id != agent_id {
            return Err(QueueError::StaleAttempt {
                build: id,
                got: attempt,
                current: b.attempt,
                holder: format!("; it is {}", b.state),
            });
        }
        Ok(b)
    }

    /// Check a lease without changing anything (uploads and logs).
    pub fn check_lease(
        &mut self,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
    ) -> Result<(), QueueError> {
        self.leased(agent_id, id, attempt).map(|_| ())
    }

    /// The agent started the build (or moved on to uploading it).
    pub fn advance(
        &mut self,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
        to: BuildState,
        now: u64,
    ) -> Result<Effects, QueueError> {
        let b = self.leased(agent_id, id, attempt)?;
        let mut fx = Effects::default();
        let order = |s: BuildState| s as u8;
        if order(b.state) >= order(to) {
            return Ok(fx); // a repeated report: nothing to do
        }
        b.state = to;
        if to == BuildState::Building {
            b.started_ms = now;
        }
        fx.batch.put(TreeId::Builds, &u64_key(id), &*b)?;
        if to == BuildState::Building {
            fx.batch.event(
                "build-started",
                id,
                agent_id,
                serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id,
                    "drv_path": b.drv_path}),
            );
        }
        Ok(fx)
    }

    /// Accept a result. Returns `duplicate = true`, changing nothing, when this attempt's
    /// result was already accepted.
    pub fn finish(
        &mut self,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
        outcome: Result<Vec<BuiltOutput>, String>,
        log_attempt: u32,
        now: u64,
    ) -> Result<(Effects, bool), QueueError> {
        if let Some(&(a, agent, ok)) = self.uncommitted_finishes.get(&id) {
            if a == attempt && agent == agent_id && ok == outcome.is_ok() {
                return Ok((Effects::default(), true));
            }
        }
        if !self.live.contains_key(&id) {
            if let Some(r) = self
                .store
                .get::<BuildRecord>(TreeId::Builds, &u64_key(id))?
            {
                let same_end = match &outcome {
                    Ok(_) => r.state == BuildState::Succeeded,
                    Err(_) => r.state == BuildState::Failed,
                };
                if same_end && r.attempt == attempt && r.agent_id == agent_id {
                    return Ok((Effects::default(), true));
                }
            }
        }
        let b = self.leased(agent_id, id, attempt)?.clone();
        let mut fx = Effects::default();
        fx.finished.push(id);
        self.uncommitted_finishes
            .insert(id, (attempt, agent_id, outcome.is_ok()));
        let mut done = b.clone();
        done.finished_ms = now;
        done.log_attempt = log_attempt;
        match outcome {
            Ok(outputs) => {
                let records = self.verify_outputs(&b, &outputs, now)?;
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
                self.unindex(&b);
                self.live.remove(&id);
                let fresh: HashSet<String> = records.iter().map(|o| o.path.clone()).collect();
                self.uncommitted_outputs.extend(fresh.iter().cloned());
                self.unblock(&fresh, &mut fx)?;
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
                self.unindex(&b);
                self.live.remove(&id);
            }
        }
        Ok((fx, false))
    }

    /// Check a success report against the build's outputs and the verified uploads.
    fn verify_outputs(
        &self,
        b: &BuildRecord,
        outputs: &[BuiltOutput],
        now: u64,
    ) -> Result<Vec<OutputRecord>, QueueError> {
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
        if outputs.len() != b.outputs.len() {
            return Err(QueueError::BadResult(format!(
                "the result of build {} lists {} outputs; the derivation has {}",
                b.id,
                outputs.len(),
                b.outputs.len()
            )));
        }
        Ok(records)
    }

    /// Make runnable every blocked build whose last missing input is among `fresh`. Costs time
    /// proportional to the number of builds waiting on those paths.
    fn unblock(&mut self, fresh: &HashSet<String>, fx: &mut Effects) -> Result<(), QueueError> {
        let mut candidates = BTreeSet::new();
        for p in fresh {
            if let Some(set) = self.waiting.remove(p) {
                candidates.extend(set);
            }
        }
        for id in candidates {
            let Some(b) = self.live.get(&id) else {
                continue;
            };
            if b.state != BuildState::Blocked {
                continue;
            }
            let mut ready = true;
            for n in &b.needs {
                if !self.available(n)? {
                    ready = false;
                    break;
                }
            }
            if ready {
                let b = self.live.get_mut(&id).ok_or(QueueError::NoSuchBuild(id))?;
                b.state = BuildState::Runnable;
                fx.batch.put(TreeId::Builds, &u64_key(id), &*b)?;
                fx.runnable.push(entry(b));
            }
        }
        Ok(())
    }

    /// Cancel a build that is not running.
    pub fn cancel(&mut self, id: BuildId, now: u64) -> Result<(Effects, BuildSummary), QueueError> {
        let Some(b) = self.live.get(&id) else {
            let r: Option<BuildRecord> = self.store.get(TreeId::Builds, &u64_key(id))?;
            return Err(match r {
                None => QueueError::NoSuchBuild(id),
                Some(r) => QueueError::WrongState(id, r.state, "it has already finished".into()),
            });
        };
        if b.state.is_leased() {
            return Err(QueueError::WrongState(
                id,
                b.state,
                "canceling a running build is not supported yet (it arrives with scheduling, issue [4/8]); wait for it to finish".into(),
            ));
        }
        let mut b = b.clone();
        let was_runnable = b.state == BuildState::Runnable;
        self.unindex(&b);
        self.live.remove(&id);
        b.state = BuildState::Canceled;
        b.finished_ms = now;
        b.reason = "canceled by request".into();
        let mut fx = Effects::default();
        fx.batch.put(TreeId::Builds, &u64_key(id), &b)?;
        fx.batch.event(
            "build-canceled",
            id,
            0,
            serde_json::json!({"build_id": id, "drv_path": b.drv_path}),
        );
        if was_runnable {
            fx.unrunnable.push(id);
        }
        Ok((fx, summary(&b)))
    }

    /// Return builds leased to `agent_id` to the queue: all of them (the agent is lost), or
    /// those not in `keep` (the agent reconnected and does not hold them). The attempt is not
    /// raised here; it rises when the build is allocated again.
    pub fn release(
        &mut self,
        agent_id: u64,
        keep: &HashSet<(BuildId, u32)>,
        why: &str,
    ) -> Result<Effects, QueueError> {
        let mut fx = Effects::default();
        let mine: Vec<BuildId> = self
            .live
            .values()
            .filter(|b| b.agent_id == agent_id && b.state.is_leased())
            .filter(|b| !keep.contains(&(b.id, b.attempt)))
            .map(|b| b.id)
            .collect();
        for id in mine {
            let Some(b) = self.live.get_mut(&id) else {
                continue;
            };
            b.state = BuildState::Runnable;
            b.agent_id = 0;
            fx.batch.put(TreeId::Builds, &u64_key(id), &*b)?;
            fx.batch.event(
                "lease-expired",
                id,
                agent_id,
                serde_json::json!({"build_id": id, "attempt": b.attempt, "agent_id": agent_id, "reason": why}),
            );
            fx.runnable.push(entry(b));
        }
        Ok(fx)
    }

    /// Which of the builds an agent says it holds are no longer its own (to abandon).
    pub fn foreign(&self, agent_id: u64, held: &[(BuildId, u32)]) -> Vec<(BuildId, u32)> {
        held.iter()
            .filter(|(id, attempt)| {
                !self.live.get(id).is_some_and(|b| {
                    b.agent_id == agent_id && b.attempt == *attempt && b.state.is_leased()
                })
            })
            .copied()
            .collect()
    }
}

fn entry(b: &BuildRecord) -> RunnableEntry {
    RunnableEntry {
        id: b.id,
        system: b.system.clone(),
        priority: b.priority,
    }
}

pub fn summary(b: &BuildRecord) -> BuildSummary {
    BuildSummary {
        id: b.id,
        drv_path: b.drv_path.clone(),
        system: b.system.clone(),
        state: b.state,
        priority: b.priority,
        existing: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::committer::CommitterOptions;
    use crate::store::records::{EventRecord, NarFileRecord};
    use crate::store::{Committer, StoreOptions};

    fn target(name: &str, needs: &[&str]) -> Target {
        Target {
            drv_path: format!("/s/{name:a<32}-{name}.drv"),
            system: "x86_64-linux".into(),
            outputs: vec![("out".into(), out_path(name))],
            needs: needs.iter().map(|n| out_path(n)).collect(),
        }
    }

    fn out_path(name: &str) -> String {
        format!("/s/{name:b<32}-{name}")
    }

    fn built(name: &str) -> Vec<BuiltOutput> {
        vec![BuiltOutput {
            name: "out".into(),
            path: out_path(name),
            nar_hash: format!("sha256:{name}"),
            nar_size: 1,
            file_hash: format!("sha256:file-{name}"),
            file_size: 1,
            references: vec![],
        }]
    }

    /// Pins the race where two inputs finish before either commit lands: memory runs ahead of
    /// sled, so the second finish must count the first one's output as available, or the
    /// dependent stays blocked forever.
    #[test]
    fn inputs_finishing_back_to_back_before_their_commits_unblock_the_dependent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let c = Committer::start(
            store.clone(),
            CommitterOptions::default(),
            Box::new(|_: &[EventRecord]| {}),
        )
        .unwrap();
        let mut q = QueueState::load(store.clone()).unwrap();
        let (fx, builds) = q
            .submit(
                vec![target("a", &[]), target("b", &[]), target("c", &["a", "b"])],
                vec![],
                0,
                vec![],
                1,
            )
            .unwrap();
        c.commit_blocking(fx.batch).unwrap();
        assert_eq!(builds[2].state, BuildState::Blocked);
        let (a, b, cid) = (builds[0].id, builds[1].id, builds[2].id);
        let (fx, leased) = q.allocate(7, &[a, b], 2).unwrap();
        c.commit_blocking(fx.batch).unwrap();
        assert_eq!(leased.len(), 2);
        // The verified uploads.
        let mut nars = Batch::new();
        for n in ["a", "b"] {
            let rec = NarFileRecord {
                file_size: 1,
                nar_hash: format!("sha256:{n}"),
                nar_size: 1,
                created_ms: 3,
            };
            nars.put(
                TreeId::NarFiles,
                format!("sha256:file-{n}").as_bytes(),
                &rec,
            )
            .unwrap();
        }
        c.commit_blocking(nars).unwrap();

        // Both results are decided before either commit is applied.
        let (fx_a, _) = q.finish(7, a, 1, Ok(built("a")), 0, 4).unwrap();
        // The same result again before its commit: a duplicate, not a stale report.
        let (dup, duplicate) = q.finish(7, a, 1, Ok(built("a")), 0, 4).unwrap();
        assert!(duplicate && dup.batch.is_empty());
        let (fx_b, _) = q.finish(7, b, 1, Ok(built("b")), 0, 5).unwrap();
        let runnable: Vec<BuildId> = fx_a
            .runnable
            .iter()
            .chain(&fx_b.runnable)
            .map(|e| e.id)
            .collect();
        assert_eq!(
            runnable,
            vec![cid],
            "the dependent became runnable exactly once"
        );
        c.commit_blocking(fx_a.batch).unwrap();
        c.commit_blocking(fx_b.batch).unwrap();
        q.committed(&[out_path("a"), out_path("b")], &[a, b]);
        assert!(q.uncommitted_outputs.is_empty() && q.uncommitted_finishes.is_empty());
        // After the commit, sled answers: still a duplicate.
        assert!(q.finish(7, a, 1, Ok(built("a")), 0, 6).unwrap().1);
        assert!(
            q.available(&out_path("a")).unwrap(),
            "sled answers once committed"
        );
        // Reloading from sled agrees.
        let again = QueueState::load(store).unwrap();
        assert_eq!(again.live()[&cid].state, BuildState::Runnable);
        c.shutdown_blocking();
    }
}
