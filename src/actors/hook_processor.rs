//! `HookProcessor`: runs the configured hooks on events, durably. Each (hook, event) pair is a
//! hook-work record in sled, written by the committer in the same transaction as the event, so
//! no event is lost to a crash; a run that exits 0 deletes it (through the committer). Hooks
//! run as child processes on this actor's arbiter, never on the build queue's, up to each
//! hook's `parallelism` at once; events of one build run in order. A failed run is retried with
//! exponential backoff; after `max_attempts` the work moves to the dead-letter tree.
//!
//! Supervision: every handler, timer and continuation runs under the panic guard. A restart
//! waits for the committer to land what the old actor handed over, then builds a fresh
//! `HookProcessor` whose `started` reloads `hook_work` from sled; runs in flight are dropped
//! (their child is killed on drop) and run again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::event_log::event_json;
use super::guard::{catch, guard_map, guard_task, Rebuild};
use super::restarts::Restarts;
use super::ActorError;
use crate::config::HookConfig;
use crate::store::keys::{hook_work_key, u64_key};
use crate::store::records::{EventRecord, HookWorkRecord};
use crate::store::{Batch, Committer, Store, TreeId};

const NAME: &str = "hook processor";

/// Most bytes of a hook's output kept for the error message.
const OUTPUT_CAP: usize = 4096;

struct Pending {
    build_id: u64,
    attempts: u32,
    not_before: Instant,
}

struct HookQueue {
    config: HookConfig,
    pending: BTreeMap<u64, Pending>,
    running: usize,
    running_builds: HashSet<u64>,
}

pub struct HookProcessor {
    store: Store,
    committer: Committer,
    /// The hook settings this actor was built from (kept for its rebuild).
    hooks: Vec<HookConfig>,
    queues: HashMap<String, HookQueue>,
    restarts: Arc<Restarts>,
}

impl HookProcessor {
    pub fn new(
        store: Store,
        committer: Committer,
        hooks: Vec<HookConfig>,
        restarts: Arc<Restarts>,
    ) -> HookProcessor {
        let queues = hooks
            .iter()
            .cloned()
            .map(|h| {
                (
                    h.name.clone(),
                    HookQueue {
                        config: h,
                        pending: BTreeMap::new(),
                        running: 0,
                        running_builds: HashSet::new(),
                    },
                )
            })
            .collect();
        HookProcessor {
            store,
            committer,
            hooks,
            queues,
            restarts,
        }
    }

    /// Add every pending hook run in sled that memory does not hold yet (all of them on a
    /// fresh actor). Runs already known keep their state (running, backoff).
    fn load(&mut self) {
        for r in self.store.hook_work() {
            let (hook, seq, w) = match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a hook work record; skipped");
                    continue;
                }
            };
            let Some(q) = self.queues.get_mut(&hook) else {
                tracing::warn!(
                    hook,
                    seq,
                    "pending work for a hook that is no longer configured; left in place"
                );
                continue;
            };
            if q.pending.contains_key(&seq) {
                continue;
            }
            let build_id = self
                .store
                .get::<EventRecord>(TreeId::Events, &u64_key(seq))
                .ok()
                .flatten()
                .map_or(0, |e| e.build_id);
            q.pending.insert(
                seq,
                Pending {
                    build_id,
                    attempts: w.attempts,
                    not_before: Instant::now(),
                },
            );
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        for (name, q) in &self.queues {
            metrics::gauge!("kiln_hook_pending", "hook" => name.clone())
                .set(q.pending.len() as f64);
        }
    }

    /// Start every run the limits allow.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let mut starts = Vec::new();
        let mut next_wake: Option<Instant> = None;
        for (name, q) in self.queues.iter_mut() {
            let mut blocked_builds: HashSet<u64> = q.running_builds.clone();
            for (seq, p) in q.pending.iter() {
                if q.running >= q.config.parallelism {
                    break;
                }
                // Events of one build run in order: nothing of a build whose earlier event is
                // running or waiting.
                if p.build_id != 0 && blocked_builds.contains(&p.build_id) {
                    continue;
                }
                if p.not_before > now {
                    next_wake = Some(next_wake.map_or(p.not_before, |w| w.min(p.not_before)));
                    if p.build_id != 0 {
                        blocked_builds.insert(p.build_id);
                    }
                    continue;
                }
                if p.build_id != 0 {
                    blocked_builds.insert(p.build_id);
                    q.running_builds.insert(p.build_id);
                }
                q.running += 1;
                starts.push((name.clone(), *seq, p.attempts));
            }
            for (_, seq, _) in starts.iter().filter(|s| &s.0 == name) {
                if let Some(p) = q.pending.get_mut(seq) {
                    // Running: not eligible again until it finishes.
                    p.not_before = now + Duration::from_secs(365 * 24 * 3600);
                }
            }
        }
        for (hook, seq, attempts) in starts {
            self.start_run(hook, seq, attempts, ctx);
        }
        if let Some(w) = next_wake {
            ctx.run_later(w.saturating_duration_since(now), |act, ctx| {
                catch(NAME, ctx, |ctx| act.dispatch(ctx));
            });
        }
    }

    fn start_run(&mut self, hook: String, seq: u64, attempts: u32, ctx: &mut Context<Self>) {
        let Some(q) = self.queues.get(&hook) else {
            return;
        };
        let config = q.config.clone();
        let event = self
            .store
            .get::<EventRecord>(TreeId::Events, &u64_key(seq))
            .ok()
            .flatten();
        let fut = async move {
            let Some(event) = event else {
                return Err("its event is no longer in the event log".to_string());
            };
            run_hook(&config, &event).await
        };
        ctx.spawn(guard_task::<Self, _, _>(NAME, fut).map(guard_map(
            NAME,
            || (),
            move |res: Option<Result<(), String>>, act: &mut Self, ctx: &mut Context<Self>| {
                if let Some(res) = res {
                    act.finished(hook, seq, attempts, res, ctx);
                }
            },
        )));
    }

    fn finished(
        &mut self,
        hook: String,
        seq: u64,
        attempts: u32,
        res: Result<(), String>,
        ctx: &mut Context<Self>,
    ) {
        let Some(q) = self.queues.get_mut(&hook) else {
            return;
        };
        q.running = q.running.saturating_sub(1);
        let Some(p) = q.pending.get(&seq) else { return };
        let build_id = p.build_id;
        let attempts = attempts + 1;
        let key = hook_work_key(&hook, seq);
        let mut batch = Batch::new();
        let outcome = match &res {
            Ok(()) => {
                batch.delete(TreeId::HookWork, &key);
                "ok"
            }
            Err(e) if attempts >= q.config.max_attempts => {
                tracing::error!(hook, seq, attempts, error = %e, "hook failed for the last time; moved to the dead-letter list");
                batch.delete(TreeId::HookWork, &key);
                let rec = HookWorkRecord {
                    attempts,
                    next_attempt_ms: 0,
                    last_error: e.clone(),
                };
                if let Err(e) = batch.put(TreeId::HookDead, &key, &rec) {
                    tracing::error!(error = %e, "cannot encode a dead letter");
                }
                "dead"
            }
            Err(e) => {
                let delay = backoff_delay(attempts);
                tracing::warn!(hook, seq, attempts, retry_in_ms = delay.as_millis() as u64, error = %e, "hook failed; will retry");
                let rec = HookWorkRecord {
                    attempts,
                    next_attempt_ms: crate::store::now_ms() + delay.as_millis() as u64,
                    last_error: e.clone(),
                };
                if let Err(e) = batch.put(TreeId::HookWork, &key, &rec) {
                    tracing::error!(error = %e, "cannot encode hook work");
                }
                "failed"
            }
        };
        metrics::counter!("kiln_hook_runs_total", "hook" => hook.clone(), "result" => outcome)
            .increment(1);
        let committer = self.committer.clone();
        ctx.spawn(
            guard_task::<Self, _, _>(NAME, async move { committer.commit(batch).await }).map(
                guard_map(NAME, || (), move |committed, act: &mut Self, ctx: &mut Context<Self>| {
                    // `None`: the commit's future panicked and the actor is stopping.
                    let Some(committed) = committed else { return };
                    let Some(q) = act.queues.get_mut(&hook) else { return };
                    q.running_builds.remove(&build_id);
                    match committed {
                        Ok(_) if outcome == "failed" => {
                            if let Some(p) = q.pending.get_mut(&seq) {
                                p.attempts = attempts;
                                p.not_before = Instant::now() + backoff_delay(attempts);
                            }
                        }
                        Ok(_) => {
                            q.pending.remove(&seq);
                        }
                        Err(e) => {
                            // Still in sled as it was: run it again later.
                            tracing::error!(error = %e, hook, seq, "cannot record a hook run; will run it again");
                            if let Some(p) = q.pending.get_mut(&seq) {
                                p.not_before = Instant::now() + backoff_delay(attempts);
                            }
                        }
                    }
                    act.update_gauges();
                    act.dispatch(ctx);
                }),
            ),
        );
    }
}

/// The wait before the next run of a hook that failed `attempts` times: Kiln's one retry
/// policy ([`crate::retry::Policy::HOOKS`]: full jitter up to min(60 s, 1 s · 2^(attempts−1))).
fn backoff_delay(attempts: u32) -> Duration {
    crate::retry::Policy::HOOKS.delay(attempts)
}

/// Run one hook on one event: the event JSON on stdin, a few variables in the environment,
/// in its own process group, killed at its timeout.
async fn run_hook(config: &HookConfig, event: &EventRecord) -> Result<(), String> {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&config.exec[0]);
    cmd.args(&config.exec[1..])
        .env("KILN_EVENT", &event.kind)
        .env("KILN_EVENT_ID", event.seq.to_string())
        .env("KILN_HOOK", &config.name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if event.build_id != 0 {
        cmd.env("KILN_BUILD_ID", event.build_id.to_string());
    }
    if event.agent_id != 0 {
        cmd.env("KILN_AGENT_ID", event.agent_id.to_string());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", config.exec[0]))?;
    let pid = child.id();
    let body = event_json(event);
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let work = async {
        if let Some(mut s) = stdin.take() {
            // A hook that does not read its stdin is fine.
            let _ = s.write_all(body.as_bytes()).await;
        }
        let (out, err) = tokio::join!(read_capped(stdout.take()), read_capped(stderr.take()));
        let status = child.wait().await;
        (status, out, err)
    };
    let timeout = Duration::from_millis(config.timeout_ms);
    let result = match tokio::time::timeout(timeout, work).await {
        Ok((Ok(status), _out, err)) if status.success() => {
            let _ = err;
            Ok(())
        }
        Ok((Ok(status), out, err)) => Err(format!(
            "exited with {status}; stderr: {}; stdout: {}",
            String::from_utf8_lossy(&err).trim(),
            String::from_utf8_lossy(&out).trim()
        )),
        Ok((Err(e), _, _)) => Err(format!("cannot wait for the hook: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                // The whole process group, so the hook's children die too.
                unsafe_kill_group(pid);
            }
            Err(format!(
                "timed out after {} ms and was killed",
                config.timeout_ms
            ))
        }
    };
    metrics::histogram!("kiln_hook_run_seconds", "hook" => config.name.clone())
        .record(started.elapsed().as_secs_f64());
    result
}

fn unsafe_kill_group(pid: u32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
}

/// Read a pipe to its end, keeping at most [`OUTPUT_CAP`] bytes.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> Vec<u8> {
    let Some(mut r) = r else { return Vec::new() };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = OUTPUT_CAP.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    kept
}

impl Actor for HookProcessor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |ctx| {
            self.load();
            self.dispatch(ctx);
        });
    }
}

impl Rebuild for HookProcessor {
    const ACTOR: &'static str = "hook_processor";

    fn restarts(&self) -> Arc<Restarts> {
        self.restarts.clone()
    }

    /// Lets every write the old actor handed over land, then a fresh actor; its `started`
    /// loads `hook_work`.
    fn rebuild(&self) -> Result<HookProcessor, ActorError> {
        self.committer.barrier_blocking();
        Ok(HookProcessor::new(
            self.store.clone(),
            self.committer.clone(),
            self.hooks.clone(),
            self.restarts.clone(),
        ))
    }
}

impl Supervised for HookProcessor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        super::guard::restart(self);
    }
}

/// Add the pending work in sled that memory lacks (sent by a restarting `EventLog`, which may
/// have lost a `NewEvents` for it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LoadPending;

impl Handler<LoadPending> for HookProcessor {
    type Result = ();

    fn handle(&mut self, _msg: LoadPending, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |ctx| {
            self.load();
            self.dispatch(ctx);
        });
    }
}

/// Events the committer made durable (their hook work is already in sled).
#[derive(Message)]
#[rtype(result = "()")]
pub struct NewEvents(pub Vec<EventRecord>);

impl Handler<NewEvents> for HookProcessor {
    type Result = ();

    fn handle(&mut self, msg: NewEvents, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |ctx| {
            let now = Instant::now();
            for e in msg.0 {
                for q in self.queues.values_mut() {
                    if q.config.events.iter().any(|k| k == &e.kind) {
                        q.pending.entry(e.seq).or_insert(Pending {
                            build_id: e.build_id,
                            attempts: 0,
                            not_before: now,
                        });
                    }
                }
            }
            self.update_gauges();
            self.dispatch(ctx);
        });
    }
}

/// The pending runs memory holds, by hook, in sequence order (tests compare them with sled).
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "BTreeMap<String, Vec<u64>>")]
pub struct PendingSnapshot;

#[cfg(feature = "fault-points")]
impl Handler<PendingSnapshot> for HookProcessor {
    type Result = super::guard::Guarded<PendingSnapshot>;
    fn handle(&mut self, _msg: PendingSnapshot, ctx: &mut Context<Self>) -> Self::Result {
        super::guard::Guarded::run(NAME, ctx, |_| {
            self.queues
                .iter()
                .map(|(name, q)| (name.clone(), q.pending.keys().copied().collect()))
                .collect()
        })
    }
}

/// Fault point `hook_processor.corrupt_memory_and_stop`: forget the real pending runs, invent
/// one, then stop.
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct CorruptMemoryAndStop;

#[cfg(feature = "fault-points")]
impl Handler<CorruptMemoryAndStop> for HookProcessor {
    type Result = ();
    fn handle(&mut self, _msg: CorruptMemoryAndStop, ctx: &mut Context<Self>) {
        tracing::warn!("fault point hook_processor.corrupt_memory_and_stop fired");
        let far = Instant::now() + Duration::from_secs(3600);
        for q in self.queues.values_mut() {
            q.pending.clear();
            q.pending.insert(
                u64::MAX,
                Pending {
                    build_id: 0,
                    attempts: 0,
                    not_before: far,
                },
            );
            q.running = q.config.parallelism;
        }
        ctx.stop();
    }
}

#[cfg(feature = "fault-points")]
impl Handler<super::guard::faults::InjectPanic> for HookProcessor {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;
    fn handle(
        &mut self,
        m: super::guard::faults::InjectPanic,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        super::guard::faults::inject_panic(NAME, m.0, ctx)
    }
}
