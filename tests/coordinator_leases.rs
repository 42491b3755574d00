//! Leases across a coordinator restart (SIGKILL): they are in sled, and their agents get the
//! agent timeout as a grace period. An agent that comes back in time keeps its lease (same
//! attempt); one that does not is lost, and its builds are leased again with a new attempt.

mod common;

use std::time::Duration;

use common::*;
use kiln::derivation::store_path::StoreDir;

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

fn state_of(c: &Coordinator, id: u64) -> String {
    get(&c.url(&format!("/api/v1/builds/{id}"))).1["summary"]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

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
    // A late report on the old attempt is refused and changes nothing.
    let token = open(&s.c, &s.secret, serde_json::json!([]));
    let (code, r) = response(
        ureq::post(&s.c.agent(&format!("/api/agent/v1/builds/{}/start", s.build)))
            .set("x-kiln-session", &token)
            .send_json(serde_json::json!({"attempt": 1})),
    );
    assert_eq!(code, 409, "{r}");
    assert_eq!(r["error"]["code"], "stale_attempt");
    let w = work(&s.c, &token);
    assert_eq!(w["builds"][0]["build_id"].as_u64(), Some(s.build));
    assert_eq!(
        w["builds"][0]["attempt"], 2,
        "allocating again raises the attempt"
    );
}
