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

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Instant;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional as _;
use tokio::sync::oneshot;

use super::codec::{encode, Record};
use super::keys::{hook_work_key, parse_u64_key, u64_key};
use super::records::{EventRecord, HookWorkRecord};
use super::{meta, now_ms, Store, StoreError, TreeId};

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

/// Why a commit did not happen. Cloneable so one failure can answer a whole batch.
#[derive(Debug, Clone, thiserror::Error)]
#[error("commit failed: {0}")]
pub struct CommitError(pub String);

/// Settings of the committer.
#[derive(Debug, Clone, Default)]
pub struct CommitterOptions {
    /// `fdatasync` the database file after each flush (power-loss durability).
    pub fsync: bool,
    /// Most batches folded into one transaction.
    pub max_batch: usize,
    /// Event kind -> names of the hooks that run on it.
    pub hook_routes: HashMap<String, Vec<String>>,
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
}

enum Message {
    Commit(Request),
    /// Finish what was sent before, close the database handle, then answer.
    Stop(mpsc::Sender<()>),
}

/// Handle to the committer thread. Cloning shares the thread; it stops when every handle is
/// dropped (after finishing the batches already sent).
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Message>,
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
        std::thread::Builder::new()
            .name("kiln-committer".into())
            .spawn(move || run(store, options, listener, rx, next_seq))?;
        Ok(Committer { tx })
    }

    /// Commit a batch; resolves after the flush that covers it.
    pub async fn commit(&self, batch: Batch) -> Result<Vec<EventRecord>, CommitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Message::Commit(Request {
                batch,
                reply: Reply::Async(reply),
            }))
            .map_err(|_| CommitError("the committer has stopped".into()))?;
        rx.await
            .map_err(|_| CommitError("the committer stopped before answering".into()))?
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
    pub fn commit_blocking(&self, batch: Batch) -> Result<Vec<EventRecord>, CommitError> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .send(Message::Commit(Request {
                batch,
                reply: Reply::Sync(reply),
            }))
            .map_err(|_| CommitError("the committer has stopped".into()))?;
        rx.recv()
            .map_err(|_| CommitError("the committer stopped before answering".into()))?
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

fn run(
    store: Store,
    options: CommitterOptions,
    listener: Listener,
    rx: mpsc::Receiver<Message>,
    mut next_seq: u64,
) {
    let max_batch = options.max_batch.max(1);
    let mut stop: Option<mpsc::Sender<()>> = None;
    while stop.is_none() {
        let first = match rx.recv() {
            Ok(Message::Commit(r)) => r,
            Ok(Message::Stop(ack)) => {
                stop = Some(ack);
                break;
            }
            Err(_) => break,
        };
        let mut requests = vec![first];
        while requests.len() < max_batch {
            match rx.try_recv() {
                Ok(Message::Commit(r)) => requests.push(r),
                Ok(Message::Stop(ack)) => {
                    stop = Some(ack);
                    break;
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = apply(&store, &options, &requests, next_seq).and_then(|events| {
            store.db().flush().map_err(|e| CommitError(e.to_string()))?;
            if options.fsync {
                fdatasync(&store).map_err(|e| CommitError(format!("fdatasync: {e}")))?;
            }
            Ok(events)
        });
        metrics::histogram!("kiln_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("kiln_commit_batch_size").record(requests.len() as f64);
        match result {
            Ok(per_request) => {
                metrics::counter!("kiln_commits_total", "result" => "ok").increment(1);
                let all: Vec<EventRecord> = per_request.iter().flatten().cloned().collect();
                if let Some(last) = all.last() {
                    next_seq = last.seq + 1;
                }
                // The listener hears of the events before their writers get their replies,
                // so a subscriber never misses an event whose request was acknowledged.
                if !all.is_empty() {
                    listener(&all);
                }
                for (req, events) in requests.into_iter().zip(per_request) {
                    req.reply.send(Ok(events));
                }
            }
            Err(e) => {
                metrics::counter!("kiln_commits_total", "result" => "error").increment(1);
                tracing::error!(error = %e, writes = requests.len(), "group commit failed");
                for req in requests {
                    req.reply.send(Err(e.clone()));
                }
            }
        }
    }
    drop(store);
    if let Some(ack) = stop {
        let _ = ack.send(());
    }
}

/// Apply every request in one transaction; returns each request's events with their seqs.
fn apply(
    store: &Store,
    options: &CommitterOptions,
    requests: &[Request],
    first_seq: u64,
) -> Result<Vec<Vec<EventRecord>>, CommitError> {
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
    let empty = encode(&HookWorkRecord::default()).map_err(|e| CommitError(e.to_string()))?;
    for ev in events.iter().flatten() {
        let value = encode(ev).map_err(|e| CommitError(e.to_string()))?;
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
    result.map_err(|e| CommitError(format!("{e:?}")))?;
    Ok(events)
}

fn fdatasync(store: &Store) -> std::io::Result<()> {
    let f = std::fs::File::open(store.path().join("db"))?;
    f.sync_data()
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
                fsync: false,
                max_batch: 16,
                hook_routes: routes,
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
        assert_eq!(store.tree(TreeId::Events).len(), 2);
        // Two hooks on build-succeeded, none on build-failed.
        assert_eq!(store.tree(TreeId::HookWork).len(), 2);
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
}
