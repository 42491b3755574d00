//! Leases over real HTTP to a real coordinator, with the agent played by the test so replies
//! can be lost on purpose:
//! - across a coordinator restart (SIGKILL) leases are in sled, and their agents get the agent
//!   timeout as a grace period: back in time, the lease is kept (same attempt); not back, the
//!   agent is lost and its builds are leased again with a new attempt;
//! - a work request retried with the same id gets the same assignments, also after a restart;
//! - a lease whose work reply never reached its agent ends within the unheld bound (its
//!   heartbeats do not list it) and the build is then built by a real agent;
//! - a refused result leaves the build in a defined state, and a later report is not taken
//!   for a duplicate of the refused one.

mod common;
mod leases_common;

use std::time::Duration;

use common::*;
use kiln::derivation::store_path::StoreDir;
use leases_common::{events, events_of, register, submit, AgentProc, Nar, RawAgent};
use serde_json::json;

struct Setup {
    c: Coordinator,
    secret: String,
    build: u64,
    _tmp: tempfile::TempDir,
}

fn open(c: &Coordinator, secret: &str, held: serde_json::Value) -> String {
    let (code, s) = post(
        &c.agent("/api/agent/v1/session"),
        &serde_json::json!({"name": "a1", "secret": secret, "protocol_version": 1,
            "systems": ["x86_64-linux"], "max_parallel_builds": 1, "builds": held}),
    );
    assert_eq!(code, 200, "{s}");
    s["session_token"].as_str().unwrap().to_string()
}

fn work(c: &Coordinator, token: &str) -> serde_json::Value {
    response(
        ureq::post(&c.agent("/api/agent/v1/work"))
            .set("x-kiln-session", token)
            .send_json(serde_json::json!({"max_builds": 1})),
    )
    .1
}

use leases_common::state_of;

/// One agent holds one build at attempt 1; then the coordinator is SIGKILLed and restarted.
fn leased_then_restarted(agent_timeout_ms: u64) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let mut c = Coordinator::start(
        tmp.path(),
        &store,
        &format!(
            "[timeouts]\nheartbeat_interval_ms = 200\nagent_timeout_ms = {agent_timeout_ms}\n"
        ),
    );
    let (_, agent) = post(
        &c.url("/api/v1/agents"),
        &serde_json::json!({"name": "a1", "systems": ["x86_64-linux"]}),
    );
    let secret = agent["secret"].as_str().unwrap().to_string();
    let (p, b) = simple_drv(&sd, "leased", "echo > $out");
    let (code, r) = post(
        &c.url("/api/v1/builds"),
        &serde_json::json!({"derivations": [{"path": p, "contents": b64(&b)}], "builds": [p]}),
    );
    assert_eq!(code, 200, "{r}");
    let token = open(&c, &secret, serde_json::json!([]));
    let w = work(&c, &token);
    let build = w["builds"][0]["build_id"].as_u64().unwrap();
    assert_eq!(w["builds"][0]["attempt"], 1);
    c.kill9();
    c.spawn();
    Setup {
        c,
        secret,
        build,
        _tmp: tmp,
    }
}

#[test]
fn an_agent_back_within_the_grace_period_keeps_its_lease() {
    // A long timeout: the agent is surely back in time, even on a slow machine.
    let s = leased_then_restarted(60_000);
    let (_, agents) = get(&s.c.url("/api/v1/agents"));
    assert_eq!(agents[0]["status"], "awaited", "{agents}");
    assert_eq!(state_of(&s.c, s.build), "allocated");
    let token = open(
        &s.c,
        &s.secret,
        serde_json::json!([{"build_id": s.build, "attempt": 1, "phase": "building"}]),
    );
    let (code, r) = response(
        ureq::post(&s.c.agent(&format!("/api/agent/v1/builds/{}/start", s.build)))
            .set("x-kiln-session", &token)
            .send_json(serde_json::json!({"attempt": 1})),
    );
    assert_eq!(code, 200, "the re-adopted lease keeps attempt 1: {r}");
    assert_eq!(state_of(&s.c, s.build), "building");
}

#[test]
fn an_agent_that_does_not_come_back_loses_its_leases_after_the_timeout() {
    let s = leased_then_restarted(1500);
    wait_for("the lease to expire", Duration::from_secs(30), || {
        (state_of(&s.c, s.build) == "runnable").then_some(())
    });
    let (_, agents) = get(&s.c.url("/api/v1/agents"));
    assert_eq!(agents[0]["status"], "lost", "{agents}");
    // Back without the build: allocating it again raises the attempt.
    let token = open(&s.c, &s.secret, serde_json::json!([]));
    let w = work(&s.c, &token);
    assert_eq!(w["builds"][0]["build_id"].as_u64(), Some(s.build));
    assert_eq!(
        w["builds"][0]["attempt"], 2,
        "allocating again raises the attempt"
    );
    // A late report on the old attempt is refused and changes nothing.
    let (code, r) = response(
        ureq::post(&s.c.agent(&format!("/api/agent/v1/builds/{}/start", s.build)))
            .set("x-kiln-session", &token)
            .send_json(serde_json::json!({"attempt": 1})),
    );
    assert_eq!(code, 409, "{r}");
    assert_eq!(r["error"]["code"], "stale_attempt");
    assert_eq!(state_of(&s.c, s.build), "allocated");
}

/// A coordinator with one derivation store, and the given `[timeouts]`.
fn coordinator(timeouts: &str) -> (Coordinator, StoreDir, std::path::PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, &format!("[timeouts]\n{timeouts}\n"));
    (c, sd, store, tmp)
}

/// Pins item 1 of [3/8]: a work reply lost after the lease was committed strands nothing. The
/// retry (same request id) gets the same assignments; after a coordinator SIGKILL the agent
/// reopens its session without the build (it never got it), and the retry still gets it back,
/// same attempt.
#[test]
fn a_retried_work_request_gets_the_same_assignments_also_after_a_restart() {
    let (mut c, sd, _store, _tmp) =
        coordinator("heartbeat_interval_ms = 200\nagent_timeout_ms = 60000");
    let secret = register(&c, "a1");
    let ids = submit(
        &c,
        &[
            simple_drv(&sd, "one", "echo one > $out"),
            simple_drv(&sd, "two", "echo two > $out"),
        ],
    );
    let (mut a, _) = RawAgent::open(&c, "a1", &secret, json!([]));
    // The reply to this request is "lost": the test only keeps it to compare.
    let lost = a.work(Some("req-1"), 1);
    let x = lost["builds"][0]["build_id"].as_u64().unwrap();
    assert_eq!(lost["builds"].as_array().unwrap().len(), 1, "{lost}");
    assert_eq!(lost["builds"][0]["attempt"], 1);
    let again = a.work(Some("req-1"), 1);
    assert_eq!(
        again["builds"], lost["builds"],
        "the retry gets the same assignments"
    );
    assert_eq!(
        events_of(&events(&c), "build-allocated", x).len(),
        1,
        "leased once"
    );
    // The other build is still runnable: a new request gets it.
    let y = ids.iter().copied().find(|i| *i != x).unwrap();
    let other = a.work(Some("req-2"), 1);
    assert_eq!(other["builds"][0]["build_id"].as_u64(), Some(y));

    c.kill9();
    c.spawn();
    a.base = c.agent_url.clone();
    a.reopen(json!([{"build_id": y, "attempt": 1, "phase": "building"}]));
    assert_eq!(
        state_of(&c, x),
        "runnable",
        "released at the reopening: not held"
    );
    let after = a.work(Some("req-1"), 1);
    assert_eq!(
        after["builds"], lost["builds"],
        "same build, same attempt after a restart"
    );
    assert_eq!(state_of(&c, x), "allocated");
    let ev = events(&c);
    assert_eq!(events_of(&ev, "build-allocated", x).len(), 1);
    assert_eq!(events_of(&ev, "lease-readopted", x).len(), 1);
    let (code, r) = a.start(x, 1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        state_of(&c, y),
        "allocated",
        "the held build kept its lease"
    );
}

/// Pins item 2: a lease whose work reply never reached the agent ends once the agent's
/// heartbeats have not listed it for the unheld bound (measured from the allocation), with a
/// `lease-expired` event, the attempt unchanged; then a real agent builds it.
#[test]
fn a_lease_the_agent_never_received_is_released_within_its_bound_then_built() {
    let (c, sd, store, tmp) = coordinator(
        "heartbeat_interval_ms = 200\nagent_timeout_ms = 60000\nunheld_lease_ms = 2000",
    );
    let secret = register(&c, "ghost");
    let ids = submit(&c, &[simple_drv(&sd, "unheld", "echo > $out")]);
    let (ghost, _) = RawAgent::open(&c, "ghost", &secret, json!([]));
    // The lease is granted after this instant (same clock as the coordinator's events).
    let asked_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let w = ghost.work(Some("lost-reply"), 1);
    assert_eq!(w["builds"][0]["build_id"].as_u64(), Some(ids[0]));
    // The agent never got the reply: its heartbeats list nothing.
    wait_for("the unheld lease to end", Duration::from_secs(60), || {
        ghost.heartbeat(json!([]));
        (state_of(&c, ids[0]) == "runnable").then_some(())
    });
    let ev = events(&c);
    let expired = events_of(&ev, "lease-expired", ids[0]);
    assert_eq!(expired.len(), 1, "{ev:?}");
    assert_eq!(expired[0]["data"]["reason"], "not held by its agent");
    assert_eq!(expired[0]["data"]["attempt"], 1);
    // Not released before its bound (an ordering of two instants, not a performance claim).
    let expired_ms = expired[0]["time_ms"].as_u64().unwrap();
    assert!(
        expired_ms >= asked_ms + 2000,
        "released {} ms after the request, before its bound of 2000 ms",
        expired_ms.saturating_sub(asked_ms)
    );

    let builder = register(&c, "builder");
    let _agent = AgentProc::start(tmp.path(), &c.agent_url, &store, "builder", &builder);
    wait_for("a real agent to build it", Duration::from_secs(120), || {
        (state_of(&c, ids[0]) == "succeeded").then_some(())
    });
    let b = leases_common::build(&c, ids[0]);
    assert_eq!(b["attempt"], 2);
    assert_eq!(b["agent"], "builder");
}

/// Pins item 3: a refused result settles the build (failed with the refusal as reason, or
/// runnable again when the refusal was transient), and leaves no "accepted" marker: a later
/// correct report is not answered `duplicate`.
#[test]
fn a_refused_result_settles_the_build_and_a_later_report_is_no_duplicate() {
    let (c, sd, _store, tmp) = coordinator("heartbeat_interval_ms = 200\nagent_timeout_ms = 60000");
    let secret = register(&c, "a1");
    let ids = submit(
        &c,
        &[
            simple_drv(&sd, "refused", "echo > $out"),
            simple_drv(&sd, "transient", "echo t > $out"),
        ],
    );
    let (a, _) = RawAgent::open(&c, "a1", &secret, json!([]));
    let w = a.work(Some("w1"), 2);
    let out_of = |id: u64| -> String {
        w["builds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["build_id"].as_u64() == Some(id))
            .unwrap()["outputs"][0]["path"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (x, y) = (ids[0], ids[1]);
    for id in [x, y] {
        assert_eq!(a.start(id, 1).0, 200);
    }

    // A NarHash that is not the verified upload's: refused for good.
    let nar = Nar::of_file(tmp.path(), b"refused output");
    let (code, up) = a.upload(x, 1, &nar);
    assert_eq!((code, &up["verified"]), (200, &json!(true)), "{up}");
    let mut wrong = nar.success(&out_of(x));
    wrong["outputs"][0]["nar_hash"] = json!(Nar::of_file(tmp.path(), b"other").nar_hash);
    let (code, r) = a.result(x, 1, wrong);
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (422, Some("bad_result")),
        "{r}"
    );
    let b = leases_common::build(&c, x);
    assert_eq!(b["summary"]["state"], "failed");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .starts_with("result refused: "),
        "{b}"
    );
    let (code, r) = a.result(x, 1, nar.success(&out_of(x)));
    assert_eq!(code, 409, "a later report is stale, not a duplicate: {r}");
    assert_eq!(r["error"]["code"], "stale_attempt");
    assert_eq!(state_of(&c, x), "failed");

    // An output never uploaded: refused for now, the build goes back to the queue.
    let nar_y = Nar::of_file(tmp.path(), b"transient output");
    let (code, r) = a.result(y, 1, nar_y.success(&out_of(y)));
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (422, Some("output_not_uploaded")),
        "{r}"
    );
    assert_eq!(
        state_of(&c, y),
        "runnable",
        "never left leased to an agent that dropped it"
    );
    assert_eq!(a.upload(y, 1, &nar_y).0, 409, "the lease is gone");
    let w2 = a.work(Some("w2"), 1);
    assert_eq!(w2["builds"][0]["build_id"].as_u64(), Some(y));
    assert_eq!(w2["builds"][0]["attempt"], 2);
    assert_eq!(a.start(y, 2).0, 200);
    assert_eq!(a.upload(y, 2, &nar_y).0, 200);
    let (code, r) = a.result(y, 2, nar_y.success(&out_of(y)));
    assert_eq!((code, &r["duplicate"]), (200, &json!(false)), "{r}");
    let (code, r) = a.result(y, 2, nar_y.success(&out_of(y)));
    assert_eq!((code, &r["duplicate"]), (200, &json!(true)), "{r}");
    assert_eq!(state_of(&c, y), "succeeded");

    let ev = events(&c);
    let failed = events_of(&ev, "build-failed", x);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["data"]["refused"], true);
    assert!(events_of(&ev, "build-succeeded", x).is_empty());
    let expired = events_of(&ev, "lease-expired", y);
    assert_eq!(expired.len(), 1);
    assert!(expired[0]["data"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("result refused: "));
    assert_eq!(
        events_of(&ev, "build-succeeded", y).len(),
        1,
        "accepted once"
    );
}

/// Pins item 6 at the HTTP level, deterministically: an agent declared lost that comes back
/// gets no new work until a heartbeat said what it holds (else the build it still runs would
/// be handed to it again under a new attempt and built twice); its heartbeat re-adopts the
/// build at the same attempt.
#[test]
fn a_lost_agent_that_comes_back_readopts_before_it_gets_new_work() {
    let (c, sd, _store, _tmp) = coordinator("heartbeat_interval_ms = 200\nagent_timeout_ms = 1500");
    let secret = register(&c, "a1");
    let ids = submit(&c, &[simple_drv(&sd, "readopt", "echo > $out")]);
    let (a, _) = RawAgent::open(&c, "a1", &secret, json!([]));
    let w = a.work(Some("w1"), 1);
    assert_eq!(w["builds"][0]["build_id"].as_u64(), Some(ids[0]));
    assert_eq!(a.start(ids[0], 1).0, 200);
    // Silence: the agent is lost and its lease expires.
    wait_for("the agent to be lost", Duration::from_secs(60), || {
        (state_of(&c, ids[0]) == "runnable").then_some(())
    });
    let w = a.work(Some("w2"), 1);
    assert_eq!(
        w["builds"],
        json!([]),
        "no new work before the heartbeat: {w}"
    );
    assert_eq!(state_of(&c, ids[0]), "runnable");
    let r = a.heartbeat(json!([{"build_id": ids[0], "attempt": 1, "phase": "building"}]));
    assert_eq!(r["commands"], json!([]), "{r}");
    let b = leases_common::build(&c, ids[0]);
    assert_eq!(
        (b["summary"]["state"].as_str(), b["attempt"].as_u64()),
        (Some("building"), Some(1)),
        "{b}"
    );
    assert_eq!(events_of(&events(&c), "lease-readopted", ids[0]).len(), 1);
    // Work flows again after the heartbeat; nothing else is runnable.
    assert_eq!(a.work(Some("w3"), 1)["builds"], json!([]));
}

/// Every lease has an end that needs no message from its holder: an agent that talks (here:
/// empty work requests) but sends no heartbeats loses the leases it never started after the
/// unheld bound; a lease it started stays.
#[test]
fn an_agent_without_heartbeats_loses_the_leases_it_never_started() {
    let (c, sd, _store, _tmp) = coordinator(
        "heartbeat_interval_ms = 200\nagent_timeout_ms = 60000\nunheld_lease_ms = 1000",
    );
    let secret = register(&c, "quiet");
    let ids = submit(
        &c,
        &[
            simple_drv(&sd, "started", "echo s > $out"),
            simple_drv(&sd, "never-started", "echo n > $out"),
        ],
    );
    let (a, _) = RawAgent::open(&c, "quiet", &secret, json!([]));
    let w = a.work(Some("q1"), 2);
    assert_eq!(w["builds"].as_array().unwrap().len(), 2, "{w}");
    assert_eq!(a.start(ids[0], 1).0, 200);
    wait_for(
        "the unstarted lease to end",
        Duration::from_secs(60),
        || {
            a.work(None, 0); // a sign of life that is not a heartbeat
            (state_of(&c, ids[1]) == "runnable").then_some(())
        },
    );
    let expired = events_of(&events(&c), "lease-expired", ids[1]);
    assert_eq!(expired.len(), 1);
    assert_eq!(
        expired[0]["data"]["reason"],
        "never started and no heartbeat"
    );
    assert_eq!(state_of(&c, ids[0]), "building", "a started lease stays");
}
