//! Request limits against a real coordinator, with raw sockets: a client that drips its
//! headers is cut by the header timeout, one that drips a body at 100 B/s is cut by the body
//! rate floor (HTTP 408), and an oversized body is refused before it is read (HTTP 413) — on
//! the client listener and on the agent listener. A submission with a `.drv` over
//! `limits.max_drv_bytes` is refused whole (413) and stores nothing; a big submission (parsed
//! while it arrives, committed in chunks) is refused whole or committed whole.

mod common;

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use common::{b64, post, simple_drv, state_dump, Coordinator};
use kiln::derivation::store_path::StoreDir;

/// Most drips before the test gives up (each drip waits `DRIP`): bounds the test at ~60 s.
const MAX_DRIPS: usize = 300;
const DRIP: Duration = Duration::from_millis(200);

/// What the server did while we dripped.
#[derive(Debug)]
enum Outcome {
    /// It answered; the bytes it sent.
    Answered(String),
    /// It closed or reset the connection without an answer.
    Closed,
    /// We sent every drip and it still waited.
    StillWaiting,
}

/// Send `head`, then each of `drips` one after the other with a pause, watching for the
/// server to answer or close.
fn drip(addr: &str, head: &str, drips: impl Iterator<Item = Vec<u8>>) -> Outcome {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    for piece in drips.take(MAX_DRIPS) {
        std::thread::sleep(DRIP);
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) if got.is_empty() => return Outcome::Closed,
            Ok(0) => return Outcome::Answered(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                // Read the rest of the answer (it is small), then report it.
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let _ = s.read_to_end(&mut got);
                return Outcome::Answered(String::from_utf8_lossy(&got).into_owned());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Outcome::Closed,
        }
        if s.write_all(&piece).is_err() {
            return Outcome::Closed;
        }
    }
    Outcome::StillWaiting
}

fn start(dir: &std::path::Path) -> Coordinator {
    let store = dir.join("store");
    std::fs::create_dir_all(&store).unwrap();
    Coordinator::start(
        dir,
        &store,
        "[timeouts]\nrequest_header_ms = 1000\n[limits]\nmin_body_rate_window_ms = 2000\n",
    )
}

#[test]
fn slow_headers_slow_bodies_and_oversized_bodies_are_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let c = start(tmp.path());
    let client = c.client_url.trim_start_matches("http://").to_string();
    let agent = c.agent_url.trim_start_matches("http://").to_string();

    for addr in [&client, &agent] {
        // Headers at one short line per drip never complete in time.
        let head = format!("GET /api/v1/builds HTTP/1.1\r\nHost: {addr}\r\n");
        let out = drip(addr, &head, std::iter::repeat(b"X-Drip: a\r\n".to_vec()));
        match &out {
            Outcome::Closed => {}
            Outcome::Answered(text) => assert!(text.starts_with("HTTP/1.1 408"), "{addr}: {text}"),
            Outcome::StillWaiting => panic!("{addr}: dripped headers were never cut"),
        }
    }

    // A body at 100 B/s (20 bytes per 200 ms) against a floor of 1 KiB/s: cut with 408.
    for (addr, path) in [
        (&client, "/api/v1/builds"),
        (&agent, "/api/agent/v1/session"),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        );
        let out = drip(addr, &head, std::iter::repeat(vec![b' '; 20]));
        match &out {
            Outcome::Answered(text) => {
                assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
                assert!(text.contains("body_too_slow"), "{path}: {text}");
            }
            other => panic!("{path}: a 100 B/s body was not answered with 408: {other:?}"),
        }
    }

    // A declared body over the route's limit is refused before any of it is sent.
    let head = format!(
        "POST /api/v1/agents HTTP/1.1\r\nHost: {client}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    );
    match drip(&client, &head, std::iter::repeat(Vec::new())) {
        Outcome::Answered(text) => assert!(text.starts_with("HTTP/1.1 413"), "{text}"),
        other => panic!("an oversized body was not refused with 413: {other:?}"),
    }

    // Controls: a complete request on a fresh connection is served on both listeners.
    let (code, body) = common::get(&c.url("/api/v1/builds"));
    assert_eq!(code, 200, "{body}");
    let (code, body) = common::get(&c.agent("/nix-cache-info"));
    assert_eq!(code, 200, "{body}");
}

/// With `max_uploads_per_agent = 1`, an agent's second upload while its first is in progress
/// is refused before its body is read (429 + Retry-After), and is taken once the first ends.
#[test]
fn uploads_over_the_per_agent_cap_wait_with_429() {
    use common::transfer::{
        compressed_nar, held_build, send_partial, upload_status, upload_target,
    };
    let h = held_build("[limits]\nmax_uploads_per_agent = 1\n");
    let (zst, fh, _, _) = compressed_nar(h.tmp.path(), 200_000);
    let size = zst.len() as u64;
    let half = zst.len() / 2;
    let first = send_partial(
        &h.c.agent_url,
        "PUT",
        &upload_target(h.build, "out", &fh, size, 0),
        &[("x-kiln-session", &h.token)],
        size,
        &zst[..half],
    );
    common::wait_for("the first half to arrive", Duration::from_secs(60), || {
        (upload_status(&h, &fh, size)["received"].as_u64() == Some(half as u64)).then_some(())
    });
    let log = zstd::encode_all(&b"a log line\n"[..], 1).unwrap();
    let put_log = || {
        common::response(
            ureq::put(&h.c.agent(&format!("/api/agent/v1/builds/{}/log?attempt=1", h.build)))
                .set("x-kiln-session", &h.token)
                .send_bytes(&log),
        )
    };
    let (code, body) = put_log();
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_uploads", "{body}");
    let r = ureq::put(&h.c.agent(&format!("/api/agent/v1/builds/{}/log?attempt=1", h.build)))
        .set("x-kiln-session", &h.token)
        .send_bytes(&log);
    match r {
        Err(ureq::Error::Status(429, resp)) => {
            assert!(
                resp.header("retry-after").is_some(),
                "429 without Retry-After"
            )
        }
        other => panic!("expected 429, got {other:?}"),
    }
    assert!(common::transfer::metric(&h.c, "kiln_uploads_refused_total") >= 2.0);
    // The first upload's link breaks: its slot comes back.
    drop(first);
    common::wait_for("the slot to come back", Duration::from_secs(60), || {
        let (code, _) = put_log();
        (code == 200).then_some(())
    });
}

/// The rate floor judges windows, not the whole body: an upload that streams fast for several
/// windows without a pause and then slows to 8 KiB/s (above the 1 KiB/s floor) is not cut.
#[test]
fn a_fast_then_slower_upload_above_the_floor_is_not_cut() {
    use common::transfer::{
        compressed_nar, held_build, read_response, send_partial, upload_target,
    };
    let h = held_build("[limits]\nmin_body_rate_window_ms = 1000\n");
    let (zst, fh, _, _) = compressed_nar(h.tmp.path(), 24 << 20);
    let size = zst.len() as u64;
    // The last 24 KiB go at 8 KiB/s, in 1 KiB pieces; everything before at full speed.
    let slow_from = zst.len() - (24 << 10);
    let mut s = send_partial(
        &h.c.agent_url,
        "PUT",
        &upload_target(h.build, "out", &fh, size, 0),
        &[("x-kiln-session", &h.token)],
        size,
        &zst[..slow_from],
    );
    for piece in zst[slow_from..].chunks(1024) {
        std::thread::sleep(Duration::from_millis(125));
        s.write_all(piece).unwrap();
    }
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// A submission carrying one `.drv` over `limits.max_drv_bytes` is refused whole with 413,
/// naming the derivation, its size and the limit, over HTTP and through `kiln submit`; nothing
/// of it is stored; the rest alone is then accepted.
#[test]
fn an_oversized_drv_refuses_the_whole_submission() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = t.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let mut c = Coordinator::start(t, &store, "[limits]\nmax_drv_bytes = 2048\n");
    let (small, small_bytes) = simple_drv(&sd, "small", "echo > $out");
    let (big, big_bytes) = simple_drv(&sd, "big", &format!("echo {} > $out", "x".repeat(3000)));
    assert!(big_bytes.len() > 2048 && small_bytes.len() < 2048);
    let body = serde_json::json!({
        "derivations": [
            {"path": small, "contents": b64(&small_bytes)},
            {"path": big, "contents": b64(&big_bytes)},
        ],
        "builds": [small, big],
    });
    let (code, resp) = post(&c.url("/api/v1/builds"), &body);
    assert_eq!(code, 413, "{resp}");
    assert_eq!(resp["error"]["code"], "drv_too_large", "{resp}");
    let msg = resp["error"]["message"].as_str().unwrap();
    for part in [
        big.as_str(),
        &format!("{} bytes", big_bytes.len()),
        "2048",
        "limits.max_drv_bytes",
        "nothing of this submission was stored",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    // Through the CLI: the same refusal, as the CLI's error.
    std::fs::write(&big, &big_bytes).unwrap();
    let out = std::process::Command::new(common::kiln_bin())
        .args(["submit", &big, "--coordinator", &c.client_url])
        .arg("--store-dir")
        .arg(&store)
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_TOKEN_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 413") && err.contains("limits.max_drv_bytes"),
        "{err}"
    );
    let (code, builds) = common::get(&c.url("/api/v1/builds"));
    assert_eq!(code, 200);
    assert_eq!(
        builds,
        serde_json::json!([]),
        "a refused submission queued builds"
    );
    c.stop();
    let dump = state_dump(&c.state_dir);
    assert_eq!(records(&dump, "derivations"), 0, "{dump}");
    assert_eq!(records(&dump, "builds"), 0, "{dump}");

    // The small one alone is accepted.
    c.spawn();
    let body = serde_json::json!({
        "derivations": [{"path": small, "contents": b64(&small_bytes)}],
        "builds": [small],
    });
    let (code, resp) = post(&c.url("/api/v1/builds"), &body);
    assert_eq!(code, 200, "{resp}");
    c.stop();
    let dump = state_dump(&c.state_dir);
    assert_eq!(records(&dump, "derivations"), 1, "{dump}");
}

/// A submission of 2,000 builds (over 1 MiB: parsed while it arrives; committed in chunks)
/// with one malformed `.drv` in the middle is refused whole (422 naming it) and stores
/// nothing; one that is not JSON is refused (400) and stores nothing; the same submission
/// with the `.drv` mended, sent chunked, is committed whole: 2,000 new builds and 2,000 `.drv`
/// records.
#[test]
fn a_big_submission_is_refused_whole_or_committed_whole() {
    const N: usize = 2000;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = t.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let mut c = Coordinator::start(t, &store, "");
    let drvs: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| simple_drv(&sd, &format!("many-{i}"), "echo > $out"))
        .collect();
    let body = |bad: Option<usize>| {
        let derivations: Vec<serde_json::Value> = drvs
            .iter()
            .enumerate()
            .map(|(i, (p, bytes))| {
                let contents = if bad == Some(i) {
                    &bytes[..bytes.len() / 2]
                } else {
                    &bytes[..]
                };
                serde_json::json!({"path": p, "contents": b64(contents)})
            })
            .collect();
        let builds: Vec<&String> = drvs.iter().map(|(p, _)| p).collect();
        serde_json::json!({"derivations": derivations, "builds": builds})
    };

    let bad_path = &drvs[N / 2].0;
    let (code, resp) = post(&c.url("/api/v1/builds"), &body(Some(N / 2)));
    assert_eq!(code, 422, "{resp}");
    assert_eq!(resp["error"]["code"], "bad_derivation", "{resp}");
    let msg = resp["error"]["message"].as_str().unwrap();
    assert!(msg.contains(bad_path.as_str()), "{bad_path} not in {msg}");

    // Not JSON from its 18th byte on: the parse fails at once, the rest of the body (over
    // 1 MiB, so parsed while it arrives) is read, then the answer comes.
    let text = serde_json::to_vec(&body(None)).unwrap();
    assert!(text.len() > 1 << 20, "{} bytes", text.len());
    let mut broken = b"{\"derivations\": [x".to_vec();
    broken.extend_from_slice(&text);
    let r = ureq::post(&c.url("/api/v1/builds"))
        .set("content-type", "application/json")
        .send_bytes(&broken);
    let (code, resp) = common::response(r);
    assert_eq!(code, 400, "{resp}");
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request body is not the expected JSON"),
        "{resp}"
    );

    let (code, builds) = common::get(&c.url("/api/v1/builds?limit=0"));
    assert_eq!(code, 200);
    assert_eq!(
        builds,
        serde_json::json!([]),
        "a refused submission queued builds"
    );
    c.stop();
    let dump = state_dump(&c.state_dir);
    assert_eq!(records(&dump, "derivations"), 0, "{dump}");
    assert_eq!(records(&dump, "builds"), 0, "{dump}");

    // Sent without a Content-Length (chunked), so parsed while it arrives.
    c.spawn();
    let r = ureq::post(&c.url("/api/v1/builds"))
        .set("content-type", "application/json")
        .send(std::io::Cursor::new(text));
    let (code, resp) = common::response(r);
    assert_eq!(code, 200, "{resp}");
    let answered = resp["builds"].as_array().unwrap();
    assert_eq!(answered.len(), N);
    let mut ids = std::collections::BTreeSet::new();
    for (b, (p, _)) in answered.iter().zip(&drvs) {
        assert_eq!(b["drv_path"], p.as_str(), "{b}");
        assert_eq!(b["existing"], false, "{b}");
        assert_eq!(b["state"], "runnable", "{b}");
        ids.insert(b["id"].as_u64().unwrap());
    }
    assert_eq!(ids.len(), N, "every build has an id of its own");
    let (code, builds) = common::get(&c.url("/api/v1/builds?limit=0"));
    assert_eq!(code, 200);
    assert_eq!(builds.as_array().unwrap().len(), N);
    c.stop();
    let dump = state_dump(&c.state_dir);
    assert_eq!(records(&dump, "derivations"), N, "{dump}");
    assert_eq!(records(&dump, "builds"), N, "{dump}");
}

/// How many records of `tree` a state dump holds.
fn records(dump: &str, tree: &str) -> usize {
    dump.lines()
        .filter(|l| l.split(' ').next() == Some(tree))
        .count()
}
