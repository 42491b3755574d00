//! Restart counters per actor and the restart intensity, shared by the actors (each counts its
//! own restarts in `Supervised::restarting`, through [`super::guard::restart`]) and by
//! `kiln coordinator`, which waits for [`Restarts::gave_up`] to shut down. They live here, next
//! to the actors, so an actor never imports the supervisor that starts it.
//!
//! The intensity is Erlang/OTP's: at most `max_restarts` restarts of one actor kind within
//! `window`. The restart that goes past it escalates: one clear log line naming the actor and
//! the counts, then the coordinator stops its listeners, drains the committer and exits with
//! [`EXIT_RESTART_INTENSITY`]. Never a silent restart loop.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Exit status of `kiln coordinator` after the restart intensity was exceeded
/// (`EX_SOFTWARE` of sysexits.h: an internal error the process could not recover from).
pub const EXIT_RESTART_INTENSITY: i32 = 70;

/// At most `max_restarts` restarts of one actor within `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    pub max_restarts: u32,
    pub window: Duration,
}

impl Default for Intensity {
    fn default() -> Intensity {
        Intensity {
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// Why the coordinator gave up: the actor, and what it did within the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp {
    pub actor: &'static str,
    /// Restarts within the window, counting the one that went past the limit (or, for a
    /// restart that could not rebuild its actor, the restarts so far).
    pub restarts: usize,
    pub reason: String,
}

#[derive(Debug, Default)]
struct Counts {
    total: u64,
    /// Times of the restarts within the window (older ones are pruned on each restart).
    recent: VecDeque<Instant>,
}

/// Restarts seen so far, by actor kind (`build_queue`, `allocator`, `agent_registry`,
/// `agent_session` (all sessions together), `event_log`, `hook_processor`).
#[derive(Debug)]
pub struct Restarts {
    intensity: Intensity,
    inner: Mutex<HashMap<&'static str, Counts>>,
    /// Set once, by the first escalation; `kiln coordinator` waits for it.
    gave_up: OnceLock<GaveUp>,
    notify: Notify,
}

impl Default for Restarts {
    fn default() -> Restarts {
        Restarts::new(Intensity::default())
    }
}

impl Restarts {
    pub fn new(intensity: Intensity) -> Restarts {
        Restarts {
            intensity,
            inner: Mutex::new(HashMap::new()),
            gave_up: OnceLock::new(),
            notify: Notify::new(),
        }
    }

    pub fn intensity(&self) -> Intensity {
        self.intensity
    }

    /// Count one restart of `actor`. Returns `false`, after escalating, when this restart goes
    /// past the restart intensity.
    pub fn record(&self, actor: &'static str) -> bool {
        metrics::counter!("kiln_actor_restarts_total", "actor" => actor).increment(1);
        let now = Instant::now();
        let recent = {
            // A poisoned lock only means another thread panicked while counting; the counts
            // are plain numbers and stay usable.
            let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let c = m.entry(actor).or_default();
            c.total += 1;
            c.recent.push_back(now);
            while c
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > self.intensity.window)
            {
                c.recent.pop_front();
            }
            c.recent.len()
        };
        tracing::warn!(
            actor,
            restarts_in_window = recent,
            max_restarts = self.intensity.max_restarts,
            window_s = self.intensity.window.as_secs(),
            "actor restarting; rebuilding it from sled"
        );
        if recent > self.intensity.max_restarts as usize {
            self.escalate(GaveUp {
                actor,
                restarts: recent,
                reason: format!(
                    "{recent} restarts within {} s, more than the {} allowed ([supervision] max_restarts, window_s)",
                    self.intensity.window.as_secs(),
                    self.intensity.max_restarts
                ),
            });
            return false;
        }
        true
    }

    /// Give up: log one clear line and wake whoever waits in [`Restarts::gave_up`]. Only the
    /// first escalation is kept.
    pub fn escalate(&self, why: GaveUp) {
        if self.gave_up.set(why.clone()).is_ok() {
            tracing::error!(
                actor = why.actor,
                restarts = why.restarts,
                max_restarts = self.intensity.max_restarts,
                window_s = self.intensity.window.as_secs(),
                reason = %why.reason,
                "restart intensity exceeded; shutting the coordinator down"
            );
            // notify_one keeps a permit when nobody waits yet.
            self.notify.notify_one();
        }
    }

    /// Resolves once an actor went past the restart intensity (or could not be rebuilt).
    pub async fn gave_up(&self) -> GaveUp {
        loop {
            if let Some(g) = self.gave_up.get() {
                return g.clone();
            }
            self.notify.notified().await;
        }
    }

    /// The escalation, if one happened.
    pub fn has_given_up(&self) -> Option<GaveUp> {
        self.gave_up.get().cloned()
    }

    /// Restarts of `actor` so far.
    pub fn count(&self, actor: &str) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(actor)
            .map_or(0, |c| c.total)
    }

    /// Restarts of `actor` within the last `window`.
    pub fn recent(&self, actor: &str, window: Duration) -> usize {
        let now = Instant::now();
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(actor)
            .map_or(0, |c| {
                c.recent
                    .iter()
                    .filter(|t| now.duration_since(**t) <= window)
                    .count()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_past_the_intensity_escalates_once_and_names_the_actor() {
        let r = Restarts::new(Intensity {
            max_restarts: 2,
            window: Duration::from_secs(3600),
        });
        assert!(r.record("allocator"));
        assert!(r.record("allocator"));
        // Another actor's restarts do not count against the allocator.
        assert!(r.record("event_log"));
        assert!(r.has_given_up().is_none());
        assert!(!r.record("allocator"), "the third restart is one too many");
        let g = r.has_given_up().expect("escalated");
        assert_eq!((g.actor, g.restarts), ("allocator", 3));
        assert!(
            g.reason.contains("3 restarts within 3600 s"),
            "{}",
            g.reason
        );
        // A later escalation does not replace the first.
        r.escalate(GaveUp {
            actor: "hook_processor",
            restarts: 1,
            reason: "x".into(),
        });
        assert_eq!(r.has_given_up().unwrap().actor, "allocator");
        assert_eq!(r.count("allocator"), 3);
        assert_eq!(r.recent("allocator", Duration::from_secs(3600)), 3);
    }

    #[test]
    fn restarts_older_than_the_window_do_not_count() {
        let r = Restarts::new(Intensity {
            max_restarts: 1,
            window: Duration::ZERO,
        });
        // With a zero window each restart is alone in it (Instant::now() moves on, or equals:
        // `>` keeps equal instants, so two restarts in the same instant would count 2).
        assert!(r.record("allocator"));
        std::thread::sleep(Duration::from_millis(2));
        assert!(r.record("allocator"));
        assert_eq!(r.count("allocator"), 2);
        assert!(r.has_given_up().is_none());
    }

    #[test]
    fn gave_up_resolves_even_when_the_escalation_came_first() {
        let r = Restarts::new(Intensity {
            max_restarts: 0,
            window: Duration::from_secs(60),
        });
        assert!(!r.record("build_queue"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let g = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), r.gave_up())
                .await
                .expect("gave_up resolves")
        });
        assert_eq!(g.actor, "build_queue");
    }
}
