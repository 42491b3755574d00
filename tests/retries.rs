//! Automatic retries and deferral over real HTTP to a real coordinator process, the agent
//! played by the test:
//! - an agent that reports a setup failure on every attempt gets the build again (a new
//!   attempt, after the backoff) until the infrastructure cap is reached; then the build is
//!   `failed` with a reason that says so;
//! - `kiln submit --defer-until +1h` (the CLI) queues a build that no agent is offered, also
//!   after a coordinator restart, and `kiln build show` says until when; a build submitted
//!   through the API with `defer_until_ms` a moment ahead is offered once that time came,
//!   never before.

mod common;
mod leases_common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use kiln::derivation::store_path::StoreDir;
use leases_common::{build, events, events_of, register, state_of, RawAgent};
use serde_json::{json, Value};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Setup {
    c: Coordinator,
    store: std::path::PathBuf,
    sd: StoreDir,
    _tmp: tempfile::TempDir,
}

fn setup(extra: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, extra);
    Setup {
        c,
        store,
        sd,
        _tmp: tmp,
    }
}

/// Ask for work until a build is handed out (each ask answers at once); the assignment.
fn next_assignment(a: &RawAgent) -> Value {
    wait_for("a build to be offered", Duration::from_secs(90), || {
        let w = a.work(None, 1);
        let b = w["builds"].as_array()?.first()?.clone();
        Some(b)
    })
}

/// Setup failures are infrastructure failures: retried (new attempt each time) up to
/// `infrastructure` times, with the backoff between; the next one fails the build with a
/// reason that names the count and the last failure. The build's record counts them.
#[test]
fn setup_failures_are_retried_up_to_the_cap_then_fail_the_build() {
    let s = setup(
        "[scheduling.retries]\ninfrastructure = 2\nbackoff_initial_ms = 200\nbackoff_max_ms = 400\n",
    );
    let secret = register(&s.c, "a1");
    let (a, _) = RawAgent::open(&s.c, "a1", &secret, json!([]));
    let drv = simple_drv(&s.sd, "flaky", "exit 0");
    let id = leases_common::submit(&s.c, &[drv])[0];
    let mut attempts = Vec::new();
    for n in 1..=3u64 {
        let asg = next_assignment(&a);
        assert_eq!(asg["build_id"], id);
        let attempt = asg["attempt"].as_u64().unwrap() as u32;
        attempts.push(attempt);
        let (code, ack) = a.result(
            id,
            attempt,
            json!({"result": "failed", "reason": "input /s/x could not be fetched",
                "kind": "setup"}),
        );
        assert_eq!(code, 200, "{ack}");
        assert_eq!(ack["duplicate"], false);
        assert_eq!(build(&s.c, id)["retries"], n, "after failure {n}");
        if n < 3 {
            assert_eq!(state_of(&s.c, id), "runnable");
        }
    }
    assert_eq!(attempts, vec![1, 2, 3]);
    let b = build(&s.c, id);
    assert_eq!(b["summary"]["state"], "failed", "{b}");
    let reason = b["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("gave up after 3 infrastructure failures (2 retries; last: setup failure: input /s/x could not be fetched)"),
        "{reason}"
    );
    // Nothing is offered any more.
    assert!(a.work(None, 1)["builds"].as_array().unwrap().is_empty());
    // Each retried failure ended the lease with the count and the backoff in the event.
    let ev = events(&s.c);
    let expired = events_of(&ev, "lease-expired", id);
    assert_eq!(expired.len(), 2, "{expired:?}");
    assert_eq!(expired[0]["data"]["retries"], 1);
    assert_eq!(
        expired[0]["data"]["defer_until_ms"], 0,
        "the first retry is at once"
    );
    assert_eq!(expired[1]["data"]["retries"], 2);
    assert!(expired[1]["data"]["defer_until_ms"].as_u64().unwrap() > 0);
    assert_eq!(events_of(&ev, "build-failed", id).len(), 1);
}

fn kiln(c: &Coordinator) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_COORDINATOR", &c.client_url);
    cmd
}

/// `--defer-until` through the CLI holds a build back (also across a restart, from its
/// record) and `kiln build show` says so; one deferred a moment ahead through the API is
/// offered when its time came, and not before.
#[test]
fn deferred_builds_are_offered_only_from_their_time_on() {
    let mut s = setup("");
    let secret = register(&s.c, "a1");
    let (drv_path, bytes) = simple_drv(&s.sd, "later", "exit 0");
    std::fs::write(&drv_path, &bytes).unwrap();
    let before = now_ms();
    let out = kiln(&s.c)
        .arg("submit")
        .arg("--store-dir")
        .arg(&s.store)
        .args(["--defer-until", "+1h", "--json"])
        .arg(&drv_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let submitted: Value = serde_json::from_slice(&out.stdout).unwrap();
    let late = submitted["builds"][0]["id"].as_u64().unwrap();
    let b = build(&s.c, late);
    assert_eq!(b["summary"]["state"], "runnable");
    let until = b["defer_until_ms"].as_u64().unwrap();
    assert!(
        until >= before + 3_600_000 && until <= now_ms() + 3_600_000,
        "{until}"
    );
    let shown = kiln(&s.c)
        .args(["build", "show", &late.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("deferred:  until "), "{text}");

    let (mut a, _) = RawAgent::open(&s.c, "a1", &secret, json!([]));
    assert!(a.work(None, 4)["builds"].as_array().unwrap().is_empty());

    // A restart loads the deferral from the record.
    s.c.kill9();
    s.c.spawn();
    a.base = s.c.agent_url.clone();
    a.reopen(json!([]));
    assert!(a.work(None, 4)["builds"].as_array().unwrap().is_empty());
    assert_eq!(build(&s.c, late)["defer_until_ms"], until);

    // A build deferred by two seconds through the API: offered once the time came.
    let soon_drv = simple_drv(&s.sd, "soon", "exit 0");
    let not_before = now_ms() + 2_000;
    let (code, r) = post(
        &s.c.url("/api/v1/builds"),
        &json!({"derivations": [{"path": soon_drv.0, "contents": b64(&soon_drv.1)}],
            "builds": [soon_drv.0], "defer_until_ms": not_before}),
    );
    assert_eq!(code, 200, "{r}");
    let soon = r["builds"][0]["id"].as_u64().unwrap();
    let asg = next_assignment(&a);
    assert!(now_ms() >= not_before, "offered before its time");
    assert_eq!(asg["build_id"], soon);
    // The build deferred by an hour is still held back.
    assert!(a.work(None, 4)["builds"].as_array().unwrap().is_empty());
    assert_eq!(state_of(&s.c, late), "runnable");
}
