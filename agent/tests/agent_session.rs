//! Runs the real `kiln-agent` binary against a small stand-in for the coordinator's agent API
//! (a hand-written HTTP/1.1 responder on 127.0.0.1:0 that follows the protocol contract), so
//! the session loop, the resumable upload and the result report run for real. The stand-in
//! forgets the session once (401 `session_unknown`) and keeps only half of the first upload
//! (503 + `Retry-After: 0`), so the agent must reopen the session and resume from `received`.
//! The real coordinator's end-to-end test lives in the workspace's `tests/`.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln::protocol::{Outcome, ResultReport};
use support::*;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_uploads_resumably_and_reports_through_a_session_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let state = tmp.path().join("state");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    // One input, served as a compressed NAR; the builder copies from it, so the output
    // refers to it.
    let dep = format!("{}/{DEP_HASH}-dep", store.display());
    let mut a = assignment_with(&store, &format!("mkdir -p $out/bin; printf 'hi \\377\\n' > $out/bin/hello; cat {dep}/greeting >> $out/bin/hello; echo {dep} > $out/uses; echo built"));
    let (info, nar_zst) = input(tmp.path(), &dep);
    a.inputs.push(info);
    let mut files = HashMap::new();
    files.insert("nar/dep.nar.zst".to_owned(), nar_zst);
    let fake: Shared = Arc::new(Mutex::new(Fake {
        assignment: Some(a),
        files,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));

    let agent = spawn_agent(&url, &secret, &store, &state);

    let result = wait_for("the result", Duration::from_secs(60), || {
        fake.lock().unwrap().result.clone()
    })
    .await;
    let Outcome::Succeeded { outputs } = result.outcome else {
        panic!("build failed: {:?}", result.outcome)
    };
    // As root the output lives in the agent's private store, visible at <state-dir>/store.
    let seen_at: PathBuf = [state.join("store"), store.clone()]
        .into_iter()
        .map(|d| d.join(format!("{OUT_HASH}-hello")))
        .find(|p| p.exists())
        .expect("the output exists in the agent's store view");
    assert_eq!(outputs[0].nar_hash, nix_hash(&seen_at));
    assert_eq!(
        std::fs::read(seen_at.join("bin/hello")).unwrap(),
        b"hi \xff\nfrom the input\n"
    );
    assert_eq!(
        outputs[0].references,
        vec![dep.clone()],
        "the output refers to its input"
    );
    {
        let f = fake.lock().unwrap();
        assert!(f.sessions >= 2, "the agent reopened its session");
        assert!(
            !f.work_waits.is_empty() && f.work_waits.iter().all(|w| *w == 20_000),
            "every work request is a long poll of the default wait: {:?}",
            f.work_waits
        );
        assert!(f.verified);
        assert_eq!(
            f.put_offsets.len(),
            2,
            "one broken upload, one resumed: {:?}",
            f.put_offsets
        );
        assert!(
            f.put_offsets[1] > 0,
            "the second PUT resumed from what arrived"
        );
        let log =
            zstd::decode_all(f.log.clone().expect("the log was uploaded").as_slice()).unwrap();
        assert!(log.starts_with(b"built"));
        let nar = zstd::decode_all(f.upload.as_slice()).unwrap();
        assert_eq!(nar.len() as u64, outputs[0].nar_size);
    }
    wait_for(
        "the build dir to be removed",
        Duration::from_secs(20),
        || (!state.join("builds/7-1").exists()).then_some(()),
    )
    .await;

    stop_agent(agent).await;
}

/// Pins down recovery: a result decided before the agent died (its `report.json` on disk) is
/// named in the next session opening and sent, log first; an undecided build is discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_report_is_resent_after_a_restart() {
    use kiln_agent::state::{StateDir, StoredReport};
    let tmp = tempfile::tempdir().unwrap();
    let (store, state, secret) = (
        tmp.path().join("store"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    std::fs::write(&secret, "s3cret").unwrap();
    let dirs = StateDir::open(&state).unwrap();
    let mut a = assignment(&store);
    (a.build_id, a.attempt) = (9, 2);
    let decided = dirs.build_dir(9, 2);
    decided.create().await.unwrap();
    decided.write_assignment(&a).await.unwrap();
    std::fs::write(decided.log(), b"it broke \xff\n").unwrap();
    let outcome = Outcome::Failed {
        reason: "builder exited with status 1".into(),
        kind: kiln::protocol::FailureKind::Builder,
        missing_inputs: Vec::new(),
    };
    decided
        .write_report(&StoredReport::new(9, 2, outcome.clone(), true))
        .await
        .unwrap();
    let undecided = dirs.build_dir(10, 1);
    undecided.create().await.unwrap();

    let fake: Shared = Arc::new(Mutex::new(Fake {
        forgot_once: true,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let agent = spawn_agent(&url, &secret, &store, &state);

    let result = wait_for("the resent result", Duration::from_secs(60), || {
        fake.lock().unwrap().result.clone()
    })
    .await;
    assert_eq!(
        result,
        ResultReport {
            attempt: 2,
            outcome
        }
    );
    {
        let f = fake.lock().unwrap();
        assert_eq!(
            f.opened_with[0],
            serde_json::json!([{"build_id": 9, "attempt": 2, "phase": "uploading"}])
        );
        let log = zstd::decode_all(f.log.clone().expect("the log was resent").as_slice()).unwrap();
        assert_eq!(log, b"it broke \xff\n");
    }
    assert!(
        !undecided.path.exists(),
        "a build without a result is discarded at start"
    );
    wait_for(
        "the build dir to be removed",
        Duration::from_secs(20),
        || (!decided.path.exists()).then_some(()),
    )
    .await;
    stop_agent(agent).await;
}

/// Pins down cancel through a command on the heartbeat: the builder is killed and the build is
/// reported `Failed{reason:"canceled"}` with its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_command_stops_the_builder_and_reports_canceled() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, state, secret) = (
        tmp.path().join("store"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    std::fs::write(&secret, "s3cret").unwrap();
    let a = assignment_with(&store, "echo started; exec sleep 1000");
    let fake: Shared = Arc::new(Mutex::new(Fake {
        assignment: Some(a),
        forgot_once: true,
        cancel_after_start: true,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let agent = spawn_agent(&url, &secret, &store, &state);

    let result = wait_for("the canceled result", Duration::from_secs(60), || {
        fake.lock().unwrap().result.clone()
    })
    .await;
    assert_eq!(
        result.outcome,
        Outcome::Failed {
            reason: "canceled".into(),
            kind: kiln::protocol::FailureKind::Builder,
            missing_inputs: Vec::new(),
        }
    );
    let log = fake
        .lock()
        .unwrap()
        .log
        .clone()
        .expect("the log was uploaded");
    assert!(zstd::decode_all(log.as_slice())
        .unwrap()
        .starts_with(b"started"));
    stop_agent(agent).await;
}

/// Pins down the free-disk limit: an agent whose dirs have less free space than
/// `--min-free-disk-mb` asks for no work, and its metrics say which limit holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_short_of_disk_asks_for_no_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, state, secret) = (
        tmp.path().join("store"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    std::fs::write(&secret, "s3cret").unwrap();
    let fake: Shared = Arc::new(Mutex::new(Fake {
        forgot_once: true,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let metrics = free_addr();
    // About a petabyte: no test machine has that much free.
    let agent = spawn_agent_with(
        &url,
        &secret,
        &store,
        &state,
        &[
            "--min-free-disk-mb",
            "1000000000",
            "--metrics-addr",
            &metrics,
        ],
    );
    let text = wait_for_async(
        "the disk limit to hold work back",
        Duration::from_secs(60),
        || async {
            metrics_text(&metrics)
                .await
                .filter(|t| t.contains("kiln_agent_work_held_back{reason=\"disk\"} 1"))
        },
    )
    .await;
    assert!(
        text.contains("kiln_agent_work_held_back{reason=\"load\"} 0"),
        "{text}"
    );
    // The limit is checked before the first request and holds for as long as the disk is
    // short, so no request may have gone out.
    assert!(
        fake.lock().unwrap().work_waits.is_empty(),
        "a work request went out while the disk limit held"
    );
    assert!(fake.lock().unwrap().sessions >= 1);
    stop_agent(agent).await;
}

/// Pins down `--max-allocated-builds`: with one build slot and three allocations the agent
/// asks for three builds at once (two wait for the slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_asks_for_its_allocation_not_its_slots() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, state, secret) = (
        tmp.path().join("store"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    std::fs::write(&secret, "s3cret").unwrap();
    let fake: Shared = Arc::new(Mutex::new(Fake {
        forgot_once: true,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let agent = spawn_agent_with(
        &url,
        &secret,
        &store,
        &state,
        &["--max-parallel-builds", "1", "--max-allocated-builds", "3"],
    );
    let asks = wait_for("a work request", Duration::from_secs(60), || {
        let f = fake.lock().unwrap();
        (!f.work_asks.is_empty()).then(|| f.work_asks.clone())
    })
    .await;
    assert_eq!(asks[0], 3, "{asks:?}");
    stop_agent(agent).await;
}

/// Pins down upload ordering and post-build precedence through the real agent: three builds
/// finish while the one upload slot is stuck; the two waiting are sent highest priority first,
/// and while more than `--max-waiting-uploads` wait the agent asks for no work, then asks again
/// once the backlog drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_go_by_priority_and_take_precedence_over_new_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, state, secret) = (
        tmp.path().join("store"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    std::fs::write(&secret, "s3cret").unwrap();
    let script = "mkdir -p $out; echo done > $out/f";
    let hash = |c: char| format!("0123456789abcdfghijklmnpqrsvwxy{c}");
    let mut builds = Vec::new();
    for (id, prio, c) in [(7u64, 1, 'a'), (8, 5, 'b'), (9, 3, 'c')] {
        let mut a = numbered_assignment(&store, id, &hash(c), script);
        a.priority = prio;
        builds.push(a);
    }
    let priority_of = |id: u64| {
        [(7u64, 1), (8, 5), (9, 3)]
            .iter()
            .find(|(i, _)| *i == id)
            .unwrap()
            .1
    };
    let fake: Shared = Arc::new(Mutex::new(Fake {
        forgot_once: true,
        truncated_once: true,
        hold_uploads: true,
        more_assignments: builds,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let metrics = free_addr();
    let agent = spawn_agent_with(
        &url,
        &secret,
        &store,
        &state,
        &[
            "--max-parallel-builds",
            "3",
            "--max-parallel-uploads",
            "1",
            "--max-waiting-uploads",
            "1",
            "--metrics-addr",
            &metrics,
        ],
    );
    // One build holds the slot (its PUT is stuck), two wait, and the agent holds work back.
    wait_for_async(
        "two uploads waiting and work held back",
        Duration::from_secs(90),
        || async {
            metrics_text(&metrics).await.filter(|t| {
                t.contains("\nkiln_agent_uploads_waiting 2\n")
                    && t.contains("kiln_agent_work_held_back{reason=\"uploads\"} 1")
            })
        },
    )
    .await;
    let asked_before = fake.lock().unwrap().work_waits.len();
    fake.lock().unwrap().hold_uploads = false;
    let results = wait_for("three results", Duration::from_secs(90), || {
        let f = fake.lock().unwrap();
        (f.results.len() == 3).then(|| f.results.clone())
    })
    .await;
    for (id, r) in &results {
        assert!(
            matches!(r.outcome, Outcome::Succeeded { .. }),
            "{id}: {r:?}"
        );
    }
    let waited: Vec<i32> = results[1..]
        .iter()
        .map(|(id, _)| priority_of(*id))
        .collect();
    assert!(
        waited[0] > waited[1],
        "the waiting uploads go highest priority first: {:?}",
        results.iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
    // The backlog drained: the agent asks for work again.
    wait_for(
        "a work request after the backlog drained",
        Duration::from_secs(60),
        || (fake.lock().unwrap().work_waits.len() > asked_before).then_some(()),
    )
    .await;
    stop_agent(agent).await;
}

/// Pins down `pause` and `resume` from the coordinator: a paused agent asks for no work (its
/// metrics say why) while its heartbeats go on; resumed, it asks again. A command this agent
/// does not know, sent alongside, is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_asks_for_no_work_until_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, state, secret) = (
        tmp.path().join("store"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    std::fs::write(&secret, "s3cret").unwrap();
    let fake: Shared = Arc::new(Mutex::new(Fake {
        forgot_once: true,
        heartbeat_commands: vec![
            serde_json::json!({"command": "from-the-future"}),
            serde_json::json!({"command": "pause"}),
        ],
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let metrics = free_addr();
    // No long poll: the stand-in answers at once either way.
    let agent = spawn_agent_with(
        &url,
        &secret,
        &store,
        &state,
        &["--metrics-addr", &metrics, "--work-wait-ms", "0"],
    );
    wait_for_async(
        "the pause to hold work back",
        Duration::from_secs(60),
        || async {
            metrics_text(&metrics)
                .await
                .filter(|t| t.contains("kiln_agent_work_held_back{reason=\"paused\"} 1"))
        },
    )
    .await;
    // The hold is in force (it is checked before each request): while eight more heartbeats
    // (about 1.6 s, past the agent's ~1 s re-check) go by, no work request goes out.
    let (asked, beats) = {
        let f = fake.lock().unwrap();
        (f.work_waits.len(), f.heartbeats)
    };
    wait_for("eight more heartbeats", Duration::from_secs(60), || {
        (fake.lock().unwrap().heartbeats >= beats + 8).then_some(())
    })
    .await;
    assert_eq!(
        fake.lock().unwrap().work_waits.len(),
        asked,
        "a paused agent asked for work"
    );
    fake.lock()
        .unwrap()
        .heartbeat_commands
        .push(serde_json::json!({"command": "resume"}));
    wait_for(
        "a work request after resume",
        Duration::from_secs(60),
        || (fake.lock().unwrap().work_waits.len() > asked).then_some(()),
    )
    .await;
    stop_agent(agent).await;
}

/// Pins down that a wrong name or secret is fatal: the agent exits non-zero and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_agent_exits_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "wrong").unwrap();
    let fake: Shared = Arc::new(Mutex::new(Fake {
        refuse: true,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["--coordinator", &url, "--name", "a1", "--secret-file"])
        .arg(&secret)
        .arg("--store-dir")
        .arg(tmp.path().join("store"))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused this agent (unauthorized)"),
        "{stderr}"
    );
}

#[test]
fn the_nix_and_guix_executors_are_refused_until_issue_8() {
    for executor in ["nix", "guix"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .args([
                "--coordinator",
                "http://127.0.0.1:9",
                "--name",
                "a",
                "--secret-file",
                "/nonexistent",
            ])
            .args(["--state-dir", "/nonexistent", "--executor", executor])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("[8/8]") && stderr.contains(executor),
            "{stderr}"
        );
    }
}
