//! Runs the real `kiln-agent` binary against a small stand-in for the coordinator's agent API
//! (a hand-written HTTP/1.1 responder on 127.0.0.1:0 that follows the protocol contract), so
//! the session loop, the resumable upload and the result report run for real. The stand-in
//! forgets the session once (401 `session_unknown`) and keeps only half of the first upload
//! (503 + `Retry-After: 0`), so the agent must reopen the session and resume from `received`.
//! The real coordinator's end-to-end test lives in the workspace's `tests/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln::derivation::{Derivation, DerivationOutput};
use kiln::protocol::{
    Assignment, Bytes64, Outcome, OutputSpec, PathInfo, ResultReport, UploadStatus,
};
use sha2::Digest as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

const OUT_HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Default)]
struct Fake {
    assignment: Option<Assignment>,
    sessions: u32,
    /// Refuse every session opening with 401 `unauthorized`.
    refuse: bool,
    /// Served at `/<key>` as they are (compressed NARs of inputs).
    files: HashMap<String, Vec<u8>>,
    /// Cancel the assigned build on the first heartbeat after its start.
    cancel_after_start: bool,
    started: bool,
    /// The `builds` of every session opening, as sent.
    opened_with: Vec<serde_json::Value>,
    forgot_once: bool,
    truncated_once: bool,
    put_offsets: Vec<u64>,
    upload: Vec<u8>,
    verified: bool,
    log: Option<Vec<u8>>,
    result: Option<ResultReport>,
}

type Shared = Arc<Mutex<Fake>>;

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length") {
        body.resize(len.parse().ok()?, 0);
        r.read_exact(&mut body).await.ok()?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3A", ":")))
        .collect();
    Some(Request {
        method,
        path: path.to_owned(),
        query,
        headers,
        body,
    })
}

async fn respond(w: &mut BufReader<TcpStream>, status: &str, extra: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = w.get_mut().write_all(msg.as_bytes()).await;
}

fn error(code: &str) -> String {
    format!(r#"{{"error":{{"code":"{code}","message":"from the test"}}}}"#)
}

/// Decides the answer to one request: (status line, extra headers, body).
fn answer(fake: &Shared, req: &Request) -> (&'static str, String, String) {
    let mut f = fake.lock().unwrap();
    let token = req
        .headers
        .get("x-kiln-session")
        .cloned()
        .unwrap_or_default();
    let path = req.path.trim_start_matches("/api/agent/v1/");
    if path == "session" && f.refuse {
        return ("401 Unauthorized", String::new(), error("unauthorized"));
    }
    if path == "session" {
        f.sessions += 1;
        let open: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        f.opened_with.push(open["builds"].clone());
        let body = format!(
            r#"{{"agent_id":1,"session_token":"t{}","heartbeat_interval_ms":200,"agent_timeout_ms":5000}}"#,
            f.sessions
        );
        return ("200 OK", String::new(), body);
    }
    if token != format!("t{}", f.sessions) {
        return ("401 Unauthorized", String::new(), error("session_unknown"));
    }
    match (req.method.as_str(), path) {
        ("POST", "heartbeat") if f.cancel_after_start && f.started => {
            f.cancel_after_start = false;
            let cmd = serde_json::json!({"commands": [{"command": "cancel", "build_id": 7, "attempt": 1}]});
            ("200 OK", String::new(), cmd.to_string())
        }
        ("POST", "heartbeat") => ("200 OK", String::new(), "{}".into()),
        ("POST", "work") => {
            if !f.forgot_once {
                // The coordinator "restarted": it no longer knows this session.
                f.forgot_once = true;
                f.sessions += 1;
                return ("401 Unauthorized", String::new(), error("session_unknown"));
            }
            let builds = f.assignment.take().map(|a| vec![a]).unwrap_or_default();
            (
                "200 OK",
                String::new(),
                serde_json::json!({ "builds": builds }).to_string(),
            )
        }
        ("POST", p) if p.ends_with("/start") => {
            f.started = true;
            ("200 OK", String::new(), "{}".into())
        }
        ("PUT", p) if p.ends_with("/log") => {
            f.log = Some(req.body.clone());
            ("200 OK", String::new(), "{}".into())
        }
        ("POST", p) if p.ends_with("/result") => {
            f.result = Some(serde_json::from_slice(&req.body).unwrap());
            ("200 OK", String::new(), r#"{"duplicate":false}"#.into())
        }
        (method, p) if p.contains("/outputs/") => upload(&mut f, method, req),
        _ => ("404 Not Found", String::new(), error("not_found")),
    }
}

fn upload(f: &mut Fake, method: &str, req: &Request) -> (&'static str, String, String) {
    let size: u64 = req.query["file_size"].parse().unwrap();
    if method == "PUT" {
        let offset: u64 = req.query["offset"].parse().unwrap();
        f.put_offsets.push(offset);
        if offset != f.upload.len() as u64 {
            return ("409 Conflict", String::new(), error("upload_offset"));
        }
        let mut body = req.body.clone();
        if !f.truncated_once {
            // The link broke half way: keep half, and say "come back later".
            f.truncated_once = true;
            body.truncate(body.len() / 2);
            f.upload.extend_from_slice(&body);
            return (
                "503 Service Unavailable",
                "retry-after: 0\r\n".into(),
                error("busy"),
            );
        }
        f.upload.extend_from_slice(&body);
        if f.upload.len() as u64 == size {
            let hash = format!(
                "sha256:{}",
                kiln::derivation::base32::encode(&sha2::Sha256::digest(&f.upload))
            );
            assert_eq!(
                hash, req.query["file_hash"],
                "the upload must match its file_hash"
            );
            f.verified = true;
        }
    }
    let status = UploadStatus {
        received: f.upload.len() as u64,
        verified: f.verified,
        nar_hash: None,
        nar_size: None,
    };
    (
        "200 OK",
        String::new(),
        serde_json::to_string(&status).unwrap(),
    )
}

async fn serve(listener: TcpListener, fake: Shared) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let fake = fake.clone();
        tokio::spawn(async move {
            let mut conn = BufReader::new(stream);
            while let Some(req) = read_request(&mut conn).await {
                let file = fake
                    .lock()
                    .unwrap()
                    .files
                    .get(req.path.trim_start_matches('/'))
                    .cloned();
                if let Some(bytes) = file {
                    let head =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", bytes.len());
                    let _ = conn.get_mut().write_all(head.as_bytes()).await;
                    let _ = conn.get_mut().write_all(&bytes).await;
                    continue;
                }
                let (status, extra, body) = answer(&fake, &req);
                respond(&mut conn, status, &extra, &body).await;
            }
        });
    }
}

fn assignment(store: &Path) -> Assignment {
    assignment_with(
        store,
        "mkdir -p $out/bin; printf 'hi \\377\\n' > $out/bin/hello; echo built",
    )
}

const DEP_HASH: &str = "zyxwvsrqpnmlkjihgfdcba9876543210";

/// A `PathInfo` for `path` and its compressed NAR, made from a small tree under `tmp`.
fn input(tmp: &Path, path: &str) -> (PathInfo, Vec<u8>) {
    let src = tmp.join("dep-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("greeting"), b"from the input\n").unwrap();
    let mut nar = Vec::new();
    kiln::nar::dump(&src, &mut nar).unwrap();
    let zst = zstd::encode_all(nar.as_slice(), 3).unwrap();
    let h = |b: &[u8]| {
        format!(
            "sha256:{}",
            kiln::derivation::base32::encode(&sha2::Sha256::digest(b))
        )
    };
    let info = PathInfo {
        path: path.to_owned(),
        nar_hash: h(&nar),
        nar_size: nar.len() as u64,
        file_hash: h(&zst),
        file_size: zst.len() as u64,
        compression: "zstd".into(),
        url: "nar/dep.nar.zst".into(),
        references: vec![],
    };
    (info, zst)
}

fn assignment_with(store: &Path, script: &str) -> Assignment {
    let out = format!("{}/{OUT_HASH}-hello", store.display());
    let drv = Derivation {
        outputs: vec![(
            b"out".to_vec(),
            DerivationOutput {
                path: out.clone().into_bytes(),
                ..Default::default()
            },
        )],
        platform: b"x86_64-linux".to_vec(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), script.as_bytes().to_vec()],
        env: vec![
            (b"out".to_vec(), out.clone().into_bytes()),
            (b"PATH".to_vec(), b"/usr/bin:/bin".to_vec()),
        ],
        ..Derivation::default()
    };
    Assignment {
        build_id: 7,
        attempt: 1,
        drv_path: format!(
            "{}/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello.drv",
            store.display()
        ),
        drv: Bytes64(drv.print()),
        system: "x86_64-linux".into(),
        outputs: vec![OutputSpec {
            name: "out".into(),
            path: out,
        }],
        inputs: vec![],
    }
}

async fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn nix_hash(path: &Path) -> String {
    let out = std::process::Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("failed to run nix-hash ({e}): install nix (apt-get install nix-bin) to run this test"));
    format!("sha256:{}", String::from_utf8(out.stdout).unwrap().trim())
}

fn spawn_agent(url: &str, secret: &Path, store: &Path, state: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["--coordinator", url, "--name", "a1", "--secret-file"])
        .arg(secret)
        .arg("--store-dir")
        .arg(store)
        .arg("--state-dir")
        .arg(state)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn stop_agent(mut agent: tokio::process::Child) {
    // SAFETY: kill with a pid we spawned.
    unsafe { libc::kill(agent.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "agent exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_uploads_resumably_and_reports_through_a_session_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let state = tmp.path().join("state");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    // One input, served as a compressed NAR; the builder copies from it, so the output
    // refers to it.
    let dep = format!("{}/{DEP_HASH}-dep", store.display());
    let mut a = assignment_with(&store, &format!("mkdir -p $out/bin; printf 'hi \\377\\n' > $out/bin/hello; cat {dep}/greeting >> $out/bin/hello; echo {dep} > $out/uses; echo built"));
    let (info, nar_zst) = input(tmp.path(), &dep);
    a.inputs.push(info);
    let mut files = HashMap::new();
    files.insert("nar/dep.nar.zst".to_owned(), nar_zst);
    let fake: Shared = Arc::new(Mutex::new(Fake {
        assignment: Some(a),
        files,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));

    let agent = spawn_agent(&url, &secret, &store, &state);

    let result = wait_for("the result", Duration::from_secs(60), || {
        fake.lock().unwrap().result.clone()
    })
    .await;
    let Outcome::Succeeded { outputs } = result.outcome else {
        panic!("build failed: {:?}", result.outcome)
    };
    // As root the output lives in the agent's private store, visible at <state-dir>/store.
    let seen_at: PathBuf = [state.join("store"), store.clone()]
        .into_iter()
        .map(|d| d.join(format!("{OUT_HASH}-hello")))
        .find(|p| p.exists())
        .expect("the output exists in the agent's store view");
    assert_eq!(outputs[0].nar_hash, nix_hash(&seen_at));
    assert_eq!(
        std::fs::read(seen_at.join("bin/hello")).unwrap(),
        b"hi \xff\nfrom the input\n"
    );
    assert_eq!(
        outputs[0].references,
        vec![dep.clone()],
        "the output refers to its input"
    );
    {
        let f = fake.lock().unwrap();
        assert!(f.sessions >= 2, "the agent reopened its session");
        assert!(f.verified);
        assert_eq!(
            f.put_offsets.len(),
            2,
            "one broken upload, one resumed: {:?}",
            f.put_offsets
        );
        assert!(
            f.put_offsets[1] > 0,
            "the second PUT resumed from what arrived"
        );
        let log =
            zstd::decode_all(f.log.clone().expect("the log was uploaded").as_slice()).unwrap();
        assert!(log.starts_with(b"built"));
        let nar = zstd::decode_all(f.upload.as_slice()).unwrap();
        assert_eq!(nar.len() as u64, outputs[0].nar_size);
    }
    wait_for(
        "the build dir to be removed",
        Duration::from_secs(20),
        || (!state.join("builds/7-1").exists()).then_some(()),
    )
    .await;

    stop_agent(agent).await;
}

/// Pins down recovery: a result decided before the agent died (its `report.json` on disk) is
/// named in the next session opening and sent, log first; an undecided build is discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_report_is_resent_after_a_restart() {
    use kiln_agent::state::{StateDir, StoredReport};
    let tmp = tempfile::tempdir().unwrap();
    let (store, state, secret) = (
        tmp.path().join("store"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    std::fs::write(&secret, "s3cret").unwrap();
    let dirs = StateDir::open(&state).unwrap();
    let mut a = assignment(&store);
    (a.build_id, a.attempt) = (9, 2);
    let decided = dirs.build_dir(9, 2);
    decided.create().unwrap();
    decided.write_assignment(&a).unwrap();
    std::fs::write(decided.log(), b"it broke \xff\n").unwrap();
    let outcome = Outcome::Failed {
        reason: "builder exited with status 1".into(),
    };
    decided
        .write_report(&StoredReport::new(9, 2, outcome.clone(), true))
        .unwrap();
    let undecided = dirs.build_dir(10, 1);
    undecided.create().unwrap();

    let fake: Shared = Arc::new(Mutex::new(Fake {
        forgot_once: true,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let agent = spawn_agent(&url, &secret, &store, &state);

    let result = wait_for("the resent result", Duration::from_secs(60), || {
        fake.lock().unwrap().result.clone()
    })
    .await;
    assert_eq!(
        result,
        ResultReport {
            attempt: 2,
            outcome
        }
    );
    {
        let f = fake.lock().unwrap();
        assert_eq!(
            f.opened_with[0],
            serde_json::json!([{"build_id": 9, "attempt": 2, "phase": "uploading"}])
        );
        let log = zstd::decode_all(f.log.clone().expect("the log was resent").as_slice()).unwrap();
        assert_eq!(log, b"it broke \xff\n");
    }
    assert!(
        !undecided.path.exists(),
        "a build without a result is discarded at start"
    );
    wait_for(
        "the build dir to be removed",
        Duration::from_secs(20),
        || (!decided.path.exists()).then_some(()),
    )
    .await;
    stop_agent(agent).await;
}

/// Pins down cancel through a command on the heartbeat: the builder is killed and the build is
/// reported `Failed{reason:"canceled"}` with its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_command_stops_the_builder_and_reports_canceled() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, state, secret) = (
        tmp.path().join("store"),
        tmp.path().join("state"),
        tmp.path().join("secret"),
    );
    std::fs::write(&secret, "s3cret").unwrap();
    let a = assignment_with(&store, "echo started; exec sleep 1000");
    let fake: Shared = Arc::new(Mutex::new(Fake {
        assignment: Some(a),
        forgot_once: true,
        cancel_after_start: true,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let agent = spawn_agent(&url, &secret, &store, &state);

    let result = wait_for("the canceled result", Duration::from_secs(60), || {
        fake.lock().unwrap().result.clone()
    })
    .await;
    assert_eq!(
        result.outcome,
        Outcome::Failed {
            reason: "canceled".into()
        }
    );
    let log = fake
        .lock()
        .unwrap()
        .log
        .clone()
        .expect("the log was uploaded");
    assert!(zstd::decode_all(log.as_slice())
        .unwrap()
        .starts_with(b"started"));
    stop_agent(agent).await;
}

/// Pins down that a wrong name or secret is fatal: the agent exits non-zero and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_agent_exits_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "wrong").unwrap();
    let fake: Shared = Arc::new(Mutex::new(Fake {
        refuse: true,
        ..Fake::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, fake.clone()));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["--coordinator", &url, "--name", "a1", "--secret-file"])
        .arg(&secret)
        .arg("--store-dir")
        .arg(tmp.path().join("store"))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused this agent (unauthorized)"),
        "{stderr}"
    );
}

#[test]
fn the_nix_and_guix_executors_are_refused_until_issue_8() {
    for executor in ["nix", "guix"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
            .args([
                "--coordinator",
                "http://127.0.0.1:9",
                "--name",
                "a",
                "--secret-file",
                "/nonexistent",
            ])
            .args(["--state-dir", "/nonexistent", "--executor", executor])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("[8/8]") && stderr.contains(executor),
            "{stderr}"
        );
    }
}
