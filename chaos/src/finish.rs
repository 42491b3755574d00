//! The end of a run: wait for the hooks, check the served NARs and run the Nix client while
//! the coordinator is up, stop the coordinator and then the agents, read the state dump, and
//! turn the evidence into the report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kiln::nar::signing::SecretKey;

use crate::check::{self, Evidence};
use crate::counters;
use crate::evidence;
use crate::graph::{self, ChaosGraph};
use crate::report::{BuildCounts, InvariantResult, Report};
use crate::run::{now_ms, poll_states, round1, scrape, Live};
use crate::scenario::Scenario;
use crate::served;
use crate::submitter::Submissions;

/// Stop everything, gather the evidence, check, report.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish(
    s: &Scenario,
    seed: u64,
    graph: &ChaosGraph,
    mut live: Live,
    subs: &Submissions,
    states: BTreeMap<u64, String>,
    build_phase: Duration,
    dir: &Path,
    kiln_bin: &Path,
    key: &SecretKey,
) -> anyhow::Result<Report> {
    let h = live
        .farm
        .http(Duration::from_secs(2), Duration::from_secs(10));
    // Served NARs and the Nix probe: the bounds of their HTTP calls.
    let slow = live
        .farm
        .http(Duration::from_secs(10), Duration::from_secs(120));
    let build_end_ms = now_ms();
    // The agents stay up until the coordinator has stopped: stopping them first would make
    // the coordinator declare them lost and expire their leases, hiding the leases the run
    // left behind.
    if !live.farm.coordinator_running() {
        live.farm.start_coordinator()?;
    }
    let agent_url = live.farm.agent_url();
    wait_for_hooks(&h, &agent_url, &dir.join("hook-runs"));

    // Served NARs of every success, fetched like a binary-cache client.
    let scratch = dir.join("served");
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("failed to create {}", scratch.display()))?;
    let current = poll_states(&h, &live.farm.client_url(), &live.farm.token).unwrap_or(states);
    let acked = subs
        .acknowledged
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let succeeded: BTreeSet<String> = acked
        .iter()
        .filter(|(id, _)| current.get(id).is_some_and(|st| st == "succeeded"))
        .map(|(_, d)| d.clone())
        .collect();
    let mut served_hashes = Vec::new();
    let mut served_problems = Vec::new();
    for d in graph
        .drvs
        .iter()
        .filter(|d| succeeded.contains(&d.drv_path))
    {
        match served::check_output_with(&slow, &agent_url, d, &scratch) {
            Ok(sh) => served_hashes.push((d.index, sh)),
            Err(e) => served_problems.push(e),
        }
    }
    let nix = s.checks.nix.then(|| {
        let roots: Vec<String> = graph
            .root_outputs()
            .into_iter()
            .filter(|p| {
                graph
                    .drvs
                    .iter()
                    .any(|d| &d.out_path == p && succeeded.contains(&d.drv_path))
            })
            .collect();
        let all_roots = graph.root_outputs().len();
        let expected = served::expected_closure(graph, &roots);
        let ca = live.farm.tls.as_ref().map(|t| t.ca.clone());
        let mut outcome = served::nix_copy_and_verify(
            &agent_url,
            ca.as_deref(),
            &slow,
            graph.store_dir.as_str(),
            &key.to_public().to_string(),
            &roots,
            &expected,
            dir,
        );
        if roots.len() < all_roots {
            outcome.problems.push(format!(
                "{} of {all_roots} roots did not succeed and were not copied",
                all_roots - roots.len()
            ));
        }
        outcome
    });

    let clean = live.farm.stop_coordinator(Duration::from_secs(30));
    if !clean {
        live.notes
            .push("the coordinator did not exit cleanly on SIGTERM".to_string());
    }
    for i in 0..live.farm.agents.len() {
        live.scrape_agent(&h, i);
    }
    live.farm.stop_agents(Duration::from_secs(20));
    // Bulky and not evidence: the agents' private stores (the coordinator keeps every NAR),
    // the restored NARs and the Nix client's store.
    let mut bulky = vec![dir.join("served"), dir.join("nix-root")];
    bulky.extend(live.farm.agents.iter().map(|a| a.state.join("store")));
    for d in bulky {
        if d.exists() {
            served::make_writable(&d);
            if let Err(e) = std::fs::remove_dir_all(&d) {
                tracing::warn!(dir = %d.display(), error = %e, "failed to remove a bulky directory");
            }
        }
    }
    for (_, why) in live.farm.crashed_agents() {
        live.crashes.push(why);
    }
    let dump_text = evidence::state_dump(kiln_bin, &live.farm.state)?;
    std::fs::write(dir.join("state-dump.txt"), &dump_text)
        .with_context(|| format!("failed to write {}", dir.join("state-dump.txt").display()))?;
    let dump = evidence::parse_dump(&dump_text)?;
    for (i, sh) in &served_hashes {
        let d = &graph.drvs[*i];
        if let Err(e) = served::compare_recorded(d, sh, dump.outputs.get(&d.out_path)) {
            served_problems.push(e);
        }
    }
    let runs = graph::count_runs(&graph.stamp_dir)?;
    let hook_runs = evidence::hook_runs(&dir.join("hook-runs"));
    let mut exchanges = Vec::new();
    let mut refused = 0;
    let mut partition_resets = 0;
    let mut tls = crate::proxy::ConnCounts::default();
    for p in &live.proxies {
        exchanges.extend(p.exchanges());
        let c = p.counts();
        refused += c.refused;
        partition_resets += c.partition_resets;
        tls.tls_handshakes += c.tls_handshakes;
        tls.tls_resumed += c.tls_resumed;
        tls.tls_failures += c.tls_failures;
        tls.upstream_tls_handshakes += c.upstream_tls_handshakes;
        tls.upstream_tls_resumed += c.upstream_tls_resumed;
    }
    let agent_ids: BTreeMap<String, u64> = live
        .farm
        .agents
        .iter()
        .map(|a| (a.name.clone(), a.id))
        .collect();
    let mut crashes = live.crashes.clone();
    crashes.extend(
        subs.problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned(),
    );
    let nix_problems = nix.as_ref().map(|n| n.problems.clone());
    let ev = Evidence {
        graph,
        dump: &dump,
        exchanges: &exchanges,
        runs: &runs,
        hook_runs: &hook_runs,
        acknowledged: &acked,
        kills: &live.kills,
        losses: &live.losses,
        agent_ids: &agent_ids,
        served: &served_problems,
        nix: nix_problems.as_deref(),
        crashes: &crashes,
        agent_timeout_ms: s.coordinator.agent_timeout_ms,
        build_end_ms,
    };
    let mut invariants = check::check(&ev);
    if !live.notes.is_empty() {
        invariants.push(InvariantResult {
            name: "harness-notes".to_string(),
            held: true,
            details: live.notes.clone(),
        });
    }
    let mut faults = counters::fault_counts(&exchanges);
    for (k, v) in &live.faults {
        *faults.entry(k.clone()).or_default() += v;
    }
    faults.insert("refused_connections".into(), refused);
    faults.insert("partition_resets".into(), partition_resets);
    for k in ["agent_kills", "coordinator_kills"] {
        faults.entry(k.into()).or_default();
    }
    let mut recovery = counters::recovery_counts(&ev);
    let (retries, reconnects) = live
        .agent_metrics
        .values()
        .fold((0.0, 0.0), |(r, c), (a, b)| (r + a, c + b));
    recovery.insert("agent_retries".into(), retries as u64);
    recovery.insert("agent_reconnects".into(), reconnects as u64);
    if live.farm.tls.is_some() {
        // Handshakes on the agents' links (the proxies are their TLS servers) and on the
        // proxies' links to the coordinator: every reconnect after a cut is a new handshake.
        recovery.insert("tls_handshakes".into(), tls.tls_handshakes);
        recovery.insert("tls_resumed_handshakes".into(), tls.tls_resumed);
        recovery.insert("tls_failed_handshakes".into(), tls.tls_failures);
        recovery.insert(
            "upstream_tls_handshakes".into(),
            tls.upstream_tls_handshakes,
        );
        recovery.insert(
            "upstream_tls_resumed_handshakes".into(),
            tls.upstream_tls_resumed,
        );
    }
    let (realloc, detect) = counters::loss_timings(&ev);
    // Builds whose builder fails, and those behind them (they fail with their input).
    let doomed = graph.doomed();
    let mut builds = BuildCounts {
        total: dump.builds.len(),
        expected_failures: graph.drvs.iter().filter(|d| doomed[d.index]).count(),
        ..BuildCounts::default()
    };
    for b in dump.builds.values() {
        match b.state.as_str() {
            "succeeded" => builds.succeeded += 1,
            "failed" => builds.failed += 1,
            "canceled" => {}
            _ => builds.not_terminal += 1,
        }
    }
    let mut report = Report {
        scenario: s.name.clone(),
        seed,
        tls: live.farm.tls.is_some(),
        passed: false,
        build_phase_s: round1(build_phase.as_secs_f64()),
        total_s: 0.0,
        work_dir: String::new(),
        builds,
        faults,
        recovery,
        lost_agent_to_reallocation_ms: realloc,
        lost_agent_detection_ms: detect,
        coverage: Vec::new(),
        invariants,
        reproduce: String::new(),
    };
    report.judge(&s.coverage.minimums());
    Ok(report)
}

/// Wait (at most 30 s) until the coordinator reports no pending hook run twice in a row and
/// the hook's output stopped growing.
fn wait_for_hooks(h: &ureq::Agent, agent_url: &str, hook_file: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet = 0;
    let mut last_len = 0;
    while Instant::now() < deadline && quiet < 3 {
        let pending = scrape(h, &format!("{agent_url}/metrics"))
            .map(|t| evidence::metric_sum(&t, "kiln_hook_pending").unwrap_or(0.0))
            .unwrap_or(1.0);
        let len = std::fs::metadata(hook_file).map(|m| m.len()).unwrap_or(0);
        if pending == 0.0 && len == last_len {
            quiet += 1;
        } else {
            quiet = 0;
        }
        last_len = len;
        std::thread::sleep(Duration::from_millis(500));
    }
}
