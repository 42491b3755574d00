//! Tests of the checker and its counters on hand-made event logs and proxy logs.
use super::*;
use crate::counters::{fault_counts, loss_timings, recovery_counts};
use crate::evidence::BuildRow;
use crate::proxy::{Action, FaultDone, FaultSource, Phase};
use serde_json::json;

fn ev(seq: u64, t: u64, kind: &str, build: u64, attempt: u32, agent: u64) -> Event {
    Event {
        seq,
        time_ms: t,
        kind: kind.to_string(),
        build_id: build,
        agent_id: agent,
        data: json!({"build_id": build, "attempt": attempt, "agent_id": agent}),
    }
}

fn tiny_graph(dir: &std::path::Path) -> ChaosGraph {
    let spec: crate::scenario::GraphSpec = toml::from_str("builds = 2\nlayers = 1\n").unwrap();
    crate::graph::generate(
        &dir.join("store"),
        &dir.join("stamps"),
        &spec,
        1,
        "x86_64-linux",
    )
    .unwrap()
}

fn exchange(agent: &str, route: Route, build: u64, attempt: u32, t: u64) -> Exchange {
    Exchange {
        t_ms: t,
        end_ms: t + 1,
        agent: agent.into(),
        conn: 0,
        seq: 0,
        method: "POST".into(),
        route,
        path: String::new(),
        build: Some(build),
        attempt: Some(attempt),
        offset: None,
        status: Some(200),
        code: None,
        duplicate: Some(false),
        assigned: vec![],
        request_len: None,
        request_forwarded: 0,
        reply_forwarded: 0,
        fault: None,
        ending: Ending::Completed,
    }
}

/// Pins down how re-adoptions, reallocations, lost-agent timings and stale acceptances are
/// read from the event log.
#[test]
fn counters_and_invariants_read_the_event_log() {
    let dir = tempfile::tempdir().unwrap();
    let graph = tiny_graph(dir.path());
    let mut dump = Dump::default();
    for (i, d) in graph.drvs.iter().enumerate() {
        let id = i as u64 + 1;
        dump.builds.insert(
            id,
            BuildRow {
                id,
                drv_path: d.drv_path.clone(),
                state: "succeeded".into(),
                attempt: 1,
                agent_id: 2,
                reason: String::new(),
            },
        );
    }
    dump.agents.insert(2, "agent-1".into());
    dump.agents.insert(3, "agent-2".into());
    dump.events = vec![
        ev(1, 100, "build-allocated", 1, 1, 2),
        ev(2, 100, "build-allocated", 2, 1, 2),
        ev(3, 180, "agent-lost", 0, 0, 2),
        ev(4, 200, "lease-expired", 1, 1, 2),
        ev(5, 200, "lease-expired", 2, 1, 2),
        ev(6, 250, "build-allocated", 2, 2, 3),
        // Build 1 carried on by the same agent at the same attempt: a re-adoption.
        ev(7, 300, "build-started", 1, 1, 2),
        ev(8, 400, "build-succeeded", 1, 1, 2),
        // Build 2 finished by the agent that lost it: a stale result accepted.
        ev(9, 450, "build-succeeded", 2, 1, 2),
    ];
    let losses = vec![Loss {
        t_ms: 150,
        agent: "agent-1".into(),
        kind: "partition".into(),
    }];
    let ids: BTreeMap<String, u64> =
        [("agent-1".to_string(), 2), ("agent-2".to_string(), 3)].into();
    let mut stale = exchange("agent-1", Route::Result, 2, 1, 440);
    stale.duplicate = Some(false);
    let mut lost_reply = exchange("agent-2", Route::Work, 0, 0, 250);
    lost_reply.build = None;
    lost_reply.assigned = vec![(2, 2)];
    lost_reply.ending = Ending::Reset;
    lost_reply.fault = Some(FaultDone {
        action: Action::Reset,
        phase: Phase::Reply,
        source: FaultSource::Rule,
        rule: Some(0),
    });
    let exchanges = vec![stale, lost_reply];
    let runs: BTreeMap<String, (u64, u64)> = graph
        .drvs
        .iter()
        .map(|d| (d.name.clone(), (1, 1)))
        .collect();
    let acked: Vec<(u64, String)> = graph
        .drvs
        .iter()
        .enumerate()
        .map(|(i, d)| (i as u64 + 1, d.drv_path.clone()))
        .collect();
    let hook_runs = BTreeMap::new();
    let e = Evidence {
        graph: &graph,
        dump: &dump,
        exchanges: &exchanges,
        runs: &runs,
        hook_runs: &hook_runs,
        acknowledged: &acked,
        kills: &[],
        losses: &losses,
        agent_ids: &ids,
        served: &[],
        nix: None,
        crashes: &[],
        agent_timeout_ms: 3000,
        build_end_ms: 1000,
    };
    let r = recovery_counts(&e);
    assert_eq!(r["readoptions"], 1);
    assert_eq!(r["reallocations"], 1);
    assert_eq!(r["lease_expiries"], 2);
    assert_eq!(r["agents_declared_lost"], 1);
    let (realloc, detect) = loss_timings(&e);
    assert_eq!(realloc.samples, vec![100]);
    assert_eq!(detect.samples, vec![30]);
    assert_eq!(realloc.target_ms, Some(4000));
    let f = fault_counts(&exchanges);
    assert_eq!(f["resets_work_reply"], 1);

    let inv = check(&e);
    let by: BTreeMap<&str, &InvariantResult> = inv.iter().map(|i| (i.name.as_str(), i)).collect();
    let stale = by["no-stale-report-accepted"];
    assert!(!stale.held);
    assert!(
        stale
            .details
            .iter()
            .any(|d| d.contains("build 2: build-succeeded names attempt 1")),
        "{:?}",
        stale.details
    );
    assert!(by["every-build-terminal"].held);
    assert!(by["no-result-accepted-twice"].held);
    assert!(!by["every-hook-event-processed"].held, "no hook ran");
    // Two terminal events for one build break "accepted once".
    let mut dump2 = Dump {
        builds: dump.builds.clone(),
        events: dump.events.clone(),
        ..Dump::default()
    };
    dump2.events.push(ev(10, 500, "build-failed", 2, 2, 3));
    let e2 = Evidence { dump: &dump2, ..e };
    let inv = check(&e2);
    assert!(
        !inv.iter()
            .find(|i| i.name == "no-result-accepted-twice")
            .unwrap()
            .held
    );
}

#[test]
fn builder_runs_are_bounded_by_kills_and_expiries() {
    let dir = tempfile::tempdir().unwrap();
    let graph = tiny_graph(dir.path());
    let d = &graph.drvs[0];
    let mut dump = Dump::default();
    dump.builds.insert(
        1,
        BuildRow {
            id: 1,
            drv_path: d.drv_path.clone(),
            state: "succeeded".into(),
            attempt: 2,
            agent_id: 3,
            reason: String::new(),
        },
    );
    dump.events = vec![
        ev(1, 100, "build-allocated", 1, 1, 2),
        ev(2, 300, "build-allocated", 1, 2, 3),
        ev(3, 400, "build-succeeded", 1, 2, 3),
    ];
    let ids: BTreeMap<String, u64> = [("agent-1".to_string(), 2)].into();
    let kill = Loss {
        t_ms: 200,
        agent: "agent-1".into(),
        kind: "kill".into(),
    };
    let runs: BTreeMap<String, (u64, u64)> = [(d.name.clone(), (2, 1))].into();
    let hook_runs = BTreeMap::new();
    let mut e = Evidence {
        graph: &graph,
        dump: &dump,
        exchanges: &[],
        runs: &runs,
        hook_runs: &hook_runs,
        acknowledged: &[],
        kills: std::slice::from_ref(&kill),
        losses: std::slice::from_ref(&kill),
        agent_ids: &ids,
        served: &[],
        nix: None,
        crashes: &[],
        agent_timeout_ms: 3000,
        build_end_ms: 1000,
    };
    let builds = by_build(&dump.events);
    assert!(
        builder_runs_bounded(&e, &builds).held,
        "the kill allows a second run"
    );
    e.kills = &[];
    let r = builder_runs_bounded(&e, &builds);
    assert!(!r.held);
    assert!(
        r.details[0].contains("ran 2 times, at most 1"),
        "{:?}",
        r.details
    );
}
