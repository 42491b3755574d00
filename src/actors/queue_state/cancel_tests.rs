//! Unit tests of cancellation (`cancel.rs`) on the real sled store and committer of the
//! queue's test fixture: a running build canceled (lease ended, `cancel` command, late reports
//! of its agent answered without changing anything, reconciliation answering `cancel`, a
//! reload equal to memory), and `--dependents` through a chain.

use super::*;

/// Lease build `id` to agent 7 (attempt 1) and report its start.
fn running(f: &mut Fixture, id: BuildId) {
    let (fx, got) = f.q.allocate(7, Some("r1"), &[id], 10).unwrap();
    assert_eq!(attempts(&got.leased), vec![(id, 1)]);
    f.commit(fx);
    let fx = f.q.advance(7, id, 1, BuildState::Building, 11).unwrap();
    f.commit(fx);
    assert_eq!(f.state(id), BuildState::Building);
}

/// Pins item 1: a running build is canceled at once and for good. Its lease ends (no lease,
/// no request index, nothing runnable), its holder gets `cancel`, and the agent's later
/// reports of that attempt end its retrying without changing the build's state: its log is
/// taken, a failure result is a duplicate that links that log (also while the cancel's commit
/// is in flight: it waits for it), a success result and a start are refused as stale; a heartbeat listing the build is answered
/// `cancel` (before and after the commit), and the lease is not re-adopted. A reload agrees.
#[test]
fn a_running_build_is_canceled_its_lease_ends_and_late_reports_change_nothing() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    let (a, b) = (ids[0], ids[1]);
    running(&mut f, a);
    let (fx, c) = f.q.cancel(a, false, 20).unwrap();
    assert_eq!(c.build.state, BuildState::Canceled);
    assert!(c.dependents.is_empty());
    assert_eq!(
        c.stops,
        vec![(
            7,
            AgentCommand::Cancel {
                build_id: a,
                attempt: 1
            }
        )]
    );
    assert_eq!(kinds(&fx), vec!["build-canceled"]);
    let ev = &fx.batch.events[0].payload;
    assert_eq!(ev["reason"], "canceled by request");
    assert_eq!(
        (ev["agent_id"].as_u64(), ev["attempt"].as_u64()),
        (Some(7), Some(1))
    );
    assert_eq!(ev["was"], "building");
    assert!(
        fx.runnable.is_empty() && fx.unrunnable.is_empty(),
        "not in the index"
    );
    assert!(f.q.leased_to(7).is_empty(), "the lease ended");
    assert!(
        !f.q.known_request(7, "r1"),
        "a retry of r1 gets nothing back"
    );
    assert_eq!(f.q.count(BuildState::Building), 0);
    assert_eq!(f.q.live_len(), 1);

    // Before the commit lands: a heartbeat gets `cancel`; the failure report waits for it.
    let beat = [held(a, 1, HeldPhase::Building)];
    let (rfx, cmds) = f.q.reconcile(7, &beat, Unheld::Release, 21).unwrap();
    assert!(rfx.batch.is_empty(), "nothing to release or re-adopt");
    assert_eq!(
        cmds,
        vec![AgentCommand::Cancel {
            build_id: a,
            attempt: 1
        }]
    );
    let (early, answer) = f.q.finish(7, a, 1, Err("canceled".into()), 1, 22).unwrap();
    assert!(matches!(answer, FinishAnswer::Duplicate));
    let landing = early.after.clone().expect("waits for the cancel's commit");
    assert_eq!(landing.outcome(), None);
    assert!(matches!(
        f.q.cancel(a, false, 22),
        Err(QueueError::WrongState(_, BuildState::Canceled, _))
    ));
    f.commit(fx);
    assert_eq!(landing.outcome(), Some(true));

    let rec = f.q.record(a).unwrap().unwrap();
    assert_eq!(
        (
            rec.state,
            rec.reason.as_str(),
            rec.attempt,
            rec.agent_id,
            rec.finished_ms
        ),
        (BuildState::Canceled, "canceled by request", 1, 7, 20)
    );
    // After the commit: the same answers, from sled.
    let (_, cmds) =
        f.q.reconcile(7, &beat, Unheld::ReleaseAfter(0), 30)
            .unwrap();
    assert_eq!(
        cmds,
        vec![AgentCommand::Cancel {
            build_id: a,
            attempt: 1
        }]
    );
    let (_, cmds) = f.q.reconcile(8, &beat, Unheld::Release, 30).unwrap();
    assert_eq!(
        cmds,
        vec![AgentCommand::Abandon {
            build_id: a,
            attempt: 1
        }],
        "not that agent's: abandon"
    );
    // The log the agent uploaded is linked by its failure report; the state stays.
    let (fx, answer) = f.q.finish(7, a, 1, Err("canceled".into()), 1, 31).unwrap();
    assert!(matches!(answer, FinishAnswer::Duplicate));
    assert!(fx.batch.events.is_empty(), "no event");
    f.commit(fx);
    let rec = f.q.record(a).unwrap().unwrap();
    assert_eq!((rec.state, rec.log_attempt), (BuildState::Canceled, 1));
    for outcome in [
        Err("canceled".to_string()),
        Err("builder exited with 1".into()),
    ] {
        let (fx, answer) = f.q.finish(7, a, 1, outcome, 1, 31).unwrap();
        assert!(matches!(answer, FinishAnswer::Duplicate));
        assert!(fx.batch.is_empty(), "a repeat writes nothing");
    }
    f.uploaded("a");
    assert!(matches!(
        f.q.finish(7, a, 1, Ok(built("a")), 1, 32),
        Err(QueueError::StaleAttempt { .. })
    ));
    assert!(matches!(
        f.q.finish(8, a, 1, Err("canceled".into()), 1, 32),
        Err(QueueError::StaleAttempt { .. })
    ));
    assert!(matches!(
        f.q.advance(7, a, 1, BuildState::Uploading, 33),
        Err(QueueError::StaleAttempt { .. })
    ));
    // Its holder may still upload the log of that attempt; nobody else, no other attempt.
    assert!(f.q.check_lease(7, a, 1, 33).unwrap().batch.is_empty());
    for (agent, attempt) in [(8, 1), (7, 2)] {
        assert!(matches!(
            f.q.check_lease(agent, a, attempt, 33),
            Err(QueueError::StaleAttempt { .. })
        ));
    }
    assert_eq!(f.state(a), BuildState::Canceled, "no report changed it");
    assert!(matches!(
        f.q.cancel(a, false, 34),
        Err(QueueError::WrongState(_, BuildState::Canceled, _))
    ));
    // The other build is untouched and still allocatable; a reload equals memory.
    assert_eq!(
        f.q.runnable().iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![b]
    );
    let before = fingerprint(&f.q);
    f.reload();
    assert_eq!(fingerprint(&f.q), before);
    let (_, cmds) = f.q.reconcile(7, &beat, Unheld::Release, 40).unwrap();
    assert_eq!(
        cmds,
        vec![AgentCommand::Cancel {
            build_id: a,
            attempt: 1
        }],
        "after a restart too"
    );
}

/// Allocated (not started) and uploading builds are running too; a runnable build whose
/// lease was released leaves the allocator's index and its last holder is told `cancel`
/// when it lists it.
#[test]
fn allocated_uploading_and_released_builds_are_canceled_too() {
    let (mut f, ids) = Fixture::new(&["a", "b", "c"]);
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let (fx, _) = f.q.allocate(7, None, &[a, b, c], 10).unwrap();
    f.commit(fx);
    let fx = f.q.advance(7, b, 1, BuildState::Uploading, 11).unwrap();
    f.commit(fx);
    // c's lease is released (not listed at a session opening): runnable, 7 its last holder.
    let (fx, _) =
        f.q.reconcile(
            7,
            &[
                held(a, 1, HeldPhase::Building),
                held(b, 1, HeldPhase::Uploading),
            ],
            Unheld::Release,
            12,
        )
        .unwrap();
    f.commit(fx);
    assert_eq!(f.state(c), BuildState::Runnable);
    for (id, was) in [(a, "allocated"), (b, "uploading"), (c, "runnable")] {
        let (fx, got) = f.q.cancel(id, false, 20).unwrap();
        assert_eq!(fx.batch.events[0].payload["was"], was);
        if was == "runnable" {
            assert!(got.stops.is_empty(), "no lease: nobody to stop");
            assert_eq!(fx.unrunnable, vec![c], "out of the allocator's index");
        } else {
            assert_eq!(got.stops.len(), 1);
            assert!(fx.unrunnable.is_empty());
        }
        f.commit(fx);
        assert_eq!(f.state(id), BuildState::Canceled);
    }
    assert!(f.q.leased_to(7).is_empty());
    assert_eq!(f.q.live_len(), 0);
    let (_, cmds) =
        f.q.reconcile(7, &[held(c, 1, HeldPhase::Building)], Unheld::Release, 30)
            .unwrap();
    assert_eq!(
        cmds,
        vec![AgentCommand::Cancel {
            build_id: c,
            attempt: 1
        }]
    );
}

/// Pins item 2: with `dependents`, a chain a <- b <- c canceled at a cancels b and c, each
/// naming the input it waited on, with a `build-canceled` event each; a build that waits on
/// nothing canceled stays. Without it, the dependents stay blocked (and a resubmission of the
/// canceled derivation that succeeds unblocks them).
#[test]
fn dependents_are_canceled_through_a_chain_only_on_request() {
    let (mut f, ids) = Fixture::new(&["a", "x"]);
    let (a, x) = (ids[0], ids[1]);
    let (fx, deps) =
        f.q.submit(
            vec![
                target("b", &["a"]),
                target("c", &["b"]),
                target("d", &["x"]),
            ],
            vec![],
            0,
            vec![],
            2,
        )
        .unwrap();
    f.commit(fx);
    let (b, c, d) = (deps[0].id, deps[1].id, deps[2].id);
    running(&mut f, a);
    let (fx, got) = f.q.cancel(a, true, 20).unwrap();
    assert_eq!(
        got.dependents
            .iter()
            .map(|s| (s.id, s.state))
            .collect::<Vec<_>>(),
        vec![(b, BuildState::Canceled), (c, BuildState::Canceled)]
    );
    assert_eq!(got.stops.len(), 1, "only a was running");
    assert_eq!(kinds(&fx), vec!["build-canceled"; 3]);
    let inputs: Vec<(u64, &str, u64)> = fx.batch.events[1..]
        .iter()
        .map(|e| {
            (
                e.payload["build_id"].as_u64().unwrap(),
                e.payload["reason"].as_str().unwrap(),
                e.payload["input_build"].as_u64().unwrap(),
            )
        })
        .collect();
    let (rb, rc) = (input_canceled_reason(a), input_canceled_reason(b));
    assert_eq!(inputs, vec![(b, rb.as_str(), a), (c, rc.as_str(), b)]);
    f.commit(fx);
    assert_eq!(
        reason(&f, b),
        format!("canceled: input build {a} was canceled")
    );
    assert_eq!(
        reason(&f, c),
        format!("canceled: input build {b} was canceled")
    );
    assert_eq!(
        (f.state(b), f.state(c)),
        (BuildState::Canceled, BuildState::Canceled)
    );
    assert_eq!(f.state(d), BuildState::Blocked, "d waits on x, not on a");
    assert!(f
        .q
        .waiting
        .values()
        .all(|s| !s.contains(&b) && !s.contains(&c)));
    let before = fingerprint(&f.q);
    f.reload();
    assert_eq!(fingerprint(&f.q), before);

    // Without `dependents`: x canceled, d stays blocked.
    let (fx, got) = f.q.cancel(x, false, 30).unwrap();
    assert!(got.dependents.is_empty());
    assert_eq!(kinds(&fx), vec!["build-canceled"]);
    f.commit(fx);
    assert_eq!(f.state(d), BuildState::Blocked);
    // Resubmitting x's derivation and building it unblocks d.
    let (fx, again) =
        f.q.submit(vec![target("x", &[])], vec![], 0, vec![], 31)
            .unwrap();
    f.commit(fx);
    assert_ne!(again[0].id, x, "a new build of the canceled derivation");
    let fx = run_to_end(&mut f, again[0].id, "x", true, 40);
    f.commit(fx);
    assert_eq!(f.state(d), BuildState::Runnable);
}
