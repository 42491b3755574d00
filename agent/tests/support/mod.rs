//! A stand-in for the coordinator's agent API (hand-written HTTP/1.1 on 127.0.0.1:0, following
//! the protocol contract), and helpers to build assignments and run the real `kiln-agent`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln::derivation::{Derivation, DerivationOutput};
use kiln::protocol::{Assignment, Bytes64, OutputSpec, PathInfo, ResultReport, UploadStatus};
use sha2::Digest as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub const OUT_HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Default)]
pub struct Fake {
    pub assignment: Option<Assignment>,
    pub sessions: u32,
    /// Refuse every session opening with 401 `unauthorized`.
    pub refuse: bool,
    /// Served at `/<key>` as they are (compressed NARs of inputs).
    pub files: HashMap<String, Vec<u8>>,
    /// Cancel the assigned build on the first heartbeat after its start.
    pub cancel_after_start: bool,
    pub started: bool,
    /// The `builds` of every session opening, as sent.
    pub opened_with: Vec<serde_json::Value>,
    pub forgot_once: bool,
    pub truncated_once: bool,
    pub put_offsets: Vec<u64>,
    pub upload: Vec<u8>,
    pub verified: bool,
    pub log: Option<Vec<u8>>,
    pub result: Option<ResultReport>,
    /// The `wait_ms` of every work request, as sent.
    pub work_waits: Vec<u64>,
    /// The `max_builds` of every work request, as sent.
    pub work_asks: Vec<u64>,
    /// Assigned with `assignment`, in the same work reply.
    pub more_assignments: Vec<Assignment>,
    /// Every result with its build id, in arrival order.
    pub results: Vec<(u64, ResultReport)>,
    /// While true, output PUTs are not answered (the uploads back up).
    pub hold_uploads: bool,
    /// Heartbeats answered so far.
    pub heartbeats: u32,
    /// Sent (and emptied) with the next heartbeat reply.
    pub heartbeat_commands: Vec<serde_json::Value>,
    /// Uploads by URL path (`upload`/`verified` mirror the latest one touched).
    pub uploads: HashMap<String, (Vec<u8>, bool)>,
}

pub type Shared = Arc<Mutex<Fake>>;

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

pub async fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
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

pub async fn respond(w: &mut BufReader<TcpStream>, status: &str, extra: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = w.get_mut().write_all(msg.as_bytes()).await;
}

pub fn error(code: &str) -> String {
    format!(r#"{{"error":{{"code":"{code}","message":"from the test"}}}}"#)
}

/// Decides the answer to one request: (status line, extra headers, body).
pub fn answer(fake: &Shared, req: &Request) -> (&'static str, String, String) {
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
        ("POST", "heartbeat") => {
            f.heartbeats += 1;
            let commands: Vec<_> = f.heartbeat_commands.drain(..).collect();
            let body = serde_json::json!({ "commands": commands });
            ("200 OK", String::new(), body.to_string())
        }
        ("POST", "work") => {
            let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
            f.work_waits
                .push(body["wait_ms"].as_u64().expect("wait_ms is sent"));
            f.work_asks
                .push(body["max_builds"].as_u64().expect("max_builds is sent"));
            if !f.forgot_once {
                // The coordinator "restarted": it no longer knows this session.
                f.forgot_once = true;
                f.sessions += 1;
                return ("401 Unauthorized", String::new(), error("session_unknown"));
            }
            let mut builds = f.assignment.take().map(|a| vec![a]).unwrap_or_default();
            builds.append(&mut f.more_assignments);
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
            let r = f.result.clone().unwrap();
            let id = p.split('/').nth(1).and_then(|i| i.parse().ok()).unwrap();
            f.results.push((id, r));
            ("200 OK", String::new(), r#"{"duplicate":false}"#.into())
        }
        (method, p) if p.contains("/outputs/") => upload(&mut f, method, req),
        _ => ("404 Not Found", String::new(), error("not_found")),
    }
}

pub fn upload(f: &mut Fake, method: &str, req: &Request) -> (&'static str, String, String) {
    let (buf, verified) = f.uploads.remove(&req.path).unwrap_or_default();
    f.upload = buf;
    f.verified = verified;
    let answer = upload_one(f, method, req);
    f.uploads
        .insert(req.path.clone(), (f.upload.clone(), f.verified));
    answer
}

fn upload_one(f: &mut Fake, method: &str, req: &Request) -> (&'static str, String, String) {
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

pub async fn serve(listener: TcpListener, fake: Shared) {
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
                if req.method == "PUT" && req.path.contains("/outputs/") {
                    // Bounded: a test that never releases fails on its own deadline first.
                    for _ in 0..2_400 {
                        if !fake.lock().unwrap().hold_uploads {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                let (status, extra, body) = answer(&fake, &req);
                respond(&mut conn, status, &extra, &body).await;
            }
        });
    }
}

pub fn assignment(store: &Path) -> Assignment {
    assignment_with(
        store,
        "mkdir -p $out/bin; printf 'hi \\377\\n' > $out/bin/hello; echo built",
    )
}

pub const DEP_HASH: &str = "zyxwvsrqpnmlkjihgfdcba9876543210";

/// A `PathInfo` for `path` and its compressed NAR, made from a small tree under `tmp`.
pub fn input(tmp: &Path, path: &str) -> (PathInfo, Vec<u8>) {
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

pub fn assignment_with(store: &Path, script: &str) -> Assignment {
    numbered_assignment(store, 7, OUT_HASH, script)
}

/// Build `id` whose output hash part is `out_hash` (32 nix-base32 characters).
pub fn numbered_assignment(store: &Path, id: u64, out_hash: &str, script: &str) -> Assignment {
    let out = format!("{}/{out_hash}-hello", store.display());
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
        build_id: id,
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
        priority: 0,
    }
}

pub async fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
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

pub fn nix_hash(path: &Path) -> String {
    let out = std::process::Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("failed to run nix-hash ({e}): install nix (apt-get install nix-bin) to run this test"));
    format!("sha256:{}", String::from_utf8(out.stdout).unwrap().trim())
}

pub fn spawn_agent(url: &str, secret: &Path, store: &Path, state: &Path) -> tokio::process::Child {
    spawn_agent_with(url, secret, store, state, &[])
}

/// [`spawn_agent`] with more flags.
pub fn spawn_agent_with(
    url: &str,
    secret: &Path,
    store: &Path,
    state: &Path,
    extra: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["--coordinator", url, "--name", "a1", "--secret-file"])
        .arg(secret)
        .arg("--store-dir")
        .arg(store)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

pub async fn stop_agent(mut agent: tokio::process::Child) {
    // SAFETY: kill with a pid we spawned.
    unsafe { libc::kill(agent.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "agent exited with {status}");
}

/// A loopback address with a port that was free a moment ago (for `--metrics-addr`).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The agent's `/metrics` text, or `None` while its metrics server does not answer.
pub async fn metrics_text(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    Some(text)
}

/// Polls `probe` (async) until it answers `Some`, for at most `within`.
pub async fn wait_for_async<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
