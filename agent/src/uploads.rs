//! Upload slots handed out by build priority (`--max-parallel-uploads`): when every slot is
//! taken, the finished build of the highest priority gets the next free one; equal
//! priorities go first come first served. The number of builds waiting is what the
//! post-build-precedence limit reads (`--max-waiting-uploads`, see [`crate::limits`]).
//!
//! A waiter that gives up (its build was abandoned, the agent shuts down) leaves the queue; a
//! slot handed to a waiter that gave up at that moment is passed on, never lost.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::metrics;

struct Waiter {
    priority: i32,
    /// Arrival order: lower first among equal priorities.
    seq: u64,
    grant: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    /// The heap's greatest is served first: higher priority, then earlier arrival.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

struct Inner {
    free: usize,
    seq: u64,
    waiting: BinaryHeap<Waiter>,
}

/// The agent's upload slots.
pub struct UploadSlots {
    inner: Mutex<Inner>,
}

impl UploadSlots {
    pub fn new(slots: usize) -> Arc<UploadSlots> {
        Arc::new(UploadSlots {
            inner: Mutex::new(Inner {
                free: slots,
                seq: 0,
                waiting: BinaryHeap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finished builds waiting for a slot (waiters that gave up are not counted).
    pub fn waiting(&self) -> usize {
        self.lock()
            .waiting
            .iter()
            .filter(|w| !w.grant.is_closed())
            .count()
    }

    /// Waits for a slot, served by `priority` (higher first); the slot is freed when the
    /// returned guard drops.
    pub async fn acquire(self: &Arc<Self>, priority: i32) -> UploadSlot {
        loop {
            let rx = {
                let mut inner = self.lock();
                if inner.free > 0 && inner.waiting.is_empty() {
                    inner.free -= 1;
                    return UploadSlot(self.clone());
                }
                let (tx, rx) = oneshot::channel();
                inner.seq += 1;
                let seq = inner.seq;
                inner.waiting.push(Waiter {
                    priority,
                    seq,
                    grant: tx,
                });
                metrics::UPLOADS_WAITING.set(inner.waiting.len() as u64);
                rx
            };
            let mut pending = Pending {
                rx,
                slots: self.clone(),
                granted: false,
            };
            if (&mut pending.rx).await.is_ok() {
                pending.granted = true;
                return UploadSlot(self.clone());
            }
            // The sender went without a grant: only `release` drops senders, and only those
            // whose receiver is gone, which ours is not. Should it happen, queue again.
        }
    }

    /// Frees a slot: hands it to the best waiter still waiting, else back to the pool.
    fn release(&self) {
        let mut inner = self.lock();
        while let Some(w) = inner.waiting.pop() {
            if w.grant.send(()).is_ok() {
                metrics::UPLOADS_WAITING.set(inner.waiting.len() as u64);
                return;
            }
        }
        inner.free += 1;
        metrics::UPLOADS_WAITING.set(0);
    }
}

/// A held upload slot.
pub struct UploadSlot(Arc<UploadSlots>);

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A wait in the queue; dropped before its grant was taken (the waiter gave up), it passes a
/// grant that raced with the drop on.
struct Pending {
    rx: oneshot::Receiver<()>,
    slots: Arc<UploadSlots>,
    granted: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        // After close() no grant can arrive; one that arrived before is passed on.
        self.rx.close();
        if self.rx.try_recv().is_ok() {
            self.slots.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits (bounded) until `n` waiters are queued.
    async fn until_waiting(slots: &UploadSlots, n: usize) {
        for _ in 0..2_000 {
            if slots.waiting() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never saw {n} waiters (saw {})", slots.waiting());
    }

    /// Pins down the order: with the slot taken, waiters are served highest priority first,
    /// equal priorities in arrival order.
    #[tokio::test]
    async fn slots_go_to_the_highest_priority_then_the_earliest() {
        let slots = UploadSlots::new(1);
        let held = slots.acquire(0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, prio) in [(0, 1), (1, 5), (2, -3), (3, 5), (4, 1)] {
            let (s, order) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = s.acquire(prio).await;
                order.lock().unwrap().push(i);
                drop(slot);
            }));
            // Arrival order is the spawn order.
            until_waiting(&slots, tasks.len()).await;
        }
        drop(held);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 3, 0, 4, 2]);
        assert_eq!(slots.waiting(), 0);
    }

    /// Pins down that a waiter that gives up leaves the queue and costs no slot.
    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let slots = UploadSlots::new(1);
        let held = slots.acquire(0).await;
        let s2 = slots.clone();
        let quitter = tokio::spawn(async move { s2.acquire(9).await });
        until_waiting(&slots, 1).await;
        quitter.abort();
        let _ = quitter.await;
        assert_eq!(slots.waiting(), 0);
        drop(held);
        // The slot came back: two acquisitions in turn both succeed.
        let a = tokio::time::timeout(Duration::from_secs(60), slots.acquire(0))
            .await
            .expect("the slot is free again");
        drop(a);
        let _b = tokio::time::timeout(Duration::from_secs(60), slots.acquire(0))
            .await
            .expect("and again");
    }
}
