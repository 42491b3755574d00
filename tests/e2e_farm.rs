//! The walking skeleton end to end, with real processes on loopback: a real `kiln coordinator`
//! and two real `kiln-agent` processes build a graph of derivations with real `.drv` files and
//! real NARs. Pins down: dependency order (by the builders' own stamps), NarHash equal to
//! `nix-hash` of the built tree, served NARs that restore to the same tree, exactly one hook run
//! per success in a fault-free run, and what a failing builder does to its dependents.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use kiln::client::graph::{self, Graph, GraphOptions};
use kiln::client::procs::Processes;

struct Farm {
    coordinator: Coordinator,
    agents: Processes,
    agent_states: Vec<PathBuf>,
    store: PathBuf,
    graph: Graph,
    stamps: PathBuf,
    hook_file: PathBuf,
    _tmp: tempfile::TempDir,
}

fn agent_bin() -> PathBuf {
    let p = kiln_bin().with_file_name("kiln-agent");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (scripts/test does)",
        p.display()
    );
    p
}

fn farm(fail: &[&str]) -> Farm {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let stamps = tmp.path().join("stamps");
    std::fs::create_dir_all(&stamps).unwrap();
    let hook_file = tmp.path().join("hook-runs");
    let hook = format!(
        "[timeouts]\nheartbeat_interval_ms = 500\nagent_timeout_ms = 10000\n\n\
         [[hooks]]\nname = \"record\"\nevents = [\"build-succeeded\"]\nparallelism = 4\n\
         exec = [\"/bin/sh\", \"-c\", \"echo \\\"$KILN_BUILD_ID\\\" >> {}\"]\n",
        hook_file.display()
    );
    let coordinator = Coordinator::start(tmp.path(), &store, &hook);
    let graph = graph::generate(
        &store,
        &GraphOptions {
            layers: 2,
            width: 3,
            seed: 7,
            sleep_ms: (20, 150),
            stamp_dir: Some(stamps.clone()),
            fail: fail.iter().map(|s| s.to_string()).collect(),
            system: graph::default_system(),
        },
    )
    .unwrap();
    assert!(
        graph.drvs.len() >= 10,
        "the graph has {} derivations",
        graph.drvs.len()
    );
    let two = graph.get("uses-lib-dev").unwrap();
    assert!(
        two.inputs.iter().any(|(_, outs)| outs.len() == 2),
        "one input needs two outputs of one derivation: {:?}",
        two.inputs
    );
    assert!(
        graph.get("diamond-bottom").is_some(),
        "the graph has a diamond"
    );

    let mut agents = Processes::default();
    let mut agent_states = Vec::new();
    for i in 1..=2 {
        let name = format!("agent-{i}");
        let (code, created) = post(
            &coordinator.url("/api/v1/agents"),
            &serde_json::json!({"name": name, "systems": [graph::default_system()]}),
        );
        assert_eq!(code, 200, "{created}");
        let secret = tmp.path().join(format!("{name}.secret"));
        std::fs::write(&secret, created["secret"].as_str().unwrap()).unwrap();
        let state = tmp.path().join(format!("{name}-state"));
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--coordinator")
            .arg(&coordinator.agent_url)
            .args(["--name", &name, "--system", &graph::default_system()])
            .arg("--secret-file")
            .arg(&secret)
            .arg("--store-dir")
            .arg(&store)
            .arg("--state-dir")
            .arg(&state)
            .args(["--executor", "native", "--max-parallel-builds", "2"]);
        agents
            .spawn(&name, cmd, &tmp.path().join(format!("{name}.log")))
            .unwrap();
        agent_states.push(state);
    }
    let out = Command::new(kiln_bin())
        .args(["submit", "--json", "--coordinator", &coordinator.client_url])
        .arg("--store-dir")
        .arg(&store)
        .args(graph.drv_paths())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Farm {
        coordinator,
        agents,
        agent_states,
        store,
        graph,
        stamps,
        hook_file,
        _tmp: tmp,
    }
}

/// drv path -> (id, state), once `done` says the run is over. On timeout, panics with the
/// builds that did not finish and the end of every log, and keeps the temporary directory.
fn wait_builds(
    f: &mut Farm,
    done: impl Fn(&HashMap<String, (u64, String)>) -> bool,
) -> HashMap<String, (u64, String)> {
    let url = f.coordinator.url("/api/v1/builds");
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        if let Some(why) = f.agents.exited() {
            panic!("{why}");
        }
        let (code, list) = get(&url);
        assert_eq!(code, 200);
        let m: HashMap<String, (u64, String)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["drv_path"].as_str().unwrap().to_string(),
                    (
                        b["id"].as_u64().unwrap(),
                        b["state"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect();
        if done(&m) {
            return m;
        }
        if std::time::Instant::now() > deadline {
            let stuck: Vec<_> = m
                .values()
                .filter(|(_, s)| s != "succeeded" && s != "failed")
                .collect();
            let dir = f._tmp.path().to_path_buf();
            let mut logs = String::new();
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "log") {
                    logs += &format!(
                        "\n--- {}:\n{}",
                        p.display(),
                        kiln::client::procs::log_tail(&p, 40)
                    );
                }
            }
            let (_, agents) = get(&f.coordinator.url("/api/v1/agents"));
            let kept = std::mem::replace(&mut f._tmp, tempfile::tempdir().unwrap()).keep();
            panic!("builds did not finish in 240 s; not finished: {stuck:?}; agents: {agents}; kept {}{logs}", kept.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stamps(f: &Farm) -> BTreeMap<String, Vec<(String, u128)>> {
    let text = std::fs::read_to_string(f.stamps.join(graph::STAMP_FILE)).unwrap_or_default();
    let mut m: BTreeMap<String, Vec<(String, u128)>> = BTreeMap::new();
    for line in text.lines() {
        let mut it = line.split(' ');
        let (Some(name), Some(what), Some(ns)) = (it.next(), it.next(), it.next()) else {
            panic!("bad stamp line {line:?}");
        };
        m.entry(name.into())
            .or_default()
            .push((what.into(), ns.parse().unwrap()));
    }
    m
}

/// Where an output was built: the private store view of the agent that built it.
fn built_tree(f: &Farm, path: &str) -> PathBuf {
    let base = Path::new(path).file_name().unwrap();
    for s in &f.agent_states {
        let p = s.join("store").join(base);
        if p.symlink_metadata().is_ok() {
            return p;
        }
    }
    // Agents that are not root share the store dir itself (a lock file keeps them apart).
    let p = f.store.join(base);
    assert!(p.symlink_metadata().is_ok(), "output {path} is on no agent");
    p
}

fn nix_hash(p: &Path) -> String {
    let out = Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(p)
        .output()
        .expect("nix-hash not found: run scripts/test, which installs nix-bin");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn nar_bytes(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    kiln::nar::dump(p, &mut v).unwrap();
    v
}

#[test]
fn two_agents_build_a_graph_in_dependency_order_with_verified_nars_and_one_hook_run_each() {
    let mut f = farm(&[]);
    let n = f.graph.drvs.len();
    let builds = wait_builds(&mut f, |m| {
        m.len() == n && m.values().all(|(_, s)| s == "succeeded" || s == "failed")
    });
    for d in &f.graph.drvs {
        assert_eq!(
            builds[&d.drv_path].1, "succeeded",
            "{} did not succeed: see the agents' logs",
            d.name
        );
    }

    // No builder started before all its inputs finished; each ran exactly once.
    let st = stamps(&f);
    let name_of: HashMap<&str, &str> = f
        .graph
        .drvs
        .iter()
        .map(|d| (d.drv_path.as_str(), d.name.as_str()))
        .collect();
    for d in &f.graph.drvs {
        let runs = &st[&d.name];
        assert_eq!(
            runs.len(),
            2,
            "{} ran more than once in a fault-free run: {runs:?}",
            d.name
        );
        let start = runs.iter().find(|(w, _)| w == "start").unwrap().1;
        for (input, _) in &d.inputs {
            let iname = name_of[input.as_str()];
            let end = st[iname].iter().find(|(w, _)| w == "end").unwrap().1;
            assert!(
                start >= end,
                "{} started before its input {iname} finished",
                d.name
            );
        }
    }

    // NarHash is nix-hash of the built tree, and the served NAR restores to that tree.
    let restored = f._tmp.path().join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    let mut checked = 0;
    for d in &f.graph.drvs {
        for (_, path) in &d.outputs {
            let hash = &Path::new(path).file_name().unwrap().to_str().unwrap()[..32];
            let r = ureq::get(&f.coordinator.agent(&format!("/{hash}.narinfo")))
                .call()
                .unwrap();
            let ni = kiln::nar::narinfo::NarInfo::parse(&r.into_string().unwrap()).unwrap();
            assert_eq!(&ni.store_path, path);
            let tree = built_tree(&f, path);
            assert_eq!(
                ni.nar_hash.to_nix_string(),
                format!("sha256:{}", nix_hash(&tree)),
                "NarHash of {path}"
            );
            let mut compressed = Vec::new();
            ureq::get(&f.coordinator.agent(&format!("/{}", ni.url)))
                .call()
                .unwrap()
                .into_reader()
                .read_to_end(&mut compressed)
                .unwrap();
            let mut dec = zstd::stream::read::Decoder::new(&compressed[..]).unwrap();
            let dest = restored.join(format!("{checked}"));
            kiln::nar::restore(&mut dec, &dest).unwrap();
            assert_eq!(
                nar_bytes(&dest),
                nar_bytes(&tree),
                "the served NAR of {path} restores to another tree"
            );
            checked += 1;
        }
    }
    assert!(
        checked > n,
        "every output checked, including the multi-output one"
    );

    // The hook ran exactly once per success.
    let succeeded: BTreeSet<u64> = builds.values().map(|(id, _)| *id).collect();
    let metrics_url = f.coordinator.agent("/metrics");
    let runs = wait_for("every hook run", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&f.hook_file).unwrap_or_default();
        let lines: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
        let metrics = ureq::get(&metrics_url).call().ok()?.into_string().ok()?;
        let idle = metrics
            .lines()
            .any(|l| l == "kiln_hook_pending{hook=\"record\"} 0");
        (idle && lines.len() >= succeeded.len()).then_some(lines)
    });
    let mut sorted = runs.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        succeeded.iter().copied().collect::<Vec<_>>(),
        "hook runs: {runs:?}"
    );
}

#[test]
fn a_failing_builder_fails_its_build_with_a_log_and_its_dependents_with_it() {
    let mut f = farm(&["diamond-left"]);
    let left = f.graph.get("diamond-left").unwrap().drv_path.clone();
    let blocked: Vec<String> = f
        .graph
        .drvs
        .iter()
        .filter(|d| d.blocked)
        .map(|d| d.drv_path.clone())
        .collect();
    assert!(!blocked.is_empty());
    let others: Vec<String> = f
        .graph
        .drvs
        .iter()
        .filter(|d| !d.blocked && !d.fails)
        .map(|d| d.drv_path.clone())
        .collect();
    let builds = wait_builds(&mut f, |m| {
        m.get(&left).is_some_and(|(_, s)| s == "failed")
            && others
                .iter()
                .all(|p| m.get(p).is_some_and(|(_, s)| s == "succeeded"))
            && blocked
                .iter()
                .all(|p| m.get(p).is_some_and(|(_, s)| s != "blocked"))
    });
    for p in &blocked {
        assert_eq!(
            builds[p].1, "failed",
            "{p} should fail with its failed input, not wait forever"
        );
    }
    let left_id = builds[&left].0;

    // The log is retrievable and holds what the builder printed.
    let out = Command::new(kiln_bin())
        .args([
            "build",
            "log",
            &left_id.to_string(),
            "--coordinator",
            &f.coordinator.client_url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("fails on purpose"), "log: {log}");

    // `kiln build show` of the dependent says which input failed (its reason).
    let bottom = &f.graph.get("diamond-bottom").unwrap().drv_path;
    let bottom_id = builds[bottom].0;
    let out = Command::new(kiln_bin())
        .args([
            "build",
            "show",
            &bottom_id.to_string(),
            "--coordinator",
            &f.coordinator.client_url,
        ])
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        show.contains(&format!("input build {left_id} failed")),
        "kiln build show {bottom_id} should name the failed input build {left_id}:\n{show}"
    );
}
