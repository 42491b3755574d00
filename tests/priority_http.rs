//! Priorities over real HTTP to a real coordinator process, with the agent played by the test:
//! - a `[[scheduling.priority_rules]]` rule of the coordinator's config sets the priority of
//!   the builds it matches at submission;
//! - `kiln build priority ID N` (the real client binary, `POST /api/v1/builds/{id}/priority`)
//!   raises a blocked build, and the input it waits on inherits it: the agent's work request
//!   gets that input before builds of higher own priority, also after a SIGKILL and restart
//!   (the derived priority is recomputed from the stored own priorities);
//! - the route refuses an unknown build (404) and a bad body (400).
//!
//! No timed assertions: every wait is a deadline poller that only bounds a hang.

mod common;
mod leases_common;

use std::process::Command;

use common::*;
use kiln::derivation::store_path::StoreDir;
use kiln::derivation::{Derivation, PathComputer, StorePath};
use leases_common::{build, events, register, state_of, submit, RawAgent};
use serde_json::json;

/// A derivation that needs the `out` output of `input` (a derivation made by `simple_drv`).
fn dependent_drv(sd: &StoreDir, name: &str, input: &(String, Vec<u8>)) -> (String, Vec<u8>) {
    let (_, bytes) = simple_drv(sd, name, "echo > $out");
    let mut drv = Derivation::parse(&bytes).unwrap();
    drv.input_drvs = vec![(input.0.clone().into_bytes(), vec![b"out".to_vec()])];
    drv.outputs[0].1.path = Vec::new();
    drv.env[2].1 = Vec::new();
    let input_drv = Derivation::parse(&input.1).unwrap();
    let mut loader = |_: &StorePath| -> anyhow::Result<Derivation> { Ok(input_drv.clone()) };
    let mut pc = PathComputer::new(sd.clone(), &mut loader);
    let paths = pc.output_paths(&drv).unwrap();
    let out = sd.full_path(paths[0].1.as_ref().unwrap());
    drv.outputs[0].1.path = out.clone().into_bytes();
    drv.env[2].1 = out.into_bytes();
    let path = sd.full_path(&kiln::derivation::paths::drv_path(sd, &drv).unwrap());
    (path, drv.print())
}

/// The build ids of a work reply, in the order given.
fn ids(w: &serde_json::Value) -> Vec<u64> {
    w["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn rules_and_reprioritisation_order_the_queue_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let mut c = Coordinator::start(
        tmp.path(),
        &store,
        "[[scheduling.priority_rules]]\nname = \"urgent-*\"\npriority = 7\n",
    );
    let sd = StoreDir::new(&store).unwrap();
    let lib = simple_drv(&sd, "lib", "echo > $out");
    let app = dependent_drv(&sd, "app", &lib);
    let other = simple_drv(&sd, "other", "echo > $out");
    let urgent = simple_drv(&sd, "urgent-fix", "echo > $out");
    let got = submit(&c, &[lib, app, other, urgent]);
    let (lib, app, other, urgent) = (got[0], got[1], got[2], got[3]);
    assert_eq!(
        build(&c, urgent)["summary"]["priority"],
        7,
        "the rule applied"
    );
    assert_eq!(build(&c, other)["summary"]["priority"], 0);
    assert_eq!(state_of(&c, app), "blocked");

    // The real client raises the blocked app; lib (runnable, own priority 0) inherits 20.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env_remove("KILN_TOKEN")
        .args(["build", "priority", &app.to_string(), "20", "--json"])
        .args(["--coordinator", &c.client_url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (summary["id"].as_u64(), summary["priority"].as_i64()),
        (Some(app), Some(20))
    );
    assert_eq!(build(&c, app)["summary"]["priority"], 20, "stored");
    let reprioritized = events(&c)
        .into_iter()
        .filter(|e| e["kind"] == "build-reprioritized")
        .collect::<Vec<_>>();
    assert_eq!(reprioritized.len(), 1, "{reprioritized:?}");
    assert_eq!(reprioritized[0]["data"]["effective"], 20);

    // The route refuses what it cannot do.
    let (code, body) = post(
        &c.url("/api/v1/builds/9999/priority"),
        &json!({"priority": 1}),
    );
    assert_eq!(code, 404, "{body}");
    let (code, body) = post(
        &c.url(&format!("/api/v1/builds/{app}/priority")),
        &json!({"priority": "high"}),
    );
    assert_eq!(code, 400, "{body}");

    // Restart: effective priorities are derived again from the stored own priorities.
    c.kill9();
    c.spawn();
    let secret = register(&c, "a1");
    let (agent, _) = RawAgent::open(&c, "a1", &secret, json!([]));
    let w = agent.work(Some("w-1"), 3);
    assert_eq!(
        ids(&w),
        vec![lib, urgent, other],
        "lib inherits app's 20, then the rule's 7, then 0: {w}"
    );
}
