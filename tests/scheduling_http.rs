//! Scheduling at scale over real HTTP to a real coordinator, with the agent played by the test:
//! - push, not poll: a work request that waits (`wait_ms`) is answered by the SAME request with
//!   a build submitted while it waited;
//! - a waiting request whose connection closed is never served: the build goes to the next
//!   agent that asks, at attempt 1;
//! - listings page with a cursor (`x-kiln-next-cursor`) and return every build exactly once,
//!   for a live state and for the whole list.
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
use serde_json::json;

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
