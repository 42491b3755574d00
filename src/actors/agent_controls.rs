//! Operators' and the coordinator's controls on an agent: its mode (`active`, `paused`,
//! `draining`, set by `kiln agent pause|drain|resume`), its quarantine after consecutive
//! infrastructure failures, and the rule that picks agents to expire. [`AgentControls`] is
//! the in-memory map every agent's session reads on each work request (O(1)); the
//! [`super::registry::AgentRegistry`] alone changes it, and persists each change that must
//! survive a restart in the `agent_controls` tree ([`AgentControlRecord`]).
//!
//! The rules are plain functions of [`Control`] and the clock, tested below without actors:
//! - an agent gets work only when `active` and not quarantined;
//! - each infrastructure failure counts; at `agents.quarantine_after` in a row the agent is
//!   quarantined for `agents.quarantine_ms`, doubled for each further quarantine without a
//!   success in between, capped at `agents.quarantine_max_ms`; the count starts again;
//! - a success resets the count and the doubling (a quarantine under way runs to its end);
//! - `resume` makes the agent active, lifts a quarantine and resets both.
//!
//! Failure counts live in memory only (a restart forgives them); the mode, the quarantine's
//! end and its level, and when the agent last opened a session are stored.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::AgentsConfig;
use crate::protocol::AgentId;
use crate::store::records::AgentControlRecord;

/// What the operator set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Active,
    /// Takes no new work; keeps the builds it holds running.
    Paused,
    /// Finishes the builds it holds, takes no new work; `drained` once it holds none.
    Draining,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Active => "active",
            Mode::Paused => "paused",
            Mode::Draining => "draining",
        }
    }

    fn code(self) -> u8 {
        match self {
            Mode::Active => 0,
            Mode::Paused => 1,
            Mode::Draining => 2,
        }
    }

    /// An unknown code (a newer kiln's) reads as paused: the agent gets no work until an
    /// operator resumes it, never work it was not meant to get.
    fn from_code(c: u8) -> Mode {
        match c {
            0 => Mode::Active,
            2 => Mode::Draining,
            _ => Mode::Paused,
        }
    }
}

/// The quarantine policy (`[agents]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// 0 = quarantine off.
    pub after: u32,
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Policy {
    pub fn from_config(c: &AgentsConfig) -> Policy {
        Policy {
            after: c.quarantine_after,
            base_ms: c.quarantine_ms,
            max_ms: c.quarantine_max_ms.max(c.quarantine_ms),
        }
    }

    /// The length of quarantine number `level` (0 = the first): doubling, capped.
    pub fn pause_ms(&self, level: u32) -> u64 {
        let factor = 1u64.checked_shl(level.min(63)).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.max_ms)
    }
}

/// One agent's controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    pub mode: Mode,
    /// Infrastructure failures in a row since the last success, quarantine or resume.
    pub failures: u32,
    /// Quarantines since the last success or resume: the next one lasts `pause_ms(level)`.
    pub level: u32,
    /// When the quarantine under way ends (wall clock, ms); 0 = none.
    pub quarantined_until_ms: u64,
    /// When the agent last opened a session (wall clock, ms); 0 = never since this tree exists.
    pub last_seen_ms: u64,
}

impl Control {
    pub fn quarantined(&self, now_ms: u64) -> bool {
        self.quarantined_until_ms > now_ms
    }

    pub fn accepts_work(&self, now_ms: u64) -> bool {
        self.mode == Mode::Active && !self.quarantined(now_ms)
    }

    /// Count an infrastructure failure; the length of the quarantine it starts, if it does.
    pub fn failure(&mut self, policy: &Policy, now_ms: u64) -> Option<u64> {
        if policy.after == 0 {
            return None;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures < policy.after {
            return None;
        }
        let pause = policy.pause_ms(self.level);
        self.failures = 0;
        self.level = self.level.saturating_add(1);
        self.quarantined_until_ms = now_ms.saturating_add(pause).max(self.quarantined_until_ms);
        Some(pause)
    }

    /// A success: the count and the doubling start again. True when the stored part changed.
    pub fn success(&mut self) -> bool {
        self.failures = 0;
        std::mem::replace(&mut self.level, 0) != 0
    }

    /// `kiln agent resume`: active, no quarantine, nothing counted.
    pub fn resume(&mut self) {
        self.mode = Mode::Active;
        self.failures = 0;
        self.level = 0;
        self.quarantined_until_ms = 0;
    }

    pub fn record(&self) -> AgentControlRecord {
        AgentControlRecord {
            mode: self.mode.code(),
            quarantine_level: self.level,
            quarantined_until_ms: self.quarantined_until_ms,
            last_seen_ms: self.last_seen_ms,
        }
    }

    pub fn from_record(r: &AgentControlRecord) -> Control {
        Control {
            mode: Mode::from_code(r.mode),
            failures: 0,
            level: r.quarantine_level,
            quarantined_until_ms: r.quarantined_until_ms,
            last_seen_ms: r.last_seen_ms,
        }
    }
}

/// Whether an agent is due to expire: `expire_after_ms` (0 = never) has passed since the
/// latest of its creation, its last session opening (stored) and the last request this
/// coordinator run heard from it (`heard_ms_ago`, from the in-memory liveness).
pub fn expired(
    expire_after_ms: u64,
    created_ms: u64,
    last_seen_ms: u64,
    heard_ms_ago: Option<u64>,
    now_ms: u64,
) -> bool {
    if expire_after_ms == 0 {
        return false;
    }
    if heard_ms_ago.is_some_and(|ago| ago < expire_after_ms) {
        return false;
    }
    let last = created_ms.max(last_seen_ms);
    now_ms.saturating_sub(last) >= expire_after_ms
}

/// Every agent's [`Control`], by id; agents without an entry are active. Shared by the
/// registry (the only writer) and the sessions (readers); kept through a registry restart.
pub struct AgentControls {
    inner: Mutex<HashMap<AgentId, Control>>,
    pub policy: Policy,
    /// When this coordinator started (ms): the "last seen" of an agent with no stored session
    /// opening (one registered before this tree existed may have been connected until the
    /// restart, so its expiry clock starts now, not at its creation).
    pub started_ms: u64,
}

impl AgentControls {
    pub fn new(policy: Policy, loaded: HashMap<AgentId, Control>) -> AgentControls {
        AgentControls {
            inner: Mutex::new(loaded),
            policy,
            started_ms: crate::store::now_ms(),
        }
    }

    /// When `agent` was last known to be there, as stored: its last session opening, else
    /// this coordinator's start.
    pub fn stored_last_seen(&self, agent: AgentId) -> u64 {
        match self.get(agent).last_seen_ms {
            0 => self.started_ms,
            t => t,
        }
    }

    pub fn get(&self, agent: AgentId) -> Control {
        self.lock().get(&agent).copied().unwrap_or_default()
    }

    pub fn accepts_work(&self, agent: AgentId, now_ms: u64) -> bool {
        self.get(agent).accepts_work(now_ms)
    }

    /// Change one agent's controls; returns what `f` returns and the new state.
    pub(super) fn update<T>(
        &self,
        agent: AgentId,
        f: impl FnOnce(&mut Control) -> T,
    ) -> (T, Control) {
        let mut m = self.lock();
        let c = m.entry(agent).or_default();
        let out = f(c);
        (out, *c)
    }

    pub(super) fn remove(&self, agent: AgentId) {
        self.lock().remove(&agent);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AgentId, Control>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a failed build's reason names an infrastructure failure (the agent could not set
/// the build up or deliver it), as opposed to the builder failing: the agent's reasons
/// `failed to fetch input ...`, `agent error: ...` and `upload of output ...`.
pub fn infrastructure_failure(reason: &str) -> bool {
    reason.starts_with("failed to fetch input ")
        || reason.starts_with("agent error: ")
        || reason.starts_with("upload of output ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        after: 3,
        base_ms: 60_000,
        max_ms: 3_600_000,
    };

    #[test]
    fn quarantine_starts_at_the_nth_failure_in_a_row() {
        let mut c = Control::default();
        assert_eq!(c.failure(&POLICY, 1000), None);
        assert_eq!(c.failure(&POLICY, 1000), None);
        assert!(c.accepts_work(1000));
        assert_eq!(c.failure(&POLICY, 1000), Some(60_000));
        assert!(!c.accepts_work(1000));
        assert!(c.quarantined(60_999));
        assert!(!c.quarantined(61_000));
        assert!(c.accepts_work(61_000));
        assert_eq!(c.failures, 0, "the count starts again after a quarantine");
    }

    #[test]
    fn a_success_resets_the_count_and_the_doubling() {
        let mut c = Control::default();
        c.failure(&POLICY, 0);
        c.failure(&POLICY, 0);
        assert!(!c.success(), "no quarantine yet: nothing stored changes");
        assert_eq!(c.failure(&POLICY, 0), None);
        assert_eq!(c.failure(&POLICY, 0), None);
        assert_eq!(c.failure(&POLICY, 0), Some(60_000));
        assert!(c.success());
        assert_eq!(c.level, 0);
        for _ in 0..2 {
            assert_eq!(c.failure(&POLICY, 100_000), None);
        }
        assert_eq!(
            c.failure(&POLICY, 100_000),
            Some(60_000),
            "back to the first length"
        );
    }

    #[test]
    fn pauses_double_up_to_the_cap() {
        let mut c = Control::default();
        let mut pauses = Vec::new();
        for _ in 0..9 {
            for _ in 0..3 {
                if let Some(p) = c.failure(&POLICY, 0) {
                    pauses.push(p);
                }
            }
        }
        let min = 60_000;
        assert_eq!(
            pauses,
            vec![
                min,
                2 * min,
                4 * min,
                8 * min,
                16 * min,
                32 * min,
                3_600_000,
                3_600_000,
                3_600_000
            ]
        );
        assert_eq!(POLICY.pause_ms(u32::MAX), 3_600_000, "no overflow");
    }

    #[test]
    fn resume_lifts_everything_and_zero_turns_quarantine_off() {
        let mut c = Control {
            mode: Mode::Draining,
            ..Default::default()
        };
        for _ in 0..3 {
            c.failure(&POLICY, 0);
        }
        assert!(c.quarantined(1));
        c.resume();
        assert!(c.accepts_work(1));
        assert_eq!((c.failures, c.level), (0, 0));
        let off = Policy { after: 0, ..POLICY };
        let mut c = Control::default();
        for _ in 0..100 {
            assert_eq!(c.failure(&off, 0), None);
        }
        assert!(c.accepts_work(0));
    }

    #[test]
    fn paused_and_draining_agents_get_no_work() {
        for (mode, works) in [
            (Mode::Active, true),
            (Mode::Paused, false),
            (Mode::Draining, false),
        ] {
            let c = Control {
                mode,
                ..Default::default()
            };
            assert_eq!(c.accepts_work(0), works, "{mode:?}");
            let back = Control::from_record(&c.record());
            assert_eq!(back, c, "the stored part round-trips");
        }
        assert_eq!(Mode::from_code(9), Mode::Paused);
    }

    #[test]
    fn expiry_selects_agents_not_seen_for_the_period() {
        let day = 86_400_000;
        // Created long ago, never opened a session, not heard from: expires.
        assert!(expired(30 * day, 0, 0, None, 31 * day));
        // Exactly at the period.
        assert!(expired(30 * day, day, 0, None, 31 * day));
        // A session opened recently.
        assert!(!expired(30 * day, 0, 20 * day, None, 31 * day));
        // Created recently.
        assert!(!expired(30 * day, 10 * day, 0, None, 31 * day));
        // Heard from in this run, even if the stored opening is old.
        assert!(!expired(30 * day, 0, 0, Some(1000), 31 * day));
        // Heard from, but long ago.
        assert!(expired(30 * day, 0, 0, Some(30 * day), 31 * day));
        // 0 = never.
        assert!(!expired(0, 0, 0, None, u64::MAX));
    }

    #[test]
    fn infrastructure_failures_are_told_from_build_failures() {
        assert!(infrastructure_failure(
            "failed to fetch input /gnu/store/x-a: connection refused"
        ));
        assert!(infrastructure_failure("agent error: no space left"));
        assert!(infrastructure_failure(
            "upload of output out failed: hash_mismatch: x"
        ));
        assert!(!infrastructure_failure("builder exited with status 1"));
        assert!(!infrastructure_failure("canceled"));
    }
}
