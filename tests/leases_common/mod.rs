//! Support for the lease tests (`coordinator_leases.rs`, `lease_farm.rs`): an agent played over
//! raw HTTP (so a test can lose a reply on purpose), real NARs to upload, the event log read
//! back through the SSE replay, real `kiln-agent` processes that can be stopped, continued and
//! killed with signals, and a loopback TCP proxy that drops work replies and follows a
//! restarted coordinator.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln::derivation::store_path::StoreDir;
use kiln::derivation::{Derivation, PathComputer, StorePath};
use serde_json::{json, Value};

use crate::common::{get, kiln_bin, post, response, simple_drv, Coordinator};

/// Every event in the log, read through the SSE replay (`since=0`); the stream is cut after
/// one quiet second.
pub fn events(c: &Coordinator) -> Vec<Value> {
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(1))
        .build();
    let resp = agent
        .get(&c.url("/api/v1/events?since=0"))
        .call()
        .expect("event stream");
    let mut out = Vec::new();
    let mut reader = BufReader::new(resp.into_reader());
    let mut line = String::new();
    // Bounded: at most 100,000 lines, and the read timeout ends a quiet stream.
    for _ in 0..100_000 {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Some(data) = line.strip_prefix("data: ") {
                    out.push(serde_json::from_str(data.trim_end()).expect("event json"));
                }
            }
        }
    }
    out
}

/// The events of one kind about one build.
pub fn events_of(all: &[Value], kind: &str, build: u64) -> Vec<Value> {
    all.iter()
        .filter(|e| e["kind"] == kind && e["build_id"] == build)
        .cloned()
        .collect()
}

/// A build's detail (`GET /api/v1/builds/{id}`).
pub fn build(c: &Coordinator, id: u64) -> Value {
    let (code, b) = get(&c.url(&format!("/api/v1/builds/{id}")));
    assert_eq!(code, 200, "{b}");
    b
}

pub fn state_of(c: &Coordinator, id: u64) -> String {
    build(c, id)["summary"]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Register an agent; returns its secret.
pub fn register(c: &Coordinator, name: &str) -> String {
    let (code, a) = post(
        &c.url("/api/v1/agents"),
        &json!({"name": name, "systems": ["x86_64-linux"]}),
    );
    assert_eq!(code, 200, "{a}");
    a["secret"].as_str().unwrap().to_string()
}

/// Submit `.drv`s (no inputs) as builds; returns their ids.
pub fn submit(c: &Coordinator, drvs: &[(String, Vec<u8>)]) -> Vec<u64> {
    let derivations: Vec<Value> = drvs
        .iter()
        .map(|(p, b)| json!({"path": p, "contents": crate::common::b64(b)}))
        .collect();
    let paths: Vec<&String> = drvs.iter().map(|(p, _)| p).collect();
    let (code, r) = post(
        &c.url("/api/v1/builds"),
        &json!({"derivations": derivations, "builds": paths}),
    );
    assert_eq!(code, 200, "{r}");
    r["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect()
}

/// An agent played over raw HTTP.
pub struct RawAgent {
    pub base: String,
    pub name: String,
    pub secret: String,
    pub token: String,
}

impl RawAgent {
    pub fn open(c: &Coordinator, name: &str, secret: &str, held: Value) -> (RawAgent, Value) {
        let mut a = RawAgent {
            base: c.agent_url.clone(),
            name: name.into(),
            secret: secret.into(),
            token: String::new(),
        };
        let opened = a.reopen(held);
        (a, opened)
    }

    /// Open a session again (as after a coordinator restart); returns the reply.
    pub fn reopen(&mut self, held: Value) -> Value {
        let (code, s) = post(
            &format!("{}/api/agent/v1/session", self.base),
            &json!({"name": self.name, "secret": self.secret, "protocol_version": 1,
                "systems": ["x86_64-linux"], "max_parallel_builds": 1, "builds": held}),
        );
        assert_eq!(code, 200, "{s}");
        self.token = s["session_token"].as_str().unwrap().to_string();
        s
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        response(
            ureq::post(&format!("{}/api/agent/v1/{path}", self.base))
                .set("x-kiln-session", &self.token)
                .send_json(body),
        )
    }

    /// `POST …/work`; the caller may ignore the reply, as if it was lost on the wire.
    pub fn work(&self, request_id: Option<&str>, max: u32) -> Value {
        let (code, w) = self.post("work", json!({"max_builds": max, "request_id": request_id}));
        assert_eq!(code, 200, "{w}");
        w
    }

    pub fn heartbeat(&self, held: Value) -> Value {
        let (code, r) = self.post("heartbeat", json!({ "builds": held }));
        assert_eq!(code, 200, "{r}");
        r
    }

    pub fn start(&self, id: u64, attempt: u32) -> (u16, Value) {
        self.post(&format!("builds/{id}/start"), json!({ "attempt": attempt }))
    }

    pub fn upload(&self, id: u64, attempt: u32, nar: &Nar) -> (u16, Value) {
        response(
            ureq::put(&format!(
                "{}/api/agent/v1/builds/{id}/outputs/out",
                self.base
            ))
            .set("x-kiln-session", &self.token)
            .query("attempt", &attempt.to_string())
            .query("file_hash", &nar.file_hash)
            .query("file_size", &nar.compressed.len().to_string())
            .query("offset", "0")
            .send_bytes(&nar.compressed),
        )
    }

    pub fn result(&self, id: u64, attempt: u32, outcome: Value) -> (u16, Value) {
        self.post(
            &format!("builds/{id}/result"),
            json!({"attempt": attempt, "outcome": outcome}),
        )
    }
}

/// A real NAR of a one-file output, compressed as the agent uploads it.
pub struct Nar {
    pub compressed: Vec<u8>,
    pub nar_hash: String,
    pub nar_size: u64,
    pub file_hash: String,
}

impl Nar {
    pub fn of_file(dir: &Path, contents: &[u8]) -> Nar {
        let f = dir.join(format!("nar-src-{}", rand_u32()));
        std::fs::write(&f, contents).unwrap();
        let mut nar = Vec::new();
        kiln::nar::dump(&f, &mut nar).unwrap();
        let compressed = zstd::encode_all(&nar[..], 3).unwrap();
        Nar {
            nar_hash: kiln::derivation::Hash::sha256(&nar).to_nix_string(),
            nar_size: nar.len() as u64,
            file_hash: kiln::derivation::Hash::sha256(&compressed).to_nix_string(),
            compressed,
        }
    }

    /// The success outcome for output `out` at `path`.
    pub fn success(&self, path: &str) -> Value {
        json!({"result": "succeeded", "outputs": [{
            "name": "out", "path": path, "nar_hash": self.nar_hash, "nar_size": self.nar_size,
            "file_hash": self.file_hash, "file_size": self.compressed.len(), "references": []}]})
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

pub fn agent_bin() -> PathBuf {
    let p = kiln_bin().with_file_name("kiln-agent");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (scripts/test does)",
        p.display()
    );
    p
}

/// A real `kiln-agent` process; SIGKILLed and reaped when dropped (also when stopped).
pub struct AgentProc {
    pub child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
    pub state: PathBuf,
}

impl AgentProc {
    /// Start an agent named `name` (registered, its secret given) against `url`.
    pub fn start(dir: &Path, url: &str, store: &Path, name: &str, secret: &str) -> AgentProc {
        let secret_file = dir.join(format!("{name}.secret"));
        std::fs::write(&secret_file, secret).unwrap();
        let state = dir.join(format!("{name}-state"));
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(agent_bin())
            .arg("--coordinator")
            .arg(url)
            .args(["--name", name, "--system", "x86_64-linux"])
            .arg("--secret-file")
            .arg(&secret_file)
            .arg("--store-dir")
            .arg(store)
            .arg("--state-dir")
            .arg(&state)
            .args(["--executor", "native", "--max-parallel-builds", "2"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start kiln-agent");
        AgentProc {
            child: Some(child),
            name: name.into(),
            log,
            state,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.pid();
        assert!(pid > 0, "agent {} is not running", self.name);
        // SAFETY: kill takes plain integers.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test if the agent exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!(
                "agent {} exited ({st}); its log:\n{}",
                self.name,
                self.log_text()
            );
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Is any process of process group `pgid` alive (per /proc)?
pub fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] = state, [1] = ppid, [2] = pgrp. A zombie holds no process.
        fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string()
    })
}

/// A loopback TCP proxy in front of the coordinator's agent listener. It forwards bytes both
/// ways to the address in `upstream` (read at each new connection, so a restarted
/// coordinator on a new port is followed), and can lose work replies: the first `drop_work`
/// replies to `POST /api/agent/v1/work` that carry a build are swallowed and the connection
/// is closed, after the coordinator committed the lease. HTTP/1.1 clients do not pipeline, so
/// the bytes after a request line up to the next request are that request's reply.
pub struct Proxy {
    pub url: String,
    pub upstream: Arc<Mutex<String>>,
    drop_budget: Arc<AtomicUsize>,
    /// Work replies swallowed so far.
    pub dropped: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

/// No proxy thread lives longer than this.
const PROXY_LIFETIME: Duration = Duration::from_secs(900);

impl Proxy {
    pub fn start(upstream: &str, drop_work: usize) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let p = Proxy {
            url,
            upstream: Arc::new(Mutex::new(upstream.trim_start_matches("http://").into())),
            drop_budget: Arc::new(AtomicUsize::new(drop_work)),
            dropped: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (up, budget, dropped, stop) = (
            p.upstream.clone(),
            p.drop_budget.clone(),
            p.dropped.clone(),
            p.stop.clone(),
        );
        std::thread::spawn(move || {
            let born = Instant::now();
            while !stop.load(Ordering::SeqCst) && born.elapsed() < PROXY_LIFETIME {
                match listener.accept() {
                    Ok((client, _)) => {
                        let target = up.lock().unwrap().clone();
                        let (budget, dropped) = (budget.clone(), dropped.clone());
                        std::thread::spawn(move || serve(client, &target, &budget, &dropped));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        p
    }

    /// Point new connections at another coordinator address (`http://host:port`).
    pub fn retarget(&self, url: &str) {
        *self.upstream.lock().unwrap() = url.trim_start_matches("http://").into();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(client: TcpStream, target: &str, budget: &AtomicUsize, dropped: &AtomicUsize) {
    let Ok(server) = TcpStream::connect(target) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let limit = Some(Duration::from_secs(300));
    for s in [&client, &server] {
        let _ = s.set_read_timeout(limit);
        let _ = s.set_nodelay(true);
    }
    let work_pending = Arc::new(AtomicBool::new(false));
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let pending = work_pending.clone();
    let up = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match c_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if buf[..n].starts_with(b"POST /api/agent/v1/work ") {
                pending.store(true, Ordering::SeqCst);
            }
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(Shutdown::Write);
    });
    let (mut s_in, mut c_out) = (server, client);
    let mut buf = vec![0u8; 64 * 1024];
    let mut reply: Vec<u8> = Vec::new();
    loop {
        let n = match s_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !work_pending.load(Ordering::SeqCst) {
            if c_out.write_all(&buf[..n]).is_err() {
                break;
            }
            continue;
        }
        reply.extend_from_slice(&buf[..n]);
        let Some(complete) = complete_reply(&reply) else {
            continue; // wait for the whole reply before deciding
        };
        work_pending.store(false, Ordering::SeqCst);
        let carries_build = complete.windows(10).any(|w| w == b"\"build_id\"");
        if carries_build
            && budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_ok()
        {
            dropped.fetch_add(1, Ordering::SeqCst);
            let _ = c_out.shutdown(Shutdown::Both);
            let _ = s_in.shutdown(Shutdown::Both);
            break;
        }
        if c_out.write_all(&reply).is_err() {
            break;
        }
        reply.clear();
    }
    let _ = c_out.shutdown(Shutdown::Both);
    let _ = up.join();
}

/// The reply's bytes once its head and `Content-Length` body are all there.
fn complete_reply(bytes: &[u8]) -> Option<&[u8]> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(len) => (bytes.len() >= head_end + len).then_some(bytes),
        // Not a reply this proxy can frame: pass it on as it is.
        None => Some(bytes),
    }
}

/// Lines of a builder's run file (one per builder run).
pub fn runs(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A `/bin/sh -c` builder that appends its PID (its process group) to `runs`, waits until
/// `go` exists (at most 600 s), then writes its output. Builders get no `PATH` of their own
/// (as in Nix), hence the one set here for `sleep`.
pub fn waiting_script(runs: &Path, go: &Path) -> String {
    format!(
        "PATH=/usr/bin:/bin; echo $$ >> {runs}; i=0; while [ $i -lt 6000 ] && [ ! -e {go} ]; do sleep 0.1; i=$((i+1)); done; echo built > $out",
        runs = runs.display(),
        go = go.display()
    )
}

/// Derivations with inputs: `chain[i]` needs `chain[i-1]`'s `out`.
pub fn chain(sd: &StoreDir, names: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut known: HashMap<String, Derivation> = HashMap::new();
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for name in names {
        let (_, bytes) = simple_drv(sd, name, "echo > $out");
        let mut drv = Derivation::parse(&bytes).unwrap();
        if let Some((input, _)) = out.last() {
            drv.input_drvs = vec![(input.clone().into_bytes(), vec![b"out".to_vec()])];
            drv.outputs[0].1.path = Vec::new();
            drv.env[2].1 = Vec::new();
            let mut loader = |p: &StorePath| -> anyhow::Result<Derivation> {
                let full = sd.full_path(p);
                known
                    .get(&full)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("unknown input {full}"))
            };
            let mut pc = PathComputer::new(sd.clone(), &mut loader);
            let paths = pc.output_paths(&drv).unwrap();
            let o = sd.full_path(paths[0].1.as_ref().unwrap());
            drv.outputs[0].1.path = o.clone().into_bytes();
            drv.env[2].1 = o.into_bytes();
        }
        let path = sd.full_path(&kiln::derivation::paths::drv_path(sd, &drv).unwrap());
        known.insert(path.clone(), drv.clone());
        out.push((path, drv.print()));
    }
    out
}
