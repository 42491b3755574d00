//! A healthy agent is never declared lost because of its own file work: a real `kiln-agent`
//! with a 2.5 s agent timeout builds an output of 300 MB (spooled: NAR, zstd, two hashes,
//! fsync) whose builder also leaves 80,000 files in its build dir (removed after the builder,
//! a tree removal that takes seconds on a loaded disk). Heartbeats must keep flowing through
//! all of it: the event log holds no `agent-lost` and no `lease-expired`, the build succeeds
//! at attempt 1, and `kiln_agents_lost_total` stays 0.

mod common;

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::transfer::metric;
use common::*;
use kiln::derivation::store_path::StoreDir;

fn agent_bin() -> PathBuf {
    let p = kiln_bin().with_file_name("kiln-agent");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (scripts/test does)",
        p.display()
    );
    p
}

/// The kinds of the events from the start of the durable log up to the first that settles the
/// question: the build ended, or the agent was lost or a lease expired. Bounded by a 300 s
/// deadline (checked at each line) and the stream's 300 s read timeout.
fn event_kinds_until_settled(c: &Coordinator) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let resp = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(300))
        .build()
        .get(&c.url("/api/v1/events?since=0"))
        .call()
        .unwrap();
    let mut kinds = Vec::new();
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line.expect("the event stream stays open until the build ends");
        if let Some(kind) = line.strip_prefix("event: ") {
            kinds.push(kind.to_string());
            let settled = matches!(
                kind,
                "build-succeeded" | "build-failed" | "agent-lost" | "lease-expired"
            );
            if settled {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no end of the build within 300 s; events so far: {kinds:?}"
        );
    }
    kinds
}

#[test]
fn heartbeats_keep_flowing_while_the_agent_spools_and_removes_big_trees() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let c = Coordinator::start(
        tmp.path(),
        &store,
        "[timeouts]\nheartbeat_interval_ms = 500\nagent_timeout_ms = 2500\n",
    );
    let (code, agent) = post(
        &c.url("/api/v1/agents"),
        &serde_json::json!({"name": "a1", "systems": ["x86_64-linux"]}),
    );
    assert_eq!(code, 200, "{agent}");
    let secret = tmp.path().join("a1.secret");
    std::fs::write(&secret, agent["secret"].as_str().unwrap()).unwrap();
    let script = "export PATH=/usr/bin:/bin; mkdir -p $out junk; \
                  head -c 300000000 /dev/urandom > $out/blob; \
                  cd junk && seq 1 80000 | xargs touch";
    let (drv, bytes) = simple_drv(&sd, "big-output", script);
    let (code, r) = post(
        &c.url("/api/v1/builds"),
        &serde_json::json!({"derivations": [{"path": drv, "contents": b64(&bytes)}], "builds": [drv]}),
    );
    assert_eq!(code, 200, "{r}");
    let id = r["builds"][0]["id"].as_u64().unwrap();
    let mut agents = kiln::client::procs::Processes::default();
    let mut cmd = Command::new(agent_bin());
    cmd.arg("--coordinator")
        .arg(&c.agent_url)
        .args(["--name", "a1", "--system", "x86_64-linux"])
        .arg("--secret-file")
        .arg(&secret)
        .arg("--store-dir")
        .arg(&store)
        .arg("--state-dir")
        .arg(tmp.path().join("agent-state"));
    agents
        .spawn("a1", cmd, &tmp.path().join("agent.log"))
        .unwrap();

    let kinds = event_kinds_until_settled(&c);
    let agent_log = std::fs::read_to_string(tmp.path().join("agent.log")).unwrap_or_default();
    assert!(
        !kinds
            .iter()
            .any(|k| k == "agent-lost" || k == "lease-expired"),
        "the agent was declared lost while it worked: events {kinds:?}\nagent log:\n{agent_log}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("build-succeeded"),
        "{kinds:?}\nagent log:\n{agent_log}"
    );
    let (_, d) = get(&c.url(&format!("/api/v1/builds/{id}")));
    assert_eq!(d["summary"]["state"], "succeeded", "{d}");
    assert_eq!(d["attempt"], 1, "never allocated again: {d}");
    assert_eq!(metric(&c, "kiln_agents_lost_total"), 0.0);
    let (_, list) = get(&c.url("/api/v1/agents"));
    assert_eq!(list[0]["status"], "connected", "{list}");
    drop(agents);
}
