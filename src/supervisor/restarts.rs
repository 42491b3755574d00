//! Restart counters per actor, shared by the actors (which count their own restarts in
//! `Supervised::restarting`) and exported as `kiln_actor_restarts_total{actor}`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Restarts seen so far, by actor name, with their times (for the restart intensity).
#[derive(Debug, Default)]
pub struct Restarts {
    inner: Mutex<HashMap<&'static str, Vec<Instant>>>,
}

impl Restarts {
    pub fn new() -> Restarts {
        Restarts::default()
    }

    /// Count one restart of `actor`.
    pub fn record(&self, actor: &'static str) {
        metrics::counter!("kiln_actor_restarts_total", "actor" => actor).increment(1);
        tracing::warn!(actor, "actor restarting; reloading its state from sled");
        if let Ok(mut m) = self.inner.lock() {
            m.entry(actor).or_default().push(Instant::now());
        }
    }

    /// Restarts of `actor` so far.
    pub fn count(&self, actor: &str) -> u64 {
        self.inner
            .lock()
            .map(|m| m.get(actor).map_or(0, |v| v.len() as u64))
            .unwrap_or(0)
    }

    /// Restarts of `actor` within the last `window`.
    pub fn recent(&self, actor: &str, window: std::time::Duration) -> usize {
        let now = Instant::now();
        self.inner
            .lock()
            .map(|m| {
                m.get(actor).map_or(0, |v| {
                    v.iter()
                        .filter(|t| now.duration_since(**t) <= window)
                        .count()
                })
            })
            .unwrap_or(0)
    }
}
