//! A run's report: what was injected, how Kiln recovered, which invariants held, whether the
//! scenario's coverage minimums were met. Written as `report.json` and `report.txt` in the run
//! directory; the text is also printed. The fields are documented in `docs/chaos.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Build outcomes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BuildCounts {
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Builds whose builder fails on purpose.
    pub expected_failures: usize,
    pub not_terminal: usize,
}

/// A distribution of durations in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timing {
    pub samples: Vec<u64>,
    pub min: Option<u64>,
    pub median: Option<u64>,
    pub max: Option<u64>,
    /// What the figure should stay under (agent timeout + 1 s), when there is a target.
    pub target_ms: Option<u64>,
}

impl Timing {
    pub fn new(mut samples: Vec<u64>, target_ms: Option<u64>) -> Timing {
        samples.sort_unstable();
        Timing {
            min: samples.first().copied(),
            median: samples.get(samples.len() / 2).copied(),
            max: samples.last().copied(),
            samples,
            target_ms,
        }
    }

    fn line(&self) -> String {
        match (self.min, self.median, self.max) {
            (Some(a), Some(m), Some(b)) => {
                let target = self
                    .target_ms
                    .map(|t| format!(", target <= {t} ms"))
                    .unwrap_or_default();
                format!(
                    "{} samples, min {a} ms, median {m} ms, max {b} ms{target}",
                    self.samples.len()
                )
            }
            _ => "no samples".to_string(),
        }
    }
}

/// One coverage minimum and what the run reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoverageLine {
    pub counter: String,
    pub minimum: u64,
    pub seen: u64,
    pub met: bool,
}

/// One invariant and the evidence against it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvariantResult {
    pub name: String,
    pub held: bool,
    /// What broke it (the first few cases), empty when it held.
    pub details: Vec<String>,
}

impl InvariantResult {
    /// At most this many details are kept per invariant (the count says how many there were).
    const MAX_DETAILS: usize = 12;

    pub fn from(name: &str, mut details: Vec<String>) -> InvariantResult {
        let n = details.len();
        if n > Self::MAX_DETAILS {
            details.truncate(Self::MAX_DETAILS);
            details.push(format!("... and {} more", n - Self::MAX_DETAILS));
        }
        InvariantResult {
            name: name.to_string(),
            held: n == 0,
            details,
        }
    }
}

/// The report of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    /// The agents' links and both listeners ran over TLS (the proxies terminating it).
    #[serde(default)]
    pub tls: bool,
    /// Every invariant held and every coverage minimum was met.
    pub passed: bool,
    /// Seconds from the first submission until every build was done (or the time bound).
    pub build_phase_s: f64,
    /// Seconds of the whole run, checks included.
    pub total_s: f64,
    pub work_dir: String,
    pub builds: BuildCounts,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// How Kiln recovered: retries, reallocations, re-adoptions, resumed uploads, ...
    pub recovery: BTreeMap<String, u64>,
    /// From losing an agent (kill or window start) to each of its builds allocated again.
    pub lost_agent_to_reallocation_ms: Timing,
    /// From losing an agent to the coordinator's `agent-lost` event.
    pub lost_agent_detection_ms: Timing,
    pub coverage: Vec<CoverageLine>,
    pub invariants: Vec<InvariantResult>,
    /// How to run it again.
    pub reproduce: String,
}

impl Report {
    /// A counter from `faults` or `recovery`.
    pub fn counter(&self, name: &str) -> u64 {
        self.faults
            .get(name)
            .or_else(|| self.recovery.get(name))
            .copied()
            .unwrap_or(0)
    }

    /// Fill `coverage` from the minimums and decide `passed`.
    pub fn judge(&mut self, minimums: &[(&str, u64)]) {
        self.coverage = minimums
            .iter()
            .filter(|(_, m)| *m > 0)
            .map(|(c, m)| {
                let seen = self.counter(c);
                CoverageLine {
                    counter: c.to_string(),
                    minimum: *m,
                    seen,
                    met: seen >= *m,
                }
            })
            .collect();
        self.passed = self.invariants.iter().all(|i| i.held) && self.coverage.iter().all(|c| c.met);
    }

    /// The human summary.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let tls = if self.tls { " over TLS" } else { "" };
        let _ = writeln!(
            s,
            "scenario {} seed {}{tls}: {verdict} (build phase {:.1} s, total {:.1} s)",
            self.scenario, self.seed, self.build_phase_s, self.total_s
        );
        let b = &self.builds;
        let _ = writeln!(
            s,
            "  builds: {} total, {} succeeded, {} failed ({} expected: on purpose or behind one that is), {} not terminal",
            b.total, b.succeeded, b.failed, b.expected_failures, b.not_terminal
        );
        let list = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(s, "  faults: {}", list(&self.faults));
        let _ = writeln!(s, "  recovery: {}", list(&self.recovery));
        let _ = writeln!(
            s,
            "  lost agent -> reallocation: {}",
            self.lost_agent_to_reallocation_ms.line()
        );
        let _ = writeln!(
            s,
            "  lost agent -> agent-lost event: {}",
            self.lost_agent_detection_ms.line()
        );
        for c in &self.coverage {
            let mark = if c.met { "ok" } else { "BELOW MINIMUM" };
            let _ = writeln!(
                s,
                "  coverage {}: {} of at least {} {mark}",
                c.counter, c.seen, c.minimum
            );
        }
        for i in &self.invariants {
            let mark = if i.held { "held" } else { "BROKEN" };
            let _ = writeln!(s, "  invariant {}: {mark}", i.name);
            for d in &i.details {
                for (k, line) in d.lines().enumerate() {
                    let lead = if k == 0 { "- " } else { "  " };
                    let _ = writeln!(s, "      {lead}{line}");
                }
            }
        }
        let _ = writeln!(s, "  work dir: {}", self.work_dir);
        let _ = writeln!(s, "  reproduce: {}", self.reproduce);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_below_its_coverage_fails_even_when_invariants_hold() {
        let mut r = Report {
            invariants: vec![InvariantResult::from("x", vec![])],
            ..Report::default()
        };
        r.faults.insert("resets_mid_upload".into(), 3);
        r.judge(&[("resets_mid_upload", 3), ("readoptions", 0)]);
        assert!(r.passed);
        assert_eq!(r.coverage.len(), 1, "a minimum of 0 is not listed");
        r.judge(&[("resets_mid_upload", 4)]);
        assert!(!r.passed);
        assert!(r.text().contains("BELOW MINIMUM"));
        r.invariants
            .push(InvariantResult::from("y", vec!["build 1 is stuck".into()]));
        r.judge(&[]);
        assert!(!r.passed);
        assert!(r.text().contains("invariant y: BROKEN"));
    }

    #[test]
    fn timings_summarise() {
        let t = Timing::new(vec![30, 10, 20], Some(25));
        assert_eq!((t.min, t.median, t.max), (Some(10), Some(20), Some(30)));
        assert!(t.line().contains("target <= 25 ms"));
        assert_eq!(Timing::new(vec![], None).line(), "no samples");
    }
}
