//! Leases with real `kiln-agent` processes and real builders on loopback. Each builder appends
//! its PID (the leader of its process group) to a run file, so the runs of every build are
//! counted from the builders' own side. The faults are real: a TCP proxy that swallows a work
//! reply after the lease was committed, SIGSTOP/SIGCONT of an agent ("a cut"), and SIGKILL of
//! the coordinator. Pins down:
//! - a lost work reply: the retry gets the same build, the builder runs once;
//! - a cut shorter than the agent timeout: the lease is kept, the builder runs once;
//! - a cut longer than the timeout, nobody else free: re-adopted at the same attempt, the
//!   builder runs once;
//! - a cut longer than the timeout after the build went to another agent: the old builder's
//!   process group is killed, and a late report of the old attempt gets 409;
//! - the coordinator SIGKILLed during builds (twice): every result lands, no builder ran twice.

mod common;
mod leases_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kiln::derivation::store_path::StoreDir;
use leases_common::*;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(120);

struct Farm {
    c: Coordinator,
    sd: StoreDir,
    store: PathBuf,
    tmp: tempfile::TempDir,
}

impl Farm {
    fn new(timeouts: &str) -> Farm {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let sd = StoreDir::new(&store).unwrap();
        let c = Coordinator::start(tmp.path(), &store, &format!("[timeouts]\n{timeouts}\n"));
        Farm { c, sd, store, tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Start a real agent talking to `url` (the coordinator, or a proxy in front of it).
    fn agent(&self, name: &str, url: &str) -> AgentProc {
        let secret = register(&self.c, name);
        AgentProc::start(self.tmp.path(), url, &self.store, name, &secret)
    }

    /// Submit one build whose builder records its run in `<name>.runs` and waits for `go`.
    fn waiting_build(&self, name: &str, go: &Path) -> (u64, PathBuf) {
        let runs = self.path(&format!("{name}.runs"));
        let drv = simple_drv(&self.sd, name, &waiting_script(&runs, go));
        (submit(&self.c, &[drv])[0], runs)
    }

    fn wait_state(&self, id: u64, state: &str, agents: &mut [&mut AgentProc]) {
        wait_for(&format!("build {id} to be {state}"), DEADLINE, || {
            for a in agents.iter_mut() {
                a.assert_running();
            }
            (state_of(&self.c, id) == state).then_some(())
        });
    }

    fn agent_status(&self, name: &str) -> (String, Option<u64>) {
        let (_, agents) = get(&self.c.url("/api/v1/agents"));
        let a = agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
            .unwrap();
        (
            a["status"].as_str().unwrap().to_string(),
            a["last_seen_ms_ago"].as_u64(),
        )
    }
}

/// The builder's PID from the first line of its run file (once it started).
fn first_pid(runs: &Path) -> i32 {
    wait_for("the builder to start", DEADLINE, || {
        runs_of(runs).first().and_then(|l| l.trim().parse().ok())
    })
}

fn runs_of(file: &Path) -> Vec<String> {
    runs(file)
}

#[test]
fn a_lost_work_reply_is_answered_again_and_the_builder_runs_once() {
    let f = Farm::new("heartbeat_interval_ms = 500\nagent_timeout_ms = 20000");
    let proxy = Proxy::start(&f.c.agent_url, 1);
    let mut agent = f.agent("a1", &proxy.url);
    let runs = f.path("lost.runs");
    let drv = simple_drv(
        &f.sd,
        "lost",
        &format!("echo $$ >> {}; echo > $out", runs.display()),
    );
    let id = submit(&f.c, &[drv])[0];
    f.wait_state(id, "succeeded", &mut [&mut agent]);
    assert_eq!(
        proxy.dropped.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the proxy swallowed the work reply that carried the lease"
    );
    assert_eq!(runs_of(&runs).len(), 1, "the builder ran once");
    let b = build(&f.c, id);
    assert_eq!(b["attempt"], 1, "the retry got the same attempt");
    let ev = events(&f.c);
    assert_eq!(events_of(&ev, "build-allocated", id).len(), 1);
    assert!(events_of(&ev, "lease-expired", id).is_empty(), "{ev:?}");
}

#[test]
fn a_cut_shorter_than_the_agent_timeout_keeps_the_lease() {
    let f = Farm::new("heartbeat_interval_ms = 200\nagent_timeout_ms = 15000");
    let mut agent = f.agent("a1", &f.c.agent_url.clone());
    let go = f.path("go");
    let (id, runs) = f.waiting_build("short-cut", &go);
    let pid = first_pid(&runs);
    f.wait_state(id, "building", &mut [&mut agent]);
    agent.signal(libc::SIGSTOP);
    // The cut: until the coordinator has not heard from the agent for 3 s (under 15 s).
    wait_for("a 3 s silence", DEADLINE, || {
        let (status, ago) = f.agent_status("a1");
        assert_eq!(status, "connected", "declared lost during a short cut");
        ago.filter(|ms| *ms >= 3000)
    });
    agent.signal(libc::SIGCONT);
    assert!(group_alive(pid), "the builder waits for the go file");
    assert_eq!(state_of(&f.c, id), "building");
    std::fs::write(&go, b"").unwrap();
    f.wait_state(id, "succeeded", &mut [&mut agent]);
    assert_eq!(runs_of(&runs).len(), 1, "the builder ran once");
    assert_eq!(build(&f.c, id)["attempt"], 1);
    let ev = events(&f.c);
    assert!(events_of(&ev, "lease-expired", id).is_empty(), "{ev:?}");
    assert!(!ev.iter().any(|e| e["kind"] == "agent-lost"), "{ev:?}");
}

#[test]
fn a_cut_longer_than_the_timeout_with_nobody_else_free_readopts_the_build() {
    let f = Farm::new("heartbeat_interval_ms = 200\nagent_timeout_ms = 2000");
    let mut agent = f.agent("a1", &f.c.agent_url.clone());
    let go = f.path("go");
    let (id, runs) = f.waiting_build("long-cut", &go);
    let pid = first_pid(&runs);
    f.wait_state(id, "building", &mut [&mut agent]);
    agent.signal(libc::SIGSTOP);
    wait_for("the agent to be declared lost", DEADLINE, || {
        (state_of(&f.c, id) == "runnable").then_some(())
    });
    assert_eq!(f.agent_status("a1").0, "lost");
    assert!(
        group_alive(pid),
        "the builder runs on while its agent is stopped"
    );
    agent.signal(libc::SIGCONT);
    f.wait_state(id, "building", &mut [&mut agent]);
    let ev = events(&f.c);
    assert_eq!(events_of(&ev, "lease-readopted", id).len(), 1, "{ev:?}");
    std::fs::write(&go, b"").unwrap();
    f.wait_state(id, "succeeded", &mut [&mut agent]);
    assert_eq!(runs_of(&runs).len(), 1, "the builder ran once");
    let b = build(&f.c, id);
    assert_eq!(b["attempt"], 1, "re-adopted at the same attempt");
    assert_eq!(b["agent"], "a1");
    assert_eq!(events_of(&events(&f.c), "build-allocated", id).len(), 1);
}

#[test]
fn a_cut_longer_after_the_build_went_elsewhere_kills_the_old_builder_and_refuses_its_report() {
    let f = Farm::new("heartbeat_interval_ms = 200\nagent_timeout_ms = 2000");
    let mut a = f.agent("a1", &f.c.agent_url.clone());
    let go = f.path("go");
    let (id, runs) = f.waiting_build("moved", &go);
    let old_pid = first_pid(&runs);
    f.wait_state(id, "building", &mut [&mut a]);
    let mut b = f.agent("b1", &f.c.agent_url.clone());
    a.signal(libc::SIGSTOP);
    // a1 is lost; b1 takes the build at attempt 2 and its builder starts.
    wait_for("the build to move to b1", DEADLINE, || {
        b.assert_running();
        let d = build(&f.c, id);
        (d["attempt"] == 2 && d["summary"]["state"] == "building" && runs_of(&runs).len() == 2)
            .then_some(())
    });
    assert!(
        group_alive(old_pid),
        "a1's builder still runs while a1 is stopped"
    );
    a.signal(libc::SIGCONT);
    // a1's next heartbeat lists attempt 1: abandon; a1 kills the builder's process group.
    wait_for("a1 to kill its builder's process group", DEADLINE, || {
        a.assert_running();
        (!group_alive(old_pid)).then_some(())
    });
    std::fs::write(&go, b"").unwrap();
    f.wait_state(id, "succeeded", &mut [&mut a, &mut b]);
    assert_eq!(runs_of(&runs).len(), 2, "one builder per attempt");
    let d = build(&f.c, id);
    assert_eq!(
        (d["attempt"].as_u64(), d["agent"].as_str()),
        (Some(2), Some("b1"))
    );

    // A late report of a1's attempt is refused and changes nothing.
    a.kill9();
    let secret = std::fs::read_to_string(f.path("a1.secret")).unwrap();
    let (late, _) = RawAgent::open(&f.c, "a1", &secret, json!([]));
    let (code, r) = late.result(id, 1, json!({"result": "failed", "reason": "late"}));
    assert_eq!(
        (code, r["error"]["code"].as_str()),
        (409, Some("stale_attempt")),
        "{r}"
    );
    let after = build(&f.c, id);
    assert_eq!(after["summary"]["state"], "succeeded");
    assert_eq!(after["attempt"], 2);
    assert!(
        a.log_text().contains("Abandon"),
        "a1 was told to abandon: {}",
        a.log_text()
    );
}

#[test]
fn a_coordinator_killed_during_builds_loses_no_result_and_runs_no_builder_twice() {
    // A long agent timeout: agents back after a restart on a slow machine keep their leases.
    let mut f = Farm::new("heartbeat_interval_ms = 500\nagent_timeout_ms = 30000");
    // Agents reach the coordinator through a proxy that follows it to its new port.
    let proxy = Proxy::start(&f.c.agent_url, 0);
    let mut agents = [f.agent("a1", &proxy.url), f.agent("a2", &proxy.url)];
    let go = f.path("go");
    let builds: Vec<(u64, PathBuf)> = (0..4)
        .map(|i| f.waiting_build(&format!("crash-{i}"), &go))
        .collect();
    wait_for("every builder to start", DEADLINE, || {
        for a in agents.iter_mut() {
            a.assert_running();
        }
        builds
            .iter()
            .all(|(_, r)| runs_of(r).len() == 1)
            .then_some(())
    });
    let pids: Vec<i32> = builds.iter().map(|(_, r)| first_pid(r)).collect();
    assert!(
        pids.iter().all(|p| group_alive(*p)),
        "every builder waits for the go file"
    );
    f.c.kill9();
    f.c.spawn();
    proxy.retarget(&f.c.agent_url);
    std::fs::write(&go, b"").unwrap();
    // Kill it again once a result landed and others are on their way.
    wait_for("a first result after the restart", DEADLINE, || {
        for a in agents.iter_mut() {
            a.assert_running();
        }
        builds
            .iter()
            .any(|(id, _)| state_of(&f.c, *id) == "succeeded")
            .then_some(())
    });
    f.c.kill9();
    f.c.spawn();
    proxy.retarget(&f.c.agent_url);
    for (id, _) in &builds {
        let [a1, a2] = &mut agents;
        f.wait_state(*id, "succeeded", &mut [a1, a2]);
    }
    for (id, runs) in &builds {
        assert_eq!(runs_of(runs).len(), 1, "build {id}: its builder ran once");
        assert_eq!(build(&f.c, *id)["attempt"], 1, "build {id} kept its lease");
    }
    let ev = events(&f.c);
    for (id, _) in &builds {
        assert_eq!(
            events_of(&ev, "build-succeeded", *id).len(),
            1,
            "accepted once"
        );
    }
}
