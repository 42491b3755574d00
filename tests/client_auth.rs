//! The client listener's gate against a real coordinator process: every client route × every
//! token scope and no (or a wrong) token is refused with 401/403; cross-origin `text/plain`
//! POSTs, foreign `Origin`s and foreign `Host`s are refused on every route; and none of it
//! changes `kiln state dump`. Tokens are made with the real `kiln token new`, offline and
//! online, and the real `kiln submit` sends one from `--token-file`. `kiln token list` shows
//! every token's id, name, scope and last use and never a token; `kiln token revoke ID|NAME`
//! makes a token refused (401) from the very next request, refuses unknown and ambiguous
//! names, and keeps the last admin token unless run offline (`--state-dir`).

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{b64, simple_drv, state_dump, wait_for, Coordinator};
use kiln::derivation::store_path::StoreDir;

const LIMIT: Duration = Duration::from_secs(90);

fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env_remove("KILN_COORDINATOR")
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_TOKEN_FILE");
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One raw HTTP/1.1 exchange: (status, head, body). `host` overrides the Host header.
fn raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    host: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.set_write_timeout(Some(LIMIT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        host.unwrap_or(addr),
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    // One write: head and body reach the server together, so answering early leaves no
    // unread bytes behind (which would reset the connection under the answer).
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer: {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// The first admin token ("root"), made offline in the state dir `state` and saved to
/// `file`; what the command printed.
fn first_admin_offline(state: &Path, file: &Path) -> String {
    run_ok(
        kiln()
            .args(["token", "new", "--scope", "admin", "--name", "root"])
            .arg("--state-dir")
            .arg(state)
            .arg("--save-to")
            .arg(file),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
enum Need {
    Read,
    Submit,
    Admin,
}

struct Route {
    method: &'static str,
    path: String,
    content_type: &'static str,
    body: Vec<u8>,
    need: Need,
    /// A GET that streams forever when allowed (not sent with a sufficient token).
    endless: bool,
}

fn token_file(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn every_client_route_refuses_missing_wrong_and_narrow_tokens_and_foreign_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let state = tmp.path().join("state");
    let t = tmp.path();

    // The first token, offline, before the coordinator ever ran.
    let out = first_admin_offline(&state, &t.join("admin.tok"));
    assert!(out.contains("written to"), "{out}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(t.join("admin.tok"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let mut c = Coordinator::start(t, &store, "");
    assert!(
        c.log().contains("client API requires a token"),
        "{}",
        c.log()
    );
    // More tokens, online, with the admin one.
    for scope in ["read", "submit"] {
        run_ok(
            kiln()
                .args(["token", "new", "--scope", scope, "--name", scope])
                .args(["--coordinator", &c.client_url])
                .arg("--token-file")
                .arg(t.join("admin.tok"))
                .arg("--save-to")
                .arg(t.join(format!("{scope}.tok"))),
        );
    }
    // Without a token the CLI is refused, and says what to do.
    let out = kiln()
        .args(["builds", "--coordinator", &c.client_url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 401") && err.contains("KILN_TOKEN"),
        "{err}"
    );
    // A read token cannot submit (403 through the CLI), a submit token can.
    let (drv, bytes) = simple_drv(&sd, "seed", "echo > $out");
    std::fs::write(&drv, &bytes).unwrap();
    let out = kiln()
        .args(["submit", &drv, "--coordinator", &c.client_url])
        .arg("--store-dir")
        .arg(&store)
        .env("KILN_TOKEN", token_file(t, "read.tok"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 403"),
        "{out:?}"
    );
    run_ok(
        kiln()
            .args(["submit", &drv, "--coordinator", &c.client_url])
            .arg("--store-dir")
            .arg(&store)
            .arg("--token-file")
            .arg(t.join("submit.tok")),
    );
    run_ok(
        kiln()
            .args(["agent", "new", "a1", "--system", "x86_64-linux"])
            .args(["--coordinator", &c.client_url])
            .env("KILN_TOKEN", token_file(t, "admin.tok")),
    );
    let listed = run_ok(
        kiln()
            .args(["builds", "--json", "--coordinator", &c.client_url])
            .env("KILN_TOKEN", token_file(t, "read.tok")),
    );
    assert!(listed.contains("seed"), "{listed}");
    c.stop();
    let before = state_dump(&state);
    assert_eq!(before.matches("client_tokens ").count(), 3, "{before}");
    assert!(
        !before.contains(&token_file(t, "admin.tok")),
        "a token is stored in clear"
    );

    c.spawn();
    let addr = c.client_url.trim_start_matches("http://").to_string();
    let (drv2, bytes2) = simple_drv(&sd, "intruder", "echo > $out");
    let submit_body = serde_json::json!({
        "derivations": [{"path": drv2, "contents": b64(&bytes2)}],
        "builds": [drv2],
    });
    let src = t.join("src");
    std::fs::write(&src, b"a source").unwrap();
    let mut nar = Vec::new();
    kiln::nar::dump(&src, &mut nar).unwrap();
    let nar_hash = kiln::derivation::Hash::sha256(&nar).to_nix_string();
    let src_path = format!("{}/{}-src", sd.as_str(), "3".repeat(32));
    let json = |v: serde_json::Value| v.to_string().into_bytes();
    let route = |method, path: &str, content_type, body: Vec<u8>, need| Route {
        method,
        path: format!("/api/v1{path}"),
        content_type,
        body,
        need,
        endless: false,
    };
    let mut routes = vec![
        route("GET", "/builds", "", vec![], Need::Read),
        route("GET", "/builds?state=runnable", "", vec![], Need::Read),
        route("GET", "/builds/1", "", vec![], Need::Read),
        route("GET", "/builds/1/log", "", vec![], Need::Read),
        route("GET", "/agents", "", vec![], Need::Read),
        route("GET", "/events?since=0", "", vec![], Need::Read),
        route(
            "POST",
            "/builds",
            "application/json",
            json(submit_body),
            Need::Submit,
        ),
        route(
            "POST",
            "/builds/1/cancel",
            "application/json",
            vec![],
            Need::Submit,
        ),
        route(
            "POST",
            "/sources/missing",
            "application/json",
            json(serde_json::json!({"paths": [src_path]})),
            Need::Submit,
        ),
        route(
            "PUT",
            &format!("/sources?path={src_path}&nar_hash={nar_hash}&references="),
            "application/x-nix-archive",
            nar,
            Need::Submit,
        ),
        route(
            "POST",
            "/agents",
            "application/json",
            json(serde_json::json!({"name": "intruder", "systems": ["x86_64-linux"]})),
            Need::Admin,
        ),
        route(
            "POST",
            "/tokens",
            "application/json",
            json(serde_json::json!({"name": "intruder", "scope": "admin"})),
            Need::Admin,
        ),
        route("GET", "/tokens", "", vec![], Need::Admin),
        route(
            "POST",
            "/tokens/read/revoke",
            "application/json",
            vec![],
            Need::Admin,
        ),
    ];
    routes[5].endless = true;
    let creds: Vec<(&str, Option<String>, Option<Need>)> = vec![
        ("no token", None, None),
        (
            "unknown token",
            Some(format!("Bearer kiln-{}", "0".repeat(64))),
            None,
        ),
        ("not a bearer", Some("Basic cm9vdDpyb290".into()), None),
        (
            "read",
            Some(format!("Bearer {}", token_file(t, "read.tok"))),
            Some(Need::Read),
        ),
        (
            "submit",
            Some(format!("Bearer {}", token_file(t, "submit.tok"))),
            Some(Need::Submit),
        ),
        (
            "admin",
            Some(format!("Bearer {}", token_file(t, "admin.tok"))),
            Some(Need::Admin),
        ),
    ];
    let mut refused = 0;
    for r in &routes {
        for (label, auth, held) in &creds {
            let mut headers = Vec::new();
            if !r.content_type.is_empty() {
                headers.push(("Content-Type", r.content_type.to_string()));
            }
            if let Some(a) = auth {
                headers.push(("Authorization", a.clone()));
            }
            let what = format!("{} {} with {label}", r.method, r.path);
            match held {
                None => {
                    let (code, head, body) = raw(&addr, r.method, &r.path, &headers, None, &r.body);
                    assert_eq!(code, 401, "{what}: {body}");
                    assert!(head.contains("www-authenticate: bearer"), "{what}: {head}");
                    assert!(body.contains("\"unauthorized\""), "{what}: {body}");
                    refused += 1;
                }
                Some(h) if *h < r.need => {
                    let (code, _, body) = raw(&addr, r.method, &r.path, &headers, None, &r.body);
                    assert_eq!(code, 403, "{what}: {body}");
                    assert!(body.contains("\"forbidden\""), "{what}: {body}");
                    refused += 1;
                }
                // Allowed reads are sent too: they pass the gate (and change nothing).
                Some(_) if r.method == "GET" && !r.endless => {
                    let (code, _, body) = raw(&addr, r.method, &r.path, &headers, None, &r.body);
                    assert!(code == 200 || code == 404, "{what}: {code} {body}");
                }
                Some(_) => {}
            }
        }
    }
    assert_eq!(refused, 6 * 3 + 4 * 4 + 4 * 5, "refusals counted");

    // Browser safety, with the admin token (so only the browser checks can refuse).
    let admin = format!("Bearer {}", token_file(t, "admin.tok"));
    for r in &routes {
        let auth = ("Authorization", admin.clone());
        let own_type = ("Content-Type", r.content_type.to_string());
        let what = format!("{} {}", r.method, r.path);
        if r.method != "GET" {
            // A cross-origin "simple request" a web page can send without a preflight.
            let (code, head, body) = raw(
                &addr,
                r.method,
                &r.path,
                &[
                    auth.clone(),
                    ("Content-Type", "text/plain".into()),
                    ("Origin", "http://evil.example".into()),
                ],
                None,
                &r.body,
            );
            assert_eq!(code, 403, "{what} cross-origin text/plain: {body}");
            assert!(!head.contains("access-control-allow"), "{what}: {head}");
            // The same without an Origin (a form post from a page that hides it): still no.
            let (code, _, body) = raw(
                &addr,
                r.method,
                &r.path,
                &[auth.clone(), ("Content-Type", "text/plain".into())],
                None,
                &r.body,
            );
            assert_eq!(code, 415, "{what} text/plain: {body}");
            assert!(body.contains("content_type_required"), "{what}: {body}");
            // The right type from a foreign origin.
            let (code, _, body) = raw(
                &addr,
                r.method,
                &r.path,
                &[
                    auth.clone(),
                    own_type.clone(),
                    ("Origin", "http://evil.example".into()),
                ],
                None,
                &r.body,
            );
            assert_eq!(code, 403, "{what} foreign origin: {body}");
            assert!(body.contains("cross_origin"), "{what}: {body}");
        }
        // DNS rebinding: a foreign Host, on every route (reads too).
        let port = addr.rsplit(':').next().unwrap();
        let (code, _, body) = raw(
            &addr,
            r.method,
            &r.path,
            &[auth.clone(), own_type.clone()],
            Some(&format!("evil.example:{port}")),
            &r.body,
        );
        assert_eq!(code, 403, "{what} foreign Host: {body}");
        assert!(body.contains("host_not_allowed"), "{what}: {body}");
    }
    // Controls: the same admin token, own Origin and localhost Host pass the gate.
    let (code, _, body) = raw(
        &addr,
        "GET",
        "/api/v1/builds",
        &[
            ("Authorization", admin.clone()),
            ("Origin", format!("http://{addr}")),
        ],
        None,
        b"",
    );
    assert_eq!(code, 200, "{body}");
    let port = addr.rsplit(':').next().unwrap();
    let (code, _, body) = raw(
        &addr,
        "GET",
        "/api/v1/builds",
        &[("Authorization", admin.clone())],
        Some(&format!("localhost:{port}")),
        b"",
    );
    assert_eq!(code, 200, "{body}");

    c.stop();
    let after = state_dump(&state);
    assert_eq!(before, after, "refused requests changed the state");
}

/// With no client token at all, the listener serves loopback callers without one, and says so.
#[test]
fn without_tokens_loopback_callers_need_none() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, "");
    wait_for("the access log line", LIMIT, || {
        c.log()
            .contains("the client API serves loopback connections only")
            .then_some(())
    });
    let addr = c.client_url.trim_start_matches("http://").to_string();
    let (code, _, body) = raw(&addr, "GET", "/api/v1/builds", &[], None, b"");
    assert_eq!(code, 200, "{body}");
    // The browser checks hold without tokens too.
    let (code, _, body) = raw(
        &addr,
        "POST",
        "/api/v1/builds/1/cancel",
        &[
            ("Content-Type", "text/plain".into()),
            ("Origin", "http://evil.example".into()),
        ],
        None,
        b"",
    );
    assert_eq!(code, 403, "{body}");
}

fn run_fail(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `GET path` with a bearer token: (status, body).
fn get_with(addr: &str, path: &str, token: &str) -> (u16, String) {
    let (code, _, body) = raw(
        addr,
        "GET",
        path,
        &[("Authorization", format!("Bearer {token}"))],
        None,
        b"",
    );
    (code, body)
}

/// `kiln token list --json` (online with `admin`, or offline), as JSON values.
fn list(c: Option<&Coordinator>, admin: &str, state: &Path) -> Vec<serde_json::Value> {
    let mut cmd = kiln();
    cmd.args(["token", "list", "--json"]);
    match c {
        Some(c) => {
            cmd.args(["--coordinator", &c.client_url])
                .env("KILN_TOKEN", admin);
        }
        None => {
            cmd.arg("--state-dir").arg(state);
        }
    }
    serde_json::from_str::<serde_json::Value>(&run_ok(&mut cmd))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// How many records of `tree` a state dump holds.
fn lines_of(dump: &str, tree: &str) -> usize {
    dump.lines()
        .filter(|l| l.split(' ').next() == Some(tree))
        .count()
}

fn by_name<'a>(list: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    list.iter().filter(|t| t["name"] == name).collect()
}

#[test]
fn tokens_are_listed_without_secrets_and_revoked_at_once_but_the_last_admin_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = t.join("store");
    std::fs::create_dir_all(&store).unwrap();
    let state = t.join("state");
    let out = first_admin_offline(&state, &t.join("root.tok"));
    assert!(out.contains("id "), "{out}");
    let mut c = Coordinator::start(t, &store, "");
    let root = token_file(t, "root.tok");
    // Two tokens named "ci" (names are labels, not unique), a second admin "ops".
    for (file, scope, name) in [
        ("ci-read.tok", "read", "ci"),
        ("ci-submit.tok", "submit", "ci"),
        ("ops.tok", "admin", "ops"),
    ] {
        run_ok(
            kiln()
                .args(["token", "new", "--scope", scope, "--name", name])
                .args(["--coordinator", &c.client_url])
                .env("KILN_TOKEN", &root)
                .arg("--save-to")
                .arg(t.join(file)),
        );
    }
    let ci_read = token_file(t, "ci-read.tok");
    let ops = token_file(t, "ops.tok");
    let addr = c.client_url.trim_start_matches("http://").to_string();
    let (code, body) = get_with(&addr, "/api/v1/builds", &ci_read);
    assert_eq!(code, 200, "{body}");

    // The listing: scopes, ids, last use; never a token, in JSON or as a table.
    let tokens = list(Some(&c), &root, &state);
    assert_eq!(tokens.len(), 4, "{tokens:?}");
    let scopes: Vec<(String, String)> = tokens
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["scope"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("root", "admin"),
        ("ci", "read"),
        ("ci", "submit"),
        ("ops", "admin"),
    ] {
        assert!(
            scopes.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} not in {scopes:?}"
        );
    }
    let ci_read_entry = by_name(&tokens, "ci")
        .into_iter()
        .find(|t| t["scope"] == "read")
        .unwrap()
        .clone();
    assert!(
        ci_read_entry["last_used_ms"].as_u64().is_some(),
        "{ci_read_entry}"
    );
    assert!(
        by_name(&tokens, "ops")[0]["last_used_ms"].is_null(),
        "{tokens:?}"
    );
    for t in &tokens {
        assert_eq!(t["id"].as_str().unwrap().len(), 12, "{t}");
        assert!(t.get("token").is_none(), "{t}");
    }
    let table = run_ok(
        kiln()
            .args(["token", "list", "--coordinator", &c.client_url])
            .env("KILN_TOKEN", &root),
    );
    assert!(
        table.starts_with("ID") && table.contains("LAST USED"),
        "{table}"
    );
    assert!(
        table.contains(ci_read_entry["id"].as_str().unwrap()),
        "{table}"
    );
    for f in ["root.tok", "ci-read.tok", "ci-submit.tok", "ops.tok"] {
        let secret = token_file(t, f);
        let hex = secret.trim_start_matches("kiln-");
        for shown in [&table, &serde_json::to_string(&tokens).unwrap()] {
            assert!(!shown.contains(hex), "{f}'s token is shown: {shown}");
        }
    }

    // Only admin may list and revoke.
    let err = run_fail(
        kiln()
            .args(["token", "revoke", "ops", "--coordinator", &c.client_url])
            .env("KILN_TOKEN", &ci_read),
    );
    assert!(err.contains("HTTP 403"), "{err}");
    // Unknown and ambiguous: refused, saying what to do.
    let err = run_fail(
        kiln()
            .args(["token", "revoke", "nobody", "--coordinator", &c.client_url])
            .env("KILN_TOKEN", &root),
    );
    assert!(
        err.contains("HTTP 404") && err.contains("\"nobody\"") && err.contains("kiln token list"),
        "{err}"
    );
    let err = run_fail(
        kiln()
            .args(["token", "revoke", "ci", "--coordinator", &c.client_url])
            .env("KILN_TOKEN", &root),
    );
    assert!(
        err.contains("HTTP 409")
            && err.contains("2 client tokens are named")
            && err.contains("by its id"),
        "{err}"
    );

    // Revoked by id: the very next request with it is refused, and says why.
    let id = ci_read_entry["id"].as_str().unwrap();
    let out = run_ok(
        kiln()
            .args(["token", "revoke", id, "--coordinator", &c.client_url])
            .env("KILN_TOKEN", &root),
    );
    assert!(out.contains(id) && out.contains("revoked"), "{out}");
    let (code, body) = get_with(&addr, "/api/v1/builds", &ci_read);
    assert_eq!(code, 401, "{body}");
    assert!(
        body.contains("not known to this coordinator") && body.contains("revoked"),
        "{body}"
    );
    // Revoking it again: it is unknown now.
    let err = run_fail(
        kiln()
            .args(["token", "revoke", id, "--coordinator", &c.client_url])
            .env("KILN_TOKEN", &root),
    );
    assert!(err.contains("HTTP 404"), "{err}");
    // The name "ci" is unique now: revoke by name.
    run_ok(
        kiln()
            .args([
                "token",
                "revoke",
                "ci",
                "--json",
                "--coordinator",
                &c.client_url,
            ])
            .env("KILN_TOKEN", &root),
    );

    // An admin token revokes another admin token (even its own), but not the last one.
    run_ok(
        kiln()
            .args(["token", "revoke", "root", "--coordinator", &c.client_url])
            .env("KILN_TOKEN", &ops),
    );
    let (code, body) = get_with(&addr, "/api/v1/tokens", &root);
    assert_eq!(code, 401, "{body}");
    let err = run_fail(
        kiln()
            .args(["token", "revoke", "ops", "--coordinator", &c.client_url])
            .env("KILN_TOKEN", &ops),
    );
    assert!(
        err.contains("HTTP 409") && err.contains("last admin token") && err.contains("--state-dir"),
        "{err}"
    );
    let left = list(Some(&c), &ops, &state);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["name"], "ops");
    c.stop();

    // Offline, with the state dir in hand, the last admin token can go.
    let offline = list(None, "", &state);
    assert_eq!(offline.len(), 1, "{offline:?}");
    assert!(offline[0]["last_used_ms"].is_null(), "{offline:?}");
    let out = run_ok(
        kiln()
            .args(["token", "revoke", "ops", "--state-dir"])
            .arg(&state),
    );
    assert!(out.contains("revoked"), "{out}");
    assert!(list(None, "", &state).is_empty());
    let dump = state_dump(&state);
    assert_eq!(lines_of(&dump, "client_tokens"), 0, "{dump}");
    // Every creation and revocation is in the event log (online and offline), with the
    // token's id, name and scope, and never the token.
    // (Each payload is a JSON text inside the record's JSON: unescape its quotes.)
    let events = |kind: &str| -> Vec<String> {
        dump.lines()
            .filter(|l| l.starts_with("events ") && l.contains(&format!("\"{kind}\"")))
            .map(|l| l.replace("\\\"", "\""))
            .collect()
    };
    assert_eq!(events("client-token-created").len(), 4, "{dump}");
    let revoked = events("client-token-revoked");
    assert_eq!(revoked.len(), 4, "{dump}");
    assert!(
        revoked
            .iter()
            .any(|l| l.contains(id) && l.contains("\"read\"")),
        "{revoked:?}"
    );
    assert!(
        revoked
            .iter()
            .any(|l| l.contains("\"ops\"") && l.contains("\"admin\"")),
        "{revoked:?}"
    );
    for f in ["root.tok", "ci-read.tok", "ci-submit.tok", "ops.tok"] {
        let hex = token_file(t, f);
        let hex = hex.trim_start_matches("kiln-");
        assert!(!dump.contains(hex), "{f}'s token is in the state dump");
    }
    // With no token left, the listener is loopback-only again, and says so.
    c.spawn();
    common::wait_for("the access log line", LIMIT, || {
        c.log()
            .contains("the client API serves loopback connections only")
            .then_some(())
    });
}
