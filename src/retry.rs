//! The one retry policy of Kiln: exponential backoff with full jitter and a cap, and the
//! reading of `Retry-After`. The agent (every network call), the coordinator's hook retries and
//! the client (`kiln …` commands) all take their waits from here, so they back off the same
//! way and honour `Retry-After` the same way.
//!
//! Full jitter (as in "Exponential Backoff And Jitter", AWS architecture blog, 2015): the n-th
//! wait is drawn uniformly from `[0, min(cap, initial · 2^(n−1))]`. Many clients that failed
//! together (every agent of a farm after a coordinator restart) then come back spread over the
//! whole window instead of in synchronised waves.
//!
//! The exponential sequence itself comes from the `backoff` crate, which RustSec flags as
//! unmaintained: this module is its only user in the workspace (the agent reaches it through
//! `kiln` with default features off), so replacing it is a one-file change. It stays free of
//! actix and sled, so the agent can use it.

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff;
use rand::Rng as _;

/// Longest `Retry-After` honoured: a larger value (from a confused proxy, say) is clamped, so
/// that nothing parks for hours on one header.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A retry policy: the first wait's ceiling, the cap on every wait's ceiling, and an optional
/// bound on the total time spent retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Ceiling of the first wait; each later ceiling doubles.
    pub initial: Duration,
    /// No wait's ceiling goes above this.
    pub cap: Duration,
    /// `None`: retry for as long as the caller keeps asking.
    pub max_elapsed: Option<Duration>,
}

impl Policy {
    /// The agent's calls: 200 ms, doubling, capped at 30 s, forever (the coordinator may be
    /// restarting, and the agent keeps its results until it is back).
    pub const AGENT: Policy = Policy {
        initial: Duration::from_millis(200),
        cap: Duration::from_secs(30),
        max_elapsed: None,
    };

    /// The coordinator's hook runs: 1 s, doubling, capped at 60 s; the number of attempts is
    /// the hook's `max_attempts`.
    pub const HOOKS: Policy = Policy {
        initial: Duration::from_secs(1),
        cap: Duration::from_secs(60),
        max_elapsed: None,
    };

    /// The client commands: 500 ms, doubling, capped at 5 s; a person is waiting, so the
    /// caller bounds the number of attempts.
    pub const CLIENT: Policy = Policy {
        initial: Duration::from_millis(500),
        cap: Duration::from_secs(5),
        max_elapsed: None,
    };

    /// A fresh sequence of waits for one operation.
    pub fn backoff(&self) -> JitteredBackoff {
        JitteredBackoff {
            inner: self.ceilings(self.max_elapsed),
        }
    }

    /// The plain exponential sequence of ceilings. The crate's own jitter ("± a factor around
    /// the interval") is off: full jitter is applied on top instead.
    fn ceilings(&self, max_elapsed: Option<Duration>) -> backoff::ExponentialBackoff {
        backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(self.initial)
            .with_max_interval(self.cap)
            .with_multiplier(2.0)
            .with_randomization_factor(0.0)
            .with_max_elapsed_time(max_elapsed)
            .build()
    }

    /// The wait before retry number `attempt` (1 = the first retry) of a caller that keeps no
    /// sequence of its own (the hook processor stores only the attempt count): drawn uniformly
    /// from `[0, min(cap, initial · 2^(attempt−1))]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let mut seq = self.ceilings(None);
        let mut ceiling = self.initial.min(self.cap);
        // Past the cap every ceiling is the cap: stop there, so a huge count costs nothing.
        for _ in 0..attempt.max(1) {
            match seq.next_backoff() {
                Some(c) => ceiling = c,
                None => break,
            }
            if ceiling >= self.cap {
                break;
            }
        }
        full_jitter(ceiling)
    }

    /// The wait to use: what the server asked for in `Retry-After` (clamped to
    /// [`MAX_RETRY_AFTER`]) when it did, else `next` from the backoff.
    pub fn wait(next: Duration, retry_after: Option<Duration>) -> Duration {
        retry_after.map_or(next, |r| r.min(MAX_RETRY_AFTER))
    }
}

impl Default for Policy {
    /// [`Policy::AGENT`]: no bound on the total time.
    fn default() -> Policy {
        Policy::AGENT
    }
}

/// The exponential sequence of the `backoff` crate with full jitter applied to each wait.
#[derive(Debug, Clone)]
pub struct JitteredBackoff {
    inner: backoff::ExponentialBackoff,
}

impl Backoff for JitteredBackoff {
    fn next_backoff(&mut self) -> Option<Duration> {
        self.inner.next_backoff().map(full_jitter)
    }

    fn reset(&mut self) {
        self.inner.reset();
    }
}

impl JitteredBackoff {
    /// The next wait, or `None` once the policy's `max_elapsed` is spent.
    pub fn next_wait(&mut self) -> Option<Duration> {
        self.next_backoff()
    }
}

fn full_jitter(ceiling: Duration) -> Duration {
    let ms = ceiling.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// Parses a `Retry-After` value: delay-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`, relative to `now`; a date in the past means "now").
/// Anything else is `None`, and the normal backoff applies.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_under_a_doubling_ceiling_and_the_cap() {
        let p = Policy {
            initial: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
            max_elapsed: None,
        };
        let mut b = p.backoff();
        let ceilings = [100u64, 200, 400, 800, 1000, 1000, 1000];
        for (i, c) in ceilings.iter().enumerate() {
            let w = b.next_wait().unwrap();
            assert!(
                w <= Duration::from_millis(*c),
                "wait {i} is {w:?}, over its ceiling {c} ms"
            );
        }
        for attempt in 1..100 {
            assert!(p.delay(attempt) <= Duration::from_millis(1000));
        }
        assert!(p.delay(1) <= Duration::from_millis(100));
        assert!(p.delay(3) <= Duration::from_millis(400));
    }

    #[test]
    fn the_jitter_is_full_not_a_band_around_the_interval() {
        // Over many draws of a 1 s ceiling, some waits fall in the lowest tenth and some in
        // the highest: the whole window is used. (1000 draws: the chance that either tenth
        // stays empty is about 2 · 0.9^1000, i.e. nil.)
        let p = Policy {
            initial: Duration::from_secs(1),
            cap: Duration::from_secs(1),
            max_elapsed: None,
        };
        let draws: Vec<Duration> = (0..1000).map(|_| p.delay(1)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(900)));
    }

    #[test]
    fn max_elapsed_ends_the_sequence() {
        let p = Policy {
            initial: Duration::from_millis(1),
            cap: Duration::from_millis(1),
            max_elapsed: Some(Duration::ZERO),
        };
        let mut b = p.backoff();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(b.next_wait(), None);
    }

    #[test]
    fn retry_after_replaces_the_backoff_and_is_clamped() {
        let next = Duration::from_millis(123);
        assert_eq!(Policy::wait(next, None), next);
        assert_eq!(
            Policy::wait(next, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            Policy::wait(next, Some(Duration::from_secs(86_400))),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn retry_after_parsing() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(" 12 ", now),
            Some(Duration::from_secs(12))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }
}
