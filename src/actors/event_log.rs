//! `EventLog`: fan-out of the durable, sequence-numbered event log. The committer writes
//! events (in the same transaction as the state change they describe) and, after the flush,
//! hands them here; this actor passes them to the hook processor and to every event-stream
//! subscriber. A subscriber that gives a sequence number gets the events after it replayed
//! from sled first, with no gap and no duplicate (`Last-Event-ID`).
//!
//! Supervision: every handler runs under the panic guard. A restart builds a fresh `EventLog`
//! (no subscribers: their streams end and clients resume with `Last-Event-ID`, replayed from
//! sled) and asks the hook processor to reload its pending work from sled, since the
//! `Committed` message being handled when the old one panicked is lost.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::guard::{catch, Rebuild};
use super::hook_processor::{HookProcessor, LoadPending, NewEvents};
use super::restarts::Restarts;
use super::ActorError;
use crate::store::records::EventRecord;
use crate::store::Store;

const NAME: &str = "event log";

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

impl Rebuild for EventLog {
    const ACTOR: &'static str = "event_log";

    fn restarts(&self) -> Arc<Restarts> {
        self.restarts.clone()
    }

    fn rebuild(&self) -> Result<EventLog, ActorError> {
        if let Some(h) = &self.hooks {
            h.do_send(LoadPending);
        }
        Ok(EventLog::new(
            self.store.clone(),
            self.hooks.clone(),
            self.restarts.clone(),
        ))
    }
}

impl Supervised for EventLog {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        super::guard::restart(self);
    }
}

/// Events the committer just made durable.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Committed(pub Vec<EventRecord>);

impl Handler<Committed> for EventLog {
    type Result = ();

    fn handle(&mut self, msg: Committed, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| {
            metrics::counter!("kiln_events_total").increment(msg.0.len() as u64);
            if let Some(h) = &self.hooks {
                h.do_send(NewEvents(msg.0.clone()));
            }
            self.subscribers.retain_mut(|s| {
                for e in &msg.0 {
                    if e.seq <= s.last_sent {
                        continue;
                    }
                    // A subscriber that cannot keep up is dropped; it resumes with
                    // Last-Event-ID.
                    if s.tx.try_send(e.clone()).is_err() {
                        return false;
                    }
                    s.last_sent = e.seq;
                }
                true
            });
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

    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) {
        catch(NAME, ctx, |_| self.subscribe(msg));
    }
}

impl EventLog {
    fn subscribe(&mut self, msg: Subscribe) {
        let mut last_sent = match self.store.last_event_seq() {
            Ok(seq) => seq,
            Err(e) => {
                // The stream ends at once; the client retries.
                tracing::error!(error = %e, "cannot read the event log");
                return;
            }
        };
        if let Some(since) = msg.since {
            let mut sent = since;
            for e in self.store.events_after(since) {
                let e = match e {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, after = sent, "cannot read an event to replay; skipped");
                        continue;
                    }
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

/// Subscribers now (tests: a restart starts with none).
#[cfg(feature = "fault-points")]
#[derive(Message)]
#[rtype(result = "usize")]
pub struct SubscriberCount;

#[cfg(feature = "fault-points")]
impl Handler<SubscriberCount> for EventLog {
    type Result = super::guard::Guarded<SubscriberCount>;
    fn handle(&mut self, _msg: SubscriberCount, ctx: &mut Context<Self>) -> Self::Result {
        super::guard::Guarded::run(NAME, ctx, |_| self.subscribers.len())
    }
}

#[cfg(feature = "fault-points")]
impl Handler<super::guard::faults::InjectPanic> for EventLog {
    type Result = ResponseActFuture<Self, Result<(), ActorError>>;
    fn handle(
        &mut self,
        m: super::guard::faults::InjectPanic,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        super::guard::faults::inject_panic(NAME, m.0, ctx)
    }
}
