//! Enrolling agents, end to end with real processes over real HTTP:
//! - a registration token made with `kiln agent registration-token new` lets a real
//!   `kiln-agent --registration-token-file` register itself at its first session (it writes a
//!   secret of its own first, mode 0600), build, restart and come back with that secret;
//!   `kiln agent rotate-secret` ends its session and its old secret stops working (the agent
//!   stops, saying why); a revoked token registers nobody; a token limited to some systems
//!   refuses an agent claiming another;
//! - an agent record from a state dir written before Argon2id (v1: salted SHA-256) still
//!   authenticates, and is rehashed with Argon2id at that first session;
//! - `kiln key generate` writes Nix's key files, which the coordinator signs with and Nix
//!   reads back.

mod common;
mod leases_common;
#[path = "nar_common.rs"]
mod nar_common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use kiln::derivation::store_path::StoreDir;
use leases_common::{agent_bin, state_of, submit};
use serde_json::{json, Value};

fn kiln(c: &Coordinator, args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .args(args)
        .arg("--coordinator")
        .arg(&c.client_url)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A real agent started with a registration token (and no secret file of its own).
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, c: &Coordinator, name: &str, token: &Path, system: &str) -> Agent {
        let state = dir.join(format!("{name}-state"));
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(agent_bin())
            .arg("--coordinator")
            .arg(&c.agent_url)
            .args(["--name", name, "--system", system])
            .arg("--registration-token-file")
            .arg(token)
            .arg("--store-dir")
            .arg(dir.join("store"))
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start kiln-agent");
        Agent { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (bounded) for the agent to exit; returns whether it failed, and its log.
    fn wait_exit(&mut self) -> (bool, String) {
        let status = wait_for("the agent to exit", Duration::from_secs(120), || {
            self.child.try_wait().ok().flatten()
        });
        (!status.success(), self.log_text())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_succeeded(c: &Coordinator, id: u64) {
    wait_for(
        &format!("build {id} to succeed"),
        Duration::from_secs(120),
        || (state_of(c, id) == "succeeded").then_some(()),
    );
}

#[test]
fn agents_register_with_a_token_rotate_and_are_refused_after() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(tmp.path(), &store, "");

    // A token for x86_64-linux agents offering at most big-memory=yes.
    let token_file = tmp.path().join("farm.token");
    let out = ok(kiln(
        &c,
        &[
            "agent",
            "registration-token",
            "new",
            "--system",
            "x86_64-linux",
            "--tag",
            "big-memory=yes",
            "--save-to",
            token_file.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("written to"), "{out}");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let listed: Value = serde_json::from_str(&ok(kiln(
        &c,
        &["agent", "registration-token", "list", "--json"],
    )))
    .unwrap();
    assert_eq!(listed[0]["systems"], json!(["x86_64-linux"]), "{listed}");
    assert_eq!(
        listed[0]["tags"],
        json!([["big-memory", "yes"]]),
        "{listed}"
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        !listed.to_string().contains(&token),
        "a listing never shows a token"
    );
    let token_id = listed[0]["id"].as_str().unwrap().to_string();

    // A real agent registers itself and builds.
    let mut agent = Agent::start(tmp.path(), &c, "reg-1", &token_file, "x86_64-linux");
    let id = submit(&c, &[simple_drv(&sd, "one", "echo 1 > $out")])[0];
    wait_succeeded(&c, id);
    let secret_file = tmp.path().join("reg-1-state/secret");
    let mode = std::fs::metadata(&secret_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the agent's own secret is private");
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert_eq!(secret.len(), 64);
    let agents: Value = serde_json::from_str(&ok(kiln(&c, &["agents", "--json"]))).unwrap();
    assert_eq!(agents[0]["name"], "reg-1", "{agents}");
    assert_eq!(agents[0]["systems"], json!(["x86_64-linux"]), "{agents}");

    // Restarted, it comes back with its secret (no second registration) and builds again.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let mut agent = Agent::start(tmp.path(), &c, "reg-1", &token_file, "x86_64-linux");
    let id = submit(&c, &[simple_drv(&sd, "two", "echo 2 > $out")])[0];
    wait_succeeded(&c, id);
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
    let agents: Value = serde_json::from_str(&ok(kiln(&c, &["agents", "--json"]))).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");

    // Rotation: its session ends, the old secret is refused, the agent stops and says why.
    let new_secret_file = tmp.path().join("reg-1.new-secret");
    let out = ok(kiln(
        &c,
        &[
            "agent",
            "rotate-secret",
            "reg-1",
            "--secret-file",
            new_secret_file.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("old secret no longer works"), "{out}");
    // The agent notices at its next request (a work poll or a heartbeat).
    let (failed, log) = agent.wait_exit();
    assert!(failed, "the agent exits with an error: {log}");
    assert!(log.contains("unauthorized"), "{log}");
    let refused = post(
        &c.agent("/api/agent/v1/session"),
        &json!({"name": "reg-1", "secret": secret, "protocol_version": 1, "systems": [],
                "max_parallel_builds": 1}),
    );
    assert_eq!(refused.0, 401, "{}", refused.1);
    let new_secret = std::fs::read_to_string(&new_secret_file).unwrap();
    let opened = post(
        &c.agent("/api/agent/v1/session"),
        &json!({"name": "reg-1", "secret": new_secret, "protocol_version": 1, "systems": [],
                "max_parallel_builds": 1}),
    );
    assert_eq!(opened.0, 200, "{}", opened.1);

    // A token limited to x86_64-linux does not register an aarch64-linux agent.
    let mut arm = Agent::start(tmp.path(), &c, "arm-1", &token_file, "aarch64-linux");
    let (failed, log) = arm.wait_exit();
    assert!(failed && log.contains("system_not_allowed"), "{log}");

    // Revoked, the token registers nobody (the agents it registered keep their secrets).
    let out = ok(kiln(
        &c,
        &["agent", "registration-token", "revoke", &token_id],
    ));
    assert!(out.contains("revoked"), "{out}");
    let mut late = Agent::start(tmp.path(), &c, "reg-2", &token_file, "x86_64-linux");
    let (failed, log) = late.wait_exit();
    assert!(failed && log.contains("unauthorized"), "{log}");
    let agents: Value = serde_json::from_str(&ok(kiln(&c, &["agents", "--json"]))).unwrap();
    let names: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reg-1"]);
}

/// Write a v1 agent record (salted SHA-256) the way a kiln before Argon2id did.
fn write_v1_agent(state_dir: &Path, name: &str, secret: &str) {
    use kiln::store::committer::CommitterOptions;
    use kiln::store::keys::u64_key;
    use kiln::store::{meta, Batch, Committer, Store, StoreOptions, TreeId};
    use sha2::Digest as _;
    let store = Store::open(state_dir, &StoreOptions::default()).unwrap();
    let committer =
        Committer::start(store.clone(), CommitterOptions::default(), Box::new(|_| {})).unwrap();
    let salt = vec![5u8; 16];
    let mut h = sha2::Sha256::new();
    h.update(&salt);
    h.update(secret.as_bytes());
    let rec = kiln::store::records::v1::AgentRecordV1 {
        id: 1,
        name: name.into(),
        salt,
        secret_hash: h.finalize().to_vec(),
        systems: vec!["x86_64-linux".into()],
        created_ms: 1,
    };
    let mut bytes = vec![1u8];
    bytes.extend(bincode::serialize(&rec).unwrap());
    let mut b = Batch::new();
    b.put_raw(TreeId::Agents, &u64_key(1), &bytes);
    b.put_raw(TreeId::AgentNames, name.as_bytes(), &u64_key(1));
    b.put_raw(TreeId::Meta, meta::NEXT_AGENT_ID, &u64_key(2));
    committer.commit_blocking(b).unwrap();
    committer.shutdown_blocking();
}

fn open(c: &Coordinator, name: &str, secret: &str) -> (u16, Value) {
    post(
        &c.agent("/api/agent/v1/session"),
        &json!({"name": name, "secret": secret, "protocol_version": 1, "systems": [],
                "max_parallel_builds": 1}),
    )
}

#[test]
fn a_v1_salted_sha256_secret_still_works_and_is_rehashed_with_argon2id() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let secret = "an-old-secret-from-before-argon2";
    write_v1_agent(&tmp.path().join("state"), "old", secret);
    let dump = state_dump(&tmp.path().join("state"));
    assert!(dump.contains("\"secret\":\"salted-sha256\""), "{dump}");

    let mut c = Coordinator::start(tmp.path(), &store, "");
    assert_eq!(open(&c, "old", "wrong").0, 401);
    let (code, opened) = open(&c, "old", secret);
    assert_eq!(code, 200, "{opened}");
    c.stop();
    let dump = state_dump(&c.state_dir);
    let line = dump
        .lines()
        .find(|l| l.starts_with("agents "))
        .expect("the agent record");
    assert!(
        line.contains("\"secret\":\"argon2id(m=19456,t=2,p=1)\""),
        "{line}"
    );
    assert!(
        !line.contains("\"secret_set_ms\":1,"),
        "the rehash is dated: {line}"
    );

    // The rehashed record authenticates the same secret, and only it.
    c.spawn();
    assert_eq!(open(&c, "old", secret).0, 200);
    assert_eq!(open(&c, "old", "an-old-secret-from-before-argon3").0, 401);
}

#[test]
fn generated_keys_are_nix_key_files_and_stay_private() {
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk, gk) = (
        tmp.path().join("k.secret"),
        tmp.path().join("k.public"),
        tmp.path().join("k.guix.pub"),
    );
    let out = Command::new(kiln_bin())
        .args(["key", "generate", "cache.test-1"])
        .args([&sk, &pk])
        .arg("--guix-public-file")
        .arg(&gk)
        .output()
        .unwrap();
    let printed = ok(out);
    let secret = std::fs::read_to_string(&sk).unwrap();
    let public = std::fs::read_to_string(&pk).unwrap();
    assert!(secret.starts_with("cache.test-1:") && public.starts_with("cache.test-1:"));
    assert!(printed.contains(&public), "{printed}");
    assert!(
        !printed.contains(&secret),
        "the secret key is never printed"
    );
    assert_eq!(
        std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Nix's own tool derives the same public key from Kiln's secret key file.
    let nix_public = nar_common::nix("nix")
        .args(["key", "convert-secret-to-public"])
        .stdin(std::fs::File::open(&sk).unwrap())
        .output()
        .unwrap();
    assert_eq!(ok(nix_public).trim(), public);
    // The Guix form names the same 32 bytes.
    let guix = std::fs::read_to_string(&gk).unwrap();
    let printed = ok(Command::new(kiln_bin())
        .args(["key", "public", "--guix"])
        .arg(&sk)
        .output()
        .unwrap());
    assert_eq!(printed, guix);
    assert!(guix.starts_with("(public-key \n (ecc \n  (curve Ed25519)\n  (q #"));
    // An existing secret key file is not replaced by accident.
    let again = Command::new(kiln_bin())
        .args(["key", "generate", "cache.test-2"])
        .args([&sk, &pk])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&sk).unwrap(), secret);
}
