//! Rebuilding the queue's memory from sled in ONE scan of the `builds` tree: the compact
//! live entries, the path indexes, the lease and request indexes, and the runnable entries the
//! allocator's index is filled from (the allocator does not scan). Records are read as
//! borrowed views (no string is copied), so the scan costs about one decode per build.
//!
//! A state dir written before the `output_builds` index existed gets it in the same scan: the
//! entries are handed to the actor as batches to commit (`take_migration`).

use std::collections::HashMap;
use std::sync::Arc;

use super::{LiveBuild, QueueState};
use crate::actors::runnable_index::RunnableEntry;
use crate::actors::symbols::{PathDigest, Symbols};
use crate::protocol::BuildState;
use crate::store::keys::{output_key, u64_key};
use crate::store::{meta, Batch, Store, StoreError, TreeId};

/// Index writes per migration batch.
const MIGRATION_BATCH: usize = 50_000;

/// Runnable entries handed over per call of the load's `runnable` callback.
const RUNNABLE_CHUNK: usize = 65_536;

impl QueueState {
    /// Rebuild the state from sled (see the module doc).
    pub fn load(store: Store, symbols: Arc<Symbols>) -> Result<QueueState, StoreError> {
        QueueState::load_at(store, symbols, crate::store::now_ms())
    }

    /// [`QueueState::load`] at time `now` (deferrals that end later are put back on the
    /// timer; earlier ones are over).
    pub fn load_at(
        store: Store,
        symbols: Arc<Symbols>,
        now: u64,
    ) -> Result<QueueState, StoreError> {
        Ok(QueueState::load_streaming(store, symbols, now, &mut |_| {})?.0)
    }

    /// [`QueueState::load`], handing the runnable builds to `runnable` in chunks while the
    /// scan goes on (so the allocator can index them meanwhile, on its own thread). Entries
    /// are handed over with `rdeps` 0 and their own priority; the builds whose `rdeps` or
    /// effective priority the end of the scan raised are returned, to re-key. A build deferred
    /// past `now` (a submission's `defer_until`, a retry's backoff) goes back on the timer
    /// instead of to the allocator.
    pub fn load_streaming(
        store: Store,
        symbols: Arc<Symbols>,
        now: u64,
        runnable: &mut dyn FnMut(Vec<RunnableEntry>),
    ) -> Result<(QueueState, Vec<RunnableEntry>), StoreError> {
        let mut chunk: Vec<RunnableEntry> = Vec::new();
        let next = store.meta_u64(meta::NEXT_BUILD_ID)?.unwrap_or(1);
        let migrate = store.meta_u64(meta::OUTPUT_BUILDS_INDEXED)?.is_none();
        let mut s = QueueState::empty(store.clone(), symbols, next);
        let mut migration = vec![Batch::new()];
        // Availability of the inputs of blocked builds, each path asked of sled once.
        let mut available: HashMap<PathDigest, bool> = HashMap::new();
        // Each blocked build's missing paths (the edges of derived priority), dropped after.
        let mut missing_of: HashMap<u64, Vec<PathDigest>> = HashMap::new();
        store.visit_builds(|b| -> Result<(), StoreError> {
            s.next_build_id = s.next_build_id.max(b.id + 1);
            if migrate {
                let batch = migration
                    .last_mut()
                    .filter(|b| b.ops.len() < MIGRATION_BATCH);
                let batch = match batch {
                    Some(b) => b,
                    None => {
                        migration.push(Batch::new());
                        migration.last_mut().ok_or(StoreError::CommitterGone)?
                    }
                };
                for (_, o) in &b.outputs {
                    batch.put_raw(
                        TreeId::OutputBuilds,
                        output_key(o).as_bytes(),
                        &u64_key(b.id),
                    );
                }
            }
            if b.state.is_terminal() {
                // A build failed behind a failed input waits for its missing paths to be built.
                if super::is_input_failed(b.state, b.attempt, b.reason) {
                    for need in &b.needs {
                        let d = PathDigest::of(need);
                        let ok = match available.get(&d) {
                            Some(ok) => *ok,
                            None => {
                                let ok = s.available(need)?;
                                available.insert(d, ok);
                                ok
                            }
                        };
                        if !ok {
                            s.input_failed.entry(d).or_default().insert(b.id);
                        }
                    }
                }
                return Ok(());
            }
            let mut missing = 0u32;
            if b.state == BuildState::Blocked {
                for need in &b.needs {
                    let d = PathDigest::of(need);
                    let ok = match available.get(&d) {
                        Some(ok) => *ok,
                        None => {
                            let ok = s.available(need)?;
                            available.insert(d, ok);
                            ok
                        }
                    };
                    if !ok {
                        missing += 1;
                        s.waiting.entry(d).or_default().insert(b.id);
                        missing_of.entry(b.id).or_default().push(d);
                    }
                }
            }
            s.by_drv.insert(PathDigest::of(b.drv_path), b.id);
            for (_, o) in &b.outputs {
                s.producers.insert(PathDigest::of(o), b.id);
            }
            let l = LiveBuild {
                state: b.state,
                system: s.symbols.system(b.system),
                tags: s.symbols.tag_set(&b.tags),
                attempt: b.attempt,
                priority: b.priority,
                effective: b.priority,
                rdeps: 0,
                missing,
                retries: b.retries,
                builder_retries: b.builder_retries,
                agent_id: b.agent_id,
                allocated_ms: b.allocated_ms,
                started_ms: b.started_ms,
                defer_until_ms: b.defer_until_ms,
            };
            let deferred = b.defer_until_ms > now;
            if deferred {
                s.deferred.insert((b.defer_until_ms, b.id));
            }
            if b.state == BuildState::Runnable && !deferred {
                chunk.push(l.entry(b.id));
                if chunk.len() >= RUNNABLE_CHUNK {
                    runnable(std::mem::take(&mut chunk));
                }
            }
            s.add_live(b.id, l);
            if !b.request.is_empty() {
                s.request_of.insert(b.id, Arc::from(b.request));
            }
            if b.state.is_leased() {
                s.lease_on(b.id, b.allocated_ms);
            } else if b.state == BuildState::Runnable {
                s.remember_request(b.id);
            }
            Ok(())
        })?;
        // Builds waiting on each producer (its tie-break), now that every producer is known.
        let counts: Vec<(u64, usize)> = s
            .waiting
            .iter()
            .filter_map(|(p, set)| Some((*s.producers.get(p)?, set.len())))
            .collect();
        runnable(chunk);
        let mut changed = std::collections::BTreeSet::new();
        for (producer, n) in counts {
            if let Some(l) = s.live.get_mut(&producer) {
                l.rdeps = l.rdeps.saturating_add(n.min(u32::MAX as usize) as u32);
                if l.state == BuildState::Runnable {
                    changed.insert(producer);
                }
            }
        }
        // Derived priorities are not stored: recompute them from the own priorities.
        changed.extend(s.compute_effective(&missing_of)?);
        drop(missing_of);
        let rekeyed = changed
            .into_iter()
            .filter_map(|id| Some(s.live.get(&id)?.entry(id)))
            .collect();
        if migrate {
            if let Some(last) = migration.last_mut() {
                last.put_raw(TreeId::Meta, meta::OUTPUT_BUILDS_INDEXED, &u64_key(1));
            }
            s.migration = migration;
        }
        Ok((s, rekeyed))
    }

    /// Index writes the load found missing (a state dir from before the `output_builds`
    /// index): the actor commits them before it serves.
    pub fn take_migration(&mut self) -> Vec<Batch> {
        std::mem::take(&mut self.migration)
    }
}
