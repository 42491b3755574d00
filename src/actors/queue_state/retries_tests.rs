//! Unit tests of automatic retries and deferral (`retries.rs`) on a real sled store and a real
//! committer: infrastructure failures requeue with backoff up to the cap, builder failures
//! are final unless configured, deferrals hold builds back until the timer wakes them, a
//! re-adoption ends a backoff without counting, and a reload keeps counts and deferrals.
//! Times are explicit (`now` arguments).

use super::tests::{built, held, kinds, target, Fixture};
use super::*;
use crate::protocol::{FailureKind, HeldPhase};

fn policy(infrastructure: u32, builder: u32) -> RetryConfig {
    RetryConfig {
        infrastructure,
        builder,
        backoff_initial_ms: 1_000,
        backoff_max_ms: 1_500,
    }
}

fn ids_of(entries: &[RunnableEntry]) -> Vec<BuildId> {
    entries.iter().map(|e| e.id).collect()
}

/// Lease `id` to `agent` at `now` and commit; the attempt.
fn lease(f: &mut Fixture, agent: u64, id: BuildId, now: u64) -> u32 {
    let (fx, got) = f.q.allocate(agent, None, &[id], now).unwrap();
    assert_eq!(got.leased.len(), 1, "build {id} was not leased at {now}");
    f.commit(fx);
    got.leased[0].attempt
}

/// The backoff doubles from the second retry on and is capped; the first retry waits nothing.
#[test]
fn backoff_is_none_then_doubling_then_capped() {
    let p = RetryConfig {
        infrastructure: 9,
        builder: 0,
        backoff_initial_ms: 1_000,
        backoff_max_ms: 5_000,
    };
    let waits: Vec<u64> = (1..=6).map(|n| p.backoff_ms(n)).collect();
    assert_eq!(waits, vec![0, 1_000, 2_000, 4_000, 5_000, 5_000]);
    assert_eq!(p.backoff_ms(u32::MAX), 5_000);
}

/// An agent lost twice: the first release is retried at once, the second waits out the
/// backoff (not allocatable, not in the allocator's fill, until the timer wakes it), then it
/// is leased with a new attempt. The record keeps the count and the "not before".
#[test]
fn a_lost_agent_requeues_with_backoff_and_the_build_waits_for_it() {
    let (mut f, ids) = Fixture::new(&["a"]);
    f.q.set_retry(policy(3, 0));
    let a = ids[0];
    assert_eq!(lease(&mut f, 7, a, 10), 1);
    let fx = f.q.agent_lost(7, 100).unwrap();
    assert_eq!(kinds(&fx), vec!["lease-expired", "agent-lost"]);
    assert_eq!(ids_of(&fx.runnable), vec![a], "the first retry is at once");
    f.commit(fx);
    assert_eq!(f.q.record(a).unwrap().unwrap().retries, 1);
    assert_eq!(lease(&mut f, 8, a, 200), 2);
    let fx = f.q.agent_lost(8, 300).unwrap();
    assert!(fx.runnable.is_empty(), "in backoff: not offered");
    f.commit(fx);
    let r = f.q.record(a).unwrap().unwrap();
    assert_eq!(
        (r.state, r.retries, r.defer_until_ms),
        (BuildState::Runnable, 2, 1_300)
    );
    assert!(f.q.is_deferred(a));
    assert!(f.q.runnable().is_empty());
    assert_eq!(f.q.next_wake(), Some(1_300));
    // A stale proposal of it is not leased.
    let (_, got) = f.q.allocate(9, None, &[a], 400).unwrap();
    assert!(got.leased.is_empty());
    assert!(f.q.wake(1_299).is_empty());
    assert_eq!(ids_of(&f.q.wake(1_300)), vec![a]);
    assert_eq!(f.q.next_wake(), None);
    assert_eq!(ids_of(&f.q.runnable()), vec![a]);
    assert_eq!(lease(&mut f, 9, a, 1_300), 3);
}

/// The cap: with one infrastructure retry, the second failure fails the build with the
/// reason, and the build waiting on it fails behind it. The agent, back with the build, is
/// told to abandon it.
#[test]
fn the_infrastructure_cap_reached_fails_the_build_with_the_reason() {
    let (mut f, ids) = Fixture::new(&["a"]);
    f.q.set_retry(policy(1, 0));
    let a = ids[0];
    let (fx, dep) =
        f.q.submit(vec![target("d", &["a"])], vec![], 0, vec![], 2)
            .unwrap();
    f.commit(fx);
    let d = dep[0].id;
    assert_eq!(f.state(d), BuildState::Blocked);
    lease(&mut f, 7, a, 10);
    let fx = f.q.agent_lost(7, 20).unwrap();
    f.commit(fx);
    lease(&mut f, 8, a, 30);
    let fx = f.q.agent_lost(8, 40).unwrap();
    assert_eq!(
        kinds(&fx),
        vec![
            "lease-expired",
            "build-failed",
            "build-failed",
            "agent-lost"
        ]
    );
    assert_eq!(fx.unrunnable, vec![a]);
    assert!(fx.runnable.is_empty());
    f.commit(fx);
    let r = f.q.record(a).unwrap().unwrap();
    assert_eq!(r.state, BuildState::Failed);
    assert_eq!(r.retries, 2);
    assert_eq!(
        r.reason,
        "gave up after 2 infrastructure failures (1 retries; last: agent lost)"
    );
    assert_eq!(f.state(d), BuildState::Failed);
    assert!(f.q.live_entry(a).is_none());
    let (_, cmds) =
        f.q.reconcile(8, &[held(a, 2, HeldPhase::Building)], Unheld::Release, 50)
            .unwrap();
    assert_eq!(
        cmds,
        vec![crate::protocol::AgentCommand::Abandon {
            build_id: a,
            attempt: 2
        }]
    );
}

/// A setup failure reported by the agent is an infrastructure failure: requeued (answered
/// as such, the agent drops it), counted, and past the cap the build fails naming it.
#[test]
fn reported_setup_failures_are_retried_then_fail_the_build() {
    let (mut f, ids) = Fixture::new(&["a"]);
    f.q.set_retry(policy(1, 0));
    let a = ids[0];
    let setup = || Err(("input missing".to_string(), FailureKind::Setup));
    lease(&mut f, 7, a, 10);
    let (fx, answer) =
        f.q.finish_scanned(7, a, 1, setup(), 0, None, &[], 20)
            .unwrap();
    assert!(matches!(answer, FinishAnswer::Requeued), "{answer:?}");
    assert_eq!(ids_of(&fx.runnable), vec![a]);
    assert!(kinds(&fx).contains(&"lease-expired"));
    f.commit(fx);
    let r = f.q.record(a).unwrap().unwrap();
    assert_eq!(
        (r.state, r.retries, r.agent_id),
        (BuildState::Runnable, 1, 0)
    );
    // The same report again is stale: the agent no longer holds the build.
    assert!(matches!(
        f.q.finish_scanned(7, a, 1, setup(), 0, None, &[], 21),
        Err(QueueError::StaleAttempt { .. })
    ));
    lease(&mut f, 7, a, 30);
    let (fx, answer) =
        f.q.finish_scanned(7, a, 2, setup(), 0, None, &[], 40)
            .unwrap();
    assert!(matches!(answer, FinishAnswer::Accepted), "{answer:?}");
    f.commit(fx);
    let r = f.q.record(a).unwrap().unwrap();
    assert_eq!(r.state, BuildState::Failed);
    assert_eq!(
        r.reason,
        "gave up after 2 infrastructure failures (1 retries; last: setup failure: input missing)"
    );
}

/// A builder failure is final by default (the agent's reason, nothing counted); with
/// `builder = 1` the first is retried and the second fails the build, saying so.
#[test]
fn builder_failures_are_final_unless_retries_are_configured() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    f.q.set_retry(policy(3, 0));
    lease(&mut f, 7, ids[0], 10);
    let (fx, answer) = f.q.finish(7, ids[0], 1, Err("boom".into()), 0, 20).unwrap();
    assert!(matches!(answer, FinishAnswer::Accepted));
    f.commit(fx);
    let r = f.q.record(ids[0]).unwrap().unwrap();
    assert_eq!(
        (r.state, r.reason.as_str(), r.builder_retries),
        (BuildState::Failed, "boom", 0)
    );

    f.q.set_retry(policy(3, 1));
    let b = ids[1];
    lease(&mut f, 7, b, 30);
    let (fx, answer) = f.q.finish(7, b, 1, Err("boom".into()), 0, 40).unwrap();
    assert!(matches!(answer, FinishAnswer::Requeued));
    assert_eq!(ids_of(&fx.runnable), vec![b]);
    f.commit(fx);
    let r = f.q.record(b).unwrap().unwrap();
    assert_eq!(
        (r.state, r.builder_retries, r.retries),
        (BuildState::Runnable, 1, 0)
    );
    lease(&mut f, 7, b, 50);
    let (fx, answer) = f.q.finish(7, b, 2, Err("boom".into()), 0, 60).unwrap();
    assert!(matches!(answer, FinishAnswer::Accepted));
    f.commit(fx);
    let r = f.q.record(b).unwrap().unwrap();
    assert_eq!(r.state, BuildState::Failed);
    assert_eq!(
        r.reason,
        "boom (gave up after 2 builder failures, 1 retries)"
    );
}

/// A submission deferred to a later time: not offered, not allocatable, not in the fill;
/// the timer wakes it at its time. One whose inputs arrive first stays deferred too.
#[test]
fn a_deferred_submission_is_offered_only_when_the_timer_wakes_it() {
    let (mut f, ids) = Fixture::new(&["base"]);
    let (fx, subs) =
        f.q.submit_deferred(
            vec![target("x", &[]), target("y", &["base"])],
            vec![],
            0,
            vec![],
            5_000,
            2,
        )
        .unwrap();
    assert!(fx.runnable.is_empty());
    f.commit(fx);
    let (x, y) = (subs[0].id, subs[1].id);
    assert_eq!(f.q.record(x).unwrap().unwrap().defer_until_ms, 5_000);
    assert_eq!(ids_of(&f.q.runnable()), vec![ids[0]]);
    let (_, got) = f.q.allocate(7, None, &[x], 100).unwrap();
    assert!(got.leased.is_empty());
    // y's input is built before its time: runnable, but still held back.
    lease(&mut f, 7, ids[0], 200);
    f.uploaded("base");
    let (fx, _) = f.q.finish(7, ids[0], 1, Ok(built("base")), 0, 300).unwrap();
    assert!(fx.runnable.is_empty(), "{:?}", ids_of(&fx.runnable));
    f.commit(fx);
    assert_eq!(f.state(y), BuildState::Runnable);
    assert!(f.q.wake(4_999).is_empty());
    assert_eq!(ids_of(&f.q.wake(5_000)), vec![x, y]);
    assert_eq!(lease(&mut f, 7, x, 5_000), 1);
    // A past time is no deferral.
    let (fx, subs) =
        f.q.submit_deferred(vec![target("z", &[])], vec![], 0, vec![], 10, 6_000)
            .unwrap();
    assert_eq!(ids_of(&fx.runnable), vec![subs[0].id]);
    f.commit(fx);
    assert_eq!(f.q.record(subs[0].id).unwrap().unwrap().defer_until_ms, 0);
}

/// The agent that lost a build comes back still running it during the backoff: it is
/// re-adopted (same attempt), out of the backoff, and the count the release added stays.
#[test]
fn a_readoption_ends_the_backoff_and_is_not_a_new_failure() {
    let (mut f, ids) = Fixture::new(&["a"]);
    f.q.set_retry(policy(3, 0));
    let a = ids[0];
    lease(&mut f, 7, a, 10);
    let fx = f.q.agent_lost(7, 20).unwrap();
    f.commit(fx);
    lease(&mut f, 8, a, 30);
    let fx = f.q.agent_lost(8, 40).unwrap();
    f.commit(fx);
    assert!(f.q.is_deferred(a));
    let (fx, cmds) =
        f.q.reconcile(8, &[held(a, 2, HeldPhase::Building)], Unheld::Release, 50)
            .unwrap();
    assert!(cmds.is_empty());
    assert_eq!(kinds(&fx), vec!["lease-readopted"]);
    f.commit(fx);
    assert!(!f.q.is_deferred(a));
    assert_eq!(f.q.next_wake(), None);
    let r = f.q.record(a).unwrap().unwrap();
    assert_eq!(
        (r.state, r.attempt, r.retries),
        (BuildState::Allocated, 2, 2)
    );
}

/// A restart (reload from sled) keeps the counts and the deferral: before its time the build
/// is on the timer and out of the allocator's fill; a reload after its time offers it.
#[test]
fn a_reload_keeps_retries_and_deferrals() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    f.q.set_retry(policy(3, 0));
    let a = ids[0];
    lease(&mut f, 7, a, 10);
    let fx = f.q.agent_lost(7, 20).unwrap();
    f.commit(fx);
    lease(&mut f, 8, a, 30);
    let fx = f.q.agent_lost(8, 40).unwrap();
    f.commit(fx);
    let (fx, subs) =
        f.q.submit_deferred(vec![target("c", &[])], vec![], 0, vec![], 9_000, 50)
            .unwrap();
    f.commit(fx);
    let c = subs[0].id;
    let symbols = || Arc::new(Symbols::default());
    f.q = QueueState::load_at(f.store.clone(), symbols(), 100).unwrap();
    let r = f.q.record(a).unwrap().unwrap();
    assert_eq!((r.retries, r.defer_until_ms), (2, 1_040));
    assert!(f.q.is_deferred(a) && f.q.is_deferred(c));
    assert_eq!(ids_of(&f.q.runnable()), vec![ids[1]]);
    assert_eq!(f.q.next_wake(), Some(1_040));
    assert_eq!(ids_of(&f.q.wake(1_040)), vec![a]);
    f.q = QueueState::load_at(f.store.clone(), symbols(), 9_000).unwrap();
    assert!(!f.q.is_deferred(a) && !f.q.is_deferred(c));
    assert_eq!(ids_of(&f.q.runnable()), vec![a, ids[1], c]);
    assert_eq!(f.q.live_entry(a).unwrap().retries, 2);
}
