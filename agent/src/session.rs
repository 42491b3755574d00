//! The session loop: open a session, then heartbeat, ask for work when a build slot is free,
//! run each build as its own task, obey the coordinator's commands, and shut down on
//! SIGTERM/SIGINT.
//!
//! Ownership: the [`Agent`] is shared by every task. `stops` holds, per build the agent holds,
//! the sender that stops it (cancel, abandon, shutdown); a build is registered there (and in
//! the held list every heartbeat reports) as soon as its assignment arrives, and the build's
//! task removes its entry when it lets go of the build.
//!
//! Leases: every work request carries a fresh id, reused on each retry of that request, so a
//! reply lost on the wire is answered again with the same builds. Heartbeats list every build
//! held, built anew for each try (a stale list would end leases the agent holds). A refused
//! result is dropped only when the coordinator has put the build in a defined state (see
//! [`after_refusal`]). Allocation permits (`--max-allocated-builds`) are held from assignment
//! until the outputs are spooled, build slots (a semaphore) while the build runs; upload slots
//! ([`UploadSlots`]) while the results are sent, highest build priority first. New work is
//! asked for only while no limit holds ([`crate::limits`]: load, free disk, and finished builds
//! waiting for an upload slot, so post-build work takes precedence when it backs up).
//!
//! Shutdown: the agent stops asking for work, stops running builders (their dirs are removed:
//! the coordinator re-runs them) and abandons uploads in flight — their `report.json` stays in
//! the state dir and is sent when the agent starts again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln::protocol::{
    AgentCommand, Assignment, BuildId, FailureKind, Heartbeat, HeartbeatReply, HeldPhase, Outcome,
    StartReport, WorkReply, WorkRequest, SESSION_HEADER,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::client::{decode, new_request_id, send, Coordinator, Held};
use crate::deliver::{self, Delivered};
use crate::executor::cache::InputCache;
use crate::executor::inputs::{self, InputLocks};
use crate::executor::{BuildResult, NativeExecutor, StopReason};
use crate::limits::{HoldBack, WorkLimits};
use crate::metrics;
use crate::retry::CallError;
use crate::state::{BuildDir, PendingBuild, StateDir, StoredReport};
use crate::uploads::UploadSlots;

type StopSender = watch::Sender<Option<StopReason>>;

/// How the agent schedules its own work, from its flags (docs/agent.md).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Builds running at once (`--max-parallel-builds`).
    pub max_builds: u32,
    /// Builds held before they are built, running or waiting for a build slot
    /// (`--max-allocated-builds`; at least `max_builds`).
    pub max_allocated: u32,
    /// Results being sent at once (`--max-parallel-uploads`).
    pub max_uploads: u32,
    /// Long poll: how long each work request may wait at the coordinator for a build
    /// (`--work-wait-ms`; zero = answer at once).
    pub work_wait: Duration,
    /// Load, free disk and upload backlog limits, checked before every work request.
    pub limits: WorkLimits,
    /// The input cache's cap in bytes (`--input-cache-mb`).
    pub input_cache: u64,
}

pub struct Agent {
    pub coordinator: Coordinator,
    pub executor: NativeExecutor,
    pub state: StateDir,
    pub held: Held,
    inputs: InputLocks,
    cache: Arc<InputCache>,
    build_slots: Arc<Semaphore>,
    /// One permit per build held from its assignment until it is built (`max_allocated`).
    alloc_slots: Arc<Semaphore>,
    upload_slots: Arc<UploadSlots>,
    /// Build id -> (attempt, stop sender) for every build the agent holds.
    stops: Mutex<HashMap<BuildId, (u32, StopSender)>>,
    draining: AtomicBool,
    /// Set by `pause`, cleared by `resume`: no new work meanwhile.
    paused: AtomicBool,
    heartbeat_ms: AtomicU64,
    settings: Settings,
    /// Set to true once to shut everything down.
    shutdown: watch::Sender<bool>,
    /// Why the agent must exit with an error (a refused session), if it must.
    fatal: Mutex<Option<String>>,
}

impl Agent {
    pub fn new(
        coordinator: Coordinator,
        executor: NativeExecutor,
        state: StateDir,
        held: Held,
        settings: Settings,
    ) -> Arc<Agent> {
        Arc::new(Agent {
            coordinator,
            executor,
            state,
            held,
            inputs: InputLocks::default(),
            cache: InputCache::new(settings.input_cache),
            build_slots: Arc::new(Semaphore::new(settings.max_builds as usize)),
            alloc_slots: Arc::new(Semaphore::new(
                settings.max_allocated.max(settings.max_builds) as usize,
            )),
            upload_slots: UploadSlots::new(settings.max_uploads as usize),
            stops: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(5_000),
            settings,
            shutdown: watch::channel(false).0,
            fatal: Mutex::new(None),
        })
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn until_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn fail(&self, why: String) {
        tracing::error!(reason = %why, "stopping the agent");
        *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.shutdown.send_replace(true);
    }

    fn register(
        &self,
        id: BuildId,
        attempt: u32,
        phase: HeldPhase,
    ) -> watch::Receiver<Option<StopReason>> {
        let (tx, rx) = watch::channel(None);
        let old = self
            .stops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (attempt, tx));
        if let Some((old_attempt, old_tx)) = old.filter(|(a, _)| *a != attempt) {
            // The coordinator leased the build again: the older attempt is stale, and its
            // builder must not outlive it (nor be mistaken for the new one's).
            tracing::info!(
                build_id = id,
                old_attempt,
                attempt,
                "newer attempt assigned; abandoning the older one"
            );
            old_tx.send_replace(Some(StopReason::Abandon));
        }
        self.held.set(id, attempt, phase);
        rx
    }

    /// Registers an assignment unless this very build and attempt is already held (then
    /// `None`: a second assignment of it must not start a second builder).
    fn register_new(
        &self,
        id: BuildId,
        attempt: u32,
    ) -> Option<watch::Receiver<Option<StopReason>>> {
        let held = self
            .stops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|(a, _)| *a == attempt);
        (!held).then(|| self.register(id, attempt, HeldPhase::Building))
    }

    /// Lets go of `id` at `attempt`; an entry of another attempt (a newer assignment of the
    /// same build) stays.
    fn unregister(&self, id: BuildId, attempt: u32) {
        let mut stops = self.stops.lock().unwrap_or_else(|p| p.into_inner());
        if stops.get(&id).is_some_and(|(a, _)| *a == attempt) {
            stops.remove(&id);
            self.held.remove(id);
        }
    }

    fn stop_build(&self, id: BuildId, attempt: u32, reason: StopReason) {
        let stops = self.stops.lock().unwrap_or_else(|p| p.into_inner());
        match stops.get(&id) {
            Some((a, tx)) if *a == attempt => {
                tracing::info!(build_id = id, attempt, reason = ?reason, "stopping build");
                tx.send_replace(Some(reason));
            }
            _ => tracing::info!(
                build_id = id,
                attempt,
                "command for a build this agent does not hold"
            ),
        }
    }

    fn handle(&self, c: AgentCommand) {
        match c {
            AgentCommand::Cancel { build_id, attempt } => {
                self.stop_build(build_id, attempt, StopReason::Cancel)
            }
            AgentCommand::Abandon { build_id, attempt } => {
                self.stop_build(build_id, attempt, StopReason::Abandon)
            }
            AgentCommand::Drain => {
                tracing::info!("draining: finishing held builds, asking for no more");
                self.draining.store(true, Ordering::SeqCst);
            }
            AgentCommand::Pause => {
                if !self.paused.swap(true, Ordering::SeqCst) {
                    tracing::info!("paused by the coordinator: finishing held builds, asking for no more until resumed");
                }
            }
            AgentCommand::Resume => {
                if self.paused.swap(false, Ordering::SeqCst) {
                    tracing::info!("resumed by the coordinator: asking for work again");
                }
            }
            AgentCommand::SetHeartbeat { interval_ms } => self
                .heartbeat_ms
                .store(interval_ms.max(100), Ordering::SeqCst),
        }
    }
}

/// Fatal refusals of a session: wrong name or secret (or a rotated one), a protocol the
/// coordinator does not speak, or systems or tags the agent's registration does not allow.
fn fatal_reason(e: &CallError) -> Option<String> {
    const FATAL: [&str; 4] = [
        "unauthorized",
        "unsupported_protocol",
        "system_not_allowed",
        "tag_not_allowed",
    ];
    match e {
        CallError::Rejected(api) if FATAL.contains(&api.code.as_str()) => {
            Some(format!("the coordinator refused this agent ({}): {}; check --name, --secret-file, --system and the agent version", api.code, api.message))
        }
        _ => None,
    }
}

/// Runs the agent until a signal or a fatal refusal; `pending` are builds recovered from the
/// state dir whose results still have to be sent.
pub async fn run(
    agent: Arc<Agent>,
    mut commands: mpsc::UnboundedReceiver<AgentCommand>,
    pending: Vec<PendingBuild>,
) -> anyhow::Result<()> {
    let mut receivers = Vec::new();
    for p in pending {
        let rx = agent.register(p.report.build_id, p.report.attempt, HeldPhase::Uploading);
        receivers.push((p, rx));
    }
    if let Err(e) = agent.coordinator.open_session().await {
        anyhow::bail!(fatal_reason(&e).unwrap_or_else(|| format!("failed to open a session: {e}")));
    }
    let mut tasks = JoinSet::new();
    for (p, rx) in receivers {
        tracing::info!(
            build_id = p.report.build_id,
            attempt = p.report.attempt,
            "resending a recovered result"
        );
        let priority = p.assignment.priority;
        tasks.spawn(deliver_and_finish(
            agent.clone(),
            p.dir,
            p.report,
            priority,
            rx,
        ));
    }
    let heartbeat = tokio::spawn(heartbeat_loop(agent.clone()));
    let work = tokio::spawn(work_loop(agent.clone()));
    let signals = tokio::spawn(wait_for_signal(agent.clone()));
    loop {
        tokio::select! {
            Some(c) = commands.recv() => agent.handle(c),
            () = agent.until_shutdown() => break,
        }
    }
    for (_, (_, tx)) in agent.stops.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        tx.send_replace(Some(StopReason::Shutdown));
    }
    let _ = work.await;
    heartbeat.abort();
    signals.abort();
    // Builders get their SIGTERM/SIGKILL; uploads in flight stay on disk for the next start.
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    if let Some(why) = agent.fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
        anyhow::bail!(why);
    }
    tracing::info!("agent stopped");
    Ok(())
}

async fn wait_for_signal(agent: Arc<Agent>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("failed to install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
    agent.shutdown.send_replace(true);
}

async fn heartbeat_loop(agent: Arc<Agent>) {
    let url = agent.coordinator.agent_url("heartbeat");
    loop {
        let wait = Duration::from_millis(agent.heartbeat_ms.load(Ordering::SeqCst));
        tokio::time::sleep(wait).await;
        // The held list is read again for every try: a list older than a work reply that
        // arrived meanwhile would tell the coordinator a lease is not held.
        let reply = agent
            .coordinator
            .call("heartbeat", |token| {
                let body = Heartbeat {
                    builds: agent.held.list(),
                };
                let rb = agent
                    .coordinator
                    .http()
                    .post(&url)
                    .header(SESSION_HEADER, token)
                    .json(&body)
                    .timeout(Duration::from_secs(30));
                async move { decode::<HeartbeatReply>(send(rb).await?) }
            })
            .await;
        match reply {
            Ok(reply) => reply.commands.into_iter().for_each(|c| agent.handle(c)),
            Err(e) => match fatal_reason(&e) {
                Some(why) => return agent.fail(why),
                None => tracing::warn!(error = %e, "heartbeat refused"),
            },
        }
    }
}

/// About one second, jittered, between empty work requests.
fn idle_wait() -> Duration {
    Duration::from_millis(750 + rand::random::<u64>() % 500)
}

/// The pause after a work request that took `took` and brought no build: whatever is left of
/// `idle` (about a second). A coordinator that long-polls held the request for up to its wait,
/// so the next request goes out at once; one that answers at once (an older coordinator, or
/// `--work-wait-ms 0`) is asked about once a second.
fn pause_after_empty(took: Duration, idle: Duration) -> Duration {
    idle.saturating_sub(took)
}

/// The whole-request timeout of a work request that may wait `wait` at the coordinator.
fn work_timeout(wait: Duration) -> Duration {
    wait + Duration::from_secs(30)
}

/// Waits while a limit holds work back (logged when it starts and when it ends); false when
/// the agent shuts down or drains meanwhile.
async fn until_limits_allow(agent: &Agent) -> bool {
    let mut holding: Option<HoldBack> = None;
    loop {
        if agent.shutting_down() || agent.draining.load(Ordering::SeqCst) {
            return false;
        }
        let paused = agent.paused.load(Ordering::SeqCst);
        metrics::held_back("paused").set(u64::from(paused));
        let check = if paused {
            Some(HoldBack::Paused)
        } else {
            agent.settings.limits.check(agent.upload_slots.waiting())
        };
        match (&check, &holding) {
            (None, None) => return true,
            (None, Some(was)) => {
                tracing::info!(
                    reason = was.reason(),
                    "limit no longer holds work back; asking for work"
                );
                return true;
            }
            (Some(now), was) => {
                if was.as_ref().map(HoldBack::reason) != Some(now.reason()) {
                    tracing::info!(reason = now.reason(), why = %now, "asking for no work while a limit holds");
                }
            }
        }
        holding = check;
        tokio::select! {
            () = tokio::time::sleep(idle_wait()) => {}
            () = agent.until_shutdown() => return false,
        }
    }
}

async fn work_loop(agent: Arc<Agent>) {
    while !agent.shutting_down() && !agent.draining.load(Ordering::SeqCst) {
        // Allocation permits, not build slots: with `--max-allocated-builds` above
        // `--max-parallel-builds`, builds are taken ahead and wait for a slot.
        let first = tokio::select! {
            p = agent.alloc_slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            () = agent.until_shutdown() => return,
        };
        if !until_limits_allow(&agent).await {
            return;
        }
        let mut permits = vec![first];
        while let Ok(p) = agent.alloc_slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        if agent.draining.load(Ordering::SeqCst) {
            return;
        }
        // One id per logical request; `post` sends this same body on every retry.
        let wait = agent.settings.work_wait;
        let req = WorkRequest {
            max_builds: permits.len() as u32,
            request_id: Some(new_request_id()),
            wait_ms: wait.as_millis() as u64,
        };
        let asked = tokio::time::Instant::now();
        let reply = tokio::select! {
            r = agent.coordinator.post_within::<_, WorkReply>("request work", "work", &req, work_timeout(wait)) => r,
            () = agent.until_shutdown() => return,
        };
        match reply {
            Ok(reply) => {
                reply.commands.into_iter().for_each(|c| agent.handle(c));
                let idle = reply.builds.is_empty();
                for a in reply.builds {
                    // Held from now on, so every heartbeat lists it, even while it waits for
                    // a build slot.
                    let Some(stop) = agent.register_new(a.build_id, a.attempt) else {
                        tracing::info!(
                            build_id = a.build_id,
                            attempt = a.attempt,
                            "build assigned again; it already runs here"
                        );
                        continue;
                    };
                    tracing::info!(build_id = a.build_id, attempt = a.attempt, drv = %a.drv_path, "build assigned");
                    tokio::spawn(run_build(agent.clone(), a, permits.pop(), stop));
                }
                drop(permits);
                let pause = pause_after_empty(asked.elapsed(), idle_wait());
                if idle && !pause.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = agent.until_shutdown() => return,
                    }
                }
            }
            Err(e) => {
                if let Some(why) = fatal_reason(&e) {
                    return agent.fail(why);
                }
                tracing::warn!(error = %e, "work request refused");
                // A short backoff whatever the request took: errors are not long polls.
                tokio::select! {
                    () = tokio::time::sleep(idle_wait()) => {}
                    () = agent.until_shutdown() => return,
                }
            }
        }
    }
}

/// The life of one assigned build on this agent (registered by the caller; `stop` is its
/// stop signal).
async fn run_build(
    agent: Arc<Agent>,
    a: Assignment,
    allocation: Option<OwnedSemaphorePermit>,
    stop: watch::Receiver<Option<StopReason>>,
) {
    metrics::ALLOCATED_BUILDS.inc();
    run_allocated(agent, a, allocation, stop).await;
}

/// [`run_build`] once the build counts in `kiln_agent_allocated_builds`; the allocation
/// (permit and gauge) ends when the build is built, before its upload.
async fn run_allocated(
    agent: Arc<Agent>,
    a: Assignment,
    allocation: Option<OwnedSemaphorePermit>,
    mut stop: watch::Receiver<Option<StopReason>>,
) {
    let (id, attempt) = (a.build_id, a.attempt);
    // Its inputs stay in the cache while the build is held (waiting or running).
    let pins = agent.cache.pin(a.inputs.iter().filter_map(|i| {
        let local = agent.executor.local_path(&i.path).ok()?;
        Some((local, i.nar_size))
    }));
    let release = move || {
        drop(pins);
        drop(allocation);
        metrics::ALLOCATED_BUILDS.dec();
    };
    // Every build waits for a build slot (also those beyond what was asked for).
    let permit = tokio::select! {
        p = agent.build_slots.clone().acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => {
                release();
                return agent.unregister(id, attempt);
            }
        },
        r = stop.wait_for(Option::is_some) => {
            let reason = r.ok().and_then(|s| *s);
            tracing::info!(build_id = id, attempt, reason = ?reason, "dropping build before it started");
            release();
            return agent.unregister(id, attempt);
        }
    };
    let dir = agent.state.build_dir(id, attempt);
    metrics::RUNNING_BUILDS.inc();
    let result = build(&agent, &a, &dir, &mut stop).await;
    metrics::RUNNING_BUILDS.dec();
    drop(permit);
    release();
    let outcome = match result {
        Ok(BuildResult::Built(outputs)) => Outcome::Succeeded { outputs },
        Ok(BuildResult::Failed(reason)) => Outcome::Failed {
            reason,
            kind: FailureKind::Builder,
            missing_inputs: Vec::new(),
        },
        Ok(BuildResult::SetupFailed { reason, missing }) => Outcome::Failed {
            reason,
            kind: FailureKind::Setup,
            missing_inputs: missing,
        },
        Ok(BuildResult::Stopped(StopReason::Cancel)) => Outcome::Failed {
            reason: "canceled".into(),
            kind: FailureKind::Builder,
            missing_inputs: Vec::new(),
        },
        Ok(BuildResult::Stopped(reason)) => {
            if reason == StopReason::Abandon {
                metrics::BUILDS_ABANDONED.inc();
            }
            tracing::info!(build_id = id, attempt, reason = ?reason, "dropping build");
            dir.remove().await;
            return agent.unregister(id, attempt);
        }
        Err(e) => Outcome::Failed {
            reason: format!("agent error: {e:#}"),
            kind: FailureKind::Setup,
            missing_inputs: Vec::new(),
        },
    };
    let report = StoredReport::new(id, attempt, outcome, dir.log().exists());
    if let Err(e) = dir.write_report(&report).await {
        tracing::error!(
            build_id = id,
            error = format!("{e:#}"),
            "failed to store the report, dropping the build"
        );
        dir.remove().await;
        return agent.unregister(id, attempt);
    }
    deliver_and_finish(agent, dir, report, a.priority, stop).await;
}

/// Prepares and runs the build; `Stopped(Abandon)` also when the coordinator refuses the start.
async fn build(
    agent: &Agent,
    a: &Assignment,
    dir: &BuildDir,
    stop: &mut watch::Receiver<Option<StopReason>>,
) -> anyhow::Result<BuildResult> {
    dir.create().await?;
    dir.write_assignment(a).await?;
    let start = StartReport { attempt: a.attempt };
    let path = format!("builds/{}/start", a.build_id);
    if let Err(e) = agent
        .coordinator
        .post::<_, serde::de::IgnoredAny>("report start", &path, &start)
        .await
    {
        tracing::warn!(build_id = a.build_id, error = %e, "coordinator refused the start");
        return Ok(BuildResult::Stopped(StopReason::Abandon));
    }
    let fetched = tokio::select! {
        r = inputs::fetch_all(&agent.coordinator, &agent.inputs, &agent.cache, &a.inputs, |p| agent.executor.local_path(p)) => r,
        r = stop.wait_for(Option::is_some) => {
            let reason = r.ok().and_then(|s| *s).unwrap_or(StopReason::Shutdown);
            return Ok(BuildResult::Stopped(reason));
        }
    };
    if let Err(e) = fetched {
        return Ok(BuildResult::SetupFailed {
            reason: e.reason,
            missing: e.missing,
        });
    }
    agent.executor.run(a, dir, stop).await
}

/// What the agent does after the coordinator refused a delivery with a 4xx.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterRefusal {
    /// The coordinator put the build in a defined state (failed, or back in the queue), or
    /// the build is not its to hold: drop it.
    Drop,
    /// The coordinator changed nothing: report the build failed with this reason instead, so
    /// it is not left leased to an agent that drops it.
    ReportFailure(String),
}

/// The agent's side of each class of refusal of a result (docs/agent.md, docs/protocol.md):
/// - `bad_result`: the coordinator failed the build with the refusal as reason;
/// - `output_not_uploaded`: it released the lease, the build is runnable again;
/// - `no_such_build`: there is nothing to hold;
/// - anything else (e.g. `bad_request`, `too_large`): nothing changed on the coordinator, so
///   a success is reported once more as a failure naming the refusal. If that is refused too,
///   the build is dropped and the coordinator ends the lease when heartbeats stop listing it.
fn after_refusal(code: &str, message: &str, outcome: &Outcome) -> AfterRefusal {
    match (code, outcome) {
        ("bad_result" | "output_not_uploaded" | "no_such_build" | "stale_attempt", _) => {
            AfterRefusal::Drop
        }
        (_, Outcome::Succeeded { .. }) => AfterRefusal::ReportFailure(format!(
            "the coordinator refused the result ({code}): {message}"
        )),
        (_, Outcome::Failed { .. }) => AfterRefusal::Drop,
    }
}

/// Sends the result (uploads first) once an upload slot is free for it (higher `priority`
/// first), then lets go of the build.
async fn deliver_and_finish(
    agent: Arc<Agent>,
    dir: BuildDir,
    mut report: StoredReport,
    priority: i32,
    mut stop: watch::Receiver<Option<StopReason>>,
) {
    let (id, attempt) = (report.build_id, report.attempt);
    agent.held.set(id, attempt, HeldPhase::Uploading);
    loop {
        let result = tokio::select! {
            r = async {
                let _slot = agent.upload_slots.acquire(priority).await;
                deliver::deliver(&agent.coordinator, &dir, report.clone()).await
            } => r,
            abandoned = async {
                let r = stop.wait_for(|s| matches!(s, Some(StopReason::Abandon | StopReason::Shutdown))).await;
                matches!(r.ok().and_then(|s| *s), Some(StopReason::Abandon))
            } => {
                if abandoned {
                    metrics::BUILDS_ABANDONED.inc();
                    tracing::info!(build_id = id, attempt, "build abandoned, dropping its reports");
                    dir.remove().await;
                }
                return agent.unregister(id, attempt);
            }
        };
        match result {
            Ok(Delivered::Acknowledged { duplicate }) => {
                let counter = match &report.outcome {
                    Outcome::Succeeded { .. } => &metrics::BUILDS_SUCCEEDED,
                    Outcome::Failed { reason, .. } if reason == "canceled" => {
                        &metrics::BUILDS_CANCELED
                    }
                    Outcome::Failed { .. } => &metrics::BUILDS_FAILED,
                };
                counter.inc();
                tracing::info!(build_id = id, attempt, duplicate, "result acknowledged");
            }
            Ok(Delivered::Stale) => {
                metrics::BUILDS_ABANDONED.inc();
                tracing::info!(
                    build_id = id,
                    attempt,
                    "attempt is stale, dropping the build"
                );
            }
            Err(e) => {
                if let Some(why) = fatal_reason(&e) {
                    agent.fail(why);
                    return agent.unregister(id, attempt);
                }
                let (code, message) = match &e {
                    CallError::Rejected(api) => (api.code.clone(), api.message.clone()),
                    other => (String::new(), other.to_string()),
                };
                match after_refusal(&code, &message, &report.outcome) {
                    AfterRefusal::ReportFailure(reason) => {
                        tracing::warn!(build_id = id, attempt, code = %code, "coordinator refused the result; reporting the build failed instead");
                        report.outcome = Outcome::Failed {
                            reason,
                            kind: FailureKind::Builder,
                            missing_inputs: Vec::new(),
                        };
                        match dir.write_report(&report).await {
                            Ok(()) => continue,
                            Err(e) => tracing::error!(
                                build_id = id,
                                error = format!("{e:#}"),
                                "failed to store the report, dropping the build"
                            ),
                        }
                    }
                    AfterRefusal::Drop => {
                        tracing::error!(build_id = id, attempt, code = %code, error = %e, "coordinator refused the result, dropping the build")
                    }
                }
            }
        }
        break;
    }
    dir.remove().await;
    agent.unregister(id, attempt);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn success() -> Outcome {
        Outcome::Succeeded { outputs: vec![] }
    }

    fn failure() -> Outcome {
        Outcome::Failed {
            reason: "builder exited with status 1".into(),
            kind: FailureKind::Builder,
            missing_inputs: Vec::new(),
        }
    }

    /// Pins the agent's side of each refusal class: it drops a build only where the
    /// coordinator settled it, and turns any other refused success into a failure report.
    /// Pins down push-not-poll: an empty long poll (it took the coordinator's wait) is
    /// followed at once by the next request; an empty answer that came at once (a coordinator
    /// without long poll) still waits out the idle second.
    #[test]
    fn an_empty_long_poll_is_followed_at_once() {
        let idle = Duration::from_millis(1_000);
        assert_eq!(
            pause_after_empty(Duration::from_secs(20), idle),
            Duration::ZERO
        );
        assert_eq!(pause_after_empty(idle, idle), Duration::ZERO);
        assert_eq!(
            pause_after_empty(Duration::from_millis(3), idle),
            Duration::from_millis(997)
        );
        assert_eq!(pause_after_empty(Duration::ZERO, idle), idle);
        // The HTTP timeout of a work request always exceeds its wait.
        for ms in [
            0,
            1,
            20_000,
            crate::client::MAX_WORK_WAIT.as_millis() as u64,
        ] {
            let wait = Duration::from_millis(ms);
            assert!(work_timeout(wait) > wait, "{ms}");
        }
    }

    #[test]
    fn each_refusal_class_has_its_reaction() {
        for code in [
            "bad_result",
            "output_not_uploaded",
            "no_such_build",
            "stale_attempt",
        ] {
            assert_eq!(
                after_refusal(code, "m", &success()),
                AfterRefusal::Drop,
                "{code}"
            );
            assert_eq!(
                after_refusal(code, "m", &failure()),
                AfterRefusal::Drop,
                "{code}"
            );
        }
        for code in ["bad_request", "too_large", ""] {
            match after_refusal(code, "why", &success()) {
                AfterRefusal::ReportFailure(r) => {
                    assert!(r.contains(code) && r.contains("why"), "{r}")
                }
                other => panic!("{code}: {other:?}"),
            }
            // A refused failure report is not turned into anything else.
            assert_eq!(after_refusal(code, "why", &failure()), AfterRefusal::Drop);
        }
    }
}
