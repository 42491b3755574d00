//! The report's counters that come from the evidence: faults the proxies injected (by kind),
//! how Kiln recovered (reallocations, lease expiries, re-adoptions, resumed uploads, stale
//! reports refused, builder runs), and the lost-agent timings.

use std::collections::BTreeMap;

use crate::check::{by_build, holder_at, Evidence};
use crate::evidence::Event;
use crate::proxy::{Action, Exchange, FaultSource, Phase, Route};
use crate::report::Timing;

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
    let backoffs = ev
        .dump
        .events
        .iter()
        .filter(|e| e.kind == "lease-expired" && retry_backoff_ms(e) > 0)
        .count();
    m.insert("retry_backoffs".to_string(), backoffs as u64);
    let (readopted, replayed) = readoptions(&builds);
    m.insert("readoptions".to_string(), readopted);
    m.insert("work_requests_replayed".to_string(), replayed);
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

/// Re-adoptions: a build whose lease expired and that the same agent then carried on at the
/// same attempt without a new allocation, whether the coordinator wrote an event for it
/// (`lease-readopted`, or any kind naming a re-adoption) or only the agent's later reports at
/// that attempt show it. A re-adoption of a retried work request (reason `work request
/// retried`) is the idempotent work request, counted as `work_requests_replayed` instead.
/// Returns (re-adoptions, replayed work requests).
fn readoptions(builds: &BTreeMap<u64, Vec<&Event>>) -> (u64, u64) {
    let (mut n, mut replayed) = (0, 0);
    for es in builds.values() {
        let mut expired: Option<(u32, u64)> = None;
        for e in es {
            let kind = e.kind.as_str();
            if kind.contains("adopt") {
                let reason = e.data.get("reason").and_then(|r| r.as_str());
                if reason == Some("work request retried") {
                    replayed += 1;
                } else {
                    n += 1;
                    expired = None;
                }
                continue;
            }
            match kind {
                "lease-expired" => expired = e.attempt().map(|a| (a, e.agent())),
                "build-allocated" => expired = None,
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
    (n, replayed)
}

/// The retry backoff a `lease-expired` event set: how long after it the build is not offered
/// (its `defer_until_ms`), 0 for none.
fn retry_backoff_ms(e: &Event) -> u64 {
    e.data
        .get("defer_until_ms")
        .and_then(serde_json::Value::as_u64)
        .map_or(0, |until| until.saturating_sub(e.time_ms))
}

/// Lost-agent timings: to each reallocation of its builds (less any retry backoff), and to
/// the `agent-lost` event.
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
                // A build lost more than once waits out its retry backoff on purpose
                // (docs/runtime-semantics.md, "Retries and deferral"): the figure is about
                // detection and reallocation, so that wait is left out (`retry_backoffs`
                // counts the leases that had one).
                let backoff = es
                    .iter()
                    .find(|e| {
                        e.kind == "lease-expired"
                            && e.attempt() == Some(attempt)
                            && e.time_ms >= loss.t_ms
                    })
                    .map_or(0, |e| retry_backoff_ms(e));
                realloc.push((next.time_ms - loss.t_ms).saturating_sub(backoff));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(seq: u64, kind: &str, build: u64, attempt: u32, agent: u64, reason: &str) -> Event {
        Event {
            seq,
            time_ms: seq * 10,
            kind: kind.to_string(),
            build_id: build,
            agent_id: agent,
            data: json!({"build_id": build, "attempt": attempt, "agent_id": agent, "reason": reason}),
        }
    }

    /// A lease expired with a retry backoff: the backoff is read from the event, and an
    /// expiry without one reads 0.
    #[test]
    fn the_retry_backoff_is_read_from_the_lease_expired_event() {
        let mut e = ev(10, "lease-expired", 1, 2, 3, "agent lost");
        assert_eq!(retry_backoff_ms(&e), 0);
        e.data["defer_until_ms"] = json!(e.time_ms + 1000);
        assert_eq!(retry_backoff_ms(&e), 1000);
        e.data["defer_until_ms"] = json!(0);
        assert_eq!(retry_backoff_ms(&e), 0);
    }

    /// Pins down that a `lease-readopted` event and the reports after it count one
    /// re-adoption, not two, and that a replayed work request is not a re-adoption.
    #[test]
    fn a_readoption_counts_once_whatever_shows_it() {
        let events = vec![
            ev(1, "build-allocated", 1, 1, 2, ""),
            ev(2, "lease-expired", 1, 1, 2, "agent lost"),
            ev(3, "lease-readopted", 1, 1, 2, "agent still runs it"),
            ev(4, "build-succeeded", 1, 1, 2, ""),
            // Only the reports show it (a coordinator without the event).
            ev(5, "build-allocated", 2, 1, 3, ""),
            ev(6, "lease-expired", 2, 1, 3, "agent lost"),
            ev(7, "build-succeeded", 2, 1, 3, ""),
            // A retried work request answered with the same lease.
            ev(8, "build-allocated", 3, 1, 2, ""),
            ev(9, "lease-readopted", 3, 1, 2, "work request retried"),
            // Expired and given to another agent: no re-adoption.
            ev(10, "build-allocated", 4, 1, 2, ""),
            ev(11, "lease-expired", 4, 1, 2, "agent lost"),
            ev(12, "build-allocated", 4, 2, 3, ""),
            ev(13, "build-succeeded", 4, 2, 3, ""),
        ];
        let builds = by_build(&events);
        assert_eq!(readoptions(&builds), (2, 1));
    }
}
