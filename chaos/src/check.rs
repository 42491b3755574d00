//! The invariants of a run, checked from evidence gathered after it: the durable event log
//! and build records (`kiln state dump`), the proxies' exchange logs, the builders' stamp
//! files, the recording hook's output, the served NARs and the Nix client. The report's
//! counters from the same evidence are in [`crate::counters`].

use std::collections::{BTreeMap, BTreeSet};

use crate::evidence::{Dump, Event};
use crate::farm::HOOKED_KINDS;
use crate::graph::ChaosGraph;
use crate::proxy::{Ending, Exchange, Route};
use crate::report::InvariantResult;

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
pub(crate) fn by_build(events: &[Event]) -> BTreeMap<u64, Vec<&Event>> {
    let mut m: BTreeMap<u64, Vec<&Event>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.build_id != 0) {
        m.entry(e.build_id).or_default().push(e);
    }
    m
}

/// The (attempt, agent) holding `events`' build at `t_ms`, if any.
pub(crate) fn holder_at(events: &[&Event], t_ms: u64) -> Option<(u32, u64)> {
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

/// Every invariant, in the order of `docs/chaos.md`.
pub fn check(ev: &Evidence<'_>) -> Vec<InvariantResult> {
    let builds = by_build(&ev.dump.events);
    let doomed = ev.graph.doomed();
    vec![
        all_terminal(ev),
        none_allocated(ev),
        failed_only_where_builder_fails(ev, &doomed),
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

/// Every build ends terminal, including those behind a failing builder (they fail with
/// their input, see `failed_only_where_builder_fails`).
fn all_terminal(ev: &Evidence<'_>) -> InvariantResult {
    let mut bad = Vec::new();
    for b in ev.dump.builds.values() {
        let terminal = matches!(b.state.as_str(), "succeeded" | "failed" | "canceled");
        if !terminal {
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

/// A build fails only where its builder fails, or (reason `input build N failed`, never run)
/// behind an input whose builder fails.
fn failed_only_where_builder_fails(ev: &Evidence<'_>, doomed: &[bool]) -> InvariantResult {
    let mut bad = Vec::new();
    for b in ev.dump.builds.values() {
        let Some(d) = ev.graph.by_drv(&b.drv_path) else {
            continue;
        };
        let behind_failed_input = doomed[d.index]
            && b.attempt == 0
            && b.reason.starts_with("input build ")
            && b.reason.ends_with(" failed");
        if b.state == "failed" && !d.fails && !behind_failed_input {
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
mod tests;
