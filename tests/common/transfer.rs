//! Support for the transfer tests: a build held by a hand-played agent (session, work, start),
//! compressed NARs with their hashes, and HTTP/1.1 spoken by hand over a raw `TcpStream`, so a
//! test can send half a body, stop, go silent, or send headers without a body.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln::derivation::store_path::StoreDir;
use sha2::Digest as _;

use super::*;

/// A coordinator with one build allocated to, and started by, agent `a1` (played by the test).
pub struct HeldBuild {
    pub c: Coordinator,
    pub secret: String,
    pub token: String,
    pub build: u64,
    pub out_path: String,
    pub store: PathBuf,
    pub tmp: tempfile::TempDir,
}

/// Starts a coordinator with `extra` config, registers `a1`, submits one derivation and takes
/// it as `a1` (session, work, start).
pub fn held_build(extra: &str) -> HeldBuild {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, extra);
    let (code, agent) = post(
        &c.url("/api/v1/agents"),
        &serde_json::json!({"name": "a1", "systems": ["x86_64-linux"]}),
    );
    assert_eq!(code, 200, "{agent}");
    let secret = agent["secret"].as_str().unwrap().to_string();
    let (p, b) = simple_drv(&sd, "transfer", "echo > $out");
    let (code, r) = post(
        &c.url("/api/v1/builds"),
        &serde_json::json!({"derivations": [{"path": p, "contents": b64(&b)}], "builds": [p]}),
    );
    assert_eq!(code, 200, "{r}");
    let (code, s) = post(
        &c.agent("/api/agent/v1/session"),
        &serde_json::json!({"name": "a1", "secret": secret, "protocol_version": 1,
            "systems": ["x86_64-linux"], "max_parallel_builds": 1, "builds": []}),
    );
    assert_eq!(code, 200, "{s}");
    let token = s["session_token"].as_str().unwrap().to_string();
    let (code, w) = response(
        ureq::post(&c.agent("/api/agent/v1/work"))
            .set("x-kiln-session", &token)
            .send_json(serde_json::json!({"max_builds": 1})),
    );
    assert_eq!(code, 200, "{w}");
    let build = w["builds"][0]["build_id"]
        .as_u64()
        .expect("a build assigned");
    let out_path = w["builds"][0]["outputs"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, r) = response(
        ureq::post(&c.agent(&format!("/api/agent/v1/builds/{build}/start")))
            .set("x-kiln-session", &token)
            .send_json(serde_json::json!({"attempt": 1})),
    );
    assert_eq!(code, 200, "{r}");
    HeldBuild {
        c,
        secret,
        token,
        build,
        out_path,
        store,
        tmp,
    }
}

impl HeldBuild {
    /// Opens a new session (after a coordinator restart), naming the held build.
    pub fn reopen(&mut self) {
        let (code, s) = post(
            &self.c.agent("/api/agent/v1/session"),
            &serde_json::json!({"name": "a1", "secret": self.secret, "protocol_version": 1,
                "systems": ["x86_64-linux"], "max_parallel_builds": 1,
                "builds": [{"build_id": self.build, "attempt": 1, "phase": "uploading"}]}),
        );
        assert_eq!(code, 200, "{s}");
        self.token = s["session_token"].as_str().unwrap().to_string();
    }

    /// Reports the build succeeded with one output `out`.
    pub fn succeed(
        &self,
        fh: &str,
        size: u64,
        nar_hash: &str,
        nar_size: u64,
    ) -> (u16, serde_json::Value) {
        response(
            ureq::post(&self.c.agent(&format!("/api/agent/v1/builds/{}/result", self.build)))
                .set("x-kiln-session", &self.token)
                .send_json(serde_json::json!({"attempt": 1, "outcome": {"result": "succeeded",
                    "outputs": [{"name": "out", "path": self.out_path, "nar_hash": nar_hash,
                        "nar_size": nar_size, "file_hash": fh, "file_size": size, "references": []}]}})),
        )
    }

    /// The partial files in `uploads/`.
    pub fn parts(&self) -> Vec<String> {
        std::fs::read_dir(self.c.state_dir.join("uploads"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `sha256:<nix base32>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        kiln::derivation::base32::encode(&sha2::Sha256::digest(bytes))
    )
}

/// A zstd-compressed NAR of a tree holding `size` bytes of incompressible data: (compressed
/// bytes, FileHash, NarHash, NarSize).
pub fn compressed_nar(dir: &Path, size: usize) -> (Vec<u8>, String, String, u64) {
    let src = dir.join(format!("nar-src-{size}"));
    std::fs::create_dir_all(&src).unwrap();
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("data"), data).unwrap();
    let mut nar = Vec::new();
    kiln::nar::dump(&src, &mut nar).unwrap();
    let zst = zstd::encode_all(nar.as_slice(), 1).unwrap();
    let fh = sha256(&zst);
    (zst, fh, sha256(&nar), nar.len() as u64)
}

/// `host:port` of a base URL.
pub fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Opens a connection and sends a request head (with `content-length: len`) and `body`,
/// which may be shorter than `len`. Returns the open stream.
pub fn send_partial(
    base: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    len: u64,
    body: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr(base)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nhost: {}\r\ncontent-length: {len}\r\n",
        addr(base)
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s.flush().unwrap();
    s
}

/// A response read by hand: status, lower-cased headers in order, body.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Reads one response from `s` (the body by `content-length`; `head` = no body expected).
/// Reads the head byte by byte, so nothing of a pipelined next response is consumed.
pub fn read_response(s: &mut TcpStream, head: bool) -> RawResponse {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("a response head");
        assert!(
            n == 1,
            "the connection closed after {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|h| !h.is_empty())
        .map(|h| {
            let (k, v) = h.split_once(':').expect("a header");
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; if head { 0 } else { len }];
    s.read_exact(&mut body).expect("the body");
    RawResponse {
        status,
        headers,
        body,
    }
}

/// The upload query of build `build`'s output `out` for a file of `size` bytes at `offset`.
pub fn upload_target(build: u64, output: &str, fh: &str, size: u64, offset: u64) -> String {
    format!("/api/agent/v1/builds/{build}/outputs/{output}?attempt=1&file_hash={fh}&file_size={size}&offset={offset}")
}

/// `GET` the upload status.
pub fn upload_status(h: &HeldBuild, fh: &str, size: u64) -> serde_json::Value {
    let (code, st) = response(
        ureq::get(&h.c.agent(&format!(
            "/api/agent/v1/builds/{}/outputs/out?attempt=1&file_hash={fh}&file_size={size}",
            h.build
        )))
        .set("x-kiln-session", &h.token)
        .call(),
    );
    assert_eq!(code, 200, "{st}");
    st
}

/// `PUT` `body` at `offset` with ureq; returns (status, JSON).
pub fn put_rest(
    h: &HeldBuild,
    fh: &str,
    size: u64,
    offset: u64,
    body: &[u8],
) -> (u16, serde_json::Value) {
    response(
        ureq::put(&h.c.agent(&upload_target(h.build, "out", fh, size, offset)))
            .set("x-kiln-session", &h.token)
            .send_bytes(body),
    )
}

/// Resident-memory figures of a process, in KiB: (VmRSS, VmHWM).
pub fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A counter in the coordinator's `/metrics` (0 when absent).
pub fn metric(c: &Coordinator, name: &str) -> f64 {
    let text = ureq::get(&c.agent("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
