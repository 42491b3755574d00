//! `kiln demo --agent PROGRAM`, end to end with real processes on loopback: the path
//! `scripts/cross` takes to run ARM builds of the agent under qemu-user. Pins down that each
//! `--agent` starts exactly one agent, in order (`demo-agent-1`, `demo-agent-2`, ...), with the
//! demo's agent arguments, that `kiln-agent` next to `kiln` is then not used, and that the demo
//! still builds the whole graph and prints its usual summary.
#![cfg(feature = "coordinator")]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use kiln::client::graph::{self, GraphOptions};

fn agent_bin() -> PathBuf {
    let p = kiln_bin().with_file_name("kiln-agent");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (scripts/test does)",
        p.display()
    );
    p
}

/// A script that records its arguments in `<dir>/<tag>.<pid>.args`, then execs the real agent
/// (as the qemu wrappers of scripts/cross exec the emulator).
fn wrapper(dir: &Path, tag: &str) -> PathBuf {
    let path = dir.join(format!("agent-{tag}"));
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{dir}/{tag}.'$$'.args'\nexec '{agent}' \"$@\"\n",
        dir = dir.display(),
        agent = agent_bin().display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The argument lists recorded by wrapper `tag`, one per start.
fn starts(dir: &Path, tag: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with(&format!("{tag}.")) && name.ends_with(".args") {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            out.push(text.lines().map(str::to_owned).collect());
        }
    }
    out
}

fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

#[test]
fn each_agent_option_starts_one_agent_and_the_graph_is_built() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (wrapper(tmp.path(), "a"), wrapper(tmp.path(), "b"));
    // The size of the graph the demo generates (its default seed and shape).
    let want = graph::generate(&tmp.path().join("store"), &GraphOptions::default())
        .unwrap()
        .drvs
        .len();

    let out = Command::new(kiln_bin())
        .args(["demo", "--json", "--keep", "--timeout", "240", "--agent"])
        .arg(&a)
        .arg("--agent")
        .arg(&b)
        .env_remove("KILN_BIN_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln demo failed: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stderr}"));
    assert_eq!(summary["built"], want, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");

    // Each wrapper started exactly once, in the order given, with the demo's agent arguments.
    let (sa, sb) = (starts(tmp.path(), "a"), starts(tmp.path(), "b"));
    assert_eq!((sa.len(), sb.len()), (1, 1), "starts: a {sa:?}, b {sb:?}");
    assert_eq!(value_of(&sa[0], "--name"), Some("demo-agent-1"), "{sa:?}");
    assert_eq!(value_of(&sb[0], "--name"), Some("demo-agent-2"), "{sb:?}");
    for args in [&sa[0], &sb[0]] {
        assert_eq!(value_of(args, "--executor"), Some("native"), "{args:?}");
        assert!(
            value_of(args, "--coordinator").is_some_and(|u| u.starts_with("https://127.0.0.1:")),
            "{args:?}"
        );
        // TLS on: each agent trusts the demo's own CA.
        assert!(
            value_of(args, "--ca-file").is_some_and(|f| f.ends_with("pki/ca.pem")),
            "{args:?}"
        );
        assert_eq!(
            value_of(args, "--system"),
            Some(graph::default_system().as_str())
        );
    }
    // The demo's directory holds the logs of exactly these two agents: nothing else was started.
    let kept = stderr
        .lines()
        .find_map(|l| l.strip_prefix("kiln demo: kept "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("--keep did not name the directory: {stderr}"));
    // Authentication on: the coordinator had a token from its start.
    let log = std::fs::read_to_string(kept.join("coordinator.log")).unwrap();
    assert!(log.contains("client API requires a token"), "{log}");
    let mut logs: Vec<String> = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log") && n != "coordinator.log")
        .collect();
    logs.sort();
    assert_eq!(logs, ["demo-agent-1.log", "demo-agent-2.log"]);
    // The store dirs are read-only: open them up before removing the directory.
    let chmod = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(&kept)
        .status();
    assert!(chmod.unwrap().success());
    std::fs::remove_dir_all(&kept).unwrap();
}
