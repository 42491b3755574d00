//! Inputs the coordinator lost (its NAR file gone from the cache) and related builds, with a
//! real coordinator process on loopback:
//! - an agent played over raw HTTP reports a setup failure naming a lost input (and a path
//!   outside the build's closure, which is ignored): the build goes back to `blocked` with no
//!   retry counted, a new build of the input's derivation is queued, and once that succeeds
//!   the build runs again and succeeds; a claim about an input whose NAR is there is an
//!   ordinary (counted) setup failure and queues nothing;
//! - a real `kiln-agent` (native executor) that finds the NAR of an input missing reports it
//!   (404), the input is built again on it, then the build that needed it;
//! - `related` submissions: a build of every derivation of the closure whose outputs are
//!   missing is queued (inputs first), one whose outputs exist is not; `kiln submit
//!   --only-targets` queues only the target.
//!
//! No timed assertions: every wait is a deadline poller that only bounds a hang.

mod common;
mod leases_common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use kiln::derivation::store_path::StoreDir;
use kiln::derivation::Derivation;
use leases_common::*;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(120);

/// The output path of a `.drv` (its only output).
fn out_of(drv: &(String, Vec<u8>)) -> String {
    let d = Derivation::parse(&drv.1).unwrap();
    String::from_utf8(d.outputs[0].1.path.clone()).unwrap()
}

/// Where the coordinator keeps the NAR of a FileHash (`sha256:<base32>`).
fn nar_file(c: &Coordinator, file_hash: &str) -> PathBuf {
    let b32 = file_hash.split_once(':').unwrap().1;
    c.state_dir
        .join("cache")
        .join("nar")
        .join(format!("{b32}.nar.zst"))
}

/// Every build of `drv` (newest last), from the build listing.
fn builds_of(c: &Coordinator, drv: &str) -> Vec<Value> {
    let (code, v) = get(&c.url("/api/v1/builds?limit=0"));
    assert_eq!(code, 200, "{v}");
    let mut out: Vec<Value> = v
        .as_array()
        .unwrap_or_else(|| panic!("a list of builds: {v}"))
        .iter()
        .filter(|b| b["drv_path"] == drv)
        .cloned()
        .collect();
    out.sort_by_key(|b| b["id"].as_u64());
    out
}

/// Lease one build to `agent` and report it built with `nar`.
fn build_with(agent: &RawAgent, expect: u64, attempt: u32, nar: &Nar, out: &str) {
    let w = agent.work(None, 1);
    assert_eq!(w["builds"][0]["build_id"], expect, "{w}");
    assert_eq!(w["builds"][0]["attempt"], attempt, "{w}");
    let (code, r) = agent.start(expect, attempt);
    assert_eq!(code, 200, "{r}");
    let (code, r) = agent.upload(expect, attempt, nar);
    assert_eq!(code, 200, "{r}");
    let (code, r) = agent.result(expect, attempt, nar.success(out));
    assert_eq!(code, 200, "{r}");
}

fn setup_failure(missing: &[&str]) -> Value {
    json!({"result": "failed", "kind": "setup",
        "reason": "failed to fetch input: HTTP 404 not_found: no such NAR",
        "missing_inputs": missing})
}

#[test]
fn a_lost_input_is_built_again_and_then_the_build_that_needed_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, "");
    let drvs = chain(&sd, &["a", "b"]);
    let ids = submit(&c, &drvs);
    let (a, b) = (ids[0], ids[1]);
    let (a_out, b_out) = (out_of(&drvs[0]), out_of(&drvs[1]));
    let secret = register(&c, "raw");
    let (agent, _) = RawAgent::open(&c, "raw", &secret, json!([]));
    let nar_a = Nar::of_file(tmp.path(), b"a, first build");
    build_with(&agent, a, 1, &nar_a, &a_out);
    assert_eq!(state_of(&c, b), "runnable");

    // b is leased; then the coordinator loses a's NAR file.
    let w = agent.work(None, 1);
    assert_eq!(w["builds"][0]["build_id"], b, "{w}");
    let f = nar_file(&c, &nar_a.file_hash);
    assert!(f.exists(), "{} is where a's NAR is kept", f.display());
    std::fs::remove_file(&f).unwrap();

    // The agent got 404 for it; it also names a path outside b's closure, which is ignored.
    let stranger = format!("{}/00000000000000000000000000000000-stranger", sd);
    let (code, r) = agent.result(b, 1, setup_failure(&[&a_out, &stranger]));
    assert_eq!(code, 200, "{r}");
    let d = build(&c, b);
    assert_eq!(d["summary"]["state"], "blocked", "{d}");
    assert_eq!(d["retries"], 0, "no retry counted: {d}");
    let a_builds = builds_of(&c, &drvs[0].0);
    assert_eq!(a_builds.len(), 2, "a second build of a: {a_builds:?}");
    let a2 = a_builds[1]["id"].as_u64().unwrap();
    assert!(a2 > b, "{a_builds:?}");
    assert_eq!(a_builds[1]["state"], "runnable", "{a_builds:?}");
    // b waits for the new build of a (and nothing else).
    let waits = d["waiting_for"].as_array().unwrap();
    assert_eq!(waits.len(), 1, "{d}");
    assert_eq!(waits[0]["path"], a_out, "{d}");
    let all = events(&c);
    let lost = events_of(&all, "output-lost", b);
    assert_eq!(lost.len(), 1, "{all:?}");
    assert_eq!(lost[0]["data"]["path"], a_out, "{lost:?}");
    let expired = events_of(&all, "lease-expired", b);
    assert_eq!(expired.len(), 1, "{all:?}");
    assert_eq!(
        expired[0]["data"]["lost_inputs"],
        json!([a_out]),
        "{expired:?}"
    );
    assert_eq!(expired[0]["data"]["state"], "blocked", "{expired:?}");

    // The same report again (its reply lost) changes nothing.
    let (code, r) = agent.result(b, 1, setup_failure(&[&a_out]));
    assert_eq!(code, 409, "{r}");
    assert_eq!(builds_of(&c, &drvs[0].0).len(), 2);

    // a is built again (here into another NAR, as a non-reproducible build would), then b.
    let nar_a2 = Nar::of_file(tmp.path(), b"a, second build");
    build_with(&agent, a2, 1, &nar_a2, &a_out);
    assert_eq!(state_of(&c, b), "runnable");
    let w = agent.work(None, 1);
    assert_eq!(w["builds"][0]["build_id"], b, "{w}");
    assert_eq!(w["builds"][0]["attempt"], 2, "{w}");
    let input = &w["builds"][0]["inputs"][0];
    assert_eq!(input["path"], a_out, "{w}");
    assert_eq!(
        input["file_hash"], nar_a2.file_hash,
        "the new NAR is served: {w}"
    );
    let (code, r) = agent.start(b, 2);
    assert_eq!(code, 200, "{r}");
    let nar_b = Nar::of_file(tmp.path(), b"b");
    let (code, r) = agent.upload(b, 2, &nar_b);
    assert_eq!(code, 200, "{r}");
    let (code, r) = agent.result(b, 2, nar_b.success(&b_out));
    assert_eq!(code, 200, "{r}");
    assert_eq!(state_of(&c, b), "succeeded");
    assert_eq!(state_of(&c, a2), "succeeded");
    assert!(nar_file(&c, &nar_a2.file_hash).exists());
}

#[test]
fn a_missing_input_claim_about_a_nar_that_is_there_is_an_ordinary_setup_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, "");
    let drvs = chain(&sd, &["a", "b"]);
    let ids = submit(&c, &drvs);
    let (a, b) = (ids[0], ids[1]);
    let a_out = out_of(&drvs[0]);
    let secret = register(&c, "raw");
    let (agent, _) = RawAgent::open(&c, "raw", &secret, json!([]));
    let nar_a = Nar::of_file(tmp.path(), b"a");
    build_with(&agent, a, 1, &nar_a, &a_out);
    let w = agent.work(None, 1);
    assert_eq!(w["builds"][0]["build_id"], b, "{w}");
    let (code, r) = agent.result(b, 1, setup_failure(&[&a_out]));
    assert_eq!(code, 200, "{r}");
    let d = build(&c, b);
    assert_eq!(d["summary"]["state"], "runnable", "{d}");
    assert_eq!(d["retries"], 1, "a counted setup failure: {d}");
    assert_eq!(builds_of(&c, &drvs[0].0).len(), 1, "a is not built again");
    assert!(events_of(&events(&c), "output-lost", b).is_empty());
}

#[test]
fn a_real_agent_reports_a_lost_input_and_it_is_built_again() {
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
    // a, then (once a is built and gone from the agent's store and the coordinator's cache)
    // b, which needs it.
    let drvs = chain(&sd, &["a", "b"]);
    let a = submit(&c, &drvs[..1])[0];
    wait_for("a to be built", DEADLINE, || {
        agent.assert_running();
        (state_of(&c, a) == "succeeded").then_some(())
    });
    let a_out = out_of(&drvs[0]);
    let nar_url = {
        let hash = a_out.rsplit('/').next().unwrap().split('-').next().unwrap();
        let (code, v) = get(&c.agent(&format!("/{hash}.narinfo")));
        // The narinfo is text, returned as a JSON string by the helper.
        assert_eq!(code, 200, "{v}");
        let text = v.as_str().unwrap_or_default().to_string();
        text.lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap_or_else(|| panic!("a URL line in {text}"))
            .to_string()
    };
    let f = c.state_dir.join("cache").join(&nar_url);
    assert!(f.exists(), "{}", f.display());
    std::fs::remove_file(&f).unwrap();
    // The agent keeps no copy of it either: it keeps what it built in its private store view
    // (backed by its state dir), so remove that copy.
    let base = a_out.rsplit('/').next().unwrap();
    let copy = agent.state.join("store").join(base);
    assert!(copy.exists(), "the agent keeps {}", copy.display());
    std::fs::remove_file(&copy).unwrap();

    // Only b is asked for (a's derivation is sent, as its input, but not built again).
    let derivations: Vec<Value> = drvs
        .iter()
        .map(|(p, bytes)| json!({"path": p, "contents": b64(bytes)}))
        .collect();
    let (code, r) = post(
        &c.url("/api/v1/builds"),
        &json!({"derivations": derivations, "builds": [drvs[1].0]}),
    );
    assert_eq!(code, 200, "{r}");
    let b = r["builds"][0]["id"].as_u64().unwrap();
    wait_for("b to be built", DEADLINE, || {
        agent.assert_running();
        let s = state_of(&c, b);
        assert_ne!(s, "failed", "{}", build(&c, b));
        (s == "succeeded").then_some(())
    });
    let a_builds = builds_of(&c, &drvs[0].0);
    assert_eq!(
        a_builds.len(),
        2,
        "a was built again: {a_builds:?}; the agent's log:\n{}",
        agent.log_text()
    );
    assert_eq!(a_builds[1]["state"], "succeeded", "{a_builds:?}");
    assert!(f.exists(), "the rebuilt NAR is in the cache again");
    let all = events(&c);
    assert_eq!(events_of(&all, "output-lost", b).len(), 1, "{all:?}");
    assert_eq!(build(&c, b)["retries"], 0);
}

#[test]
fn a_related_submission_builds_what_the_closure_lacks_and_only_targets_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, "");
    let drvs = chain(&sd, &["a", "b", "c", "d"]);
    let payload = |targets: &[&String], related: bool| {
        let derivations: Vec<Value> = drvs
            .iter()
            .map(|(p, b)| json!({"path": p, "contents": b64(b)}))
            .collect();
        json!({"derivations": derivations, "builds": targets, "related": related})
    };
    // Only c, not related: one build, blocked forever on b.
    let (code, r) = post(&c.url("/api/v1/builds"), &payload(&[&drvs[2].0], false));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["builds"].as_array().unwrap().len(), 1, "{r}");
    let c_id = r["builds"][0]["id"].as_u64().unwrap();
    assert_eq!(state_of(&c, c_id), "blocked");

    // a is built (by a raw agent) so its output is available.
    let (code, r) = post(&c.url("/api/v1/builds"), &payload(&[&drvs[0].0], true));
    assert_eq!(code, 200, "{r}");
    let a = r["builds"][0]["id"].as_u64().unwrap();
    let secret = register(&c, "raw");
    let (agent, _) = RawAgent::open(&c, "raw", &secret, json!([]));
    build_with(
        &agent,
        a,
        1,
        &Nar::of_file(tmp.path(), b"a"),
        &out_of(&drvs[0]),
    );

    // d, related: b (missing output, no build), c (live: kept), d; not a (available).
    let (code, r) = post(&c.url("/api/v1/builds"), &payload(&[&drvs[3].0], true));
    assert_eq!(code, 200, "{r}");
    let got: Vec<(String, bool)> = r["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["drv_path"].as_str().unwrap().to_string(),
                b["existing"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (drvs[1].0.clone(), false),
            (drvs[2].0.clone(), true),
            (drvs[3].0.clone(), false)
        ],
        "{r}"
    );
    assert_eq!(r["builds"][1]["id"], c_id, "{r}");
    assert_eq!(
        state_of(&c, r["builds"][0]["id"].as_u64().unwrap()),
        "runnable"
    );
    assert_eq!(builds_of(&c, &drvs[0].0).len(), 1, "a is not built again");

    // The CLI: `kiln submit --only-targets` of a new chain queues only the target;
    // `kiln submit --related` (the default) its missing inputs too.
    let e = chain(&sd, &["e", "f"]);
    for (p, bytes) in &e {
        let name = p.rsplit('/').next().unwrap();
        std::fs::write(store.join(name), bytes).unwrap();
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(kiln_bin())
            .args(args)
            .args(["--coordinator", &c.client_url, "--json"])
            .arg("--store-dir")
            .arg(&store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let v = run(&["submit", "--only-targets", &e[1].0]);
    assert_eq!(v["builds"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["builds"][0]["state"], "blocked", "{v}");
    let v = run(&["submit", "--related", &e[1].0]);
    let paths: Vec<&str> = v["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["drv_path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec![e[0].0.as_str(), e[1].0.as_str()], "{v}");
    assert_eq!(v["builds"][1]["existing"], true, "{v}");
}
