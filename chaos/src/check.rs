//! The invariants of a run, checked from evidence gathered after it: the durable event log
//! and build records (`kiln state dump`), the proxies' exchange logs, the builders' stamp
//! files, the recording hook's output, the served NARs and the Nix client. Also the report's
//! counters that come from the same evidence (reallocations, re-adoptions, resumed uploads,
//! stale reports refused, lost-agent timings).

use std::collections::{BTreeMap, BTreeSet};

use crate::evidence::{Dump, Event};
use crate::farm::HOOKED_KINDS;
use crate::graph::ChaosGraph;
use crate::proxy::{Action, Ending, Exchange, FaultSource, Phase, Route};
use crate::report::{InvariantResult, Timing};

/// An agent lost on purpose: killed, or cut off by a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    pub t_ms: u64,
    pub agent: String,
    /// `kill`, `partition` or `refuse`.
    pub kind: String,
}

/// Everything the checker reads.
pub struct Evidence<'a> {
    pub graph: &'a ChaosGraph,
    pub dump: &'a Dump,
    pub exchanges: &'a [Exchange],
    /// Derivation name -> (runs started, runs that ended).
    pub runs: &'a BTreeMap<String, (u64, u64)>,
    /// Event id -> hook runs.
    pub hook_runs: &'a BTreeMap<u64, u32>,
    /// (build id, drv path) of every build a submission acknowledged.
    pub acknowledged: &'a [(u64, String)],
    /// Agent kills (a subset of `losses`).
    pub kills: &'a [Loss],
    pub losses: &'a [Loss],
    /// Agent name -> id.
    pub agent_ids: &'a BTreeMap<String, u64>,
    /// Problems found by the served-NAR check.
    pub served: &'a [String],
    /// Problems found by the Nix client (`None`: not run).
    pub nix: Option<&'a [String]>,
    /// Processes that died without being asked.
    pub crashes: &'a [String],
    pub agent_timeout_ms: u64,
    /// When the build phase ended: later events (the final checks) are not counted.
    pub build_end_ms: u64,
}

/// The events of each build, in order.
fn by_build(events: &[Event]) -> BTreeMap<u64, Vec<&Event>> {
    let mut m: BTreeMap<u64, Vec<&Event>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.build_id != 0) {
        m.entry(e.build_id).or_default().push(e);
    }
    m
}

/// The (attempt, agent) holding `events`' build at `t_ms`, if any.
fn holder_at(events: &[&Event], t_ms: u64) -> Option<(u32, u64)> {
    let mut held = None;
    for e in events.iter().take_while(|e| e.time_ms <= t_ms) {
        match e.kind.as_str() {
            "build-allocated" => held = e.attempt().map(|a| (a, e.agent())),
            "lease-expired" | "build-succeeded" | "build-failed" | "build-canceled" => held = None,
            _ => {}
        }
    }
    held
}

/// A reset the proxy made, classified for the report.
pub fn reset_kind(e: &Exchange) -> Option<&'static str> {
    let f = e.fault?;
    if f.action != Action::Reset {
        return None;
    }
    Some(match (f.phase, e.route) {
        (Phase::Request, Route::Upload) => "resets_mid_upload",
        (Phase::Reply, Route::Work) if !e.assigned.is_empty() => "resets_work_reply",
        _ => "resets_other",
    })
}

/// The report's counters of injected faults that the proxies saw.
pub fn fault_counts(exchanges: &[Exchange]) -> BTreeMap<String, u64> {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for k in ["resets_mid_upload", "resets_work_reply", "resets_other"] {
        m.insert(k.into(), 0);
    }
    m.insert("blackholed_exchanges".into(), 0);
    m.insert("window_lost_exchanges".into(), 0);
    for e in exchanges {
        if let Some(k) = reset_kind(e) {
            *m.entry(k.into()).or_default() += 1;
        }
        match e.fault {
            Some(f) if f.action == Action::Blackhole && f.source == FaultSource::Rule => {
                *m.entry("blackholed_exchanges".into()).or_default() += 1
            }
            Some(f) if f.source == FaultSource::Window => {
                *m.entry("window_lost_exchanges".into()).or_default() += 1
            }
            _ => {}
        }
    }
    m
}

/// Counters of how Kiln recovered, from the events and the proxies.
pub fn recovery_counts(ev: &Evidence<'_>) -> BTreeMap<String, u64> {
    let builds = by_build(&ev.dump.events);
    let mut m = BTreeMap::new();
    let allocations = |es: &[&Event]| es.iter().filter(|e| e.kind == "build-allocated").count();
    let reallocations: usize = builds
        .values()
        .map(|es| allocations(es).saturating_sub(1))
        .sum();
    m.insert("reallocations".to_string(), reallocations as u64);
    let expiries = ev
        .dump
        .events
        .iter()
        .filter(|e| e.kind == "lease-expired")
        .count();
    m.insert("lease_expiries".to_string(), expiries as u64);
    m.insert(
        "readoptions".to_string(),
        readoptions(&builds, &ev.dump.events),
    );
    let resumed = ev
        .exchanges
        .iter()
        .filter(|e| e.route == Route::Upload && e.offset.unwrap_or(0) > 0 && e.accepted())
        .count();
    m.insert("resumed_uploads".to_string(), resumed as u64);
    let stale = ev
        .exchanges
        .iter()
        .filter(|e| e.status == Some(409) && e.code.as_deref() == Some("stale_attempt"))
        .count();
    m.insert("stale_reports_refused".to_string(), stale as u64);
    let runs: u64 = ev.runs.values().map(|r| r.0).sum();
    let extra: u64 = ev.runs.values().map(|r| r.0.saturating_sub(1)).sum();
    m.insert("builder_runs".to_string(), runs);
    m.insert("extra_builder_runs".to_string(), extra);
    let agent_lost = ev
        .dump
        .events
        .iter()
        .filter(|e| e.kind == "agent-lost" && e.time_ms <= ev.build_end_ms)
        .count();
    m.insert("agents_declared_lost".to_string(), agent_lost as u64);
    m
}

/// Builds whose lease expired and that the same agent then carried on at the same attempt,
/// without a new allocation (plus any event whose kind names a re-adoption).
fn readoptions(builds: &BTreeMap<u64, Vec<&Event>>, all: &[Event]) -> u64 {
    let mut n = 0;
    for es in builds.values() {
        let mut expired: Option<(u32, u64)> = None;
        for e in es {
            match e.kind.as_str() {
                "lease-expired" => expired = e.attempt().map(|a| (a, e.agent())),
                "build-allocated" => expired = None,
                k if k.contains("adopt") => {}
                _ => {
                    if let (Some((a, agent)), Some(at)) = (expired, e.attempt()) {
                        if at == a && e.agent() == agent {
                            n += 1;
                            expired = None;
                        }
                    }
                }
            }
        }
    }
    n + all.iter().filter(|e| e.kind.contains("adopt")).count() as u64
}

/// Lost-agent timings: to each reallocation of its builds, and to the `agent-lost` event.
pub fn loss_timings(ev: &Evidence<'_>) -> (Timing, Timing) {
    let builds = by_build(&ev.dump.events);
    let mut realloc = Vec::new();
    let mut detect = Vec::new();
    for loss in ev.losses {
        let Some(&agent) = ev.agent_ids.get(&loss.agent) else {
            continue;
        };
        for es in builds.values() {
            let Some((attempt, holder)) = holder_at(es, loss.t_ms) else {
                continue;
            };
            if holder != agent {
                continue;
            }
            if let Some(next) = es.iter().find(|e| {
                e.time_ms >= loss.t_ms
                    && e.kind == "build-allocated"
                    && e.attempt().is_some_and(|a| a > attempt)
            }) {
                realloc.push(next.time_ms - loss.t_ms);
            }
        }
        // The agent-lost event of this loss: before the agent's next loss and the run's end.
        let until = ev
            .losses
            .iter()
            .filter(|l| l.agent == loss.agent && l.t_ms > loss.t_ms)
            .map(|l| l.t_ms)
            .min()
            .unwrap_or(u64::MAX)
            .min(ev.build_end_ms);
        if let Some(lost) = ev.dump.events.iter().find(|e| {
            e.kind == "agent-lost"
                && e.agent() == agent
                && e.time_ms >= loss.t_ms
                && e.time_ms < until
        }) {
            detect.push(lost.time_ms - loss.t_ms);
        }
    }
    let target = Some(ev.agent_timeout_ms + 1000);
    (Timing::new(realloc, target), Timing::new(detect, target))
}

/// Every invariant, in the order of `docs/chaos.md`.
pub fn check(ev: &Evidence<'_>) -> Vec<InvariantResult> {
    let builds = by_build(&ev.dump.events);
    let doomed = ev.graph.doomed();
    vec![
        all_terminal(ev, &doomed),
        none_allocated(ev),
        failed_only_where_builder_fails(ev),
        result_accepted_once(ev, &builds),
        builder_runs_bounded(ev, &builds),
        served_nars(ev),
        nix_client(ev),
        submissions_kept(ev),
        no_stale_report_accepted(ev, &builds),
        hooks_processed(ev),
        processes_stayed_up(ev),
    ]
}

fn name_of(ev: &Evidence<'_>, drv: &str) -> String {
    ev.graph
        .by_drv(drv)
        .map(|d| d.name.clone())
        .unwrap_or_else(|| drv.to_string())
}

fn agent_name(ev: &Evidence<'_>, id: u64) -> String {
    ev.dump
        .agents
        .get(&id)
        .cloned()
        .unwrap_or_else(|| format!("agent id {id}"))
}

fn all_terminal(ev: &Evidence<'_>, doomed: &[bool]) -> InvariantResult {
    let mut bad = Vec::new();
    for b in ev.dump.builds.values() {
        let terminal = matches!(b.state.as_str(), "succeeded" | "failed" | "canceled");
        let blocked_ok = b.state == "blocked"
            && ev
                .graph
                .by_drv(&b.drv_path)
                .is_some_and(|d| doomed[d.index] && !d.fails);
        if !terminal && !blocked_ok {
            bad.push(format!(
                "build {} ({}) is {} at attempt {}",
                b.id,
                name_of(ev, &b.drv_path),
                b.state,
                b.attempt
            ));
        }
    }
    InvariantResult::from("every-build-terminal", bad)
}

fn none_allocated(ev: &Evidence<'_>) -> InvariantResult {
    let mut bad = Vec::new();
    for b in ev.dump.builds.values() {
        if !matches!(b.state.as_str(), "allocated" | "building" | "uploading") {
            continue;
        }
        let mut line = format!(
            "build {} ({}) is still {} to {} at attempt {}",
            b.id,
            name_of(ev, &b.drv_path),
            b.state,
            agent_name(ev, b.agent_id),
            b.attempt
        );
        // The proxy's evidence: was the lease sent in a work reply that never arrived?
        let lost = ev.exchanges.iter().find(|e| {
            e.route == Route::Work
                && e.assigned.contains(&(b.id, b.attempt))
                && e.ending != Ending::Completed
        });
        match lost {
            Some(e) => line.push_str(&format!(
                "; the work reply that carried it never reached {} ({} connection {} exchange {}: {:?})",
                e.agent, e.agent, e.conn, e.seq, e.ending
            )),
            None => {
                let delivered = ev.exchanges.iter().any(|e| {
                    e.route == Route::Work
                        && e.assigned.contains(&(b.id, b.attempt))
                        && e.ending == Ending::Completed
                });
                if delivered {
                    line.push_str("; its work reply reached the agent");
                }
                // The same agent held an earlier attempt of this build: two attempts of one
                // build on one agent is where an agent can mix them up.
                let holder = agent_name(ev, b.agent_id);
                let earlier: Vec<u32> = ev
                    .exchanges
                    .iter()
                    .filter(|e| e.route == Route::Work && e.agent == holder)
                    .flat_map(|e| e.assigned.iter())
                    .filter(|(id, a)| *id == b.id && *a < b.attempt)
                    .map(|(_, a)| *a)
                    .collect();
                if !earlier.is_empty() {
                    line.push_str(&format!(
                        "; {holder} had been given attempt {earlier:?} of it before"
                    ));
                }
            }
        }
        bad.push(line);
    }
    InvariantResult::from("none-left-allocated", bad)
}

fn failed_only_where_builder_fails(ev: &Evidence<'_>) -> InvariantResult {
    let mut bad = Vec::new();
    for b in ev.dump.builds.values() {
        let Some(d) = ev.graph.by_drv(&b.drv_path) else {
            continue;
        };
        if b.state == "failed" && !d.fails {
            bad.push(format!(
                "build {} ({}) failed though its builder succeeds: {}",
                b.id, d.name, b.reason
            ));
        }
        if b.state == "succeeded" && d.fails {
            bad.push(format!(
                "build {} ({}) succeeded though its builder exits 1",
                b.id, d.name
            ));
        }
    }
    InvariantResult::from("failed-only-where-the-builder-fails", bad)
}

fn result_accepted_once(ev: &Evidence<'_>, builds: &BTreeMap<u64, Vec<&Event>>) -> InvariantResult {
    let mut bad = Vec::new();
    for (id, es) in builds {
        let n = es.iter().filter(|e| e.is_terminal()).count();
        if n > 1 {
            bad.push(format!("build {id} has {n} terminal events"));
        }
    }
    let mut firsts: BTreeMap<u64, Vec<&Exchange>> = BTreeMap::new();
    for e in ev.exchanges {
        if e.route == Route::Result && e.accepted() && e.duplicate == Some(false) {
            if let Some(b) = e.build {
                firsts.entry(b).or_default().push(e);
            }
        }
    }
    for (b, es) in firsts {
        if es.len() > 1 {
            let who: Vec<String> = es
                .iter()
                .map(|e| format!("{} attempt {:?}", e.agent, e.attempt))
                .collect();
            bad.push(format!(
                "build {b}: the coordinator accepted {} results as new ({})",
                es.len(),
                who.join(", ")
            ));
        }
    }
    InvariantResult::from("no-result-accepted-twice", bad)
}

fn builder_runs_bounded(ev: &Evidence<'_>, builds: &BTreeMap<u64, Vec<&Event>>) -> InvariantResult {
    let mut allowed: BTreeMap<String, u64> = BTreeMap::new();
    let mut succeeded: BTreeSet<String> = BTreeSet::new();
    for b in ev.dump.builds.values() {
        let name = name_of(ev, &b.drv_path);
        let es = builds.get(&b.id).map(Vec::as_slice).unwrap_or(&[]);
        let expiries = es.iter().filter(|e| e.kind == "lease-expired").count() as u64;
        let kills = ev
            .kills
            .iter()
            .filter(|k| {
                let id = ev.agent_ids.get(&k.agent).copied();
                holder_at(es, k.t_ms).is_some_and(|(_, holder)| Some(holder) == id)
            })
            .count() as u64;
        *allowed.entry(name.clone()).or_default() += 1 + expiries + kills;
        if b.state == "succeeded" {
            succeeded.insert(name);
        }
    }
    let mut bad = Vec::new();
    for (name, (started, ended)) in ev.runs {
        let limit = allowed.get(name).copied().unwrap_or(0);
        if *started > limit {
            bad.push(format!(
                "{name}: the builder ran {started} times, at most {limit} allowed (1 + agent kills and lease expiries that hit it)"
            ));
        }
        let _ = ended;
    }
    for name in &succeeded {
        if ev.runs.get(name).is_none_or(|r| r.1 == 0) {
            bad.push(format!(
                "{name} succeeded but no run of its builder finished"
            ));
        }
    }
    InvariantResult::from("builder-runs-bounded", bad)
}

fn served_nars(ev: &Evidence<'_>) -> InvariantResult {
    InvariantResult::from("served-nars-match", ev.served.to_vec())
}

fn nix_client(ev: &Evidence<'_>) -> InvariantResult {
    match ev.nix {
        Some(p) => InvariantResult::from("nix-copies-and-verifies-the-roots", p.to_vec()),
        None => InvariantResult::from("nix-copies-and-verifies-the-roots", vec![]),
    }
}

fn submissions_kept(ev: &Evidence<'_>) -> InvariantResult {
    let mut bad = Vec::new();
    for (id, drv) in ev.acknowledged {
        match ev.dump.builds.get(id) {
            Some(b) if &b.drv_path == drv => {}
            Some(b) => bad.push(format!(
                "acknowledged build {id} of {drv} is now a build of {}",
                b.drv_path
            )),
            None => bad.push(format!(
                "acknowledged build {id} ({}) is not in the state",
                name_of(ev, drv)
            )),
        }
    }
    let acked: BTreeSet<&str> = ev.acknowledged.iter().map(|(_, d)| d.as_str()).collect();
    for d in &ev.graph.drvs {
        if !acked.contains(d.drv_path.as_str()) {
            bad.push(format!("{} was never acknowledged as submitted", d.name));
        }
    }
    InvariantResult::from("no-acknowledged-submission-lost", bad)
}

fn no_stale_report_accepted(
    ev: &Evidence<'_>,
    builds: &BTreeMap<u64, Vec<&Event>>,
) -> InvariantResult {
    let mut bad = Vec::new();
    for (id, es) in builds {
        let mut alloc: Option<(u32, u64)> = None;
        for e in es {
            match e.kind.as_str() {
                "build-allocated" => alloc = e.attempt().map(|a| (a, e.agent())),
                "build-started" | "build-succeeded" | "build-failed" => {
                    let report = (e.attempt().unwrap_or(0), e.agent());
                    if alloc != Some(report) {
                        bad.push(format!(
                            "build {id}: {} names attempt {} by {}, but the last allocation was {:?}",
                            e.kind,
                            report.0,
                            agent_name(ev, report.1),
                            alloc.map(|(a, g)| format!("attempt {a} to {}", agent_name(ev, g)))
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    // From the proxies: a report the coordinator accepted although a later attempt had been
    // allocated before the report even arrived.
    for e in ev.exchanges {
        let report = matches!(
            e.route,
            Route::Start | Route::Upload | Route::Log | Route::Result
        );
        if !report || !e.accepted() {
            continue;
        }
        let (Some(b), Some(a)) = (e.build, e.attempt) else {
            continue;
        };
        let newer = builds.get(&b).and_then(|es| {
            es.iter().find(|x| {
                x.kind == "build-allocated"
                    && x.attempt().is_some_and(|xa| xa > a)
                    && x.time_ms < e.t_ms
            })
        });
        if let Some(x) = newer {
            bad.push(format!(
                "{} {:?} of build {b} attempt {a} was answered {:?}, though attempt {:?} had been allocated {} ms before it arrived",
                e.agent,
                e.route,
                e.status,
                x.attempt(),
                e.t_ms - x.time_ms
            ));
        }
        if e.route == Route::Result && e.duplicate == Some(false) {
            let id = ev.agent_ids.get(&e.agent).copied();
            let term = builds
                .get(&b)
                .and_then(|es| es.iter().find(|x| x.is_terminal()).copied());
            match term {
                Some(t) if t.attempt() == Some(a) && Some(t.agent()) == id => {}
                other => bad.push(format!(
                    "{}'s result for build {b} attempt {a} was accepted, but the build's end is {:?}",
                    e.agent,
                    other.map(|t| format!("{} attempt {:?} by {}", t.kind, t.attempt(), agent_name(ev, t.agent())))
                )),
            }
        }
    }
    InvariantResult::from("no-stale-report-accepted", bad)
}

fn hooks_processed(ev: &Evidence<'_>) -> InvariantResult {
    let mut bad = Vec::new();
    let mut missing = Vec::new();
    for e in &ev.dump.events {
        if HOOKED_KINDS.contains(&e.kind.as_str()) && !ev.hook_runs.contains_key(&e.seq) {
            missing.push(format!("{} ({})", e.seq, e.kind));
        }
    }
    if !missing.is_empty() {
        bad.push(format!(
            "{} events never ran the hook: {}",
            missing.len(),
            missing
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !ev.dump.hook_work.is_empty() {
        bad.push(format!(
            "{} hook runs still pending after the run: {:?}",
            ev.dump.hook_work.len(),
            ev.dump.hook_work.iter().take(10).collect::<Vec<_>>()
        ));
    }
    if !ev.dump.hook_dead.is_empty() {
        bad.push(format!(
            "{} hook runs gave up (dead letters): {:?}",
            ev.dump.hook_dead.len(),
            ev.dump.hook_dead.iter().take(10).collect::<Vec<_>>()
        ));
    }
    InvariantResult::from("every-hook-event-processed", bad)
}

fn processes_stayed_up(ev: &Evidence<'_>) -> InvariantResult {
    InvariantResult::from("no-process-died-unasked", ev.crashes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::BuildRow;
    use crate::proxy::FaultDone;
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
        let by: BTreeMap<&str, &InvariantResult> =
            inv.iter().map(|i| (i.name.as_str(), i)).collect();
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
}
