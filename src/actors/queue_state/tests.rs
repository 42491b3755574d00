//! Unit tests of the queue's transitions on a real sled store and a real committer: lease
//! replays of retried work requests, heartbeat reconciliation, re-adoption, refused results,
//! and duplicates that wait for the first commit. Times are explicit (`now` arguments).

use super::*;
use crate::protocol::{AgentCommand, BuiltOutput, HeldBuild, HeldPhase};
use crate::store::committer::CommitterOptions;
use crate::store::records::{EventRecord, NarFileRecord};
use crate::store::{Committer, StoreOptions};

pub(super) fn target(name: &str, needs: &[&str]) -> Target {
    Target {
        drv_path: format!("/s/{name:a<32}-{name}.drv"),
        system: "x86_64-linux".into(),
        outputs: vec![("out".into(), out_path(name))],
        needs: needs.iter().map(|n| out_path(n)).collect(),
    }
}

pub(super) fn out_path(name: &str) -> String {
    format!("/s/{name:b<32}-{name}")
}

pub(super) fn built(name: &str) -> Vec<BuiltOutput> {
    vec![BuiltOutput {
        name: "out".into(),
        path: out_path(name),
        nar_hash: format!("sha256:{name}"),
        nar_size: 1,
        file_hash: format!("sha256:file-{name}"),
        file_size: 1,
        references: vec![],
    }]
}

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) store: Store,
    pub(super) c: Committer,
    pub(super) q: QueueState,
}

impl Fixture {
    /// A queue with the given builds submitted (all runnable) and committed; their ids.
    pub(super) fn new(names: &[&str]) -> (Fixture, Vec<BuildId>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let c = Committer::start(
            store.clone(),
            CommitterOptions::default(),
            Box::new(|_: &[EventRecord]| {}),
        )
        .unwrap();
        let mut q = QueueState::load(store.clone(), Arc::new(Symbols::default())).unwrap();
        let (fx, builds) = q
            .submit(
                names.iter().map(|n| target(n, &[])).collect(),
                vec![],
                0,
                vec![],
                1,
            )
            .unwrap();
        let mut f = Fixture {
            _dir: dir,
            store,
            c,
            q,
        };
        f.commit(fx);
        (f, builds.iter().map(|b| b.id).collect())
    }

    /// Commit like the actor does: flush, then confirm, then signal the landing.
    pub(super) fn commit(&mut self, fx: Effects) {
        self.c.commit_blocking(fx.batch).unwrap();
        let outputs: Vec<String> = fx.new_outputs.iter().map(|o| o.path.clone()).collect();
        self.q
            .committed(&outputs, &fx.finished, &fx.requests, &fx.submitted);
        if let Some(tx) = fx.landing {
            tx.send_replace(Some(true));
        }
    }

    /// The verified upload of `name`'s output, as the upload route commits it.
    pub(super) fn uploaded(&mut self, name: &str) {
        let mut b = Batch::new();
        let rec = NarFileRecord {
            file_size: 1,
            nar_hash: format!("sha256:{name}"),
            nar_size: 1,
            created_ms: 3,
        };
        b.put(
            TreeId::NarFiles,
            format!("sha256:file-{name}").as_bytes(),
            &rec,
        )
        .unwrap();
        self.c.commit_blocking(b).unwrap();
    }

    pub(super) fn state(&self, id: BuildId) -> BuildState {
        self.q.record(id).unwrap().unwrap().state
    }

    pub(super) fn reload(&mut self) {
        self.q = QueueState::load(self.store.clone(), Arc::new(Symbols::default())).unwrap();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.c.shutdown_blocking();
    }
}

pub(super) fn kinds(fx: &Effects) -> Vec<&str> {
    fx.batch.events.iter().map(|e| e.kind.as_str()).collect()
}

pub(super) fn held(id: BuildId, attempt: u32, phase: HeldPhase) -> HeldBuild {
    HeldBuild {
        build_id: id,
        attempt,
        phase,
    }
}

fn attempts(leased: &[BuildRecord]) -> Vec<(BuildId, u32)> {
    leased.iter().map(|b| (b.id, b.attempt)).collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Pins the race where two inputs finish before either commit lands: memory runs ahead of
/// sled, so the second finish must count the first one's output as available, or the
/// dependent stays blocked forever.
#[test]
fn inputs_finishing_back_to_back_before_their_commits_unblock_the_dependent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let c = Committer::start(
        store.clone(),
        CommitterOptions::default(),
        Box::new(|_: &[EventRecord]| {}),
    )
    .unwrap();
    let mut q = QueueState::load(store.clone(), Arc::new(Symbols::default())).unwrap();
    let (fx, builds) = q
        .submit(
            vec![target("a", &[]), target("b", &[]), target("c", &["a", "b"])],
            vec![],
            0,
            vec![],
            1,
        )
        .unwrap();
    c.commit_blocking(fx.batch).unwrap();
    assert_eq!(builds[2].state, BuildState::Blocked);
    let (a, b, cid) = (builds[0].id, builds[1].id, builds[2].id);
    let (fx, got) = q.allocate(7, None, &[a, b], 2).unwrap();
    c.commit_blocking(fx.batch).unwrap();
    assert_eq!(got.leased.len(), 2);
    let mut nars = Batch::new();
    for n in ["a", "b"] {
        let rec = NarFileRecord {
            file_size: 1,
            nar_hash: format!("sha256:{n}"),
            nar_size: 1,
            created_ms: 3,
        };
        nars.put(
            TreeId::NarFiles,
            format!("sha256:file-{n}").as_bytes(),
            &rec,
        )
        .unwrap();
    }
    c.commit_blocking(nars).unwrap();

    // Both results are decided before either commit is applied.
    let (fx_a, _) = q.finish(7, a, 1, Ok(built("a")), 0, 4).unwrap();
    let (fx_b, _) = q.finish(7, b, 1, Ok(built("b")), 0, 5).unwrap();
    let runnable: Vec<BuildId> = fx_a
        .runnable
        .iter()
        .chain(&fx_b.runnable)
        .map(|e| e.id)
        .collect();
    assert_eq!(
        runnable,
        vec![cid],
        "the dependent became runnable exactly once"
    );
    c.commit_blocking(fx_a.batch).unwrap();
    c.commit_blocking(fx_b.batch).unwrap();
    q.committed(&[out_path("a"), out_path("b")], &[a, b], &[], &[]);
    assert!(q.uncommitted_outputs.is_empty() && q.uncommitted_finishes.is_empty());
    // After the commit, sled answers: the same result again is a duplicate.
    let (dup, answer) = q.finish(7, a, 1, Ok(built("a")), 0, 6).unwrap();
    assert!(matches!(answer, FinishAnswer::Duplicate) && dup.after.is_none());
    assert!(
        q.available(&out_path("a")).unwrap(),
        "sled answers once committed"
    );
    let again = QueueState::load(store, Arc::new(Symbols::default())).unwrap();
    assert_eq!(again.live_entry(cid).unwrap().state(), BuildState::Runnable);
    c.shutdown_blocking();
}

/// Pins item 4: a repeat of a result whose commit is in flight is answered `duplicate` only
/// once that commit landed, and not at all (503) if it failed.
#[test]
fn a_duplicate_result_waits_for_the_first_commit() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    let (fx, _) = f.q.allocate(7, None, &ids, 10).unwrap();
    f.commit(fx);
    f.uploaded("a");
    let (first, answer) = f.q.finish(7, ids[0], 1, Ok(built("a")), 0, 11).unwrap();
    assert!(matches!(answer, FinishAnswer::Accepted));
    let (dup, answer) = f.q.finish(7, ids[0], 1, Ok(built("a")), 0, 12).unwrap();
    assert!(matches!(answer, FinishAnswer::Duplicate));
    assert!(dup.batch.is_empty(), "a duplicate changes nothing");
    let wait = dup.after.expect("the duplicate waits for the first commit");
    assert_eq!(
        wait.outcome(),
        None,
        "not answered while the first is in flight"
    );
    f.commit(first);
    assert_eq!(wait.outcome(), Some(true));
    assert!(block_on(wait.landed()));

    // The first commit fails (its sender is dropped unsent, as when the actor stops).
    let (first, _) = f.q.finish(7, ids[1], 1, Err("boom".into()), 0, 13).unwrap();
    let (dup, _) = f.q.finish(7, ids[1], 1, Err("boom".into()), 0, 14).unwrap();
    let wait = dup.after.expect("waits");
    drop(first);
    assert!(
        !block_on(wait.landed()),
        "a failed first commit is no duplicate"
    );
}

/// Pins item 1: a retry of a work request gets the same builds at the same attempts, gives
/// the new candidates back, and holds across a reload from sled (a coordinator restart).
#[test]
fn a_retried_work_request_gets_the_same_leases_also_after_a_reload() {
    let (mut f, ids) = Fixture::new(&["a", "b", "c"]);
    let (fx, first) = f.q.allocate(7, Some("r1"), &ids[..2], 10).unwrap();
    assert_eq!(kinds(&fx), vec!["build-allocated", "build-allocated"]);
    let first = attempts(&first.leased);
    assert_eq!(first, vec![(ids[0], 1), (ids[1], 1)]);
    f.commit(fx);

    let (fx, again) = f.q.allocate(7, Some("r1"), &ids[2..], 20).unwrap();
    assert!(again.replayed);
    assert_eq!(attempts(&again.leased), first);
    assert!(fx.batch.is_empty(), "a replay leases nothing new");
    assert_eq!(
        fx.runnable.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![ids[2]],
        "the new candidate goes back to the allocator"
    );
    assert_eq!(f.state(ids[2]), BuildState::Runnable);

    f.reload();
    let (_, after_restart) = f.q.allocate(7, Some("r1"), &[], 30).unwrap();
    assert_eq!(
        attempts(&after_restart.leased),
        first,
        "recorded with the lease in sled"
    );
    assert_eq!(
        f.q.leased_to(7),
        vec![ids[0], ids[1]],
        "lease index rebuilt"
    );

    // The id belongs to the agent: another agent's request with it is a new request.
    let (fx, other) = f.q.allocate(8, Some("r1"), &ids[2..], 40).unwrap();
    assert!(!other.replayed);
    assert_eq!(attempts(&other.leased), vec![(ids[2], 1)]);
    f.commit(fx);
    // Once the builds finished, a retry finds nothing to answer and leases nothing new.
    f.uploaded("a");
    let (fx, _) = f.q.finish(7, ids[0], 1, Ok(built("a")), 0, 50).unwrap();
    f.commit(fx);
    let (fx, _) = f.q.finish(7, ids[1], 1, Err("no".into()), 0, 51).unwrap();
    f.commit(fx);
    assert!(!f.q.requests.contains_key(&(7, "r1".to_string())));
}

/// A retry that arrives while the first lease commit is in flight waits for that commit.
#[test]
fn a_retry_while_the_lease_commit_is_in_flight_waits_for_it() {
    let (mut f, ids) = Fixture::new(&["a"]);
    let (fx, _) = f.q.allocate(7, Some("r1"), &ids, 10).unwrap();
    let (retry, again) = f.q.allocate(7, Some("r1"), &[], 11).unwrap();
    assert_eq!(attempts(&again.leased), vec![(ids[0], 1)]);
    let wait = retry.after.expect("the retry waits");
    assert_eq!(wait.outcome(), None);
    f.commit(fx);
    assert_eq!(wait.outcome(), Some(true));
    assert!(f.q.uncommitted_requests.is_empty());
}

/// A build released from its agent (lost) and not reallocated comes back to that agent when
/// it retries the work request that leased it: same attempt, out of the runnable index.
#[test]
fn a_retry_readopts_a_released_build_nobody_took() {
    let (mut f, ids) = Fixture::new(&["a"]);
    let (fx, _) = f.q.allocate(7, Some("r1"), &ids, 10).unwrap();
    f.commit(fx);
    let fx = f.q.agent_lost(7, 0).unwrap();
    assert_eq!(kinds(&fx), vec!["lease-expired", "agent-lost"]);
    f.commit(fx);
    assert_eq!(f.state(ids[0]), BuildState::Runnable);
    let (fx, again) = f.q.allocate(7, Some("r1"), &[], 20).unwrap();
    assert_eq!(attempts(&again.leased), vec![(ids[0], 1)]);
    assert_eq!(kinds(&fx), vec!["lease-readopted"]);
    assert_eq!(fx.unrunnable, vec![ids[0]]);
    f.commit(fx);
    assert_eq!(f.state(ids[0]), BuildState::Allocated);
}

/// Pins item 2: a lease the heartbeats do not list ends only after the bound, counted from
/// when it was handed out; a listed build that is not the agent's is abandoned.
#[test]
fn heartbeats_end_unheld_leases_after_the_bound_and_abandon_foreign_builds() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    let (fx, _) = f.q.allocate(7, Some("r1"), &ids, 1_000).unwrap();
    f.commit(fx);
    let beat = [
        held(ids[0], 1, HeldPhase::Building),
        held(999, 1, HeldPhase::Building),
    ];
    let (fx, cmds) =
        f.q.reconcile(7, &beat, Unheld::ReleaseAfter(500), 1_400)
            .unwrap();
    assert!(fx.batch.is_empty(), "within the bound: kept");
    assert_eq!(
        cmds,
        vec![AgentCommand::Abandon {
            build_id: 999,
            attempt: 1
        }]
    );
    // A replay hands the lease out again: its clock restarts.
    let (_, _) = f.q.allocate(7, Some("r1"), &[], 1_400).unwrap();
    let (fx, _) =
        f.q.reconcile(7, &beat, Unheld::ReleaseAfter(500), 1_800)
            .unwrap();
    assert!(fx.batch.is_empty(), "the replay restarted the clock");
    let (fx, _) =
        f.q.reconcile(7, &beat, Unheld::ReleaseAfter(500), 1_901)
            .unwrap();
    assert_eq!(kinds(&fx), vec!["lease-expired"]);
    assert_eq!(
        fx.batch.events[0].payload["reason"],
        "not held by its agent"
    );
    assert_eq!(
        fx.runnable.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![ids[1]]
    );
    f.commit(fx);
    let b = f.q.record(ids[1]).unwrap().unwrap();
    assert_eq!(
        (b.state, b.attempt),
        (BuildState::Runnable, 1),
        "attempt unchanged"
    );
    assert_eq!(f.q.leased_to(7), vec![ids[0]]);
    // Held in any phase counts, and the wrong attempt does not.
    let (fx, cmds) =
        f.q.reconcile(
            7,
            &[held(ids[0], 2, HeldPhase::Reporting)],
            Unheld::Release,
            2_000,
        )
        .unwrap();
    assert_eq!(kinds(&fx), vec!["lease-expired"]);
    assert_eq!(
        cmds,
        vec![AgentCommand::Abandon {
            build_id: ids[0],
            attempt: 2
        }]
    );
}

/// Pins item 6: a lost agent that comes back listing a build nobody took keeps it (same
/// attempt, its phase); once the build moved on to another agent, it gets `abandon`.
#[test]
fn a_lost_agent_readopts_what_nobody_took_and_abandons_what_moved_on() {
    let (mut f, ids) = Fixture::new(&["a"]);
    let a = ids[0];
    let (fx, _) = f.q.allocate(7, None, &ids, 10).unwrap();
    f.commit(fx);
    let fx = f.q.advance(7, a, 1, BuildState::Building, 11).unwrap();
    f.commit(fx);
    let fx = f.q.agent_lost(7, 0).unwrap();
    f.commit(fx);
    let (fx, cmds) =
        f.q.reconcile(
            7,
            &[held(a, 1, HeldPhase::Building)],
            Unheld::ReleaseAfter(500),
            20,
        )
        .unwrap();
    assert!(cmds.is_empty());
    assert_eq!(kinds(&fx), vec!["lease-readopted"]);
    assert_eq!(fx.unrunnable, vec![a], "out of the allocator's index");
    f.commit(fx);
    let b = f.q.record(a).unwrap().unwrap();
    assert_eq!(
        (b.state, b.attempt, b.agent_id),
        (BuildState::Building, 1, 7)
    );

    // Lost again; this time another agent takes the build, once the second failure's backoff
    // (1 s by default) is over.
    let fx = f.q.agent_lost(7, 0).unwrap();
    f.commit(fx);
    assert_eq!(f.q.wake(1_000).len(), 1);
    let (fx, got) = f.q.allocate(8, None, &ids, 1_000).unwrap();
    assert_eq!(attempts(&got.leased), vec![(a, 2)]);
    f.commit(fx);
    // Another agent cannot adopt what agent 7 was released from, either.
    let (fx, cmds) =
        f.q.reconcile(7, &[held(a, 1, HeldPhase::Uploading)], Unheld::Release, 40)
            .unwrap();
    assert!(fx.batch.is_empty());
    assert_eq!(
        cmds,
        vec![AgentCommand::Abandon {
            build_id: a,
            attempt: 1
        }]
    );
    assert_eq!(f.q.leased_to(8), vec![a]);
    // A late report of the old attempt is refused and changes nothing.
    assert!(matches!(
        f.q.finish(7, a, 1, Err("late".into()), 0, 41),
        Err(QueueError::StaleAttempt { current: 2, .. })
    ));
}

/// A lost agent's upload or result for a build nobody took re-adopts it (same attempt, no
/// rebuild) instead of being refused as stale, before any heartbeat of its return; another
/// agent's report, or one after the build moved on, stays refused.
#[test]
fn a_report_from_a_lost_agent_readopts_what_nobody_took() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    let (a, b) = (ids[0], ids[1]);
    let (fx, _) = f.q.allocate(7, None, &ids, 10).unwrap();
    f.commit(fx);
    for id in [a, b] {
        let fx = f.q.advance(7, id, 1, BuildState::Building, 11).unwrap();
        f.commit(fx);
    }
    let fx = f.q.agent_lost(7, 0).unwrap();
    f.commit(fx);
    assert_eq!(f.state(a), BuildState::Runnable);

    // Another agent's report on it is refused and changes nothing.
    assert!(matches!(
        f.q.check_lease(8, a, 1, 12),
        Err(QueueError::StaleAttempt { .. })
    ));
    assert_eq!(f.state(a), BuildState::Runnable);

    // The upload check of its last holder re-adopts it, uploading.
    let fx = f.q.check_lease(7, a, 1, 13).unwrap();
    assert_eq!(kinds(&fx), vec!["lease-readopted"]);
    assert_eq!(fx.unrunnable, vec![a], "out of the allocator's index");
    f.commit(fx);
    let rec = f.q.record(a).unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.attempt, rec.agent_id),
        (BuildState::Uploading, 1, 7)
    );
    assert_eq!(f.q.leased_to(7), vec![a]);

    // A result for the other one re-adopts it and is accepted at attempt 1.
    let (fx, answer) = f.q.finish(7, b, 1, Err("no".into()), 0, 14).unwrap();
    assert!(matches!(answer, FinishAnswer::Accepted), "{answer:?}");
    assert!(kinds(&fx).contains(&"lease-readopted"), "{:?}", kinds(&fx));
    f.commit(fx);
    let rec = f.q.record(b).unwrap().unwrap();
    assert_eq!((rec.state, rec.attempt), (BuildState::Failed, 1));

    // Lost again, and this time the build moves on (after the second failure's backoff): the
    // old attempt's report is refused.
    let fx = f.q.agent_lost(7, 0).unwrap();
    f.commit(fx);
    assert_eq!(f.q.wake(1_000).len(), 1);
    let (fx, got) = f.q.allocate(8, None, &[a], 1_000).unwrap();
    assert_eq!(attempts(&got.leased), vec![(a, 2)]);
    f.commit(fx);
    assert!(matches!(
        f.q.check_lease(7, a, 1, 21),
        Err(QueueError::StaleAttempt { current: 2, .. })
    ));
    assert_eq!(f.q.leased_to(8), vec![a]);
}

/// An agent whose result for a build was accepted is not told to abandon it while the
/// acknowledgement is on its way (before and after the commit).
#[test]
fn a_build_finished_by_its_agent_gets_no_abandon() {
    let (mut f, ids) = Fixture::new(&["a"]);
    let (fx, _) = f.q.allocate(7, None, &ids, 10).unwrap();
    f.commit(fx);
    let (fx, _) = f.q.finish(7, ids[0], 1, Err("no".into()), 0, 11).unwrap();
    let beat = [held(ids[0], 1, HeldPhase::Reporting)];
    let (_, cmds) = f.q.reconcile(7, &beat, Unheld::Release, 12).unwrap();
    assert!(cmds.is_empty(), "in flight: {cmds:?}");
    f.commit(fx);
    let (_, cmds) = f.q.reconcile(7, &beat, Unheld::Release, 13).unwrap();
    assert!(cmds.is_empty(), "committed: {cmds:?}");
    let (_, cmds) = f.q.reconcile(8, &beat, Unheld::Release, 14).unwrap();
    assert_eq!(cmds.len(), 1, "another agent listing it must drop it");
}

/// Pins item 3: a refused result leaves the build in a defined state and no "accepted"
/// marker, so a later report is never answered as a duplicate of the refused one.
#[test]
fn refused_results_settle_the_build() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    let (fx, _) = f.q.allocate(7, None, &ids, 10).unwrap();
    f.commit(fx);
    for id in &ids {
        let fx = f.q.advance(7, *id, 1, BuildState::Building, 10).unwrap();
        f.commit(fx);
    }
    f.uploaded("a");

    // NarHash that is not the upload's: refused for good, the build fails.
    let mut wrong = built("a");
    wrong[0].nar_hash = "sha256:other".into();
    let (fx, answer) = f.q.finish(7, ids[0], 1, Ok(wrong), 0, 11).unwrap();
    assert!(matches!(
        answer,
        FinishAnswer::Refused(QueueError::BadResult(_))
    ));
    assert_eq!(kinds(&fx), vec!["build-failed"]);
    assert_eq!(fx.batch.events[0].payload["refused"], true);
    assert!(fx.finished.is_empty() && f.q.uncommitted_finishes.is_empty());
    f.commit(fx);
    let r = f.q.record(ids[0]).unwrap().unwrap();
    assert_eq!(r.state, BuildState::Failed);
    assert!(r.reason.starts_with(finish::REFUSED), "{}", r.reason);
    // The correct report afterwards is not a duplicate (nor is a failure report).
    for outcome in [Ok(built("a")), Err("it failed".to_string())] {
        assert!(matches!(
            f.q.finish(7, ids[0], 1, outcome, 0, 12),
            Err(QueueError::StaleAttempt { .. })
        ));
    }

    // An output never uploaded: refused for now, the build is runnable again.
    let (fx, answer) = f.q.finish(7, ids[1], 1, Ok(built("b")), 0, 13).unwrap();
    assert!(matches!(
        answer,
        FinishAnswer::Refused(QueueError::NotUploaded { .. })
    ));
    assert_eq!(kinds(&fx), vec!["lease-expired"]);
    assert_eq!(
        fx.runnable.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![ids[1]]
    );
    f.commit(fx);
    assert!(
        f.q.leased_to(7).is_empty(),
        "never left leased to the agent"
    );
    // A heartbeat the agent sent before it read the refusal does not take the build back.
    let beat = [held(ids[1], 1, HeldPhase::Reporting)];
    let (fx, cmds) =
        f.q.reconcile(7, &beat, Unheld::ReleaseAfter(500), 13)
            .unwrap();
    assert!(fx.batch.is_empty());
    assert_eq!(
        cmds,
        vec![AgentCommand::Abandon {
            build_id: ids[1],
            attempt: 1
        }]
    );
    f.uploaded("b");
    assert!(matches!(
        f.q.finish(7, ids[1], 1, Ok(built("b")), 0, 14),
        Err(QueueError::StaleAttempt { .. })
    ));
    let (fx, got) = f.q.allocate(8, None, &[ids[1]], 15).unwrap();
    assert_eq!(attempts(&got.leased), vec![(ids[1], 2)]);
    f.commit(fx);
    let (fx, answer) = f.q.finish(8, ids[1], 2, Ok(built("b")), 0, 16).unwrap();
    assert!(matches!(answer, FinishAnswer::Accepted));
    f.commit(fx);
    assert_eq!(f.state(ids[1]), BuildState::Succeeded);
}

/// An agent that talks but sends no heartbeats: its leases never started end after the
/// bound; started ones stay.
#[test]
fn unstarted_leases_of_an_agent_without_heartbeats_end() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    let (fx, _) = f.q.allocate(7, None, &ids, 1_000).unwrap();
    f.commit(fx);
    let fx =
        f.q.advance(7, ids[1], 1, BuildState::Building, 1_100)
            .unwrap();
    f.commit(fx);
    assert!(f
        .q
        .release_unstarted(7, 500, 1_400)
        .unwrap()
        .batch
        .is_empty());
    let fx = f.q.release_unstarted(7, 500, 1_600).unwrap();
    assert_eq!(kinds(&fx), vec!["lease-expired"]);
    assert_eq!(fx.runnable[0].id, ids[0]);
    f.commit(fx);
    assert_eq!(f.q.leased_to(7), vec![ids[1]]);
}

/// The tie-break of the allocator: a build's `rdeps` counts the blocked builds waiting on its
/// outputs, whichever is submitted first; every change re-keys a runnable build, and a reload
/// computes the same numbers.
#[test]
fn builds_waiting_on_a_build_raise_its_rdeps_and_rekey_it() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    let (fx, waiting) =
        f.q.submit(
            vec![target("c", &["a"]), target("d", &["a"])],
            vec![],
            0,
            vec![],
            2,
        )
        .unwrap();
    assert!(waiting.iter().all(|b| b.state == BuildState::Blocked));
    assert_eq!(f.q.live_entry(ids[0]).unwrap().rdeps, 2);
    assert_eq!(f.q.live_entry(ids[1]).unwrap().rdeps, 0);
    let rekeyed: Vec<(BuildId, u32)> = fx.rekeyed.iter().map(|e| (e.id, e.rdeps)).collect();
    assert_eq!(rekeyed, vec![(ids[0], 1), (ids[0], 2)]);
    f.commit(fx);
    f.reload();
    assert_eq!(f.q.live_entry(ids[0]).unwrap().rdeps, 2, "a reload agrees");
    // A dependent canceled: one fewer waits.
    let (fx, _) = f.q.cancel(waiting[0].id, false, 3).unwrap();
    assert_eq!(f.q.live_entry(ids[0]).unwrap().rdeps, 1);
    assert_eq!(
        fx.rekeyed
            .iter()
            .map(|e| (e.id, e.rdeps))
            .collect::<Vec<_>>(),
        vec![(ids[0], 1)]
    );
    f.commit(fx);
    // A producer submitted after its dependent starts with the dependent counted.
    let (fx, early) =
        f.q.submit(vec![target("e", &["z"])], vec![], 0, vec![], 4)
            .unwrap();
    assert_eq!(early[0].state, BuildState::Blocked);
    f.commit(fx);
    let (fx, z) =
        f.q.submit(vec![target("z", &[])], vec![], 0, vec![], 5)
            .unwrap();
    assert_eq!(f.q.live_entry(z[0].id).unwrap().rdeps, 1);
    assert_eq!(
        fx.runnable.iter().map(|e| e.rdeps).collect::<Vec<_>>(),
        vec![1]
    );
    f.commit(fx);
}

/// Listings of a live state page through the per-state index; every build once, in id
/// order, and the index follows every transition.
#[test]
fn live_listings_page_through_the_state_index() {
    let names: Vec<String> = (0..7).map(|i| format!("p{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (mut f, ids) = Fixture::new(&refs);
    let (fx, _) = f.q.allocate(3, None, &ids[..2], 2).unwrap();
    f.commit(fx);
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = f.q.list_live(BuildState::Runnable, after, 2);
        seen.extend(page.builds.iter().map(|b| b.0));
        assert!(page.builds.iter().all(|b| b.1 == BuildState::Runnable));
        match (page.more, page.builds.last()) {
            (true, Some(last)) => after = last.0,
            _ => break,
        }
    }
    assert_eq!(seen, ids[2..].to_vec());
    let leased = f.q.list_live(BuildState::Allocated, 0, 10);
    assert_eq!(
        leased.builds.iter().map(|b| b.0).collect::<Vec<_>>(),
        ids[..2].to_vec()
    );
    assert!(!leased.more);
    assert_eq!(f.q.count(BuildState::Runnable), 5);
    assert_eq!(f.q.count(BuildState::Allocated), 2);
    // The same after a reload from sled.
    f.reload();
    assert_eq!(f.q.count(BuildState::Runnable), 5);
    assert_eq!(f.q.count(BuildState::Allocated), 2);
}

/// An agent may skip the start report: its first upload, or its result, records the start
/// (`build-started`) once, and a start report after it changes nothing.
#[test]
fn a_first_upload_or_result_without_a_start_report_records_the_start() {
    let (mut f, ids) = Fixture::new(&["a", "b"]);
    let (fx, _) = f.q.allocate(7, None, &ids, 10).unwrap();
    f.commit(fx);
    let fx =
        f.q.advance(7, ids[0], 1, BuildState::Uploading, 11)
            .unwrap();
    assert_eq!(kinds(&fx), vec!["build-started"]);
    f.commit(fx);
    assert_eq!(f.state(ids[0]), BuildState::Uploading);
    assert!(f.q.record(ids[0]).unwrap().unwrap().started_ms == 11);
    let fx = f.q.advance(7, ids[0], 1, BuildState::Building, 12).unwrap();
    assert!(fx.batch.is_empty(), "a late start report is a no-op");
    // A failure reported with no start and no upload: started, then failed, in one commit.
    let (fx, answer) = f.q.finish(7, ids[1], 1, Err("no".into()), 0, 13).unwrap();
    assert!(matches!(answer, FinishAnswer::Accepted));
    assert_eq!(kinds(&fx), vec!["build-started", "build-failed"]);
    f.commit(fx);
    assert_eq!(f.state(ids[1]), BuildState::Failed);
}

/// Everything the queue keeps in memory, in a comparable form: symbol ids resolved to names
/// (a reload interns them afresh), maps sorted. Two states with the same fingerprint answer
/// every request the same way.
fn fingerprint(q: &QueueState) -> String {
    use std::collections::BTreeMap;
    let live: BTreeMap<BuildId, String> = q
        .live
        .iter()
        .map(|(id, l)| {
            let sys = q.symbols.system_name(l.system);
            let tags = q.symbols.tags(l.tags);
            let mut l = l.clone();
            l.system = 0;
            l.tags = 0;
            (*id, format!("{sys} {tags:?} {l:?}"))
        })
        .collect();
    let by_state: Vec<(BuildState, Vec<BuildId>)> = LIVE_STATES
        .iter()
        .map(|s| (*s, q.by_state.page(*s, 0, usize::MAX).0))
        .collect();
    let digests = |m: &HashMap<PathDigest, BuildId>| -> BTreeMap<[u8; 20], BuildId> {
        m.iter().map(|(d, id)| (d.0, *id)).collect()
    };
    let waiting: BTreeMap<[u8; 20], &BTreeSet<BuildId>> =
        q.waiting.iter().map(|(d, s)| (d.0, s)).collect();
    let leases: BTreeMap<AgentId, &BTreeMap<BuildId, u64>> =
        q.leases.iter().map(|(a, m)| (*a, m)).collect();
    let requests: BTreeMap<&RequestKey, &BTreeSet<BuildId>> = q.requests.iter().collect();
    let request_of: BTreeMap<BuildId, &str> =
        q.request_of.iter().map(|(id, r)| (*id, &**r)).collect();
    let input_failed: BTreeMap<[u8; 20], &BTreeSet<BuildId>> =
        q.input_failed.iter().map(|(d, s)| (d.0, s)).collect();
    format!(
        "live {live:#?}\nby_state {by_state:?}\nwaiting {waiting:?}\nproducers {:?}\n\
         by_drv {:?}\nleases {leases:?}\nrequests {requests:?}\nrequest_of {request_of:?}\n\
         input_failed {input_failed:?}\nnext {}",
        digests(&q.producers),
        digests(&q.by_drv),
        q.next_build_id
    )
}

/// Restart equals sled: after a mix of every kind of transition (submissions of several
/// systems, tag sets and priorities; blocked builds raising their producers' `rdeps`; leases
/// under work request ids; a start; a result unblocking a dependent; a released lease; a
/// cancel), the state rebuilt from sled by the one-scan load is the state memory had, index
/// for index, and the allocator's entries agree too.
#[test]
fn a_reload_from_sled_equals_memory_after_every_kind_of_transition() {
    let (mut f, ids) = Fixture::new(&["a", "b", "c"]);
    let arm = |name: &str, needs: &[&str]| Target {
        system: "aarch64-linux".into(),
        ..target(name, needs)
    };
    let (fx, blocked) =
        f.q.submit(
            vec![
                target("d", &["a"]),
                target("e", &["a", "b"]),
                arm("f", &["c"]),
            ],
            vec![],
            5,
            vec![("big-memory".into(), "yes".into())],
            2,
        )
        .unwrap();
    f.commit(fx);
    let (fx, arm_ready) =
        f.q.submit(vec![arm("g", &[])], vec![], -3, vec![], 3)
            .unwrap();
    f.commit(fx);
    assert!(blocked.iter().all(|b| b.state == BuildState::Blocked));
    assert_eq!(f.q.live_entry(ids[0]).unwrap().rdeps, 2);
    // Lease a and b under a request id; start a; finish b (e still waits on a).
    let (fx, got) = f.q.allocate(7, Some("w-1"), &ids[..2], 4).unwrap();
    f.commit(fx);
    assert_eq!(got.leased.len(), 2);
    let fx = f.q.advance(7, ids[0], 1, BuildState::Building, 5).unwrap();
    f.commit(fx);
    f.uploaded("b");
    let (fx, _) = f.q.finish(7, ids[1], 1, Ok(built("b")), 0, 6).unwrap();
    f.commit(fx);
    // Lease c to another agent, then that agent is lost: c is runnable again, its request
    // remembered for re-adoption.
    let (fx, _) = f.q.allocate(8, Some("w-2"), &ids[2..3], 7).unwrap();
    f.commit(fx);
    let fx = f.q.agent_lost(8, 0).unwrap();
    f.commit(fx);
    // Cancel the arm build nobody waits for.
    let (fx, _) = f.q.cancel(arm_ready[0].id, false, 8).unwrap();
    f.commit(fx);

    assert_eq!(f.q.count(BuildState::Building), 1);
    assert_eq!(f.q.count(BuildState::Blocked), 3);
    let before = fingerprint(&f.q);
    let runnable_before = named_entries(&f.q);
    assert_eq!(runnable_before.len(), 1, "{runnable_before:?}");
    f.reload();
    assert_eq!(
        fingerprint(&f.q),
        before,
        "the reloaded state equals memory"
    );
    assert_eq!(
        named_entries(&f.q),
        runnable_before,
        "the allocator is filled with the same entries"
    );
}

/// The allocator's entries (group by name, effective priority, rdeps), by id.
fn named_entries(q: &QueueState) -> Vec<String> {
    let mut v = q.runnable();
    v.sort_by_key(|e| e.id);
    v.iter()
        .map(|e| {
            format!(
                "{} {} {:?} {} {}",
                e.id,
                q.symbols.system_name(e.group.system),
                q.symbols.tags(e.group.tags),
                e.effective,
                e.rdeps
            )
        })
        .collect()
}

/// `kiln build show` of a blocked build names the last build of each missing input through the
/// `output_builds` index (value: the build id, u64 big-endian, raw), also once that build left
/// memory; a state dir without the index (written before it existed) gets it at its load.
#[test]
fn show_of_a_blocked_build_finds_the_last_producer_through_the_index() {
    let (mut f, ids) = Fixture::new(&["x"]);
    let x = ids[0];
    let key = out_path("x");
    let key = crate::store::keys::output_key(&key).to_string();
    assert_eq!(f.store.last_build_of(&out_path("x")).unwrap(), Some(x));
    let (fx, _) = f.q.allocate(7, None, &[x], 2).unwrap();
    f.commit(fx);
    let (fx, _) = f.q.finish(7, x, 1, Err("boom".into()), 0, 3).unwrap();
    f.commit(fx);
    assert!(f.q.live_entry(x).is_none(), "x left memory");
    let (fx, d) =
        f.q.submit(vec![target("d", &["x"])], vec![], 0, vec![], 4)
            .unwrap();
    f.commit(fx);
    let d = d[0].id;
    let show = |q: &QueueState| {
        let detail = q.detail(d, &|_| None).unwrap();
        assert_eq!(detail.summary.state, BuildState::Blocked);
        let w = &detail.waiting_for[0];
        (w.build, w.build_state, w.note.clone())
    };
    let want = (Some(x), Some(BuildState::Failed));
    let (b, st, note) = show(&f.q);
    assert_eq!((b, st), want, "{note}");
    assert!(note.contains("boom"), "{note}");

    // An old state dir: no index, no marker. The load writes both; then show finds x again.
    let mut b = Batch::new();
    b.delete(TreeId::OutputBuilds, key.as_bytes());
    b.delete(TreeId::Meta, crate::store::meta::OUTPUT_BUILDS_INDEXED);
    f.c.commit_blocking(b).unwrap();
    assert_eq!(f.store.last_build_of(&out_path("x")).unwrap(), None);
    f.reload();
    let migration = f.q.take_migration();
    // Golden bytes of the index entry: key = the output's hash part, value = the build id,
    // u64 big-endian, no version byte.
    let entry = migration
        .iter()
        .flat_map(|b| &b.ops)
        .find_map(|op| match op {
            crate::store::committer::Op::Put(TreeId::OutputBuilds, k, v) if k == key.as_bytes() => {
                Some(v.clone())
            }
            _ => None,
        })
        .expect("the load indexes x's output");
    assert_eq!(entry, vec![0, 0, 0, 0, 0, 0, 0, x as u8]);
    for b in migration {
        f.c.commit_blocking(b).unwrap();
    }
    assert_eq!(f.store.last_build_of(&out_path("x")).unwrap(), Some(x));
    assert!(f
        .store
        .meta_u64(crate::store::meta::OUTPUT_BUILDS_INDEXED)
        .unwrap()
        .is_some());
    let (b, st, _) = show(&f.q);
    assert_eq!((b, st), want);
    f.reload();
    assert!(f.q.take_migration().is_empty(), "migrated once");
}

fn eff(f: &Fixture, id: BuildId) -> i32 {
    f.q.live_entry(id).unwrap().effective
}

/// Derived priority: inputs inherit the highest effective priority of the builds waiting on
/// them, transitively, on submission (either order) and on re-prioritisation up and down (a
/// diamond falls as a whole); a canceled dependent takes its priority away; the allocator is
/// told (re-keyed) for runnable builds; a reload derives the same values.
#[test]
fn derived_priority_follows_submissions_reprioritisation_and_cancel() {
    let (mut f, ids) = Fixture::new(&["a"]);
    let a = ids[0];
    let (fx, chain) =
        f.q.submit(
            vec![target("b", &["a"]), target("c", &["b"])],
            vec![],
            0,
            vec![],
            2,
        )
        .unwrap();
    f.commit(fx);
    let (b, c) = (chain[0].id, chain[1].id);
    let (fx, top) =
        f.q.submit(vec![target("d", &["c"])], vec![], 10, vec![], 3)
            .unwrap();
    let d = top[0].id;
    assert_eq!([eff(&f, a), eff(&f, b), eff(&f, c), eff(&f, d)], [10; 4]);
    assert_eq!(
        fx.rekeyed
            .iter()
            .map(|e| (e.id, e.effective))
            .collect::<Vec<_>>(),
        vec![(a, 10)],
        "only the runnable input is re-keyed"
    );
    f.commit(fx);
    // Down: the chain follows.
    let (fx, s) = f.q.set_priority(d, 3).unwrap();
    assert_eq!(s.priority, 3);
    assert_eq!(kinds(&fx), vec!["build-reprioritized"]);
    assert_eq!([eff(&f, a), eff(&f, b), eff(&f, c), eff(&f, d)], [3; 4]);
    assert_eq!(fx.rekeyed.last().map(|e| (e.id, e.effective)), Some((a, 3)));
    f.commit(fx);
    assert_eq!(
        f.q.full(d).unwrap().unwrap().priority,
        3,
        "own priority stored"
    );
    // Up in the middle: only what b needs rises.
    let (fx, _) = f.q.set_priority(b, 7).unwrap();
    f.commit(fx);
    assert_eq!(
        [eff(&f, a), eff(&f, b), eff(&f, c), eff(&f, d)],
        [7, 7, 3, 3]
    );
    // A second dependent of a, lower than b.
    let (fx, e) =
        f.q.submit(vec![target("e", &["a"])], vec![], 5, vec![], 4)
            .unwrap();
    f.commit(fx);
    assert_eq!(eff(&f, a), 7);
    // b back to 0: b inherits 3 from c, a the highest of its waiters (e's 5).
    let (fx, _) = f.q.set_priority(b, 0).unwrap();
    f.commit(fx);
    assert_eq!([eff(&f, a), eff(&f, b), eff(&f, c)], [5, 3, 3]);
    // e canceled: a falls to what b gives it.
    let (fx, _) = f.q.cancel(e[0].id, false, 5).unwrap();
    assert_eq!(fx.rekeyed.last().map(|e| (e.id, e.effective)), Some((a, 3)));
    f.commit(fx);
    assert_eq!(eff(&f, a), 3);

    // A diamond: t needs l and r, both need base. Lowering t lowers all of them.
    let (fx, _) =
        f.q.submit(vec![target("base", &[])], vec![], 0, vec![], 6)
            .unwrap();
    f.commit(fx);
    let (fx, sides) =
        f.q.submit(
            vec![target("l", &["base"]), target("r", &["base"])],
            vec![],
            1,
            vec![],
            7,
        )
        .unwrap();
    f.commit(fx);
    let (fx, t) =
        f.q.submit(vec![target("t", &["l", "r"])], vec![], 8, vec![], 8)
            .unwrap();
    f.commit(fx);
    let base = f.q.by_drv[&PathDigest::of(&target("base", &[]).drv_path)];
    let (l, r, t) = (sides[0].id, sides[1].id, t[0].id);
    assert_eq!([eff(&f, base), eff(&f, l), eff(&f, r)], [8; 3]);
    let (fx, _) = f.q.set_priority(t, -2).unwrap();
    f.commit(fx);
    assert_eq!(
        [eff(&f, base), eff(&f, l), eff(&f, r), eff(&f, t)],
        [1, 1, 1, -2]
    );
    let (fx, _) = f.q.set_priority(r, 4).unwrap();
    f.commit(fx);
    assert_eq!([eff(&f, base), eff(&f, l), eff(&f, r)], [4, 1, 4]);

    // A producer submitted after its dependent starts with the dependent's priority, and
    // the allocator gets it with that value.
    let (fx, _) =
        f.q.submit(vec![target("x", &["y"])], vec![], 9, vec![], 9)
            .unwrap();
    f.commit(fx);
    let (fx, y) =
        f.q.submit(vec![target("y", &[])], vec![], 0, vec![], 10)
            .unwrap();
    assert_eq!(eff(&f, y[0].id), 9);
    assert_eq!(
        fx.runnable.iter().map(|e| e.effective).collect::<Vec<_>>(),
        vec![9]
    );
    f.commit(fx);

    // Restart equals memory (effective priorities are derived again at load).
    let before = fingerprint(&f.q);
    let entries = named_entries(&f.q);
    f.reload();
    assert_eq!(fingerprint(&f.q), before);
    assert_eq!(named_entries(&f.q), entries);

    // Finished and unknown builds cannot be reprioritised.
    f.uploaded("y");
    let (fx, _) = f.q.allocate(7, None, &[y[0].id], 11).unwrap();
    f.commit(fx);
    let (fx, _) = f.q.finish(7, y[0].id, 1, Ok(built("y")), 0, 12).unwrap();
    f.commit(fx);
    assert!(matches!(
        f.q.set_priority(y[0].id, 1),
        Err(QueueError::WrongState(_, BuildState::Succeeded, _))
    ));
    assert!(matches!(
        f.q.set_priority(9999, 1),
        Err(QueueError::NoSuchBuild(9999))
    ));
}

/// Priority rules apply at submission, per build (its system, the submission's tags, its
/// derivation name), and what they give is the stored own priority (a reload keeps it).
#[test]
fn priority_rules_set_the_own_priority_at_submission() {
    let (mut f, _) = Fixture::new(&[]);
    let rules: Vec<PriorityRule> = toml::from_str::<crate::config::Config>(
        "[[scheduling.priority_rules]]\nsystem = 'i586-gnu'\npriority = 20\n\
         [[scheduling.priority_rules]]\nname = 'kern*'\nadd = 4\n\
         [[scheduling.priority_rules]]\ntag = 'origin=ci'\nadd = -10\n",
    )
    .unwrap()
    .scheduling
    .priority_rules;
    f.q.set_rules(Arc::from(rules));
    let hurd = Target {
        system: "i586-gnu".into(),
        ..target("hurd", &[])
    };
    let (fx, got) =
        f.q.submit(
            vec![hurd, target("kernel", &[]), target("other", &[])],
            vec![],
            1,
            vec![],
            2,
        )
        .unwrap();
    f.commit(fx);
    assert_eq!(
        got.iter().map(|b| b.priority).collect::<Vec<_>>(),
        vec![20, 5, 1]
    );
    let (fx, ci) =
        f.q.submit(
            vec![target("kernel2", &[])],
            vec![],
            1,
            vec![("origin".into(), "ci".into())],
            3,
        )
        .unwrap();
    f.commit(fx);
    assert_eq!(ci[0].priority, -5);
    f.reload();
    assert_eq!(f.q.live_entry(got[0].id).unwrap().priority, 20);
    assert_eq!(f.q.live_entry(ci[0].id).unwrap().effective, -5);
}

/// Run build `id` (named `name`) on agent 7 to the end: leased, then finished with
/// `ok` (uploaded first) or a builder failure.
fn run_to_end(f: &mut Fixture, id: BuildId, name: &str, ok: bool, now: u64) -> Effects {
    let (fx, got) = f.q.allocate(7, None, &[id], now).unwrap();
    assert_eq!(got.leased.len(), 1, "build {id} ({name}) is leased");
    f.commit(fx);
    let outcome = if ok {
        f.uploaded(name);
        Ok(built(name))
    } else {
        Err("builder exited with 1".to_string())
    };
    let (fx, answer) = f.q.finish(7, id, 1, outcome, 1, now + 1).unwrap();
    assert!(matches!(answer, FinishAnswer::Accepted));
    fx
}

fn reason(f: &Fixture, id: BuildId) -> String {
    f.q.record(id).unwrap().unwrap().reason
}

fn id_of(f: &Fixture, name: &str) -> BuildId {
    f.q.by_drv[&PathDigest::of(&target(name, &[]).drv_path)]
}

/// Dependents of a failed build fail too, transitively, each naming its failed input, with
/// a `build-failed` event each; their other inputs lose the priority they gave; a reload
/// agrees. When the failed input is built again they are requeued (runnable or blocked),
/// except one still behind another failed input, which follows once that one is built too.
#[test]
fn dependents_of_a_failed_build_fail_and_come_back_when_it_is_rebuilt() {
    let (mut f, ids) = Fixture::new(&["a", "x", "p", "q"]);
    let (a, x, p, q) = (ids[0], ids[1], ids[2], ids[3]);
    let (fx, deps) =
        f.q.submit(
            vec![
                target("b", &["a"]),
                target("c", &["b"]),
                target("d", &["a", "x"]),
                target("r", &["p", "q"]),
            ],
            vec![],
            5,
            vec![],
            2,
        )
        .unwrap();
    f.commit(fx);
    let (b, c, d, r) = (deps[0].id, deps[1].id, deps[2].id, deps[3].id);
    assert_eq!(eff(&f, x), 5);
    let fx = run_to_end(&mut f, a, "a", false, 3);
    assert_eq!(
        kinds(&fx).iter().filter(|k| **k == "build-failed").count(),
        4,
        "a and its three dependents: {:?}",
        kinds(&fx)
    );
    assert!(fx.runnable.is_empty());
    assert_eq!(fx.rekeyed.last().map(|e| (e.id, e.effective)), Some((x, 0)));
    f.commit(fx);
    for (id, why) in [(b, a), (c, b), (d, a)] {
        assert_eq!(f.state(id), BuildState::Failed);
        assert_eq!(reason(&f, id), format!("input build {why} failed"));
    }
    assert_eq!((eff(&f, x), f.q.live_entry(x).unwrap().rdeps), (0, 0));
    assert_eq!(
        f.q.count(BuildState::Blocked),
        1,
        "only r (behind p and q) waits"
    );
    let before = fingerprint(&f.q);
    f.reload();
    assert_eq!(
        fingerprint(&f.q),
        before,
        "a reload rebuilds the same index"
    );

    // a resubmitted: nothing comes back until it is built.
    let (fx, again) =
        f.q.submit(vec![target("a", &[])], vec![], 0, vec![], 10)
            .unwrap();
    f.commit(fx);
    let a2 = again[0].id;
    assert_ne!(a2, a);
    assert_eq!(f.state(b), BuildState::Failed);
    let fx = run_to_end(&mut f, a2, "a", true, 11);
    assert_eq!(
        kinds(&fx)
            .iter()
            .filter(|k| **k == "build-requeued")
            .count(),
        3,
        "{:?}",
        kinds(&fx)
    );
    assert_eq!(
        fx.runnable
            .iter()
            .map(|e| (e.id, e.effective))
            .collect::<Vec<_>>(),
        vec![(b, 5)],
        "b keeps its priority (c waits on it)"
    );
    f.commit(fx);
    assert_eq!(f.state(b), BuildState::Runnable);
    assert_eq!(f.state(c), BuildState::Blocked);
    assert_eq!(f.state(d), BuildState::Blocked, "d waits on x");
    assert_eq!(reason(&f, c), "");
    assert_eq!(eff(&f, x), 5, "x inherits d's priority again");
    let before = fingerprint(&f.q);
    f.reload();
    assert_eq!(fingerprint(&f.q), before);
    let fx = run_to_end(&mut f, b, "b", true, 20);
    assert_eq!(
        fx.runnable.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![c]
    );
    f.commit(fx);

    // r is behind p and q; both fail; p rebuilt alone does not bring r back.
    let fx = run_to_end(&mut f, p, "p", false, 30);
    f.commit(fx);
    assert_eq!(reason(&f, r), format!("input build {p} failed"));
    let fx = run_to_end(&mut f, q, "q", false, 32);
    assert_eq!(kinds(&fx), vec!["build-started", "build-failed"]);
    f.commit(fx);
    let (fx, p2) =
        f.q.submit(vec![target("p", &[])], vec![], 0, vec![], 34)
            .unwrap();
    f.commit(fx);
    let fx = run_to_end(&mut f, p2[0].id, "p", true, 35);
    assert!(!kinds(&fx).contains(&"build-requeued"), "{:?}", kinds(&fx));
    f.commit(fx);
    assert_eq!(f.state(r), BuildState::Failed);
    let before = fingerprint(&f.q);
    f.reload();
    assert_eq!(fingerprint(&f.q), before);
    let (fx, q2) =
        f.q.submit(vec![target("q", &[])], vec![], 0, vec![], 40)
            .unwrap();
    f.commit(fx);
    let fx = run_to_end(&mut f, q2[0].id, "q", true, 41);
    assert_eq!(
        fx.runnable.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![r]
    );
    f.commit(fx);
    assert_eq!(f.state(r), BuildState::Runnable);
    assert_eq!(id_of(&f, "r"), r, "the same build, live again");
    assert!(f.q.input_failed.is_empty());
}

/// Cancellation (`cancel.rs`): a child of this module, to share its fixture.
#[path = "cancel_tests.rs"]
mod cancel_tests;
