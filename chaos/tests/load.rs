//! The load generator against a real `kiln coordinator` on loopback: the submitter queues a
//! few builds that use input derivations, the simulated agents (registering themselves with
//! a registration token) build the inputs, then the builds that use them, each uploading a
//! NAR the coordinator verifies; every build ends `succeeded` with a narinfo that names the
//! NarHash and NarSize the agent uploaded.
//!
//! Needs `kiln` built next to `kiln-chaos` (`cargo build --workspace`) or in `KILN_BIN_DIR`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_chaos::load::agents::{run_agents, verify_narinfos, AgentsOptions};
use kiln_chaos::load::coordinator::LoadCoordinator;
use kiln_chaos::load::stats::Watch;
use kiln_chaos::load::submit::{run_submit, SubmitOptions};

fn bin_dir() -> PathBuf {
    match std::env::var_os("KILN_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_BIN_EXE_kiln-chaos"))
            .parent()
            .unwrap()
            .to_path_buf(),
    }
}

#[test]
fn simulated_agents_build_every_submitted_build_with_a_valid_narinfo() {
    let dir = tempfile::tempdir().unwrap();
    let bins = kiln::client::demo::find_binaries(Some(bin_dir().into()), true).unwrap();
    let coord = LoadCoordinator::start(&bins.kiln, dir.path(), "").unwrap();
    let watch = Watch {
        pid: Some(coord.pid),
        metrics_url: Some(coord.agent_url.clone()),
    };
    let system = kiln::client::graph::default_system();
    // 6 builds in requests of 4, each using 2 input derivations (queued too): 8 builds.
    let submitted = run_submit(&SubmitOptions {
        client_url: coord.client_url.clone(),
        token: None,
        store_dir: coord.store_dir.to_str().unwrap().to_string(),
        system: system.clone(),
        builds: 6,
        per_request: 4,
        clients: 2,
        drv_bytes: 1536,
        inputs: 2,
        run: "test".to_string(),
        deadline: Duration::from_secs(120),
        watch: watch.clone(),
    })
    .unwrap();
    assert_eq!(submitted.builds_acknowledged, 6, "{submitted:?}");
    assert_eq!(submitted.builds_existing, 0);
    assert_eq!(submitted.requests, 2);
    assert!(submitted.errors.is_empty(), "{:?}", submitted.errors);
    assert!(
        (1400.0..=1700.0).contains(&submitted.drv_bytes_mean),
        "{submitted:?}"
    );
    // The coordinator flushed before it acknowledged (two concurrent requests may share one
    // group commit, so one flush can cover both).
    assert!(
        submitted.coordinator.flushes.unwrap() >= 1.0,
        "{:?}",
        submitted.coordinator
    );
    assert!(submitted.coordinator.cpu_ms.is_some());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let opts = AgentsOptions {
        agent_url: coord.agent_url.clone(),
        agents: 3,
        slots: 2,
        builds: 8,
        nar_bytes: 2048,
        system,
        registration_token: coord.registration_token.clone(),
        name_prefix: "test".to_string(),
        wait_ms: 1000,
        report_start: true,
        deadline: Duration::from_secs(120),
        watch,
    };
    let (report, done) = rt.block_on(run_agents(&opts)).unwrap();
    assert!(!report.timed_out, "{report:?}");
    assert_eq!(report.builds_succeeded, 8, "{report:?}");
    assert_eq!(report.builds_failed, 0, "{:?}", report.errors);
    assert_eq!(report.latency.upload.count, 8);
    assert_eq!(report.latency.result.count, 8);
    assert_eq!(report.latency.start.count, 8);
    assert!(report.coordinator.commits.unwrap() >= 16.0, "{report:?}");
    let mut ids: Vec<u64> = done.iter().map(|d| d.build_id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 8, "a build was reported twice: {ids:?}");

    // Every build is `succeeded` in the coordinator's own view, and its narinfo is there with
    // what the agent uploaded.
    assert_eq!(verify_narinfos(&coord.agent_url, &done).unwrap(), 8);
    for d in &done {
        let url = format!("{}/api/v1/builds/{}", coord.client_url, d.build_id);
        let v: serde_json::Value = ureq::get(&url).call().unwrap().into_json().unwrap();
        assert_eq!(v["summary"]["state"], "succeeded", "{v}");
        assert_eq!(v["outputs"][0]["path"], d.out_path.as_str(), "{v}");
    }
    assert!(
        coord.stop(Duration::from_secs(60)),
        "unclean coordinator exit"
    );
}

/// The `farm` benchmark at a tiny size, with the debug binaries: real agents build every
/// independent build and every chain link, and the report's figures are there and agree with
/// each other (no timing is asserted: figures come from `scripts/bench`).
#[test]
fn farm_benchmark_builds_everything_with_real_agents_and_reports_consistent_figures() {
    use kiln_chaos::load::farm::{run_farm, Cli, FarmOptions};
    let dir = tempfile::tempdir().unwrap();
    let bins = kiln::client::demo::find_binaries(Some(bin_dir().into()), false).unwrap();
    for tls in [false, true] {
        let work = dir.path().join(if tls { "tls" } else { "plain" });
        let r = run_farm(&FarmOptions {
            quick: true,
            kiln: bins.kiln.clone(),
            agent: bins.agent.clone().unwrap(),
            work_dir: Some(work),
            builds: Some(6),
            agents: Some(2),
            slots: Some(2),
            chain: Some(3),
            tls,
            perf_dir: None,
        })
        .unwrap();
        assert!(r.passed, "{r:#?}");
        assert_eq!(r.cli, Cli::Current);
        assert_eq!(r.tls, tls);
        assert_eq!((r.agents, r.slots), (2, 2));
        let b = &r.phase_builds;
        assert_eq!((b.builds, b.succeeded, b.failed), (6, 6, 0), "{b:?}");
        assert!(b.elapsed_s > 0.0 && b.builds_per_s > 0.0, "{b:?}");
        // Consistent: rates and per-build figures are the totals divided.
        let rate = b.builds as f64 / b.elapsed_s;
        assert!(
            (b.builds_per_s - rate).abs() <= 0.01 * rate + 0.002,
            "{b:?}"
        );
        assert!(
            (b.coordinator_cpu_ms_per_build * 6.0 - b.coordinator_cpu_ms).abs() < 0.01,
            "{b:?}"
        );
        assert!(
            (b.agent_cpu_ms_per_build * 6.0 - b.agents_cpu_ms).abs() < 0.01,
            "{b:?}"
        );
        assert!(b.scrapes >= 1, "{b:?}");
        let c = r.phase_chain.as_ref().unwrap();
        assert_eq!((c.links, c.succeeded), (3, 3), "{c:?}");
        assert_eq!(c.hop_ms.len(), 3, "{c:?}");
        assert_eq!(c.hops.count, 3);
        assert_eq!(c.handoff.count, 3);
        assert_eq!(c.run.count, 3);
        // The hops add up to no more than the measured total (the record times are in ms,
        // the total runs to the poll that saw the last success).
        let sum: u64 = c.hop_ms.iter().sum();
        assert!(sum as f64 <= c.total_ms + 5.0, "{c:?}");
        assert!((c.ms_per_hop * 3.0 - c.total_ms).abs() < 0.01, "{c:?}");
        assert!(r.coordinator_stopped_cleanly);
        assert!(!r.load_before.is_empty() && !r.load_after.is_empty());
    }
}
