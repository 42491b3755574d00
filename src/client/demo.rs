//! `kiln demo`: a demo farm in one command.
//!
//! Starts a real `kiln coordinator` on a temporary state dir and two real `kiln-agent`
//! processes (found next to this executable, or in `KILN_BIN_DIR`; or one agent per
//! `--agent PROGRAM`, e.g. a wrapper that runs an ARM build of the agent under qemu-user,
//! which is how scripts/cross proves the boards' agents), generates the default
//! derivation graph ([`super::graph`]) in a temporary store dir, submits it with the same code
//! as `kiln submit`, shows progress on stderr, and ends with `N built, M failed in S s` (or one
//! JSON object). TLS and client authentication are on: the demo makes its own CA, server
//! certificate and admin token in the temporary directory. Every child is SIGKILLed when the demo ends, however it ends
//! ([`super::procs`]); the temporary directory is removed unless `--keep` is given or
//! something went wrong (then its logs are kept and named).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::cli::{create_agent, list_builds, write_secret};
use super::graph::{self, Graph, GraphOptions};
use super::http::Client;
use super::procs::{Processes, TempDir};
use super::submit::{self, SubmitOptions};
use crate::derivation::StorePath;
use crate::protocol::{BuildId, BuildState, BuildSummary};

/// How long the coordinator may take to write its ready file.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How often progress is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How many agents the demo starts when no `--agent` is given.
const DEFAULT_AGENTS: usize = 2;

/// Options of `kiln demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Keep the temporary directory (state, store, logs) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Make this derivation of the demo graph fail, e.g. `diamond-left` (repeatable).
    #[arg(long = "fail", value_name = "NAME")]
    pub fail: Vec<String>,
    /// Seed of the demo graph's shape and builder sleeps.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub timeout: u64,
    /// Start one agent with this program instead of the kiln-agent found next to kiln, e.g. a
    /// wrapper that runs an agent built for another CPU under qemu-user (repeatable: one agent
    /// per --agent; without it, two agents of the kiln-agent found).
    #[arg(long = "agent", value_name = "PROGRAM")]
    pub agents: Vec<PathBuf>,
}

/// What `kiln demo --json` prints.
#[derive(Debug, serde::Serialize)]
pub struct DemoSummary {
    pub built: usize,
    pub failed: usize,
    pub seconds: f64,
    pub coordinator: String,
}

/// The two listen addresses the coordinator writes to its ready file.
#[derive(Debug, serde::Deserialize)]
struct Ready {
    listen: String,
    client_listen: String,
}

/// Run the demo; returns the exit code (0 when no build failed).
pub fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let mut dir = TempDir::new("kiln-demo")?;
    if args.keep {
        dir.keep();
    }
    let mut procs = Processes::default();
    let result = run_in(&args, dir.path(), &mut procs);
    // Children first: the directory cannot be removed while they write to it.
    procs.kill_all();
    match result {
        Ok(code) => {
            if dir.is_kept() {
                eprintln!("kiln demo: kept {}", dir.path().display());
            }
            Ok(code)
        }
        Err(e) => {
            dir.keep();
            Err(e.context(format!(
                "kiln demo failed; its state, store and logs are kept in {}",
                dir.path().display()
            )))
        }
    }
}

fn run_in(args: &DemoArgs, dir: &Path, procs: &mut Processes) -> anyhow::Result<i32> {
    let bins = find_binaries(std::env::var_os("KILN_BIN_DIR"), !args.agents.is_empty())?;
    let agents = agent_programs(&args.agents, bins.agent.as_deref())?;
    let store = dir.join("store");
    let state = dir.join("state");
    std::fs::create_dir_all(&store)
        .with_context(|| format!("failed to create {}", store.display()))?;
    // TLS and authentication on, as in production: a CA and server certificate of its own,
    // and an admin token made offline before the coordinator starts.
    let pki = dir.join("pki");
    let certs = crate::http::tls::init(&pki, &["localhost".into(), "127.0.0.1".into()])?;
    let token = super::cli::create_token_offline(&state, "demo", crate::protocol::Scope::Admin)?;
    write_secret(&dir.join("admin.token"), &token.token)?;
    let config = dir.join("coordinator.toml");
    write_config(&config, &state, &store, &certs)?;

    let ready_file = dir.join("ready.json");
    let mut cmd = Command::new(&bins.kiln);
    cmd.arg("coordinator")
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--client-listen",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready_file);
    procs.spawn("the coordinator", cmd, &dir.join("coordinator.log"))?;
    let ready = wait_for_ready(&ready_file, procs)?;
    let coordinator = format!("https://{}", ready.client_listen);
    let client = Client::with_ca(&coordinator, Some(token.token), Some(&certs.ca))?;
    status(&format!(
        "coordinator at {coordinator} (agents: https://{}; TLS with the CA {}, admin token in {})",
        ready.listen,
        certs.ca.display(),
        dir.join("admin.token").display()
    ));

    let system = graph::default_system();
    for (i, program) in agents.iter().enumerate() {
        let name = format!("demo-agent-{}", i + 1);
        let name = name.as_str();
        let created = create_agent(&client, name, std::slice::from_ref(&system))?;
        let secret = dir.join(format!("{name}.secret"));
        write_secret(&secret, &created.secret)?;
        let agent_state = dir.join(format!("agent-{}", i + 1));
        std::fs::create_dir_all(&agent_state)
            .with_context(|| format!("failed to create {}", agent_state.display()))?;
        let mut cmd = Command::new(program);
        cmd.arg("--coordinator")
            .arg(format!("https://{}", ready.listen))
            .arg("--ca-file")
            .arg(&certs.ca)
            .args(["--name", name, "--secret-file"])
            .arg(&secret)
            .args(["--system", &system, "--store-dir"])
            .arg(&store)
            .arg("--state-dir")
            .arg(&agent_state)
            .args(["--executor", "native", "--max-parallel-builds", "2"]);
        procs.spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    }

    let opts = GraphOptions {
        seed: args.seed,
        stamp_dir: Some(dir.join("stamps")),
        fail: args.fail.iter().cloned().collect(),
        system,
        ..GraphOptions::default()
    };
    let graph = graph::generate(&store, &opts)?;
    let unknown: Vec<&String> = args
        .fail
        .iter()
        .filter(|n| graph.get(n).is_none())
        .collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "--fail names {unknown:?}, which are not in the demo graph: pick from {}",
        graph
            .drvs
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    status(&format!(
        "submitting {} derivations from {}",
        graph.drvs.len(),
        store.display()
    ));

    let started = Instant::now();
    let targets = graph
        .drv_paths()
        .iter()
        .map(|p| graph.store_dir.parse_path(p.as_bytes()))
        .collect::<Result<Vec<StorePath>, _>>()
        .context("the generated graph has a path outside its store")?;
    let submitted = submit::submit(
        &client,
        &graph.store_dir,
        &targets,
        &SubmitOptions::default(),
    )?;
    let deadline = started + Duration::from_secs(args.timeout);
    let counts = watch(&client, &graph, &submitted.builds, procs, deadline, args)?;
    let seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;

    let summary = DemoSummary {
        built: counts.built,
        failed: counts.failed,
        seconds,
        coordinator,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&summary).context("failed to encode the summary")?
        );
    } else {
        if counts.blocked > 0 {
            eprintln!(
                "kiln demo: {} builds stay blocked behind failed inputs (see `kiln build show ID`)",
                counts.blocked
            );
        }
        println!(
            "{} built, {} failed in {:.1} s",
            summary.built, summary.failed, summary.seconds
        );
    }
    Ok(if counts.failed == 0 && counts.canceled == 0 {
        0
    } else {
        1
    })
}

/// A progress line on stderr, in both modes: `--json` only changes what goes to stdout.
fn status(line: &str) {
    eprintln!("kiln demo: {line}");
}

/// Paths of the `kiln` and `kiln-agent` executables (`kiln-chaos` finds them the same way).
pub struct Binaries {
    pub kiln: PathBuf,
    /// None when every agent comes from `--agent`.
    pub agent: Option<PathBuf>,
}

/// `kiln` and `kiln-agent` next to this executable, or in `bin_dir` (`KILN_BIN_DIR`);
/// `kiln-agent` is not looked for when `agents_given` (every agent comes from `--agent`).
pub fn find_binaries(
    bin_dir: Option<std::ffi::OsString>,
    agents_given: bool,
) -> anyhow::Result<Binaries> {
    let (dir, from) = match bin_dir.filter(|d| !d.is_empty()) {
        Some(d) => (PathBuf::from(d), "KILN_BIN_DIR"),
        None => {
            let exe = std::env::current_exe().context("failed to find this executable's path")?;
            let dir = exe
                .parent()
                .map(Path::to_path_buf)
                .with_context(|| format!("executable {} has no parent directory", exe.display()))?;
            (dir, "the directory of this kiln")
        }
    };
    let find = |name: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        anyhow::ensure!(
            p.is_file(),
            "{name} not found in {} ({from}): build it with `cargo build --workspace`, or set KILN_BIN_DIR to the directory that holds kiln and kiln-agent",
            dir.display()
        );
        Ok(p)
    };
    Ok(Binaries {
        kiln: find("kiln")?,
        agent: if agents_given {
            None
        } else {
            Some(find("kiln-agent")?)
        },
    })
}

/// The program of each demo agent: every `--agent` as given (each must be an executable
/// file), or [`DEFAULT_AGENTS`] times the kiln-agent found.
fn agent_programs(given: &[PathBuf], found: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt as _;
    if given.is_empty() {
        let found = found.context("no --agent given and no kiln-agent found")?;
        return Ok(vec![found.to_path_buf(); DEFAULT_AGENTS]);
    }
    for p in given {
        let meta = std::fs::metadata(p).with_context(|| {
            format!(
                "--agent {}: cannot read it; give the path of a kiln-agent (or of a script that execs one)",
                p.display()
            )
        })?;
        anyhow::ensure!(
            meta.is_file() && meta.permissions().mode() & 0o111 != 0,
            "--agent {} is not an executable file: give the path of a kiln-agent (or of a script that execs one), and `chmod +x` it",
            p.display()
        );
    }
    Ok(given.to_vec())
}

fn toml_str(s: &Path) -> anyhow::Result<String> {
    let s = s.to_str().with_context(|| {
        format!(
            "path {} is not UTF-8 and cannot go into the TOML config",
            s.display()
        )
    })?;
    Ok(toml::Value::String(s.to_string()).to_string())
}

fn write_config(
    file: &Path,
    state: &Path,
    store: &Path,
    certs: &crate::http::tls::InitFiles,
) -> anyhow::Result<()> {
    let text = format!(
        r#"# Written by `kiln demo`; every key is documented in docs/configuration.md.
state_dir = {state}
store_dir = {store}

[store]
background_flush_ms = 1000

[timeouts]
heartbeat_interval_ms = 1000
agent_timeout_ms = 10000

[[hooks]]
name = "demo-build-succeeded"
events = ["build-succeeded"]
exec = ["/bin/sh", "-c", "cat > /dev/null"]

[tls]
cert_file = {cert}
key_file = {key}
"#,
        state = toml_str(state)?,
        store = toml_str(store)?,
        cert = toml_str(&certs.server_cert)?,
        key = toml_str(&certs.server_key)?,
    );
    std::fs::write(file, text).with_context(|| format!("failed to write {}", file.display()))
}

fn wait_for_ready(file: &Path, procs: &mut Processes) -> anyhow::Result<Ready> {
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        // The coordinator may write the file in pieces: only a whole JSON document counts.
        if let Ok(bytes) = std::fs::read(file) {
            if let Ok(ready) = serde_json::from_slice::<Ready>(&bytes) {
                return Ok(ready);
            }
        }
        if let Some(exit) = procs.exited() {
            anyhow::bail!("the coordinator stopped before it was ready: {exit}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the coordinator did not write its ready file {} within {} s",
            file.display(),
            READY_DEADLINE.as_secs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Build counts of the demo's builds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counts {
    total: usize,
    built: usize,
    failed: usize,
    canceled: usize,
    building: usize,
    /// Blocked behind a derivation the graph makes fail: they will never run.
    blocked: usize,
    /// Blocked or runnable, still expected to run.
    waiting: usize,
}

impl Counts {
    fn done(&self) -> bool {
        self.built + self.failed + self.canceled + self.blocked == self.total
    }
}

fn count(states: &HashMap<BuildId, BuildState>, doomed: &BTreeSet<BuildId>) -> Counts {
    let mut c = Counts {
        total: states.len(),
        ..Counts::default()
    };
    for (id, st) in states {
        match st {
            BuildState::Succeeded => c.built += 1,
            BuildState::Failed => c.failed += 1,
            BuildState::Canceled => c.canceled += 1,
            s if s.is_leased() => c.building += 1,
            BuildState::Blocked if doomed.contains(id) => c.blocked += 1,
            _ => c.waiting += 1,
        }
    }
    c
}

/// Poll the builds until every one is terminal (or blocked behind an expected failure),
/// printing a line on stderr whenever the counts change.
fn watch(
    client: &Client,
    graph: &Graph,
    submitted: &[BuildSummary],
    procs: &mut Processes,
    deadline: Instant,
    args: &DemoArgs,
) -> anyhow::Result<Counts> {
    let by_drv: BTreeMap<&str, &graph::GraphDrv> = graph
        .drvs
        .iter()
        .map(|d| (d.drv_path.as_str(), d))
        .collect();
    let doomed: BTreeSet<BuildId> = submitted
        .iter()
        .filter(|b| by_drv.get(b.drv_path.as_str()).is_some_and(|d| d.blocked))
        .map(|b| b.id)
        .collect();
    let mut states: HashMap<BuildId, BuildState> =
        submitted.iter().map(|b| (b.id, b.state)).collect();
    let mut last: Option<Counts> = None;
    loop {
        for b in list_builds(client, None, None)? {
            if let Some(st) = states.get_mut(&b.id) {
                *st = b.state;
            }
        }
        let c = count(&states, &doomed);
        if last.as_ref() != Some(&c) {
            eprintln!(
                "[{}/{}] {} built, {} failed, {} building",
                c.built + c.failed + c.canceled,
                c.total,
                c.built,
                c.failed,
                c.building
            );
            last = Some(c.clone());
        }
        if c.done() {
            return Ok(c);
        }
        if let Some(exit) = procs.exited() {
            anyhow::bail!("a demo process stopped while builds were still running: {exit}");
        }
        if Instant::now() >= deadline {
            let mut stuck: Vec<String> = states
                .iter()
                .filter(|(_, s)| !s.is_terminal())
                .map(|(id, s)| format!("build {id} {s}"))
                .collect();
            stuck.sort();
            anyhow::bail!(
                "the demo did not finish within {} s (--timeout): {} of {} builds are not done ({}); see the agents' logs",
                args.timeout,
                stuck.len(),
                c.total,
                stuck.join(", ")
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_end_when_only_doomed_builds_are_blocked() {
        let states = HashMap::from([
            (1, BuildState::Succeeded),
            (2, BuildState::Failed),
            (3, BuildState::Blocked),
        ]);
        let c = count(&states, &BTreeSet::from([3]));
        assert!(c.done());
        assert_eq!((c.built, c.failed, c.blocked), (1, 1, 1));
        // A blocked build that may still run keeps the demo waiting.
        let c = count(&states, &BTreeSet::new());
        assert!(!c.done());
        assert_eq!(c.waiting, 1);
    }

    #[test]
    fn config_is_valid_for_the_coordinator() {
        let dir = TempDir::new("kiln-demo-test").unwrap();
        let file = dir.path().join("c.toml");
        let certs = crate::http::tls::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
        write_config(
            &file,
            &dir.path().join("st\"ate"),
            &dir.path().join("store"),
            &certs,
        )
        .unwrap();
        let config = crate::config::Config::load(Some(&file)).unwrap();
        assert_eq!(config.tls.cert_file.as_ref(), Some(&certs.server_cert));
        assert_eq!(config.tls.key_file.as_ref(), Some(&certs.server_key));
        assert_eq!(config.state_dir, dir.path().join("st\"ate"));
        assert_eq!(config.store_dir, Some(dir.path().join("store")));
        assert_eq!(config.timeouts.heartbeat_interval_ms, 1000);
        assert_eq!(config.hooks[0].events, ["build-succeeded"]);
        assert_eq!(config.hooks[0].exec, ["/bin/sh", "-c", "cat > /dev/null"]);
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let dir = TempDir::new("kiln-demo-test").unwrap();
        let err = find_binaries(Some(dir.path().into()), false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cargo build --workspace"), "{err}");
        assert!(err.contains("KILN_BIN_DIR"), "{err}");
    }

    /// With `--agent`, kiln-agent need not exist next to kiln; kiln itself still must.
    #[test]
    fn agent_programs_replace_the_found_agent() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = TempDir::new("kiln-demo-test").unwrap();
        let kiln = dir.path().join("kiln");
        std::fs::write(&kiln, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&kiln, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bins = find_binaries(Some(dir.path().into()), true).unwrap();
        assert_eq!(bins.kiln, kiln);
        assert_eq!(bins.agent, None);
        let err = find_binaries(Some(dir.path().into()), false).err().unwrap();
        assert!(err.to_string().contains("kiln-agent not found"), "{err}");

        // Default: two agents of the kiln-agent found.
        let found = dir.path().join("kiln-agent");
        assert_eq!(
            agent_programs(&[], Some(&found)).unwrap(),
            vec![found.clone(), found]
        );
        // One agent per --agent, in order.
        let wrapper = dir.path().join("agent-arm");
        std::fs::write(&wrapper, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let given = vec![wrapper.clone(), kiln.clone(), wrapper.clone()];
        assert_eq!(agent_programs(&given, None).unwrap(), given);
        // Not executable, or missing: refused with the path and what to do.
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = agent_programs(std::slice::from_ref(&wrapper), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not an executable file"), "{err}");
        assert!(err.contains("agent-arm"), "{err}");
        let missing = dir.path().join("nope");
        let err = agent_programs(&[missing], None).err().unwrap();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }
}
