//! Cancellation of running builds, with a real coordinator process on loopback:
//! - a real `kiln-agent` (native executor) runs a builder that forks `sleep 1000 &` and then
//!   sleeps; `kiln build cancel ID` (the real client binary) cancels it while it is building:
//!   the build is `canceled` at once with its reason, the agent is told with its next
//!   heartbeat, kills the builder's whole process group (no process of it is left, per
//!   /proc), uploads the log and reports the build canceled, and gets its report acknowledged;
//!   the state stays `canceled`, the log is kept, nothing runs again;
//! - with the agent played over raw HTTP: `POST /api/v1/builds/{id}/cancel?dependents=true`
//!   on a chain a <- b <- c cancels all three with their reasons (`kiln build cancel
//!   --dependents` prints them), the holder's heartbeat gets `cancel`, its late reports end
//!   its retrying without changing anything (the failure result is acknowledged, a start is
//!   refused as stale), and a second cancel is a 409 naming the state.
//!
//! No timed assertions: every wait is a deadline poller that only bounds a hang.

mod common;
mod leases_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use kiln::derivation::store_path::StoreDir;
use leases_common::*;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(120);

/// A builder that records its PID (its process group's id) and its background child's, then
/// sleeps; it never finishes on its own within a test.
fn forking_script(runs: &Path) -> String {
    format!(
        "PATH=/usr/bin:/bin; echo $$ >> {runs}; sleep 1000 & echo $! >> {runs}; sleep 1000; echo built > $out",
        runs = runs.display()
    )
}

/// Is process `pid` alive (not a zombie)?
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .is_some_and(|s| s != "Z")
}

/// The agent's log without ANSI colour sequences (`ESC [ … m`).
fn plain_log(agent: &AgentProc) -> String {
    let raw = agent.log_text();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // Bounded by the text: skip up to and including the final 'm'.
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

fn kiln(c: &Coordinator, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(kiln_bin())
        .args(args)
        .args(["--coordinator", &c.client_url])
        .output()
        .expect("run kiln");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_running_build_is_canceled_on_its_agent_and_its_whole_process_group_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(
        tmp.path(),
        &store,
        "[timeouts]\nheartbeat_interval_ms = 200\nagent_timeout_ms = 30000\n",
    );
    let secret = register(&c, "a1");
    let mut agent = AgentProc::start(tmp.path(), &c.agent_url, &store, "a1", &secret);
    let run_file = tmp.path().join("forker.runs");
    let id = submit(&c, &[simple_drv(&sd, "forker", &forking_script(&run_file))])[0];

    // Building, and both the builder and its background child run.
    let (pgid, child) = wait_for("the builder and its child to run", DEADLINE, || {
        agent.assert_running();
        let pids: Vec<i32> = runs(&run_file)
            .iter()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        (pids.len() == 2 && state_of(&c, id) == "building").then(|| (pids[0], pids[1]))
    });
    assert!(group_alive(pgid), "the builder's group {pgid} runs");
    assert!(alive(child), "the background sleep {child} runs");

    let (ok, out, err) = kiln(&c, &["build", "cancel", &id.to_string()]);
    assert!(ok, "kiln build cancel failed: {err}");
    assert!(out.contains(&format!("{id:<6} canceled")), "{out}");
    assert!(
        out.contains("canceled 1 build(s) (its agent was told to stop the builder)"),
        "{out}"
    );
    // Canceled at once, durably, with the reason.
    let d = build(&c, id);
    assert_eq!(d["summary"]["state"], "canceled", "{d}");
    assert_eq!(d["reason"], "canceled by request", "{d}");

    // The agent kills the whole group: the background child too.
    wait_for(
        "no process of the builder's group to be left",
        DEADLINE,
        || {
            agent.assert_running();
            (!group_alive(pgid) && !alive(child)).then_some(())
        },
    );
    // It reports the build canceled and the coordinator acknowledges the report.
    let acked = |log: &str| {
        log.lines()
            .any(|l| l.contains("result acknowledged") && l.contains(&format!("build_id={id}")))
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    while !acked(&plain_log(&agent)) {
        agent.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the agent's canceled report to be acknowledged; its log:\n{}",
            plain_log(&agent)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = plain_log(&agent);
    assert!(
        log.lines()
            .any(|l| l.contains("stopping build") && l.contains("Cancel")),
        "the agent was told to cancel: {log}"
    );
    // Nothing changed its state, it never ran again, and the log of what it ran is kept.
    let d = build(&c, id);
    assert_eq!(
        (d["summary"]["state"].as_str(), d["attempt"].as_u64()),
        (Some("canceled"), Some(1)),
        "{d}"
    );
    assert_eq!(d["reason"], "canceled by request", "{d}");
    assert_eq!(d["has_log"], true, "{d}");
    assert_eq!(runs(&run_file).len(), 2, "one builder run (two pids)");
    let all = events(&c);
    let canceled = events_of(&all, "build-canceled", id);
    assert_eq!(canceled.len(), 1, "{all:?}");
    assert_eq!(
        canceled[0]["data"]["reason"], "canceled by request",
        "{canceled:?}"
    );
    assert!(
        events_of(&all, "build-allocated", id).len() == 1,
        "allocated once: {all:?}"
    );
}

fn error_code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

#[test]
fn dependents_are_canceled_on_request_and_late_reports_of_a_canceled_attempt_end_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, "");
    let ids = submit(&c, &chain(&sd, &["a", "b", "c"]));
    let (a, b, cc) = (ids[0], ids[1], ids[2]);
    assert_eq!(
        (state_of(&c, b), state_of(&c, cc)),
        ("blocked".to_string(), "blocked".to_string())
    );
    let secret = register(&c, "raw");
    let (agent, _) = RawAgent::open(&c, "raw", &secret, json!([]));
    let w = agent.work(Some("w1"), 1);
    assert_eq!(w["builds"][0]["build_id"], a, "{w}");
    assert_eq!(w["builds"][0]["attempt"], 1, "{w}");
    let (code, r) = agent.start(a, 1);
    assert_eq!(code, 200, "{r}");

    // A query the route does not know is refused; nothing is canceled.
    let (code, r) = post(
        &c.url(&format!("/api/v1/builds/{a}/cancel?dependents=maybe")),
        &json!({}),
    );
    assert_eq!(code, 400, "{r}");
    assert_eq!(state_of(&c, a), "building");

    let (code, r) = post(
        &c.url(&format!("/api/v1/builds/{a}/cancel?dependents=true")),
        &json!({}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        (r["id"].as_u64(), r["state"].as_str()),
        (Some(a), Some("canceled")),
        "{r}"
    );
    assert_eq!(r["canceled"], 3, "{r}");
    assert_eq!(r["was_running"], true, "{r}");
    let deps: Vec<(u64, &str)> = r["dependents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_u64().unwrap(), d["state"].as_str().unwrap()))
        .collect();
    assert_eq!(deps, vec![(b, "canceled"), (cc, "canceled")], "{r}");
    assert_eq!(
        build(&c, b)["reason"],
        format!("canceled: input build {a} was canceled")
    );
    assert_eq!(
        build(&c, cc)["reason"],
        format!("canceled: input build {b} was canceled")
    );

    // The holder's heartbeat says cancel (once, though pushed and reconciled).
    let hb = agent.heartbeat(json!([{"build_id": a, "attempt": 1, "phase": "building"}]));
    assert_eq!(
        hb["commands"],
        json!([{"command": "cancel", "build_id": a, "attempt": 1}]),
        "{hb}"
    );
    // Its late reports end its retrying and change nothing.
    let (code, r) = agent.start(a, 1);
    assert_eq!((code, error_code(&r)), (409, Some("stale_attempt")), "{r}");
    for _ in 0..2 {
        let (code, r) = agent.result(a, 1, json!({"result": "failed", "reason": "canceled"}));
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["duplicate"], true, "{r}");
    }
    let d = build(&c, a);
    assert_eq!(
        (
            d["summary"]["state"].as_str(),
            d["reason"].as_str(),
            d["attempt"].as_u64()
        ),
        (Some("canceled"), Some("canceled by request"), Some(1)),
        "{d}"
    );
    // No new lease of it: the agent gets nothing.
    let w = agent.work(Some("w2"), 4);
    assert_eq!(w["builds"], json!([]), "{w}");

    // A second cancel names the state.
    let (code, r) = post(&c.url(&format!("/api/v1/builds/{a}/cancel")), &json!({}));
    assert_eq!((code, error_code(&r)), (409, Some("wrong_state")), "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("canceled"),
        "{r}"
    );

    let all = events(&c);
    for (id, reason) in [
        (a, "canceled by request".to_string()),
        (b, format!("canceled: input build {a} was canceled")),
        (cc, format!("canceled: input build {b} was canceled")),
    ] {
        let e = events_of(&all, "build-canceled", id);
        assert_eq!(e.len(), 1, "{all:?}");
        assert_eq!(e[0]["data"]["reason"], reason.as_str(), "{e:?}");
    }

    // The client: --dependents on another chain prints every canceled build and the count.
    let more = submit(&c, &chain(&sd, &["p", "q"]));
    let (ok, out, err) = kiln(
        &c,
        &["build", "cancel", &more[0].to_string(), "--dependents"],
    );
    assert!(ok, "{err}");
    assert!(out.contains(&format!("{:<6} canceled", more[0])), "{out}");
    assert!(out.contains(&format!("{:<6} canceled", more[1])), "{out}");
    assert!(out.contains("canceled 2 build(s)"), "{out}");
    assert_eq!(state_of(&c, more[1]), "canceled");
}
