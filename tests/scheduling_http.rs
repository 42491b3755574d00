//! Scheduling at scale over real HTTP to a real coordinator, with the agent played by the test:
//! - push, not poll: a work request that waits (`wait_ms`) is answered by the SAME request with
//!   a build submitted while it waited;
//! - a waiting request whose connection closed is never served: the build goes to the next
//!   agent that asks, at attempt 1;
//! - listings page with a cursor (`x-kiln-next-cursor`) and return every build exactly once,
//!   for a live state and for the whole list;
//! - which agent may take a build: its system (an i586-gnu build never reaches an
//!   aarch64-linux agent), `builtin` to any agent, a matched tag only to an agent that offers
//!   it, and an agent that requires a tag only gets builds carrying it.
//!
//! No timed assertions: every wait is a deadline poller or a join that only bounds a hang.

mod common;
mod leases_common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::Duration;

use common::*;
use kiln::derivation::store_path::StoreDir;
use leases_common::{register, submit, RawAgent};
use serde_json::{json, Value};

/// Only bounds a hang on a slow, shared machine.
const LIMIT: Duration = Duration::from_secs(120);

fn setup(tmp: &tempfile::TempDir) -> (Coordinator, StoreDir) {
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, "");
    (c, StoreDir::new(&store).unwrap())
}

/// The value of a gauge in `/metrics` (0 when absent).
fn gauge(c: &Coordinator, name: &str) -> f64 {
    let text = ureq::get(&c.agent("/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

#[test]
fn a_long_poll_is_answered_by_the_build_submitted_while_it_waits() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, sd) = setup(&tmp);
    let secret = register(&c, "a1");
    let (agent, _) = RawAgent::open(&c, "a1", &secret, json!([]));
    // The request waits far longer than the test needs: only the build can end it early.
    let waiting = std::thread::spawn(move || {
        agent.post(
            "work",
            json!({"max_builds": 1, "request_id": "lp-1", "wait_ms": 60_000}),
        )
    });
    wait_for("the work request to wait", LIMIT, || {
        (gauge(&c, "kiln_work_waiters") >= 1.0).then_some(())
    });
    let id = submit(&c, &[simple_drv(&sd, "pushed", "echo > $out")])[0];
    let (code, reply) = waiting.join().unwrap();
    assert_eq!(code, 200, "{reply}");
    let builds = reply["builds"].as_array().unwrap();
    assert_eq!(
        builds.len(),
        1,
        "the waiting request itself got the build: {reply}"
    );
    assert_eq!(builds[0]["build_id"], id);
    assert_eq!(builds[0]["attempt"], 1);
}

#[test]
fn a_waiting_request_whose_agent_went_away_leases_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, sd) = setup(&tmp);
    let s1 = register(&c, "gone");
    let (a1, _) = RawAgent::open(&c, "gone", &s1, json!([]));
    // A long poll on a raw connection, closed while it waits.
    let addr = c.agent_url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    let body = json!({"max_builds": 1, "request_id": "gone-1", "wait_ms": 60_000}).to_string();
    write!(
        conn,
        "POST /api/agent/v1/work HTTP/1.1\r\nHost: {addr}\r\nx-kiln-session: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        a1.token,
        body.len()
    )
    .unwrap();
    wait_for("the work request to wait", LIMIT, || {
        (gauge(&c, "kiln_work_waiters") >= 1.0).then_some(())
    });
    drop(conn);
    wait_for("the closed request to stop waiting", LIMIT, || {
        (gauge(&c, "kiln_work_waiters") == 0.0).then_some(())
    });
    let id = submit(&c, &[simple_drv(&sd, "for-the-living", "echo > $out")])[0];
    // The build was leased to nobody: the next agent gets it at its first attempt.
    let s2 = register(&c, "here");
    let (a2, _) = RawAgent::open(&c, "here", &s2, json!([]));
    let w = a2.work(Some("here-1"), 1);
    let builds = w["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 1, "{w}");
    assert_eq!(builds[0]["build_id"], id);
    assert_eq!(
        builds[0]["attempt"], 1,
        "never leased to the agent that went away"
    );
}

/// Every page of `GET /api/v1/builds?{query}` from the start, following the cursor.
fn all_pages(c: &Coordinator, query: &str) -> (Vec<u64>, usize) {
    let mut ids = Vec::new();
    let mut cursor = 0u64;
    let mut pages = 0;
    // Bounded: at most 1,000 pages.
    for _ in 0..1000 {
        let resp = ureq::get(&c.url(&format!("/api/v1/builds?{query}&cursor={cursor}")))
            .call()
            .unwrap();
        let next = resp
            .header(kiln::protocol::NEXT_CURSOR_HEADER)
            .map(|v| v.parse::<u64>().unwrap());
        let page: serde_json::Value = resp.into_json().unwrap();
        pages += 1;
        ids.extend(
            page.as_array()
                .unwrap()
                .iter()
                .map(|b| b["id"].as_u64().unwrap()),
        );
        match next {
            Some(n) => {
                assert!(n > cursor, "the cursor moves forward");
                cursor = n;
            }
            None => return (ids, pages),
        }
    }
    panic!("listing did not end");
}

#[test]
fn cursor_paging_returns_every_build_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, sd) = setup(&tmp);
    let drvs: Vec<_> = (0..23)
        .map(|i| simple_drv(&sd, &format!("page-{i}"), "echo > $out"))
        .collect();
    let submitted: BTreeSet<u64> = submit(&c, &drvs).into_iter().collect();
    assert_eq!(submitted.len(), 23);
    // Lease three, so the runnable listing and the whole listing differ.
    let secret = register(&c, "lister");
    let (agent, _) = RawAgent::open(&c, "lister", &secret, json!([]));
    let leased: BTreeSet<u64> = agent.work(Some("l-1"), 3)["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_id"].as_u64().unwrap())
        .collect();
    assert_eq!(leased.len(), 3);

    for (query, want) in [
        ("limit=5", submitted.clone()),
        (
            "state=runnable&limit=4",
            submitted.difference(&leased).copied().collect(),
        ),
        ("state=allocated&limit=2", leased.clone()),
        ("state=succeeded&limit=2", BTreeSet::new()),
    ] {
        let (ids, pages) = all_pages(&c, query);
        let unique: BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{query}: no build twice: {ids:?}");
        assert_eq!(unique, want, "{query}: every build once");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{query}: in id order");
        if want.len() > 5 {
            assert!(pages > 1, "{query}: the listing was paged");
        }
    }
    // limit=0 means no limit: one page with everything.
    let (ids, pages) = all_pages(&c, "limit=0");
    assert_eq!((ids.len(), pages), (23, 1));
}

/// Register an agent of `systems` and open its session offering and requiring these tags.
fn agent_of(
    c: &Coordinator,
    name: &str,
    systems: &[&str],
    offers: Value,
    requires: Value,
) -> RawAgent {
    let (code, a) = post(
        &c.url("/api/v1/agents"),
        &json!({"name": name, "systems": systems}),
    );
    assert_eq!(code, 200, "{a}");
    let secret = a["secret"].as_str().unwrap().to_string();
    let (code, s) = post(
        &c.agent("/api/agent/v1/session"),
        &json!({"name": name, "secret": secret, "protocol_version": 1, "systems": systems,
            "max_parallel_builds": 10, "builds": [], "offers": offers, "requires": requires}),
    );
    assert_eq!(code, 200, "{s}");
    RawAgent {
        base: c.agent_url.clone(),
        name: name.into(),
        secret,
        token: s["session_token"].as_str().unwrap().to_string(),
    }
}

/// Submit `drvs` with these tags; their build ids.
fn submit_tagged(c: &Coordinator, drvs: &[(String, Vec<u8>)], tags: Value) -> Vec<u64> {
    let derivations: Vec<Value> = drvs
        .iter()
        .map(|(p, b)| json!({"path": p, "contents": b64(b)}))
        .collect();
    let paths: Vec<&String> = drvs.iter().map(|(p, _)| p).collect();
    let (code, r) = post(
        &c.url("/api/v1/builds"),
        &json!({"derivations": derivations, "builds": paths, "tags": tags}),
    );
    assert_eq!(code, 200, "{r}");
    r["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect()
}

/// The ids of the builds one work request (no wait, up to 10) leased.
fn take(agent: &RawAgent, request: &str) -> BTreeSet<u64> {
    let w = agent.work(Some(request), 10);
    w["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn systems_tags_and_builtin_decide_which_agent_gets_a_build() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let c = Coordinator::start(
        tmp.path(),
        &store,
        "[scheduling]\nmatched_tags = [\"big-memory\"]\n",
    );
    let sd = StoreDir::new(&store).unwrap();
    let hurd = system_drv(&sd, "hurd", "i586-gnu", "echo > $out");
    let arm = system_drv(&sd, "arm", "aarch64-linux", "echo > $out");
    let fetch1 = system_drv(&sd, "fetch-1", "builtin", "echo > $out");
    let small = system_drv(&sd, "small", "x86_64-linux", "echo > $out");
    let big = system_drv(&sd, "big", "x86_64-linux", "echo > $out");
    let ids = submit(&c, &[hurd, arm, fetch1, small]);
    let (hurd_id, arm_id, fetch1_id, small_id) = (ids[0], ids[1], ids[2], ids[3]);
    let big_id = submit_tagged(&c, &[big], json!([["big-memory", "yes"]]))[0];

    // An aarch64-linux agent: its own build and the builtin one, never the i586-gnu build.
    let a_arm = agent_of(&c, "arm", &["aarch64-linux"], json!([]), json!([]));
    assert_eq!(take(&a_arm, "arm-1"), BTreeSet::from([arm_id, fetch1_id]));
    // A plain x86_64-linux agent: not the build whose matched tag it does not offer.
    let a_plain = agent_of(&c, "plain", &["x86_64-linux"], json!([]), json!([]));
    assert_eq!(take(&a_plain, "plain-1"), BTreeSet::from([small_id]));
    // An agent that requires big-memory=yes: the big build only.
    let a_big = agent_of(
        &c,
        "big",
        &["x86_64-linux"],
        json!([]),
        json!([["big-memory", "yes"]]),
    );
    assert_eq!(take(&a_big, "big-1"), BTreeSet::from([big_id]));
    // The i586-gnu build waited for an agent of its system; a builtin build submitted now
    // goes to that agent too.
    let fetch2_id = submit(&c, &[system_drv(&sd, "fetch-2", "builtin", "echo > $out")])[0];
    let a_hurd = agent_of(&c, "hurd", &["i586-gnu"], json!([]), json!([]));
    assert_eq!(
        take(&a_hurd, "hurd-1"),
        BTreeSet::from([hurd_id, fetch2_id])
    );
    // Everything was leased exactly once.
    let (runnable, _) = all_pages(&c, "state=runnable&limit=0");
    assert!(runnable.is_empty(), "{runnable:?}");
    let (allocated, _) = all_pages(&c, "state=allocated&limit=0");
    assert_eq!(
        allocated.into_iter().collect::<BTreeSet<u64>>(),
        BTreeSet::from([hurd_id, arm_id, fetch1_id, small_id, big_id, fetch2_id])
    );
}

/// Submit `drvs` at this priority; their build ids.
fn submit_at(c: &Coordinator, drvs: &[(String, Vec<u8>)], priority: i32) -> Vec<u64> {
    let derivations: Vec<Value> = drvs
        .iter()
        .map(|(p, b)| json!({"path": p, "contents": b64(b)}))
        .collect();
    let paths: Vec<&String> = drvs.iter().map(|(p, _)| p).collect();
    let (code, r) = post(
        &c.url("/api/v1/builds"),
        &json!({"derivations": derivations, "builds": paths, "priority": priority}),
    );
    assert_eq!(code, 200, "{r}");
    r["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect()
}

/// After SIGKILL the queue is rebuilt from sled by one scan: the listings are what they were,
/// and the first work request after the restart gets the highest-priority runnable build of
/// the agent's system (not merely the oldest), then the rest in priority order.
#[test]
fn after_sigkill_the_first_work_reply_is_the_best_build_of_the_system() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, sd) = setup(&tmp);
    let low: Vec<u64> = submit_at(
        &c,
        &(0..4)
            .map(|i| simple_drv(&sd, &format!("low-{i}"), "echo > $out"))
            .collect::<Vec<_>>(),
        0,
    );
    let high = submit_at(&c, &[simple_drv(&sd, "high", "echo > $out")], 9)[0];
    let mid = submit_at(&c, &[simple_drv(&sd, "mid", "echo > $out")], 4)[0];
    let other = submit_at(
        &c,
        &[system_drv(&sd, "arm", "aarch64-linux", "echo > $out")],
        50,
    )[0];
    let (before, _) = all_pages(&c, "state=runnable&limit=3");
    assert_eq!(before.len(), 7);

    c.kill9();
    c.spawn();
    let (after, _) = all_pages(&c, "state=runnable&limit=3");
    assert_eq!(after, before, "the restarted queue lists what sled holds");
    let secret = register(&c, "first");
    let (agent, _) = RawAgent::open(&c, "first", &secret, json!([]));
    let first = agent.work(Some("after-restart-1"), 1);
    let builds = first["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 1, "{first}");
    assert_eq!(
        builds[0]["build_id"], high,
        "the highest priority first: {first}"
    );
    let rest = agent.work(Some("after-restart-2"), 10);
    let rest: Vec<u64> = rest["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_id"].as_u64().unwrap())
        .collect();
    let mut want = vec![mid];
    want.extend(&low);
    assert_eq!(
        rest, want,
        "then by priority, then age; never the aarch64-linux build"
    );
    let (left, _) = all_pages(&c, "state=runnable&limit=0");
    assert_eq!(left, vec![other]);
}
