//! What the load generator measures and prints: latency percentiles of each kind of request,
//! the coordinator's flushes and commits from its `/metrics`, and its CPU time from
//! `/proc/PID/stat` (user + system, children excluded: the coordinator runs hooks as children
//! only when hooks are configured, and the benchmarks configure none).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

/// Latencies of one kind of request.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<Duration>);

/// Percentiles of a [`Latencies`], in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Nearest-rank percentiles; all zero when nothing was recorded.
    pub fn summary(&self) -> LatencySummary {
        let mut v = self.0.clone();
        v.sort_unstable();
        let at = |q: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            ms(v[rank - 1])
        };
        LatencySummary {
            count: v.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: v.last().map(|d| ms(*d)).unwrap_or(0.0),
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The coordinator's commit counters, from its `/metrics` (agent listener).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommitCounters {
    /// Group commits that succeeded: each is one flush of the state database
    /// (`kiln_commits_total{result="ok"}`).
    pub flushes: f64,
    /// Writes folded into those group commits (`kiln_commit_batch_size_sum`): one per request
    /// that changed durable state.
    pub commits: f64,
}

/// Parse the Prometheus text of `/metrics`.
pub fn parse_metrics(text: &str) -> CommitCounters {
    let mut c = CommitCounters::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        if name.starts_with("kiln_commits_total{") && name.contains("result=\"ok\"") {
            c.flushes += v;
        } else if name == "kiln_commit_batch_size_sum" {
            c.commits += v;
        }
    }
    c
}

/// Read `/metrics` from the agent listener at `agent_url`.
pub fn scrape(agent_url: &str) -> anyhow::Result<CommitCounters> {
    let url = format!("{}/metrics", agent_url.trim_end_matches('/'));
    let text = ureq::get(&url)
        .timeout(Duration::from_secs(10))
        .call()
        .with_context(|| format!("failed to read {url}"))?
        .into_string()
        .with_context(|| format!("failed to read the body of {url}"))?;
    Ok(parse_metrics(&text))
}

/// CPU time (user + system, children excluded) of process `pid` so far, in ms.
pub fn cpu_ms(pid: i32) -> anyhow::Result<f64> {
    cpu_with_children_ms(pid).map(|(own, _)| own)
}

/// CPU time (user + system) of process `pid` so far, in ms: its own, and that of its
/// children it reaped (fields 14+15 and 16+17 of `/proc/PID/stat`).
pub fn cpu_with_children_ms(pid: i32) -> anyhow::Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("failed to read {path}: is process {pid} running?"))?;
    // The command name (field 2) is in parentheses and may hold spaces: fields after the last
    // ')' start with field 3 (state).
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path} has no ')': {text:?}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<f64> {
        f.get(i - 3)
            .and_then(|s| s.parse::<f64>().ok())
            .with_context(|| format!("{path} has no number in field {i}: {text:?}"))
    };
    // SAFETY: sysconf takes a constant and returns a number (-1 on error, handled).
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((
        (field(14)? + field(15)?) * 1000.0 / hz,
        (field(16)? + field(17)?) * 1000.0 / hz,
    ))
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), or "" when unreadable.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The coordinator as the load generator watches it: optional pid (CPU) and agent URL
/// (`/metrics`).
#[derive(Debug, Clone, Default)]
pub struct Watch {
    pub pid: Option<i32>,
    pub metrics_url: Option<String>,
}

/// A reading of [`Watch`] at one instant.
#[derive(Debug, Clone)]
pub struct Reading {
    at: Instant,
    cpu_ms: Option<f64>,
    counters: Option<CommitCounters>,
}

/// The coordinator's share of a measured interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CoordinatorFigures {
    /// CPU ms (user + system) the coordinator used in the interval; null without a pid.
    pub cpu_ms: Option<f64>,
    /// Divided by the builds of the interval.
    pub cpu_ms_per_build: Option<f64>,
    pub flushes: Option<f64>,
    pub flushes_per_s: Option<f64>,
    pub commits: Option<f64>,
    pub commits_per_s: Option<f64>,
    /// Writes per flush (how well group commit folds them).
    pub commits_per_flush: Option<f64>,
}

impl Watch {
    /// Read the CPU time and counters now. A reading that fails is logged and left out.
    pub fn read(&self) -> Reading {
        let cpu_ms = self.pid.and_then(|p| match cpu_ms(p) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "no coordinator cpu reading");
                None
            }
        });
        let counters = self.metrics_url.as_deref().and_then(|u| match scrape(u) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "no coordinator metrics reading");
                None
            }
        });
        Reading {
            at: Instant::now(),
            cpu_ms,
            counters,
        }
    }
}

impl Reading {
    /// The coordinator's figures between `self` (start) and `end`, for `builds` builds.
    pub fn until(&self, end: &Reading, builds: u64) -> CoordinatorFigures {
        let secs = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let per_build = |v: f64| (builds > 0).then(|| round3(v / builds as f64));
        let cpu = self.cpu_ms.zip(end.cpu_ms).map(|(a, b)| b - a);
        let counters = self.counters.zip(end.counters);
        let flushes = counters.map(|(a, b)| b.flushes - a.flushes);
        let commits = counters.map(|(a, b)| b.commits - a.commits);
        CoordinatorFigures {
            cpu_ms: cpu.map(round3),
            cpu_ms_per_build: cpu.and_then(per_build),
            flushes,
            flushes_per_s: flushes.map(|f| round3(f / secs)),
            commits,
            commits_per_s: commits.map(|c| round3(c / secs)),
            commits_per_flush: flushes
                .zip(commits)
                .and_then(|(f, c)| (f > 0.0).then(|| round3(c / f))),
        }
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut l = Latencies::default();
        for i in 1..=100u64 {
            l.push(Duration::from_millis(i));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p90_ms, 90.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(Latencies::default().summary().max_ms, 0.0);
    }

    #[test]
    fn metrics_text_gives_flushes_and_commits() {
        let text = "# TYPE kiln_commits_total counter\n\
                    kiln_commits_total{result=\"ok\"} 42\n\
                    kiln_commits_total{result=\"overloaded\"} 3\n\
                    kiln_commit_batch_size_sum 120\n\
                    kiln_commit_batch_size_count 42\n";
        assert_eq!(
            parse_metrics(text),
            CommitCounters {
                flushes: 42.0,
                commits: 120.0
            }
        );
    }

    #[test]
    fn own_cpu_time_is_read() {
        let pid = std::process::id() as i32;
        let before = cpu_ms(pid).unwrap();
        let mut x = 0u64;
        let t = Instant::now();
        // Bounded spin: burn some CPU so the counter moves (it counts in 10 ms ticks).
        while t.elapsed() < Duration::from_millis(100) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(cpu_ms(pid).unwrap() >= before);
        assert!(cpu_ms(i32::MAX).is_err());
    }
}
