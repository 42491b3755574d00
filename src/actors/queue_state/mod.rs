//! The build state machine, as plain data: the live (non-terminal) builds in memory, indexes
//! of who waits for which store path and of who holds which lease, and one method per
//! transition. Each transition changes memory and returns the [`Effects`] to commit (records,
//! events) and to announce (builds that became runnable or stopped being runnable).
//! [`super::build_queue::BuildQueue`] is the thin actor around it; on restart it rebuilds this
//! from sled with [`QueueState::load`], which is why memory never holds anything sled does not
//! (apart from the markers of commits still in flight, which a restart drops with the commits).
//!
//! The transitions are split by subject: submission, allocation and progress here; cancel
//! (of queued and running builds, and of their dependents) in `cancel.rs`; results in
//! `finish.rs`; lease ends, reconciliation and re-adoption in `leases.rs`;
//! read-only queries in `queries.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

mod cancel;
mod finish;
mod input_failed;
mod leases;
mod live;
mod load;
mod lost_inputs;
mod priority;
mod queries;
mod retries;
#[cfg(test)]
mod retries_tests;
#[cfg(test)]
mod tests;

use thiserror::Error;
use tokio::sync::watch;

pub use cancel::{input_canceled_reason, Canceled, CANCELED_BY_REQUEST};
pub use finish::{FinishAnswer, ReportedOutcome, Scanned};
pub use input_failed::{input_failed_reason, is_input_failed};
pub use leases::Unheld;
pub use live::{LiveBuild, StateIndex, LIVE_STATES};
pub use queries::ListPage;
pub use retries::{FailureClass, Retry, GAVE_UP};

use super::runnable_index::RunnableEntry;
use super::symbols::{PathDigest, Symbols, TagSetId};
use crate::config::{apply_priority_rules, PriorityRule, RetryConfig};
use crate::protocol::{AgentId, BuildId, BuildState, BuildSummary, HeldPhase};
use crate::store::keys::{output_key, u64_key};
use crate::store::records::{BuildRecord, OutputRecord};
use crate::store::{Batch, Store, StoreError, TreeId};

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
    /// Builds this transition created: their full records stay in memory until the commit
    /// lands (confirmed the same way), then sled answers for them.
    pub submitted: Vec<BuildId>,
    /// Runnable builds whose effective priority or waiting count changed: the allocator
    /// re-keys them (sent after the commit, with `runnable`).
    pub rekeyed: Vec<RunnableEntry>,
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
    /// A running build canceled (not a result its agent reported): see `cancel.rs`.
    canceled: bool,
    landing: Landing,
}

/// The in-memory state of the queue.
pub struct QueueState {
    store: Store,
    symbols: Arc<Symbols>,
    /// Every non-terminal build, compact (see [`LiveBuild`]).
    live: HashMap<BuildId, LiveBuild>,
    /// Live build ids by state (listings and gauges).
    by_state: StateIndex,
    /// Missing store path -> blocked builds that need it.
    waiting: HashMap<PathDigest, BTreeSet<BuildId>>,
    /// Output path -> the live build that will produce it.
    producers: HashMap<PathDigest, BuildId>,
    /// drv path -> its live build.
    by_drv: HashMap<PathDigest, BuildId>,
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
    /// The `request` field of live builds that have one (the work request of their current
    /// attempt); only leased and recently released builds do.
    request_of: HashMap<BuildId, Arc<str>>,
    /// Work requests whose leases are not durable yet: a retry waits for their commit.
    uncommitted_requests: HashMap<RequestKey, Landing>,
    /// Outputs this state made available whose commit is not confirmed yet. Memory runs ahead
    /// of sled (a transition changes memory at once and commits later), so availability must
    /// count them: otherwise two inputs finishing back to back each see the other as missing
    /// and their dependent stays blocked forever. Cleared by [`QueueState::committed`]; a
    /// failed commit restarts the actor, which reloads without them.
    uncommitted_outputs: HashSet<PathDigest>,
    /// Results accepted (verified) whose commit is not confirmed yet. The same result sent
    /// again meanwhile waits for that commit and is then a duplicate, not a stale report.
    uncommitted_finishes: HashMap<BuildId, Accepted>,
    /// Full records of builds whose submission commit is in flight: until it lands, sled does
    /// not have them, and a transition on them (e.g. a dependent unblocked by an input that
    /// finished meanwhile) reads them here.
    pending: HashMap<BuildId, Arc<BuildRecord>>,
    /// Index writes for an old state dir, found by the load (see `load.rs`).
    migration: Vec<Batch>,
    /// Missing path -> the builds that failed because the input producing it failed (see
    /// `input_failed.rs`); rebuilt at load from their records.
    input_failed: HashMap<PathDigest, BTreeSet<BuildId>>,
    /// `[[scheduling.priority_rules]]`, applied to each build at submission.
    rules: Arc<[PriorityRule]>,
    /// `[scheduling.retries]` (see `retries.rs`).
    retry: RetryConfig,
    /// The timer of deferred builds: (not before, build), earliest first. A runnable build
    /// here is not offered to the allocator until [`QueueState::wake`] takes it out.
    deferred: BTreeSet<(u64, BuildId)>,
    next_build_id: u64,
}

/// Is a store path available (an output or an uploaded source)?
pub fn is_available(store: &Store, path: &str) -> Result<bool, StoreError> {
    Ok(store
        .get::<OutputRecord>(TreeId::Outputs, output_key(path).as_bytes())?
        .is_some_and(|o| o.path == path))
}

impl QueueState {
    /// A state with no build (the actor's until its `started` loads the real one).
    pub fn unloaded(store: Store, symbols: Arc<Symbols>) -> QueueState {
        QueueState::empty(store, symbols, 1)
    }

    /// A state with nothing loaded (the builds are read by [`QueueState::load`]).
    fn empty(store: Store, symbols: Arc<Symbols>, next_build_id: u64) -> QueueState {
        QueueState {
            store,
            symbols,
            live: HashMap::new(),
            by_state: StateIndex::default(),
            waiting: HashMap::new(),
            producers: HashMap::new(),
            by_drv: HashMap::new(),
            leases: HashMap::new(),
            requests: HashMap::new(),
            request_of: HashMap::new(),
            uncommitted_requests: HashMap::new(),
            uncommitted_outputs: HashSet::new(),
            uncommitted_finishes: HashMap::new(),
            pending: HashMap::new(),
            migration: Vec::new(),
            input_failed: HashMap::new(),
            rules: Arc::from(Vec::new()),
            retry: RetryConfig::default(),
            deferred: BTreeSet::new(),
            next_build_id,
        }
    }

    /// The priority rules submissions go through from now on.
    pub fn set_rules(&mut self, rules: Arc<[PriorityRule]>) {
        self.rules = rules;
    }

    /// Is a store path available, counting outputs whose commit is still under way?
    pub fn available(&self, path: &str) -> Result<bool, StoreError> {
        Ok(self.uncommitted_outputs.contains(&PathDigest::of(path))
            || is_available(&self.store, path)?)
    }

    /// The commit that made these outputs available, accepted these results, recorded the
    /// leases of these work requests and created these builds is durable: sled answers for
    /// them now.
    pub fn committed(
        &mut self,
        outputs: &[String],
        finished: &[BuildId],
        requests: &[RequestKey],
        submitted: &[BuildId],
    ) {
        for p in outputs {
            self.uncommitted_outputs.remove(&PathDigest::of(p));
        }
        for id in finished {
            self.uncommitted_finishes.remove(id);
        }
        for r in requests {
            self.uncommitted_requests.remove(r);
        }
        for id in submitted {
            self.pending.remove(id);
        }
    }

    /// The parts of a build's record that never change after submission, as stored (from
    /// the submission in flight, else sled); the live fields are not overlaid.
    fn stored(&self, id: BuildId) -> Result<Option<BuildRecord>, StoreError> {
        if let Some(r) = self.pending.get(&id) {
            return Ok(Some((**r).clone()));
        }
        self.store.get(TreeId::Builds, &u64_key(id))
    }

    /// A build's current record: sled's (or the submission's in flight) with memory's live
    /// fields on top. `None` for an unknown build.
    pub fn full(&self, id: BuildId) -> Result<Option<BuildRecord>, StoreError> {
        let Some(mut r) = self.stored(id)? else {
            return Ok(None);
        };
        if let Some(l) = self.live.get(&id) {
            r.state = l.state;
            r.attempt = l.attempt;
            r.agent_id = l.agent_id;
            r.priority = l.priority;
            r.allocated_ms = l.allocated_ms;
            r.started_ms = l.started_ms;
            r.retries = l.retries;
            r.builder_retries = l.builder_retries;
            r.defer_until_ms = l.defer_until_ms;
            r.request = self
                .request_of
                .get(&id)
                .map(|s| s.to_string())
                .unwrap_or_default();
        }
        Ok(Some(r))
    }

    /// The current record of a live build, for a transition that rewrites it.
    fn live_record(&self, id: BuildId) -> Result<BuildRecord, QueueError> {
        self.full(id)?.ok_or(QueueError::NoSuchBuild(id))
    }

    /// Stage the current record of live build `id` in the batch.
    fn put_live(&self, fx: &mut Effects, id: BuildId) -> Result<BuildRecord, QueueError> {
        let r = self.live_record(id)?;
        fx.batch.put(TreeId::Builds, &u64_key(id), &r)?;
        Ok(r)
    }

    fn add_live(&mut self, id: BuildId, l: LiveBuild) {
        self.by_state.insert(id, l.state);
        self.live.insert(id, l);
    }

    /// Move a live build to another live state (every state change goes through here, so
    /// the per-state index stays in step).
    fn set_state(&mut self, id: BuildId, to: BuildState) {
        if let Some(l) = self.live.get_mut(&id) {
            self.by_state.remove(id, l.state);
            l.state = to;
            self.by_state.insert(id, to);
        }
    }

    /// `id` is no longer live (it finished or was canceled): drop it and everything that
    /// names it. `rec` is its record (for the paths it was indexed under).
    fn retire(&mut self, rec: &BuildRecord) {
        let id = rec.id;
        if self.by_drv.get(&PathDigest::of(&rec.drv_path)) == Some(&id) {
            self.by_drv.remove(&PathDigest::of(&rec.drv_path));
        }
        for (_, p) in &rec.outputs {
            let d = PathDigest::of(p);
            if self.producers.get(&d) == Some(&id) {
                self.producers.remove(&d);
            }
        }
        for need in &rec.needs {
            self.unwait(id, PathDigest::of(need), None);
        }
        if let Some(l) = self.live.get(&id) {
            let agent = l.agent_id;
            self.lease_off(agent, id);
        }
        self.forget_request(id);
        self.undefer(id);
        if let Some(l) = self.live.remove(&id) {
            self.by_state.remove(id, l.state);
        }
        self.request_of.remove(&id);
    }

    /// Blocked build `id` waits for `path`; the live build producing it (if any) has one more
    /// build waiting on it.
    fn wait_on(&mut self, id: BuildId, path: PathDigest, fx: &mut Effects) {
        if !self.waiting.entry(path).or_default().insert(id) {
            return;
        }
        self.change_rdeps(path, 1, Some(fx));
    }

    /// `id` no longer waits for `path`.
    fn unwait(&mut self, id: BuildId, path: PathDigest, fx: Option<&mut Effects>) {
        let Some(set) = self.waiting.get_mut(&path) else {
            return;
        };
        if !set.remove(&id) {
            return;
        }
        if set.is_empty() {
            self.waiting.remove(&path);
        }
        self.change_rdeps(path, -1, fx);
    }

    fn change_rdeps(&mut self, path: PathDigest, by: i64, fx: Option<&mut Effects>) {
        let Some(p) = self.producers.get(&path).copied() else {
            return;
        };
        let Some(l) = self.live.get_mut(&p) else {
            return;
        };
        l.rdeps = (l.rdeps as i64 + by).clamp(0, u32::MAX as i64) as u32;
        if l.state == BuildState::Runnable {
            if let Some(fx) = fx {
                fx.rekeyed.push(l.entry(p));
            }
        }
    }

    /// `id` is leased to its agent from `handed` on: index the lease and its request.
    fn lease_on(&mut self, id: BuildId, handed: u64) {
        let Some(agent) = self.live.get(&id).map(|l| l.agent_id) else {
            return;
        };
        self.leases.entry(agent).or_default().insert(id, handed);
        self.remember_request(id);
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

    fn request_key(&self, id: BuildId) -> Option<RequestKey> {
        let r = self.request_of.get(&id)?;
        let agent = self.live.get(&id)?.agent_id;
        (agent != 0).then(|| (agent, r.to_string()))
    }

    fn remember_request(&mut self, id: BuildId) {
        if let Some(key) = self.request_key(id) {
            self.requests.entry(key).or_default().insert(id);
        }
    }

    /// `id` no longer answers a retry of the work request that leased it (it finished, was
    /// canceled, or is leased under another request).
    fn forget_request(&mut self, id: BuildId) {
        let Some(key) = self.request_key(id) else {
            return;
        };
        if let Some(set) = self.requests.get_mut(&key) {
            set.remove(&id);
            if set.is_empty() {
                self.requests.remove(&key);
            }
        }
    }

    /// Every runnable build, for the allocator's index (its fill at start and after its
    /// restart).
    pub fn runnable(&self) -> Vec<RunnableEntry> {
        let (ids, _) = self.by_state.page(
            BuildState::Runnable,
            0,
            self.by_state.count(BuildState::Runnable),
        );
        ids.iter()
            .filter(|id| !self.is_deferred(**id))
            .filter_map(|id| self.live.get(id).map(|l| l.entry(*id)))
            .collect()
    }

    /// Live builds per state (gauges).
    pub fn count(&self, s: BuildState) -> usize {
        self.by_state.count(s)
    }

    /// Agents that hold leases (the registry awaits them after a start).
    pub fn lease_holders(&self) -> Vec<AgentId> {
        let mut v: Vec<AgentId> = self.leases.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// A live build's compact entry.
    pub fn live_entry(&self, id: BuildId) -> Option<&LiveBuild> {
        self.live.get(&id)
    }

    /// Live builds.
    pub fn live_len(&self) -> usize {
        self.live.len()
    }

    /// Every live build's current record, from sled and memory (tests and the fault points
    /// compare this with sled; it reads every live record, so only they use it).
    pub fn live_records(&self) -> Result<HashMap<BuildId, BuildRecord>, StoreError> {
        let mut out = HashMap::with_capacity(self.live.len());
        for id in self.live.keys() {
            if let Some(r) = self.full(*id)? {
                out.insert(*id, r);
            }
        }
        Ok(out)
    }

    /// Fault point: change memory without committing (the `CorruptMemoryAndStop` faults).
    #[cfg(feature = "fault-points")]
    pub fn corrupt(&mut self) {
        let ids: Vec<BuildId> = self.live.keys().copied().collect();
        for id in ids {
            if let Some(l) = self.live.get_mut(&id) {
                l.priority = l.priority.wrapping_add(1000);
            }
            self.set_state(id, BuildState::Uploading);
        }
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
        self.submit_deferred(targets, drvs, priority, tags, 0, now)
    }

    /// [`QueueState::submit`], the new builds not offered before `defer_until_ms` (ms since
    /// the epoch; 0 or a past time: at once). A derivation already queued keeps its own.
    pub fn submit_deferred(
        &mut self,
        targets: Vec<Target>,
        drvs: Vec<(String, Vec<u8>)>,
        priority: i32,
        tags: Vec<(String, String)>,
        defer_until_ms: u64,
        now: u64,
    ) -> Result<(Effects, Vec<BuildSummary>), QueueError> {
        let defer_until_ms = if defer_until_ms > now {
            defer_until_ms
        } else {
            0
        };
        let mut fx = Effects::default();
        for (path, contents) in drvs {
            fx.batch.put(
                TreeId::Derivations,
                path.as_bytes(),
                &crate::store::records::DrvRecord { contents },
            )?;
        }
        let tag_set = self.symbols.tag_set(&tags);
        let mut out = Vec::new();
        for t in targets {
            out.push(self.submit_one(&mut fx, t, priority, &tags, tag_set, defer_until_ms, now)?);
        }
        // A build made runnable above may have been raised by a later target: hand the
        // allocator its current numbers.
        for e in &mut fx.runnable {
            if let Some(l) = self.live.get(&e.id) {
                *e = l.entry(e.id);
            }
        }
        fx.batch.put_raw(
            TreeId::Meta,
            crate::store::meta::NEXT_BUILD_ID,
            &self.next_build_id.to_be_bytes(),
        );
        Ok((fx, out))
    }

    /// One target of a submission: the live build of its derivation if it has one, else a
    /// new build (record, event, indexes; runnable or blocked on its missing inputs).
    #[allow(clippy::too_many_arguments)]
    fn submit_one(
        &mut self,
        fx: &mut Effects,
        t: Target,
        priority: i32,
        tags: &[(String, String)],
        tag_set: TagSetId,
        defer_until_ms: u64,
        now: u64,
    ) -> Result<BuildSummary, QueueError> {
        let drv = PathDigest::of(&t.drv_path);
        if let Some(l) = self
            .by_drv
            .get(&drv)
            .and_then(|id| Some((*id, self.live.get(id)?)))
        {
            return Ok(BuildSummary {
                id: l.0,
                drv_path: t.drv_path,
                system: t.system,
                state: l.1.state,
                priority: l.1.priority,
                existing: true,
            });
        }
        let mut missing = Vec::new();
        for n in &t.needs {
            if !self.available(n)? {
                missing.push(PathDigest::of(n));
            }
        }
        let id = self.next_build_id;
        self.next_build_id += 1;
        let priority = apply_priority_rules(&self.rules, priority, &t.system, tags, &t.drv_path);
        let state = if missing.is_empty() {
            BuildState::Runnable
        } else {
            BuildState::Blocked
        };
        let b = BuildRecord {
            id,
            drv_path: t.drv_path,
            system: t.system,
            priority,
            tags: tags.to_vec(),
            state,
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
            retries: 0,
            builder_retries: 0,
            defer_until_ms,
        };
        fx.batch.put(TreeId::Builds, &u64_key(id), &b)?;
        for (_, o) in &b.outputs {
            fx.batch
                .put_raw(TreeId::OutputBuilds, output_key(o).as_bytes(), &u64_key(id));
        }
        fx.batch.event(
            "build-submitted",
            id,
            0,
            serde_json::json!({"build_id": id, "drv_path": b.drv_path, "system": b.system,
                "priority": b.priority, "state": b.state,
                "defer_until_ms": b.defer_until_ms}),
        );
        let rdeps = b
            .outputs
            .iter()
            .map(|(_, o)| self.waiting.get(&PathDigest::of(o)).map_or(0, |s| s.len()))
            .sum::<usize>();
        // Builds submitted earlier may already wait on this one's outputs.
        let out_digests: Vec<PathDigest> =
            b.outputs.iter().map(|(_, o)| PathDigest::of(o)).collect();
        let effective = self
            .waiters_max(&out_digests)
            .map_or(priority, |w| w.max(priority));
        let l = LiveBuild {
            state,
            system: self.symbols.system(&b.system),
            tags: tag_set,
            attempt: 0,
            priority,
            effective,
            rdeps: rdeps.min(u32::MAX as usize) as u32,
            missing: missing.len() as u32,
            retries: 0,
            builder_retries: 0,
            agent_id: 0,
            allocated_ms: 0,
            started_ms: 0,
            defer_until_ms: 0,
        };
        self.by_drv.insert(drv, id);
        for (_, o) in &b.outputs {
            self.producers.insert(PathDigest::of(o), id);
        }
        self.add_live(id, l);
        self.defer(id, defer_until_ms);
        self.offer(id, fx);
        for m in missing {
            self.wait_on(id, m, fx);
        }
        let s = summary(&b);
        self.pending.insert(id, Arc::new(b));
        fx.submitted.push(id);
        self.raise_inputs(id, effective, Some(fx), &|q, b| q.inputs_of(b))?;
        Ok(s)
    }

    /// The live build leased to `agent_id` at `attempt`, or why not.
    fn leased(&self, agent_id: u64, id: BuildId, attempt: u32) -> Result<&LiveBuild, QueueError> {
        let b = match self.live.get(&id) {
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
    /// and that nobody took since is re-adopted (see `readopt_reported`). The holder of a
    /// build canceled at this attempt passes too: it delivers the log of what it stopped, then
    /// its `canceled` result (see `cancel.rs`); no state changes.
    pub fn check_lease(
        &mut self,
        agent_id: u64,
        id: BuildId,
        attempt: u32,
        now: u64,
    ) -> Result<Effects, QueueError> {
        let mut fx = Effects::default();
        if self.canceled_holder(agent_id, id, attempt)? {
            return Ok(fx);
        }
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
        let first_start = to == BuildState::Building || b.started_ms == 0;
        // An upload that comes before any start report is the start too (an agent may fold
        // its start into its first upload: one request and one commit fewer per build).
        let starts = to == BuildState::Building || b.state == BuildState::Allocated;
        self.set_state(id, to);
        if first_start {
            if let Some(l) = self.live.get_mut(&id) {
                l.started_ms = now;
            }
        }
        let r = self.put_live(&mut fx, id)?;
        if starts {
            fx.batch.event(
                "build-started",
                id,
                agent_id,
                serde_json::json!({"build_id": id, "attempt": attempt, "agent_id": agent_id,
                    "drv_path": r.drv_path}),
            );
        }
        Ok(fx)
    }

    /// [`QueueState::retire`], telling the allocator of producers whose waiting count fell.
    fn retire_with(&mut self, rec: &BuildRecord, fx: &mut Effects) {
        for need in &rec.needs {
            self.unwait(rec.id, PathDigest::of(need), Some(fx));
        }
        self.retire(rec);
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
