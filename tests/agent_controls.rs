//! Operators' agent controls over real HTTP to a real coordinator, agents played by the test
//! (real sessions, work requests, heartbeats and results):
//! - a paused agent gets no work while another does, also when it ignores `pause` and keeps
//!   asking, and also after a coordinator restart (the pause is stored); resume → work again;
//!   an unknown agent is a 404 that names it;
//! - drain: the held build is finished, no new one is taken, the agent shows `drained`;
//! - quarantine after N setup failures in a row: no work (another agent gets it), visible in
//!   the agent list with its end, an `agent-quarantined` event; resume lifts it;
//! - expiry: an agent not seen for `agents.expire_after_ms` is removed (its lease released,
//!   its credentials revoked, an `agent-expired` event), one that keeps talking is not.
//!
//! No timed assertions: every wait is a deadline poller that only bounds a hang.

mod common;
mod leases_common;

use std::time::Duration;

use common::*;
use kiln::derivation::store_path::StoreDir;
use leases_common::{events, register, state_of, submit, RawAgent};
use serde_json::{json, Value};

/// Only bounds a hang on a slow, shared machine.
const LIMIT: Duration = Duration::from_secs(120);

fn setup(tmp: &tempfile::TempDir, extra: &str) -> (Coordinator, StoreDir) {
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, extra);
    (c, StoreDir::new(&store).unwrap())
}

fn drvs(sd: &StoreDir, prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| simple_drv(sd, &format!("{prefix}-{i}"), "echo > $out"))
        .collect()
}

/// `POST /api/v1/agents/{name}/{action}`.
fn control(c: &Coordinator, name: &str, action: &str) -> (u16, Value) {
    post(
        &c.url(&format!("/api/v1/agents/{name}/{action}")),
        &json!({}),
    )
}

/// Run `kiln agent ACTION NAME` against the coordinator; returns its stdout.
fn cli(c: &Coordinator, args: &[&str]) -> String {
    let out = std::process::Command::new(kiln_bin())
        .args(args)
        .args(["--coordinator", &c.client_url])
        .env_remove("KILN_COORDINATOR")
        .env_remove("KILN_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "kiln {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The agent's entry in `GET /api/v1/agents`, if it is listed.
fn listed(c: &Coordinator, name: &str) -> Option<Value> {
    let (code, list) = get(&c.url("/api/v1/agents"));
    assert_eq!(code, 200, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
}

fn build_ids(w: &Value) -> Vec<u64> {
    w["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_id"].as_u64().unwrap())
        .collect()
}

fn has_command(reply: &Value, command: &str) -> bool {
    reply["commands"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["command"] == command))
}

#[test]
fn a_paused_agent_gets_no_work_while_another_does_and_resume_gives_it_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, sd) = setup(&tmp, "");
    let s1 = register(&c, "a1");
    let s2 = register(&c, "a2");
    let (mut a1, _) = RawAgent::open(&c, "a1", &s1, json!([]));
    let (a2, _) = RawAgent::open(&c, "a2", &s2, json!([]));

    let (code, e) = control(&c, "nobody", "pause");
    assert_eq!(code, 404, "{e}");
    assert!(e.to_string().contains("nobody"), "{e}");

    let said = cli(&c, &["agent", "pause", "a1"]);
    assert!(said.contains("a1") && said.contains("paused"), "{said}");
    let ids = submit(&c, &drvs(&sd, "paused", 2));

    // The pause rides on the next reply; an agent that ignores it still gets nothing.
    let w = a1.work(None, 2);
    assert!(build_ids(&w).is_empty(), "a paused agent got work: {w}");
    assert!(has_command(&w, "pause"), "{w}");
    for _ in 0..3 {
        let w = a1.work(None, 2);
        assert!(build_ids(&w).is_empty(), "a paused agent got work: {w}");
    }
    let w = a2.work(None, 1);
    let got = build_ids(&w);
    assert_eq!(got.len(), 1, "the other agent gets work: {w}");
    assert_eq!(listed(&c, "a1").unwrap()["control"], "paused");
    let shown = cli(&c, &["agent", "show", "a1"]);
    assert!(
        shown.contains("CONTROL") && shown.contains("paused"),
        "{shown}"
    );

    // Stored: still paused after a restart, and told so when its session opens again.
    c.stop();
    c.spawn();
    a1.base = c.agent_url.clone();
    let opened = a1.reopen(json!([]));
    assert!(has_command(&opened, "pause"), "{opened}");
    let w = a1.work(None, 2);
    assert!(build_ids(&w).is_empty(), "paused across a restart: {w}");

    let said = cli(&c, &["agent", "resume", "a1"]);
    assert!(said.contains("active"), "{said}");
    let w = wait_for("the resumed agent to get the other build", LIMIT, || {
        let w = a1.work(None, 2);
        (!build_ids(&w).is_empty()).then_some(w)
    });
    let rest: Vec<u64> = ids.iter().copied().filter(|i| !got.contains(i)).collect();
    assert_eq!(build_ids(&w), rest);
}

#[test]
fn a_draining_agent_finishes_what_it_holds_takes_no_more_and_shows_drained() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, sd) = setup(&tmp, "");
    let s1 = register(&c, "a1");
    let (a1, _) = RawAgent::open(&c, "a1", &s1, json!([]));
    submit(&c, &drvs(&sd, "drain", 2));
    let w = a1.work(None, 1);
    let held = build_ids(&w);
    assert_eq!(held.len(), 1, "{w}");
    let (code, r) = a1.start(held[0], 1);
    assert_eq!(code, 200, "{r}");

    let (code, info) = control(&c, "a1", "drain");
    assert_eq!(code, 200, "{info}");
    assert_eq!(
        info["control"], "draining",
        "it still holds a build: {info}"
    );
    let hb = a1.heartbeat(json!([{"build_id": held[0], "attempt": 1, "phase": "building"}]));
    assert!(has_command(&hb, "pause"), "{hb}");
    let w = a1.work(None, 1);
    assert!(build_ids(&w).is_empty(), "a draining agent got work: {w}");
    assert_eq!(
        state_of(&c, held[0]),
        "building",
        "the held build keeps running"
    );

    let (code, r) = a1.result(
        held[0],
        1,
        json!({"result": "failed", "reason": "builder exited with status 1"}),
    );
    assert_eq!(code, 200, "{r}");
    let a = wait_for("the agent to show drained", LIMIT, || {
        listed(&c, "a1").filter(|a| a["control"] == "drained")
    });
    assert_eq!(a["builds"], json!([]), "{a}");
    let w = a1.work(None, 1);
    assert!(build_ids(&w).is_empty(), "a drained agent got work: {w}");
}

#[test]
fn setup_failures_in_a_row_quarantine_an_agent_until_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, sd) = setup(
        &tmp,
        "[agents]\nquarantine_after = 2\nquarantine_ms = 3600000\n",
    );
    let s1 = register(&c, "a1");
    let s2 = register(&c, "a2");
    let (a1, _) = RawAgent::open(&c, "a1", &s1, json!([]));
    let (a2, _) = RawAgent::open(&c, "a2", &s2, json!([]));
    let ids = submit(&c, &drvs(&sd, "quarantine", 4));

    for n in 0..2 {
        let w = a1.work(None, 1);
        let id = build_ids(&w)[0];
        let (code, r) = a1.start(id, 1);
        assert_eq!(code, 200, "{r}");
        let (code, r) = a1.result(
            id,
            1,
            json!({"result": "failed",
                "reason": format!("failed to fetch input /x/{n}-in: connection refused")}),
        );
        assert_eq!(code, 200, "{r}");
    }
    let a = wait_for("the agent to be quarantined", LIMIT, || {
        listed(&c, "a1").filter(|a| a["quarantined_until_ms"].is_u64())
    });
    assert_eq!(a["control"], "active", "quarantine is not a mode: {a}");
    let w = a1.work(None, 2);
    assert!(
        build_ids(&w).is_empty(),
        "a quarantined agent got work: {w}"
    );
    let w = a2.work(None, 1);
    assert_eq!(build_ids(&w).len(), 1, "another agent gets work: {w}");
    let ev = events(&c);
    let q: Vec<&Value> = ev
        .iter()
        .filter(|e| e["kind"] == "agent-quarantined")
        .collect();
    assert_eq!(q.len(), 1, "{ev:?}");

    let (code, info) = control(&c, "a1", "resume");
    assert_eq!(code, 200, "{info}");
    assert!(info["quarantined_until_ms"].is_null(), "{info}");
    let w = a1.work(None, 2);
    assert_eq!(build_ids(&w).len(), 1, "work again after resume: {w}");
    assert!(ids.contains(&build_ids(&w)[0]));
}

#[test]
fn an_agent_not_seen_for_expire_after_is_removed_and_its_lease_released() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, sd) = setup(&tmp, "[agents]\nexpire_after_ms = 4000\n");
    let s1 = register(&c, "gone");
    let s2 = register(&c, "alive");
    let (gone, _) = RawAgent::open(&c, "gone", &s1, json!([]));
    let (alive, _) = RawAgent::open(&c, "alive", &s2, json!([]));
    submit(&c, &drvs(&sd, "expiry", 1));
    let w = gone.work(None, 1);
    let id = build_ids(&w)[0];
    assert_eq!(state_of(&c, id), "allocated");

    // `alive` keeps talking; `gone` says nothing more.
    wait_for("the silent agent to expire", LIMIT, || {
        alive.heartbeat(json!([]));
        listed(&c, "gone").is_none().then_some(())
    });
    assert!(listed(&c, "alive").is_some(), "an agent that talks stays");
    assert_eq!(state_of(&c, id), "runnable", "its lease was released");
    let ev = events(&c);
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "agent-expired" && e["data"]["name"] == "gone"),
        "{ev:?}"
    );
    // Credentials revoked: the session token and the secret no longer work.
    let (code, r) = gone.post("heartbeat", json!({"builds": []}));
    assert_eq!(code, 401, "{r}");
    let (code, r) = post(
        &c.agent("/api/agent/v1/session"),
        &json!({"name": "gone", "secret": s1, "protocol_version": 1,
            "systems": ["x86_64-linux"], "max_parallel_builds": 1, "builds": []}),
    );
    assert_eq!(code, 401, "{r}");
    // The name is free again.
    register(&c, "gone");
}
