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
            reason: "canceled".into()
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
