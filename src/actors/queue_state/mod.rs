//! The build state machine, as plain data: the live (non-terminal) builds in memory, indexes
//! of who waits for which store path and of who holds which lease, and one method per
//! transition. Each transition changes memory and returns the [`Effects`] to commit (records,
//! events) and to announce (builds that became runnable or stopped being runnable).
//! [`super::build_queue::BuildQueue`] is the thin actor around it; on restart it rebuilds this
//! from sled with [`QueueState::load`], which is why memory never holds anything sled does not
//! (apart from the markers of commits still in flight, which a restart drops with the commits).
//!
//! The transitions are split by subject: submission, allocation, progress and cancel here;
//! results in `finish.rs`; lease ends, reconciliation and re-adoption in `leases.rs`;
//! read-only queries in `queries.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

mod finish;
mod leases;
mod queries;
#[cfg(test)]
mod tests;

use thiserror::Error;
use tokio::sync::watch;

pub use finish::{FinishAnswer, Scanned};
pub use leases::Unheld;

use crate::protocol::{AgentId, BuildId, BuildState, BuildSummary, HeldPhase};
use crate::store::keys::{output_key, u64_key};
use crate::store::records::{BuildRecord, OutputRecord};
use crate::store::{meta, Batch, Store, StoreError, TreeId};

/// A build the allocator may hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnableEntry {
    pub id: BuildId,
    pub system: String,
    pub priority: i32,
}

/// A work request, as the agent that sent it names it.
pub type RequestKey = (AgentId, String);

/// The outcome of a commit in flight, for a request that must not be answered before it lands
/// (a result sent again, a work request retried): `true` once durable, `false` if the commit
/// failed or the actor stopped before it landed (the sender was dropped unsent).
#[derive(Debug, Clone)]
pub struct Landing(watch::Receiver<Option<bool>>);

/// The sending half of a [`Landing`], owned by the commit's future in the actor.
pub type LandingSender = watch::Sender<Option<bool>>;

impl Landing {
    pub fn channel() -> (LandingSender, Landing) {
        let (tx, rx) = watch::channel(None);
        (tx, Landing(rx))
    }

    /// `None` while the commit is in flight.
    pub fn outcome(&self) -> Option<bool> {
        *self.0.borrow()
    }

    /// Wait until the commit landed (`true`) or failed (`false`).
    pub async fn landed(mut self) -> bool {
        match self.0.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(false),
            Err(_) => false,
        }
    }
}

/// What a transition asks the actor to do: commit `batch`, then tell the allocator.
#[derive(Debug, Default)]
pub struct Effects {
    pub batch: Batch,
    pub runnable: Vec<RunnableEntry>,
    /// Builds to take out of the allocator's index; sent before the commit, so nobody is
    /// proposed a build this transition took (the queue would refuse it anyway).
    pub unrunnable: Vec<BuildId>,
    /// Outputs made available (narinfos to write after the commit).
    pub new_outputs: Vec<OutputRecord>,
    /// Builds whose result this transition accepted (to confirm with
    /// [`QueueState::committed`] once durable).
    pub finished: Vec<BuildId>,
    /// Work requests whose leases this transition records (confirmed the same way).
    pub requests: Vec<RequestKey>,
    /// Signalled when this transition's commit lands or fails; repeats of its requests that
    /// arrive meanwhile wait on it.
    pub landing: Option<LandingSender>,
    /// Answer only after this earlier commit landed: the request repeats one whose commit is
    /// still in flight.
    pub after: Option<Landing>,
}

impl Effects {
    /// A [`Landing`] for this transition's commit (one channel per commit).
    fn landing(&mut self) -> Landing {
        match &self.landing {
            Some(tx) => Landing(tx.subscribe()),
            None => {
                let (tx, l) = Landing::channel();
                self.landing = Some(tx);
                l
            }
        }
    }
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
    #[error("output {output} of build {build} was not uploaded and verified (file {file_hash}): the build goes back to the queue and runs again; drop it")]
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

/// A result accepted whose commit is not confirmed yet.
#[derive(Debug, Clone)]
struct Accepted {
    attempt: u32,
    agent_id: AgentId,
    succeeded: bool,
    landing: Landing,
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
    /// Agent -> the builds leased to it -> when the lease was last handed to it (ms since the
    /// epoch: its allocation, a replay of its work request, or its re-adoption). The lease
    /// clock of heartbeat reconciliation starts there. Rebuilt at load (from `allocated_ms`);
    /// every transition that leases or unleases a build keeps it in step, so nothing that
    /// concerns one agent's leases scans every build.
    leases: HashMap<AgentId, BTreeMap<BuildId, u64>>,
    /// (agent, work request id) -> live builds leased under that request, including builds
    /// whose lease was released but not reallocated (the agent may re-adopt them by retrying
    /// the request). Rebuilt at load from the records' `request`.
    requests: HashMap<RequestKey, BTreeSet<BuildId>>,
    /// Work requests whose leases are not durable yet: a retry waits for their commit.
    uncommitted_requests: HashMap<RequestKey, Landing>,
    /// Outputs this state made available whose commit is not confirmed yet. Memory runs ahead
    /// of sled (a transition changes memory at once and commits later), so availability must
    /// count them: otherwise two inputs finishing back to back each see the other as missing
    /// and their dependent stays blocked forever. Cleared by [`QueueState::committed`]; a
    /// failed commit restarts the actor, which reloads without them.
    uncommitted_outputs: HashSet<String>,
    /// Results accepted (verified) whose commit is not confirmed yet. The same result sent
    /// again meanwhile waits for that commit and is then a duplicate, not a stale report.
    uncommitted_finishes: HashMap<BuildId, Accepted>,
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
            leases: HashMap::new(),
            requests: HashMap::new(),
            uncommitted_requests: HashMap::new(),
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
                if b.state.is_leased() {
                    s.lease_on(&b, b.allocated_ms);
                } else if b.state == BuildState::Runnable {
                    s.remember_request(&b);
                }
                s.live.insert(b.id, b);
            }
        }
        Ok(s)
    }

    /// Is a store path available, counting outputs whose commit is still under way?
    pub fn available(&self, path: &str) -> Result<bool, StoreError> {
        Ok(self.uncommitted_outputs.contains(path) || is_available(&self.store, path)?)
    }

    /// The commit that made these outputs available, accepted these results and recorded the
    /// leases of these work requests is durable: sled answers for them now.
    pub fn committed(&mut self, outputs: &[String], finished: &[BuildId], requests: &[RequestKey]) {
        for p in outputs {
            self.uncommitted_outputs.remove(p);
        }
        for id in finished {
            self.uncommitted_finishes.remove(id);
        }
        for r in requests {
            self.uncommitted_requests.remove(r);
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

    /// `b` is leased to `b.agent_id` from `handed` on: index the lease and its request.
    fn lease_on(&mut self, b: &BuildRecord, handed: u64) {
        self.leases
            .entry(b.agent_id)
            .or_default()
            .insert(b.id, handed);
        self.remember_request(b);
    }

    /// `id` is no longer leased to `agent_id`.
    fn lease_off(&mut self, agent_id: AgentId, id: BuildId) {
        if let Some(m) = self.leases.get_mut(&agent_id) {
            m.remove(&id);
            if m.is_empty() {
                self.leases.remove(&agent_id);
            }
        }
    }

    fn remember_request(&mut self, b: &BuildRecord) {
        if !b.request.is_empty() && b.agent_id != 0 {
            self.requests
                .entry((b.agent_id, b.request.clone()))
                .or_default()
                .insert(b.id);
        }
    }

    /// `b` no longer answers a retry of the work request that leased it (it finished, was
    /// canceled, or is leased under another request).
    fn forget_request(&mut self, b: &BuildRecord) {
        if b.request.is_empty() {
            return;
        }
        let key = (b.agent_id, b.request.clone());
        if let Some(set) = self.requests.get_mut(&key) {
            set.remove(&b.id);
            if set.is_empty() {
                self.requests.remove(&key);
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
                request: String::new(),
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

    /// A report on a build whose lease ended while its agent was out of touch (lost, or its
    /// lease never heard of), and that nobody took since: runnable, at the reported attempt,
    /// this agent its last holder. The report proves the agent still has the build, so it is
    /// re-adopted (same attempt, no rebuild) instead of refused as stale; a build allocated
    /// elsewhere meanwhile has a higher attempt and stays refused.
    fn readopt_reported(
        &mut self,
        fx: &mut Effects,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
        phase: Option<HeldPhase>,
        now: u64,
    ) -> Result<(), QueueError> {
        let mine = self.live.get(&id).is_some_and(|b| {
            b.state == BuildState::Runnable
                && b.attempt == attempt
                && attempt > 0
                && b.agent_id == agent_id
        });
        if mine {
            self.readopt(fx, id, phase, "agent reported on it", now)?;
        }
        Ok(())
    }

    /// Check a lease (uploads and logs); a lease that ended while the agent was out of touch
    /// and that nobody took since is re-adopted (see `readopt_reported`).
    pub fn check_lease(
        &mut self,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
        now: u64,
    ) -> Result<Effects, QueueError> {
        let mut fx = Effects::default();
        self.readopt_reported(
            &mut fx,
            agent_id,
            id,
            attempt,
            Some(HeldPhase::Uploading),
            now,
        )?;
        self.leased(agent_id, id, attempt)?;
        Ok(fx)
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
        let mut fx = Effects::default();
        let phase = (to == BuildState::Uploading).then_some(HeldPhase::Uploading);
        self.readopt_reported(&mut fx, agent_id, id, attempt, phase, now)?;
        let b = self.leased(agent_id, id, attempt)?;
        let order = |s: BuildState| s as u8;
        if order(b.state) >= order(to) {
            return Ok(fx); // a repeated report: nothing to do
        }
        b.state = to;
        if to == BuildState::Building || b.started_ms == 0 {
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
        self.forget_request(&b);
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
