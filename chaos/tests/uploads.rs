//! Resumable uploads under faults, with a real `kiln coordinator` and a real `kiln-agent`
//! behind the fault proxy, building one derivation whose output is 2 MiB of incompressible
//! bytes. Pins down (issue [3/8], "It must show"):
//!
//! - an upload cut at half is resumed: the next `PUT` starts where the coordinator's copy
//!   ends, so at most one chunk (64 KiB) of what reached the coordinator is sent again;
//! - a blackholed upload (bytes stop, nothing comes back) is detected as stalled by one of the
//!   ends, which gives up on the connection, and the upload resumes from the bytes received.
//!
//! Both wait with deadlines only. Needs `kiln` and `kiln-agent` built next to `kiln-chaos`
//! (`cargo build --workspace`) or in `KILN_BIN_DIR`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::client::submit::{self, SubmitOptions};
use kiln::nar::signing::SecretKey;
use kiln_chaos::farm::Farm;
use kiln_chaos::graph::{self, ChaosGraph};
use kiln_chaos::proxy::{
    Action, Ending, Exchange, FaultPlan, Phase, Proxy, ProxyConfig, Route, RouteSel, Rule,
};
use kiln_chaos::scenario::{AgentsSpec, CoordinatorSpec, GraphSpec};

/// What the coordinator may send again after a cut: one chunk of the agent's upload stream.
const ONE_CHUNK: u64 = 64 * 1024;
const DEADLINE: Duration = Duration::from_secs(240);

fn bin_dir() -> PathBuf {
    match std::env::var_os("KILN_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_BIN_EXE_kiln-chaos"))
            .parent()
            .unwrap()
            .to_path_buf(),
    }
}

/// A coordinator, one proxy with `rules`, one agent behind it, and a one-build graph.
struct One {
    farm: Farm,
    proxy: Proxy,
    graph: ChaosGraph,
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

fn start(rules: Vec<Rule>) -> One {
    start_with(rules, CoordinatorSpec::default())
}

fn start_with(rules: Vec<Rule>, coordinator: CoordinatorSpec) -> One {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let spec: GraphSpec = toml::from_str(
        "builds = 1\nlayers = 1\nduration_ms = [100, 100]\noutput_kib = [2048, 2048]\n",
    )
    .unwrap();
    let system = kiln::client::graph::default_system();
    let graph = graph::generate(&store, &dir.path().join("stamps"), &spec, 3, &system).unwrap();
    let key_file = dir.path().join("signing.key");
    std::fs::write(
        &key_file,
        SecretKey::generate("kiln-chaos-test-1")
            .unwrap()
            .to_string(),
    )
    .unwrap();
    let bins = kiln::client::demo::find_binaries(Some(bin_dir().into()), false).unwrap();
    let hook_file = dir.path().join("hook-runs");
    std::fs::write(&hook_file, "").unwrap();
    let mut farm = Farm::new(
        bins,
        dir.path(),
        &store,
        &coordinator,
        &hook_file,
        &key_file,
    )
    .unwrap();
    farm.start_coordinator().unwrap();
    let proxy = rt
        .block_on(Proxy::start(
            ProxyConfig {
                name: "agent-1".into(),
                index: 0,
                plan: FaultPlan {
                    seed: 1,
                    rules,
                    ..FaultPlan::default()
                },
                log_file: Some(dir.path().join("logs/proxy-agent-1.jsonl")),
                tls: None,
            },
            farm.agent_addr.unwrap(),
        ))
        .unwrap();
    let agents = AgentsSpec {
        count: 1,
        ..AgentsSpec::default()
    };
    farm.create_agents(&agents, &system, &[proxy.url()])
        .unwrap();
    farm.start_agent(0, &agents).unwrap();
    let targets = vec![graph
        .store_dir
        .parse_path(graph.drvs[0].drv_path.as_bytes())
        .unwrap()];
    let opts = SubmitOptions {
        only_targets: true,
        ..SubmitOptions::default()
    };
    submit::submit(&farm.client(), &graph.store_dir, &targets, &opts).unwrap();
    One {
        farm,
        proxy,
        graph,
        dir,
        _rt: rt,
    }
}

impl One {
    /// Wait for the build to end; its state.
    fn wait_terminal(&mut self) -> String {
        let deadline = Instant::now() + DEADLINE;
        let client = self.farm.client();
        loop {
            let b: serde_json::Value = client.get_json("builds/1", &[]).unwrap();
            let st = b["summary"]["state"].as_str().unwrap_or("").to_string();
            if matches!(st.as_str(), "succeeded" | "failed" | "canceled") {
                return st;
            }
            if Instant::now() > deadline {
                let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
                panic!(
                    "build 1 is still {st} after {DEADLINE:?}; the proxy saw {:#?}; files kept in {}",
                    self.proxy.exchanges(),
                    kept.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn uploads(&self) -> Vec<Exchange> {
        self.proxy
            .exchanges()
            .into_iter()
            .filter(|e| e.route == Route::Upload)
            .collect()
    }

    fn builder_runs(&self) -> u64 {
        let runs = graph::count_runs(&self.graph.stamp_dir).unwrap();
        runs.get(&self.graph.drvs[0].name).map_or(0, |r| r.0)
    }

    /// The served NAR is the one the builder made.
    fn served_ok(&self) {
        let scratch = self.dir.path().join("served");
        std::fs::create_dir_all(&scratch).unwrap();
        kiln_chaos::served::check_output(&self.farm.agent_url(), &self.graph.drvs[0], &scratch)
            .unwrap();
    }
}

#[test]
fn an_upload_cut_at_half_resumes_sending_at_most_one_chunk_again() {
    let mut rule = Rule::always(RouteSel::Upload, Phase::Request, Action::Reset);
    rule.after_fraction = Some((0.5, 0.5));
    rule.limit = Some(1);
    let mut one = start(vec![rule]);
    assert_eq!(one.wait_terminal(), "succeeded");
    let ups = one.uploads();
    let cut = ups
        .iter()
        .find(|e| e.fault.is_some())
        .expect("the proxy cut an upload");
    assert_eq!(cut.ending, Ending::Reset);
    let len = cut.request_len.unwrap();
    assert!(len > 1 << 20, "the upload is {len} bytes");
    let file_size = len + cut.offset.unwrap_or(0);
    let reached = cut.offset.unwrap_or(0) + cut.request_forwarded;
    assert!(
        reached >= file_size / 2 - ONE_CHUNK,
        "half of the file reached the coordinator: {cut:?}"
    );
    let resumed = ups
        .iter()
        .find(|e| e.t_ms >= cut.end_ms && e.offset.unwrap_or(0) > 0 && e.accepted())
        .unwrap_or_else(|| panic!("no upload resumed from an offset after the cut: {ups:#?}"));
    let offset = resumed.offset.unwrap();
    assert!(
        offset <= reached && reached - offset <= ONE_CHUNK,
        "the resumed upload starts at {offset}; {reached} bytes had reached the coordinator"
    );
    let sent: u64 = ups.iter().map(|e| e.request_forwarded).sum();
    assert!(
        sent <= file_size + ONE_CHUNK,
        "{sent} bytes sent in all for a {file_size}-byte file: {ups:#?}"
    );
    assert_eq!(one.builder_runs(), 1, "the builder ran once");
    one.served_ok();
}

/// The coordinator's body stall timeout (`timeouts.transfer_stall_ms`) is set to 3 s here, so
/// it gives up on the silent body first and keeps the bytes that reached it.
#[test]
fn a_blackholed_upload_is_detected_as_stalled_and_resumed() {
    let mut rule = Rule::always(RouteSel::Upload, Phase::Request, Action::Blackhole);
    rule.after_fraction = Some((0.5, 0.5));
    rule.limit = Some(1);
    let coordinator = CoordinatorSpec {
        extra_timeouts: "transfer_stall_ms = 3000".into(),
        ..CoordinatorSpec::default()
    };
    let mut one = start_with(vec![rule], coordinator);
    assert_eq!(one.wait_terminal(), "succeeded");
    let ups = one.uploads();
    let hole = ups
        .iter()
        .find(|e| e.fault.is_some())
        .expect("the proxy blackholed an upload");
    assert!(
        matches!(hole.ending, Ending::ClientGaveUp | Ending::UpstreamGaveUp),
        "one end detected the stall and gave up: {hole:?}"
    );
    let reached = hole.offset.unwrap_or(0) + hole.request_forwarded;
    let resumed = ups
        .iter()
        .find(|e| e.t_ms >= hole.t_ms && e.offset.unwrap_or(0) > 0 && e.accepted())
        .unwrap_or_else(|| panic!("no upload resumed after the stall: {ups:#?}"));
    let offset = resumed.offset.unwrap();
    assert!(
        offset <= reached && reached - offset <= ONE_CHUNK,
        "resumed at {offset}; {reached} bytes had reached the coordinator"
    );
    assert_eq!(one.builder_runs(), 1, "the builder ran once");
    one.served_ok();
}
