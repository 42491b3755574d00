//! Every agent route × every credential failure, against a real coordinator over real HTTP:
//! no credential, a wrong secret, an expired session token (ended by a secret rotation or by a
//! coordinator restart), a foreign one (never issued), another agent's build, a stale attempt,
//! and a system the agent's registration does not allow. Each is refused with the status and
//! code the table names (or, where the protocol answers a refusal in a 200 — an `abandon`
//! command, an empty work reply — with that), and `kiln state dump` is unchanged afterwards:
//! no refusal wrote anything.
//!
//! The setup before the first dump: agents `alpha` and `bravo` (x86_64-linux); build `b1`
//! leased to alpha (attempt 1); build `b3` first leased to bravo (attempt 1), released when
//! bravo reopened its session without it, then leased to alpha (attempt 2), so bravo's
//! attempt 1 is stale; build `b2` for i586-gnu, which no agent may build, runnable.
//! alpha's secret is rotated once (so its first secret and token are expired), and the
//! coordinator is restarted (so every token from before is expired).

mod common;
mod leases_common;

use common::*;
use kiln::derivation::store_path::StoreDir;
use leases_common::{register, submit, RawAgent};
use serde_json::{json, Value};

const TIMEOUTS: &str = "[timeouts]\nheartbeat_interval_ms = 10000\nagent_timeout_ms = 600000\nunheld_lease_ms = 600000\n";

/// How a refusal shows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// An error status with this `ErrorBody` code.
    Error(u16, &'static str),
    /// 200 with an `abandon` command for this build and attempt, and nothing else changed.
    Abandon(u64, u32),
    /// 200 with no builds assigned.
    NoWork,
    /// The failure does not apply to the route (it names no build, or the route is public
    /// to every authenticated agent); the reason says why.
    NotApplicable(&'static str),
}

/// A request as the table sends it.
struct Req {
    method: &'static str,
    path: String,
    /// (header, value)
    headers: Vec<(&'static str, String)>,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
    bytes: Option<Vec<u8>>,
}

fn send(base: &str, r: &Req) -> (u16, Value) {
    let mut req = ureq::request(r.method, &format!("{base}/api/agent/v1/{}", r.path));
    for (h, v) in &r.headers {
        req = req.set(h, v);
    }
    for (k, v) in &r.query {
        req = req.query(k, v);
    }
    response(match (&r.body, &r.bytes) {
        (Some(b), _) => req.send_json(b.clone()),
        (None, Some(bytes)) => req.send_bytes(bytes),
        (None, None) => req.call(),
    })
}

/// The builds and agents the table refers to.
struct World {
    b1: u64,
    b2: u64,
    b3: u64,
    alpha_secret: String,
    alpha_old_secret: String,
    bravo_secret: String,
    /// Issued before the rotation, and before the restart.
    expired_tokens: Vec<String>,
}

const ROUTES: [&str; 9] = [
    "session",
    "heartbeat",
    "work",
    "start",
    "upload-status",
    "upload",
    "log",
    "result",
    "paths",
];

const FAILURES: [&str; 7] = [
    "none",
    "wrong secret",
    "expired token",
    "foreign token",
    "another agent's build",
    "stale attempt",
    "system not allowed",
];

/// A request on `route` about `build` at `attempt`, authenticated by `auth` (a header, or
/// none).
fn route_req(route: &str, auth: Option<(&'static str, String)>, build: u64, attempt: u32) -> Req {
    let headers: Vec<(&'static str, String)> = auth.into_iter().collect();
    let body_bytes = b"refused before it is read".to_vec();
    let file_hash = kiln::derivation::Hash::sha256(&body_bytes).to_nix_string();
    let upload_q = vec![
        ("attempt", attempt.to_string()),
        ("file_hash", file_hash),
        ("file_size", body_bytes.len().to_string()),
        ("offset", "0".to_string()),
    ];
    let (method, path, query, body, bytes) = match route {
        "heartbeat" => (
            "POST",
            "heartbeat".to_string(),
            vec![],
            Some(json!({"builds": []})),
            None,
        ),
        "work" => (
            "POST",
            "work".to_string(),
            vec![],
            Some(json!({"max_builds": 1, "request_id": "table-1"})),
            None,
        ),
        "start" => (
            "POST",
            format!("builds/{build}/start"),
            vec![],
            Some(json!({ "attempt": attempt })),
            None,
        ),
        "upload-status" => (
            "GET",
            format!("builds/{build}/outputs/out"),
            upload_q,
            None,
            None,
        ),
        "upload" => (
            "PUT",
            format!("builds/{build}/outputs/out"),
            upload_q,
            None,
            Some(body_bytes),
        ),
        "log" => (
            "PUT",
            format!("builds/{build}/log"),
            vec![("attempt", attempt.to_string())],
            None,
            Some(b"log".to_vec()),
        ),
        "result" => (
            "POST",
            format!("builds/{build}/result"),
            vec![],
            Some(json!({"attempt": attempt, "outcome": {"result": "failed", "reason": "table"}})),
            None,
        ),
        "paths" => (
            "GET",
            "paths/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr".to_string(),
            vec![],
            None,
            None,
        ),
        other => panic!("no route {other}"),
    };
    Req {
        method,
        path,
        headers,
        query,
        body,
        bytes,
    }
}

fn session_req(
    name: &str,
    secret: &str,
    systems: &[&str],
    held: Value,
    token: Option<&str>,
) -> Req {
    Req {
        method: "POST",
        path: "session".into(),
        headers: vec![],
        query: vec![],
        body: Some(
            json!({"name": name, "secret": secret, "protocol_version": 1,
            "systems": systems, "max_parallel_builds": 1, "builds": held,
            "registration_token": token}),
        ),
        bytes: None,
    }
}

fn session_header(token: &str) -> Option<(&'static str, String)> {
    Some(("x-kiln-session", token.to_string()))
}

/// One cell of the table: the request(s) to send and what each must get.
fn cell(
    w: &World,
    alpha: &RawAgent,
    bravo: &RawAgent,
    route: &str,
    failure: &str,
) -> Vec<(Req, Expect)> {
    use Expect::*;
    let unauthorized = Error(401, "unauthorized");
    let unknown = Error(401, "session_unknown");
    let builds_route = ["start", "upload-status", "upload", "log", "result"].contains(&route);
    match (route, failure) {
        ("session", "none") => vec![(session_req("alpha", "", &[], json!([]), None), unauthorized)],
        ("session", "wrong secret") => vec![(
            session_req("alpha", &format!("{}x", w.alpha_secret), &[], json!([]), None),
            unauthorized,
        )],
        ("session", "expired token") => vec![(
            // The secret alpha had before its rotation.
            session_req("alpha", &w.alpha_old_secret, &[], json!([]), None),
            unauthorized,
        )],
        ("session", "foreign token") => vec![
            // A registration token this coordinator never issued, for a name it does not know.
            (
                session_req("newcomer", &"s".repeat(64), &["x86_64-linux"], json!([]), Some(&"f".repeat(64))),
                unauthorized,
            ),
            // A session token is no credential for opening a session.
            (
                session_req("alpha", &alpha.token, &[], json!([]), None),
                unauthorized,
            ),
        ],
        ("session", "another agent's build") => vec![(
            session_req(
                "bravo",
                &w.bravo_secret,
                &[],
                json!([{"build_id": w.b1, "attempt": 1, "phase": "building"}]),
                None,
            ),
            Abandon(w.b1, 1),
        )],
        ("session", "stale attempt") => vec![(
            session_req(
                "bravo",
                &w.bravo_secret,
                &[],
                json!([{"build_id": w.b3, "attempt": 1, "phase": "uploading"}]),
                None,
            ),
            Abandon(w.b3, 1),
        )],
        ("session", "system not allowed") => vec![
            (
                session_req(
                    "alpha",
                    &w.alpha_secret,
                    &["x86_64-linux", "i586-gnu"],
                    json!([{"build_id": w.b1, "attempt": 1, "phase": "building"},
                           {"build_id": w.b3, "attempt": 2, "phase": "building"}]),
                    None,
                ),
                Error(403, "system_not_allowed"),
            ),
            // A registration token limited to x86_64-linux, used to register an i586-gnu agent:
            // refused, and no agent is created.
            (
                session_req("hurd-1", &"h".repeat(64), &["i586-gnu"], json!([]), Some(&w_token())),
                Error(403, "system_not_allowed"),
            ),
        ],
        (_, "none") => vec![(route_req(route, None, w.b1, 1), unknown)],
        (_, "wrong secret") => vec![(
            route_req(route, Some(("authorization", format!("Bearer {}x", w.alpha_secret))), w.b1, 1),
            unknown,
        )],
        (_, "expired token") => w
            .expired_tokens
            .iter()
            .map(|t| (route_req(route, session_header(t), w.b1, 1), unknown))
            .collect(),
        (_, "foreign token") => vec![(
            route_req(route, session_header(&"0123456789abcdef".repeat(4)), w.b1, 1),
            unknown,
        )],
        ("heartbeat", "another agent's build") => {
            let mut r = route_req(route, session_header(&bravo.token), 0, 0);
            r.body = Some(json!({"builds": [{"build_id": w.b1, "attempt": 1, "phase": "building"}]}));
            vec![(r, Abandon(w.b1, 1))]
        }
        ("heartbeat", "stale attempt") => {
            let mut r = route_req(route, session_header(&bravo.token), 0, 0);
            r.body = Some(json!({"builds": [{"build_id": w.b3, "attempt": 1, "phase": "building"}]}));
            vec![(r, Abandon(w.b3, 1))]
        }
        ("heartbeat", "system not allowed") => {
            let mut r = route_req(route, session_header(&bravo.token), 0, 0);
            r.body = Some(json!({"builds": [{"build_id": w.b2, "attempt": 0, "phase": "building"}]}));
            vec![(r, Abandon(w.b2, 0))]
        }
        ("work", "another agent's build") => {
            // bravo retries alpha's work request id: request ids are per agent, so it is
            // bravo's own fresh request, and alpha's builds are not handed over.
            let mut r = route_req(route, session_header(&bravo.token), 0, 0);
            r.body = Some(json!({"max_builds": 4, "request_id": "alpha-1"}));
            vec![(r, NoWork)]
        }
        ("work", "stale attempt") => vec![(
            route_req(route, session_header(&bravo.token), 0, 0),
            NotApplicable("a work request names no build or attempt"),
        )],
        ("work", "system not allowed") => {
            // The only runnable build is for i586-gnu: bravo (x86_64-linux) gets nothing.
            let mut r = route_req(route, session_header(&bravo.token), 0, 0);
            r.body = Some(json!({"max_builds": 4, "request_id": "bravo-sys"}));
            vec![(r, NoWork)]
        }
        (_, "another agent's build") if builds_route => vec![(
            route_req(route, session_header(&bravo.token), w.b1, 1),
            Error(409, "stale_attempt"),
        )],
        (_, "stale attempt") if builds_route => vec![
            // bravo's old attempt of b3 (now alpha's, attempt 2).
            (route_req(route, session_header(&bravo.token), w.b3, 1), Error(409, "stale_attempt")),
            // alpha's own build at an attempt that is not the current one.
            (route_req(route, session_header(&alpha.token), w.b3, 1), Error(409, "stale_attempt")),
        ],
        (_, "system not allowed") if builds_route => vec![(
            // The i586-gnu build, never leased (bravo may not build it).
            route_req(route, session_header(&bravo.token), w.b2, 0),
            Error(409, "stale_attempt"),
        )],
        ("paths", _) => vec![(
            route_req(route, session_header(&bravo.token), 0, 0),
            NotApplicable("available paths are public to every authenticated agent (and as narinfos to anyone)"),
        )],
        (r, f) => panic!("no cell for {r} x {f}"),
    }
}

/// The registration token of the table's coordinator (limited to x86_64-linux).
fn w_token() -> String {
    "7".repeat(64)
}

fn check(what: &str, got: (u16, Value), want: &Expect) {
    let (code, body) = got;
    match want {
        Expect::Error(status, err) => {
            assert_eq!(code, *status, "{what}: {body}");
            assert_eq!(body["error"]["code"], *err, "{what}: {body}");
            assert!(
                !body["error"]["message"].as_str().unwrap_or("").is_empty(),
                "{what}: a refusal says why: {body}"
            );
        }
        Expect::Abandon(build, attempt) => {
            assert_eq!(code, 200, "{what}: {body}");
            let cmds = body["commands"].as_array().expect("commands");
            assert!(
                cmds.contains(
                    &json!({"command": "abandon", "build_id": build, "attempt": attempt})
                ),
                "{what}: expected abandon of {build}@{attempt}: {body}"
            );
        }
        Expect::NoWork => {
            assert_eq!(code, 200, "{what}: {body}");
            assert_eq!(body["builds"], json!([]), "{what}: {body}");
        }
        Expect::NotApplicable(_) => {}
    }
}

fn held(w: &World) -> Value {
    json!([{"build_id": w.b1, "attempt": 1, "phase": "building"},
           {"build_id": w.b3, "attempt": 2, "phase": "building"}])
}

#[test]
fn every_agent_route_refuses_every_credential_failure_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let token_file = tmp.path().join("x86.token");
    std::fs::write(&token_file, w_token()).unwrap();
    let mut c = Coordinator::start(
        tmp.path(),
        &store,
        &format!(
            "[[registration_tokens]]\ntoken_file = {:?}\nsystems = [\"x86_64-linux\"]\n{TIMEOUTS}",
            token_file.display().to_string()
        ),
    );

    let alpha_old_secret = register(&c, "alpha");
    let bravo_secret = register(&c, "bravo");
    let ids = submit(
        &c,
        &[
            simple_drv(&sd, "b1", "echo 1 > $out"),
            system_drv(&sd, "b2", "i586-gnu", "echo 2 > $out"),
        ],
    );
    let (b1, b2) = (ids[0], ids[1]);
    // b1 to alpha (attempt 1), with request id alpha-1.
    let (alpha, _) = RawAgent::open(&c, "alpha", &alpha_old_secret, json!([]));
    let w = alpha.work(Some("alpha-1"), 4);
    assert_eq!(w["builds"][0]["build_id"], b1, "{w}");
    assert_eq!(alpha.start(b1, 1).0, 200);
    // b3 to bravo (attempt 1), released when bravo reopens without it, then to alpha
    // (attempt 2).
    let b3 = submit(&c, &[simple_drv(&sd, "b3", "echo 3 > $out")])[0];
    let (mut bravo, _) = RawAgent::open(&c, "bravo", &bravo_secret, json!([]));
    let w = bravo.work(Some("bravo-1"), 4);
    assert_eq!(w["builds"][0]["build_id"], b3, "{w}");
    bravo.reopen(json!([]));
    let w = alpha.work(Some("alpha-2"), 4);
    assert_eq!(w["builds"][0]["build_id"], b3, "{w}");
    assert_eq!(w["builds"][0]["attempt"], 2, "{w}");
    // Rotate alpha's secret: the first token and secret expire.
    let (code, rotated) = post(&c.url("/api/v1/agents/alpha/rotate-secret"), &json!(null));
    assert_eq!(code, 200, "{rotated}");
    let alpha_secret = rotated["secret"].as_str().unwrap().to_string();
    let rotated_token = alpha.token.clone();
    assert_eq!(
        alpha.start(b1, 1).0,
        401,
        "the rotation ended alpha's session"
    );
    let mut alpha = RawAgent {
        secret: alpha_secret.clone(),
        ..alpha
    };
    let held_now = json!([{"build_id": b1, "attempt": 1, "phase": "building"},
                          {"build_id": b3, "attempt": 2, "phase": "building"}]);
    alpha.reopen(held_now.clone());
    let before_restart = alpha.token.clone();

    // The state before the table.
    c.stop();
    let before = state_dump(&c.state_dir);
    c.spawn();
    alpha.base = c.agent_url.clone();
    bravo.base = c.agent_url.clone();
    alpha.reopen(held_now.clone());
    bravo.reopen(json!([]));
    let world = World {
        b1,
        b2,
        b3,
        alpha_secret,
        alpha_old_secret,
        bravo_secret,
        expired_tokens: vec![rotated_token, before_restart],
    };
    assert_eq!(held(&world), held_now);

    let mut rows = Vec::new();
    for route in ROUTES {
        for failure in FAILURES {
            for (i, (req, want)) in cell(&world, &alpha, &bravo, route, failure)
                .into_iter()
                .enumerate()
            {
                let what = format!("{route} x {failure} #{i}");
                if let Expect::NotApplicable(why) = &want {
                    rows.push(format!("{route:<14} {failure:<22} n/a: {why}"));
                    continue;
                }
                let got = send(&c.agent_url, &req);
                let shown = if got.0 == 200 {
                    format!("commands {} builds {}", got.1["commands"], got.1["builds"])
                } else {
                    got.1["error"]["code"].to_string()
                };
                rows.push(format!("{route:<14} {failure:<22} {} {shown}", got.0));
                check(&what, got, &want);
                // A session a cell opened replaced that agent's token: open it again as the
                // agent would, so the next cells use a live token.
                if req.path == "session" && matches!(want, Expect::Abandon(..)) {
                    match req.body.as_ref().and_then(|b| b["name"].as_str()) {
                        Some("bravo") => bravo.reopen(json!([])),
                        _ => alpha.reopen(held(&world)),
                    };
                }
            }
        }
    }
    println!("{}", rows.join("\n"));
    // Nothing the table did was written: the registered agents, leases, attempts and events
    // are as they were.
    c.stop();
    let after = state_dump(&c.state_dir);
    assert_eq!(before, after, "a refused request changed the state");
    assert!(
        !after.contains("hurd-1") && !after.contains("newcomer"),
        "no agent was registered"
    );
}
