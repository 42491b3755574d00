//! `EventLog`: fan-out of the durable, sequence-numbered event log. The committer writes
//! events (in the same transaction as the state change they describe) and, after the flush,
//! hands them here; this actor passes them to the hook processor and to every event-stream
//! subscriber. A subscriber that gives a sequence number gets the events after it replayed
//! from sled first, with no gap and no duplicate (`Last-Event-ID`).

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::hook_processor::{HookProcessor, NewEvents};
use crate::store::keys::u64_key;
use crate::store::records::EventRecord;
use crate::store::{Store, TreeId};
use crate::supervisor::Restarts;

/// The JSON form of an event, as hooks read it on stdin and subscribers get it as `data`.
pub fn event_json(e: &EventRecord) -> String {
    let data: serde_json::Value =
        serde_json::from_str(&e.payload).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "seq": e.seq,
        "kind": e.kind,
        "time_ms": e.time_ms,
        "build_id": (e.build_id != 0).then_some(e.build_id),
        "agent_id": (e.agent_id != 0).then_some(e.agent_id),
        "data": data,
    })
    .to_string()
}

struct Subscriber {
    tx: mpsc::Sender<EventRecord>,
    /// Highest sequence number sent, so a replayed event is never sent twice.
    last_sent: u64,
}

pub struct EventLog {
    store: Store,
    hooks: Option<Addr<HookProcessor>>,
    subscribers: Vec<Subscriber>,
    restarts: Arc<Restarts>,
}

impl EventLog {
    pub fn new(
        store: Store,
        hooks: Option<Addr<HookProcessor>>,
        restarts: Arc<Restarts>,
    ) -> EventLog {
        EventLog {
            store,
            hooks,
            subscribers: Vec::new(),
            restarts,
        }
    }
}

impl Actor for EventLog {
    type Context = Context<Self>;
}

impl Supervised for EventLog {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.restarts.record("event_log");
        // Subscribers reconnect with Last-Event-ID; hook work is in sled.
        self.subscribers.clear();
    }
}

/// Events the committer just made durable.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Committed(pub Vec<EventRecord>);

impl Handler<Committed> for EventLog {
    type Result = ();

    fn handle(&mut self, msg: Committed, _ctx: &mut Context<Self>) {
        metrics::counter!("kiln_events_total").increment(msg.0.len() as u64);
        if let Some(h) = &self.hooks {
            h.do_send(NewEvents(msg.0.clone()));
        }
        self.subscribers.retain_mut(|s| {
            for e in &msg.0 {
                if e.seq <= s.last_sent {
                    continue;
                }
                // A subscriber that cannot keep up is dropped; it resumes with Last-Event-ID.
                if s.tx.try_send(e.clone()).is_err() {
                    return false;
                }
                s.last_sent = e.seq;
            }
            true
        });
    }
}

/// Subscribe to events after `since` (0 = only new ones... unless `replay` is set).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// Replay every event with a higher sequence number first.
    pub since: Option<u64>,
    pub tx: mpsc::Sender<EventRecord>,
}

impl Handler<Subscribe> for EventLog {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) {
        let mut last_sent = match self.store.tree(TreeId::Events).last() {
            Ok(Some((k, _))) => crate::store::keys::parse_u64_key(&k).unwrap_or(0),
            _ => 0,
        };
        if let Some(since) = msg.since {
            let from = u64_key(since.saturating_add(1));
            let mut sent = since;
            for kv in self.store.tree(TreeId::Events).range(from..) {
                let Ok((_, v)) = kv else { break };
                let Ok(e) = crate::store::codec::decode::<EventRecord>(&v) else {
                    continue;
                };
                sent = e.seq;
                if msg.tx.try_send(e).is_err() {
                    // Too much to replay at once: the client resumes from what it got.
                    return;
                }
            }
            last_sent = sent;
        }
        self.subscribers.push(Subscriber {
            tx: msg.tx,
            last_sent,
        });
    }
}
