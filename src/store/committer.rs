//! The committer: the one writer of the state database, on its own thread.
//!
//! Callers hand it a [`Batch`] (record writes plus events) and wait for the reply. The
//! committer takes every batch that is waiting (up to `max_batch`), applies them all in ONE
//! multi-tree sled transaction — each event gets its sequence number there, with a hook-work
//! item per hook subscribed to its kind — then flushes once (and `fdatasync`s if configured),
//! and only then replies to every caller and tells the listener about the new events. So a
//! state change, its event and its hook work are atomic, nothing is acknowledged before the
//! flush that covers it, and N concurrent writers cost one flush, not N (sled does not merge
//! concurrent flushes itself).
//!
//! Limits and failures (docs/runtime-semantics.md, "The committer's limits"):
//!
//! - The queue is bounded: at most `max_queued` batches wait for the committer. A writer first
//!   takes a [`Permit`] (refused at once with [`CommitError::Overloaded`] when the queue is
//!   full, HTTP 503 with `Retry-After`), so an actor can take it *before* it changes its memory
//!   and never has to undo a change for a write that was refused.
//! - A batch that fails before anything is applied (it cannot be encoded) is answered
//!   [`CommitError::Refused`].
//! - A failed flush or `fdatasync`, or an engine error inside the transaction, leaves the
//!   outcome unknown: sled may have applied and may still persist the writes. The committer
//!   then stops the process ([`EXIT_STORAGE_FAILURE`]) without answering anyone, so no reply
//!   ever says "failed" for a write that becomes durable, and no sequence number handed out in
//!   that transaction is ever handed out again (the next start continues after the last event
//!   sled kept). Reopening the database in place was the other choice; it is not taken because
//!   every `Store` clone in the process holds the old handle, and sled cannot tell which of the
//!   transaction's writes reached the disk.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;
use tokio::sync::oneshot;

use super::codec::{encode, Record};
use super::keys::{hook_work_key, parse_u64_key, u64_key};
use super::records::{EventRecord, HookWorkRecord};
use super::{meta, now_ms, Store, StoreError, TreeId};

/// Exit status of `kiln coordinator` after a failed flush, `fdatasync` or engine error in a
/// commit (`EX_IOERR` of sysexits.h).
pub const EXIT_STORAGE_FAILURE: i32 = 74;

/// One write.
#[derive(Debug, Clone)]
pub enum Op {
    Put(TreeId, Vec<u8>, Vec<u8>),
    Delete(TreeId, Vec<u8>),
}

/// An event to append to the log; the committer gives it its sequence number.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub build_id: u64,
    pub agent_id: u64,
    pub payload: serde_json::Value,
}

/// Writes and events that must land together.
#[derive(Debug, Default)]
pub struct Batch {
    pub ops: Vec<Op>,
    pub events: Vec<NewEvent>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Encode and stage a record write.
    pub fn put<R: Record>(&mut self, t: TreeId, key: &[u8], record: &R) -> Result<(), StoreError> {
        self.ops.push(Op::Put(t, key.to_vec(), encode(record)?));
        Ok(())
    }

    pub fn put_raw(&mut self, t: TreeId, key: &[u8], value: &[u8]) {
        self.ops.push(Op::Put(t, key.to_vec(), value.to_vec()));
    }

    pub fn delete(&mut self, t: TreeId, key: &[u8]) {
        self.ops.push(Op::Delete(t, key.to_vec()));
    }

    pub fn event(&mut self, kind: &str, build_id: u64, agent_id: u64, payload: serde_json::Value) {
        self.events.push(NewEvent {
            kind: kind.to_string(),
            build_id,
            agent_id,
            payload,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.events.is_empty()
    }
}

/// Why a commit did not happen; in every case nothing of the batch was applied. Cloneable so
/// one failure can answer a whole batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The queue is full: the batch was not taken. Retry after a moment.
    #[error("the state database's write queue is full ({queued} batches waiting, store.max_queued = {max}); retry shortly")]
    Overloaded { queued: usize, max: usize },
    /// The batch was refused before anything was applied.
    #[error("commit refused, nothing was written: {0}")]
    Refused(String),
    /// The committer has stopped (the coordinator is shutting down).
    #[error("the committer has stopped; the coordinator is shutting down")]
    Stopped,
}

/// Settings of the committer.
#[derive(Debug, Clone)]
pub struct CommitterOptions {
    /// `fdatasync` the database file after each flush (power-loss durability).
    pub fsync: bool,
    /// Most batches folded into one transaction.
    pub max_batch: usize,
    /// Most batches waiting for the committer; writers beyond it are refused
    /// ([`CommitError::Overloaded`]). `0` is treated as 1.
    pub max_queued: usize,
    /// Event kind -> names of the hooks that run on it.
    pub hook_routes: HashMap<String, Vec<String>>,
}

impl Default for CommitterOptions {
    fn default() -> CommitterOptions {
        CommitterOptions {
            fsync: false,
            max_batch: 1024,
            max_queued: 8192,
            hook_routes: HashMap::new(),
        }
    }
}

/// Called on the committer thread, after the flush, with the events of each group commit.
pub type Listener = Box<dyn Fn(&[EventRecord]) + Send>;

type Outcome = Result<Vec<EventRecord>, CommitError>;

/// Where the answer goes: an async waiter, or a thread blocked on a std channel (usable even
/// from inside an async runtime, where tokio's `blocking_recv` would panic).
enum Reply {
    Async(oneshot::Sender<Outcome>),
    Sync(mpsc::Sender<Outcome>),
}

impl Reply {
    fn send(self, outcome: Outcome) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Sync(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

struct Request {
    batch: Batch,
    reply: Reply,
    /// The place this request holds in the bounded queue, given back when the committer takes
    /// the request (`None` for control requests: barriers, start-up writes, tests).
    permit: Option<Permit>,
}

impl Request {
    /// The committer took the request: its place in the queue is free again.
    fn taken(mut self) -> Request {
        self.permit = None;
        self
    }
}

enum Message {
    Commit(Request),
    /// Finish what was sent before, close the database handle, then answer.
    Stop(mpsc::Sender<()>),
}

/// Writes admitted (permits taken) and not yet taken by the committer thread. A mutex rather
/// than an atomic so that the `kiln_commit_queue_depth` gauge is set in the same order as the
/// count changes (an uncontended lock costs about as much as the atomic it replaces).
#[derive(Debug, Default)]
struct Depth(Mutex<usize>);

impl Depth {
    fn change(&self, f: impl FnOnce(&mut usize) -> bool) -> (bool, usize) {
        let mut n = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let changed = f(&mut n);
        if changed {
            metrics::gauge!("kiln_commit_queue_depth").set(*n as f64);
        }
        (changed, *n)
    }

    fn get(&self) -> usize {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A place in the committer's bounded queue, taken with [`Committer::reserve`]; dropping it
/// unused gives the place back.
#[derive(Debug)]
pub struct Permit {
    tx: mpsc::Sender<Message>,
    depth: Arc<Depth>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.depth.change(|n| {
            *n = n.saturating_sub(1);
            true
        });
    }
}

impl Permit {
    /// Commit a batch in the place this permit holds; resolves after the flush that covers it.
    /// Never [`CommitError::Overloaded`].
    pub async fn commit(self, batch: Batch) -> Result<Vec<EventRecord>, CommitError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.clone();
        tx.send(Message::Commit(Request {
            batch,
            reply: Reply::Async(reply),
            permit: Some(self),
        }))
        .map_err(|_| CommitError::Stopped)?;
        rx.await.map_err(|_| CommitError::Stopped)?
    }
}

/// Handle to the committer thread. Cloning shares the thread; it stops when every handle is
/// dropped (after finishing the batches already sent).
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Message>,
    depth: Arc<Depth>,
    max_queued: usize,
    #[cfg(feature = "fault-points")]
    faults: Arc<faults::Faults>,
}

impl Committer {
    /// Start the committer thread.
    pub fn start(
        store: Store,
        options: CommitterOptions,
        listener: Listener,
    ) -> Result<Committer, StoreError> {
        let next_seq = next_event_seq(&store)?;
        let (tx, rx) = mpsc::channel::<Message>();
        let max_queued = options.max_queued.max(1);
        #[cfg(feature = "fault-points")]
        let faults = Arc::new(faults::Faults::default());
        #[cfg(feature = "fault-points")]
        let thread_faults = faults.clone();
        std::thread::Builder::new()
            .name("kiln-committer".into())
            .spawn(move || {
                let mut c = Thread {
                    store,
                    options,
                    listener,
                    next_seq,
                    #[cfg(feature = "fault-points")]
                    faults: thread_faults,
                };
                let stop = c.run(rx);
                // Release the database handle before telling `shutdown_blocking` it is done.
                drop(c);
                if let Some(ack) = stop {
                    let _ = ack.send(());
                }
            })?;
        Ok(Committer {
            tx,
            depth: Arc::new(Depth::default()),
            max_queued,
            #[cfg(feature = "fault-points")]
            faults,
        })
    }

    /// Take a place in the queue, or be refused at once when it is full. Take it before
    /// changing memory that the batch will make durable.
    pub fn reserve(&self) -> Result<Permit, CommitError> {
        let max = self.max_queued;
        let (taken, queued) = self.depth.change(|n| {
            let room = *n < max;
            if room {
                *n += 1;
            }
            room
        });
        if !taken {
            metrics::counter!("kiln_commits_total", "result" => "overloaded").increment(1);
            return Err(CommitError::Overloaded { queued, max });
        }
        Ok(Permit {
            tx: self.tx.clone(),
            depth: self.depth.clone(),
        })
    }

    /// Batches waiting for the committer now.
    pub fn queued(&self) -> usize {
        self.depth.get()
    }

    /// Commit a batch; resolves after the flush that covers it. Refused at once with
    /// [`CommitError::Overloaded`] when the queue is full.
    pub async fn commit(&self, batch: Batch) -> Result<Vec<EventRecord>, CommitError> {
        self.reserve()?.commit(batch).await
    }

    /// Stop the thread after the batches already sent, and wait until it has released the
    /// database. Later commits fail.
    pub fn shutdown_blocking(&self) {
        let (ack, rx) = mpsc::channel();
        if self.tx.send(Message::Stop(ack)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Wait until every batch sent before this call is committed (or failed). An actor that
    /// restarts calls it before reloading from sled, so it reloads what its previous
    /// incarnation already handed over.
    pub fn barrier_blocking(&self) {
        let _ = self.commit_blocking(Batch::new());
    }

    /// Commit from a thread that is not async (startup, tests, offline tools); also safe
    /// inside an async runtime (it blocks that thread).
    /// Not subject to the queue's bound: its callers (start-up, restarts, offline tools) are
    /// few and must not be refused.
    pub fn commit_blocking(&self, batch: Batch) -> Result<Vec<EventRecord>, CommitError> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .send(Message::Commit(Request {
                batch,
                reply: Reply::Sync(reply),
                permit: None,
            }))
            .map_err(|_| CommitError::Stopped)?;
        rx.recv().map_err(|_| CommitError::Stopped)?
    }

    /// The committer's fault points (tests only).
    #[cfg(feature = "fault-points")]
    pub fn faults(&self) -> &faults::Faults {
        &self.faults
    }
}

fn next_event_seq(store: &Store) -> Result<u64, StoreError> {
    let from_meta = store.meta_u64(meta::NEXT_EVENT_SEQ)?.unwrap_or(1);
    let from_log = match store.tree(TreeId::Events).last()? {
        Some((k, _)) => parse_u64_key(&k).map(|s| s + 1).unwrap_or(1),
        None => 1,
    };
    Ok(from_meta.max(from_log))
}

/// The committer thread's own state.
struct Thread {
    store: Store,
    options: CommitterOptions,
    listener: Listener,
    /// The sequence number of the next event. Raised only after a commit that applied events
    /// was flushed; a failed flush never returns here (the process stops).
    next_seq: u64,
    #[cfg(feature = "fault-points")]
    faults: Arc<faults::Faults>,
}

impl Thread {
    /// Commit until told to stop (returns who to tell when done) or every handle is gone.
    fn run(&mut self, rx: mpsc::Receiver<Message>) -> Option<mpsc::Sender<()>> {
        let max_batch = self.options.max_batch.max(1);
        let mut stop: Option<mpsc::Sender<()>> = None;
        while stop.is_none() {
            // A request taken off the channel gives its place in the queue back.
            let first = match rx.recv() {
                Ok(Message::Commit(r)) => r.taken(),
                Ok(Message::Stop(ack)) => {
                    stop = Some(ack);
                    break;
                }
                Err(_) => break,
            };
            let mut requests = vec![first];
            #[cfg(feature = "fault-points")]
            self.faults.wait_while_stalled();
            while requests.len() < max_batch {
                match rx.try_recv() {
                    Ok(Message::Commit(r)) => requests.push(r.taken()),
                    Ok(Message::Stop(ack)) => {
                        stop = Some(ack);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.group_commit(requests);
        }
        stop
    }

    fn group_commit(&mut self, requests: Vec<Request>) {
        let started = Instant::now();
        let per_request = match apply(&self.store, &self.options, &requests, self.next_seq) {
            Ok(events) => events,
            Err(Failure::Refused(e)) => {
                metrics::counter!("kiln_commits_total", "result" => "error").increment(1);
                tracing::error!(error = %e, writes = requests.len(), "group commit refused; nothing was written");
                let e = CommitError::Refused(e);
                for req in requests {
                    req.reply.send(Err(e.clone()));
                }
                return;
            }
            Err(Failure::Unknown(e)) => fatal("the commit transaction", &e, requests),
        };
        if let Err(e) = self.flush() {
            fatal("the flush", &e, requests);
        }
        metrics::histogram!("kiln_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("kiln_commit_batch_size").record(requests.len() as f64);
        metrics::counter!("kiln_commits_total", "result" => "ok").increment(1);
        let all: Vec<EventRecord> = per_request.iter().flatten().cloned().collect();
        if let Some(last) = all.last() {
            self.next_seq = last.seq + 1;
        }
        // The listener hears of the events before their writers get their replies, so a
        // subscriber never misses an event whose request was acknowledged.
        if !all.is_empty() {
            (self.listener)(&all);
        }
        for (req, events) in requests.into_iter().zip(per_request) {
            req.reply.send(Ok(events));
        }
    }

    /// sled's flush, then `fdatasync` when configured.
    fn flush(&self) -> Result<(), String> {
        self.store
            .db()
            .flush()
            .map_err(|e| format!("sled flush: {e}"))?;
        if self.options.fsync {
            fdatasync(&self.store).map_err(|e| format!("fdatasync: {e}"))?;
        }
        #[cfg(feature = "fault-points")]
        if self.faults.take_flush_failure() {
            return Err("fault point committer.fail_flush fired (after a real flush)".into());
        }
        Ok(())
    }
}

/// The outcome of a commit is unknown (the writes may be durable): stop the process without
/// answering any of `requests`. Their reply channels are leaked on purpose, so that not even
/// a "stopped" answer reaches a caller while the process exits.
fn fatal(what: &str, error: &str, requests: Vec<Request>) -> ! {
    tracing::error!(
        error,
        failed = what,
        writes = requests.len(),
        exit_status = EXIT_STORAGE_FAILURE,
        "state database write failed after sled may have applied it; stopping the coordinator without answering its writers (restart it: sled replays what reached the disk, and event numbering continues after it)"
    );
    std::mem::forget(requests);
    std::process::exit(EXIT_STORAGE_FAILURE)
}

/// Why `apply` failed.
enum Failure {
    /// Before the transaction: nothing was applied.
    Refused(String),
    /// Inside the transaction: sled may have applied part or all of it.
    Unknown(String),
}

/// Apply every request in one transaction; returns each request's events with their seqs.
fn apply(
    store: &Store,
    options: &CommitterOptions,
    requests: &[Request],
    first_seq: u64,
) -> Result<Vec<Vec<EventRecord>>, Failure> {
    let time_ms = now_ms();
    // Build the events (and their encodings) outside the transaction closure, which sled may
    // run more than once.
    let mut seq = first_seq;
    let mut events: Vec<Vec<EventRecord>> = Vec::with_capacity(requests.len());
    for req in requests {
        let mut these = Vec::with_capacity(req.batch.events.len());
        for e in &req.batch.events {
            these.push(EventRecord {
                seq,
                time_ms,
                kind: e.kind.clone(),
                build_id: e.build_id,
                agent_id: e.agent_id,
                payload: e.payload.to_string(),
            });
            seq += 1;
        }
        events.push(these);
    }
    let mut extra: Vec<Op> = Vec::new();
    let empty = encode(&HookWorkRecord::default()).map_err(|e| Failure::Refused(e.to_string()))?;
    for ev in events.iter().flatten() {
        let value = encode(ev).map_err(|e| Failure::Refused(e.to_string()))?;
        extra.push(Op::Put(TreeId::Events, u64_key(ev.seq).to_vec(), value));
        for hook in options.hook_routes.get(&ev.kind).into_iter().flatten() {
            extra.push(Op::Put(
                TreeId::HookWork,
                hook_work_key(hook, ev.seq),
                empty.clone(),
            ));
        }
    }
    if seq != first_seq {
        extra.push(Op::Put(
            TreeId::Meta,
            meta::NEXT_EVENT_SEQ.to_vec(),
            seq.to_be_bytes().to_vec(),
        ));
    }
    let result: Result<(), TransactionError<()>> = store.trees().transaction(|trees| {
        let ops = requests
            .iter()
            .flat_map(|r| r.batch.ops.iter())
            .chain(extra.iter());
        for op in ops {
            match op {
                Op::Put(t, k, v) => {
                    trees[*t as usize].insert(k.as_slice(), v.as_slice())?;
                }
                Op::Delete(t, k) => {
                    trees[*t as usize].remove(k.as_slice())?;
                }
            }
        }
        Ok::<(), ConflictableTransactionError<()>>(())
    });
    match result {
        Ok(()) => Ok(events),
        // The closure never aborts, so this cannot happen; if it did, nothing was applied.
        Err(TransactionError::Abort(())) => Err(Failure::Refused("transaction aborted".into())),
        Err(TransactionError::Storage(e)) => Err(Failure::Unknown(e.to_string())),
    }
}

fn fdatasync(store: &Store) -> std::io::Result<()> {
    let f = std::fs::File::open(store.path().join("db"))?;
    f.sync_data()
}

/// Fault points of the committer (feature `fault-points`, never in release builds).
#[cfg(feature = "fault-points")]
pub mod faults {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    /// Longest a stall lasts without `resume`, so a forgotten stall cannot hang a test forever.
    const MAX_STALL: Duration = Duration::from_secs(120);

    #[derive(Debug, Default)]
    pub struct Faults {
        fail_flush: AtomicBool,
        stalled: Mutex<bool>,
        resumed: Condvar,
    }

    impl Faults {
        /// `committer.fail_flush`: the next group commit's flush reports a failure after it
        /// really flushed (sled persisted the writes, and the committer cannot know it).
        pub fn fail_next_flush(&self) {
            tracing::warn!("fault point committer.fail_flush armed");
            self.fail_flush.store(true, Ordering::SeqCst);
        }

        pub(super) fn take_flush_failure(&self) -> bool {
            self.fail_flush.swap(false, Ordering::SeqCst)
        }

        /// `committer.stall`: the committer holds the next batch it takes (and takes no other)
        /// until `resume`, or for at most 120 s; meanwhile writers fill the queue.
        pub fn stall(&self) {
            tracing::warn!("fault point committer.stall armed");
            *self.stalled.lock().unwrap_or_else(|p| p.into_inner()) = true;
        }

        pub fn resume(&self) {
            *self.stalled.lock().unwrap_or_else(|p| p.into_inner()) = false;
            self.resumed.notify_all();
        }

        pub(super) fn wait_while_stalled(&self) {
            let deadline = Instant::now() + MAX_STALL;
            let mut stalled = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
            if *stalled {
                // Tests wait for this line before they fill the queue behind the held batch.
                tracing::warn!(
                    "fault point committer.stall: holding a batch until committer.resume"
                );
            }
            while *stalled {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    *stalled = false;
                    break;
                }
                stalled = match self.resumed.wait_timeout(stalled, left) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::EventRecord;
    use crate::store::StoreOptions;
    use std::sync::{Arc, Mutex};

    #[test]
    fn batches_commit_atomically_with_events_and_hook_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let mut routes = HashMap::new();
        routes.insert(
            "build-succeeded".to_string(),
            vec!["h1".to_string(), "h2".to_string()],
        );
        let c = Committer::start(
            store.clone(),
            CommitterOptions {
                max_batch: 16,
                hook_routes: routes,
                ..Default::default()
            },
            Box::new(move |evs: &[EventRecord]| {
                seen2.lock().unwrap().extend(evs.iter().map(|e| e.seq))
            }),
        )
        .unwrap();
        let mut b = Batch::new();
        b.put_raw(TreeId::Meta, b"x", b"1");
        b.event("build-succeeded", 5, 0, serde_json::json!({"a": 1}));
        b.event("build-failed", 6, 0, serde_json::json!({}));
        let evs = c.commit_blocking(b).unwrap();
        assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            store
                .tree(TreeId::Meta)
                .get(b"x")
                .unwrap()
                .unwrap()
                .as_ref(),
            b"1"
        );
        assert_eq!(store.len(TreeId::Events), 2);
        // Two hooks on build-succeeded, none on build-failed.
        assert_eq!(store.len(TreeId::HookWork), 2);
        assert!(store
            .contains(TreeId::HookWork, &hook_work_key("h2", 1))
            .unwrap());
        assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
        c.shutdown_blocking();
        // Sequence numbers continue after a reopen.
        drop(store);
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let c = Committer::start(
            store,
            CommitterOptions::default(),
            Box::new(|_: &[EventRecord]| {}),
        )
        .unwrap();
        let mut b = Batch::new();
        b.event("x", 0, 0, serde_json::json!(null));
        assert_eq!(c.commit_blocking(b).unwrap()[0].seq, 3);
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_places_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let c = Committer::start(
            store.clone(),
            CommitterOptions {
                max_queued: 2,
                ..Default::default()
            },
            Box::new(|_: &[EventRecord]| {}),
        )
        .unwrap();
        let p1 = c.reserve().unwrap();
        let p2 = c.reserve().unwrap();
        assert_eq!(c.queued(), 2);
        assert_eq!(
            c.reserve().unwrap_err(),
            CommitError::Overloaded { queued: 2, max: 2 }
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt.block_on(c.commit(Batch::new())).unwrap_err();
        assert!(
            err.to_string().contains("store.max_queued = 2"),
            "the refusal names the setting: {err}"
        );
        // A permit dropped unused gives its place back.
        drop(p1);
        assert_eq!(c.queued(), 1);
        // A permit used for a commit gives it back once the committer took the batch.
        let mut b = Batch::new();
        b.put_raw(TreeId::Meta, b"k", b"v");
        rt.block_on(p2.commit(b)).unwrap();
        assert_eq!(c.queued(), 0);
        assert_eq!(store.meta_str(b"k").unwrap().as_deref(), Some("v"));
        // Control commits are not bounded.
        let _held = (c.reserve().unwrap(), c.reserve().unwrap());
        c.barrier_blocking();
        c.commit_blocking(Batch::new()).unwrap();
    }
}
