//! Scenarios: the TOML files in `chaos/scenarios/`, one run each. The format is a contract
//! (documented key by key in `docs/chaos.md`): keys may be added, never renamed or given a new
//! meaning. Every table refuses unknown keys, so a misspelt key is an error that names it.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::proxy::{Action, Phase, RouteSel, Rule};

/// One scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in reports and work-dir names.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seed of every random choice (graph, fault decisions, schedule picks). Absent: a fresh
    /// seed per run (printed). `kiln-chaos run --seed` overrides it.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Bound of the build phase in seconds: the run stops by itself (and fails if builds are
    /// left) when it is reached. The final checks take at most `CHECK_BOUND_S` more.
    pub time_bound_s: u64,
    /// Run over TLS: both coordinator listeners serve certificates `kiln tls init` made, each
    /// proxy terminates TLS from its agent and opens TLS to the coordinator, agents and the
    /// harness trust the run's CA. `kiln-chaos run --tls` turns it on for any scenario.
    #[serde(default)]
    pub tls: bool,
    pub graph: GraphSpec,
    #[serde(default)]
    pub coordinator: CoordinatorSpec,
    #[serde(default)]
    pub agents: AgentsSpec,
    #[serde(default)]
    pub proxy: ProxySpec,
    #[serde(default)]
    pub schedule: Vec<ScheduleItem>,
    #[serde(default)]
    pub coverage: Coverage,
    #[serde(default)]
    pub checks: ChecksSpec,
}

/// The derivation graph: size, shape, and what each builder does.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSpec {
    /// Number of derivations (= builds).
    pub builds: usize,
    /// Builds are spread evenly over this many layers; a build of layer k > 0 uses one build of
    /// layer k-1 and up to `max_inputs - 1` more of earlier layers.
    #[serde(default = "default_layers")]
    pub layers: usize,
    #[serde(default = "default_max_inputs")]
    pub max_inputs: usize,
    /// Builder sleep, drawn per build, in milliseconds `[min, max]`.
    #[serde(default = "default_duration")]
    pub duration_ms: [u64; 2],
    /// Output size (incompressible bytes), drawn per build, in KiB `[min, max]`.
    #[serde(default = "default_output")]
    pub output_kib: [u64; 2],
    /// Share of builds whose output size is drawn from `large_output_kib` instead.
    #[serde(default)]
    pub large_fraction: f64,
    #[serde(default = "default_large_output")]
    pub large_output_kib: [u64; 2],
    /// Builds whose builder exits 1, chosen among builds nothing depends on.
    #[serde(default)]
    pub failing: usize,
    /// Share of builds for the alternative system `kiln-chaos-alt`, which only the agents in
    /// `agents.alt_agents` build.
    #[serde(default)]
    pub alt_fraction: f64,
    /// Submit the builds (inputs first) in this many batches ...
    #[serde(default = "one")]
    pub batches: usize,
    /// ... spread evenly over this many seconds from the start.
    #[serde(default)]
    pub submit_spread_s: u64,
}

fn default_layers() -> usize {
    6
}
fn default_max_inputs() -> usize {
    3
}
fn default_duration() -> [u64; 2] {
    [100, 500]
}
fn default_output() -> [u64; 2] {
    [4, 64]
}
fn default_large_output() -> [u64; 2] {
    [256, 1024]
}
fn one() -> usize {
    1
}

/// Coordinator settings (written into its config file).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSpec {
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout_ms: u64,
    /// TOML appended verbatim to the coordinator's config (e.g. a `[timeouts]` key the
    /// coordinator gains later). Must not repeat a table the harness writes: `[timeouts]`,
    /// `[store]`, `[[hooks]]` entries may be added, `[timeouts]` keys go in `extra_timeouts`.
    #[serde(default)]
    pub extra_config: String,
    /// Extra `key = value` lines for the `[timeouts]` table.
    #[serde(default)]
    pub extra_timeouts: String,
}

fn default_heartbeat() -> u64 {
    500
}
fn default_agent_timeout() -> u64 {
    3000
}

impl Default for CoordinatorSpec {
    fn default() -> Self {
        CoordinatorSpec {
            heartbeat_ms: default_heartbeat(),
            agent_timeout_ms: default_agent_timeout(),
            extra_config: String::new(),
            extra_timeouts: String::new(),
        }
    }
}

/// The agents.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsSpec {
    pub count: usize,
    #[serde(default = "two")]
    pub max_parallel_builds: u32,
    #[serde(default = "two")]
    pub max_parallel_uploads: u32,
    /// Agents (1-based) that also build the alternative system `kiln-chaos-alt`.
    #[serde(default)]
    pub alt_agents: Vec<usize>,
    /// Agents (1-based) that build only `kiln-chaos-alt`.
    #[serde(default)]
    pub alt_only_agents: Vec<usize>,
}

fn two() -> u32 {
    2
}

impl Default for AgentsSpec {
    fn default() -> Self {
        AgentsSpec {
            count: 2,
            max_parallel_builds: 2,
            max_parallel_uploads: 2,
            alt_agents: Vec::new(),
            alt_only_agents: Vec::new(),
        }
    }
}

/// The fault-injecting proxy in front of every agent.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySpec {
    /// Delay before each request is forwarded, drawn per request, `[min, max]` ms.
    #[serde(default)]
    pub latency_ms: [u64; 2],
    /// Per connection and direction, KiB/s; 0 = unlimited.
    #[serde(default)]
    pub bandwidth_kib_s: u64,
    /// Share of connections reset after a number of bytes drawn from
    /// `connection_reset_after_bytes` (counting both directions).
    #[serde(default)]
    pub connection_reset_probability: f64,
    #[serde(default = "default_conn_reset_bytes")]
    pub connection_reset_after_bytes: [u64; 2],
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

fn default_conn_reset_bytes() -> [u64; 2] {
    [0, 262_144]
}

/// A targeted fault: on exchanges of `route`, in `phase`, with `probability`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub route: RouteSel,
    pub phase: Phase,
    #[serde(default = "reset")]
    pub action: Action,
    #[serde(default = "certain")]
    pub probability: f64,
    /// Bytes of the message (head and body) forwarded before the fault, `[min, max]`.
    #[serde(default)]
    pub after_bytes: [u64; 2],
    /// Instead: the head plus this share of the body (needs a known body length).
    #[serde(default)]
    pub after_fraction: Option<[f64; 2]>,
    /// Only work replies that carry at least this many builds.
    #[serde(default)]
    pub min_assigned: u32,
    /// Let this many matching exchanges pass first (per proxy).
    #[serde(default)]
    pub skip: u64,
    /// Fire at most this many times per proxy.
    #[serde(default)]
    pub limit: Option<u64>,
}

fn reset() -> Action {
    Action::Reset
}
fn certain() -> f64 {
    1.0
}

impl RuleSpec {
    pub fn to_rule(&self) -> Rule {
        Rule {
            route: self.route,
            phase: self.phase,
            action: self.action,
            probability: self.probability,
            after_bytes: (self.after_bytes[0], self.after_bytes[1]),
            after_fraction: self.after_fraction.map(|f| (f[0], f[1])),
            min_assigned: self.min_assigned,
            skip: self.skip,
            limit: self.limit,
        }
    }
}

/// What the schedule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleAction {
    /// A network partition as the agent sees it: a blackhole window. Connections of the chosen
    /// agents are accepted and nothing is forwarded, either way, for `duration_s`; afterwards
    /// connections that lost bytes are reset.
    Partition,
    /// An unreachable network: live connections of the chosen agents are reset, new ones are
    /// accepted and reset at once, for `duration_s`.
    Refuse,
    /// SIGKILL the chosen agents; restart them (same state dir) after `restart_after_s`.
    KillAgent,
    /// SIGKILL the coordinator once at least one build is building and one upload is in
    /// flight; restart it (same state dir and ports) after `restart_after_s`.
    KillCoordinator,
}

/// One entry of the fault schedule.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleItem {
    pub action: ScheduleAction,
    /// Seconds from the start of the run (the first submission).
    pub at_s: f64,
    /// Repeat this many times in all ...
    #[serde(default = "one")]
    pub repeat: usize,
    /// ... this many seconds apart.
    #[serde(default)]
    pub every_s: f64,
    /// Agents (1-based) it applies to ...
    #[serde(default)]
    pub agents: Vec<usize>,
    /// ... or this many agents picked at random (by the seed) at each repetition.
    #[serde(default)]
    pub random_agents: usize,
    /// Length of a partition or refuse window.
    #[serde(default)]
    pub duration_s: f64,
    /// Delay before a killed process is started again, `[min, max]` s drawn per kill;
    /// absent: not restarted (agents only; a coordinator is always restarted, after 1 s).
    #[serde(default)]
    pub restart_after_s: Option<[f64; 2]>,
    /// A `partition` or `refuse` window waits, from `at_s`, until each of these agents
    /// (1-based) holds at least one build whose result the coordinator has not yet accepted
    /// (seen in its proxy's log), so that the window is sure to strand work; it starts anyway
    /// after `hold_wait_s`. Empty: the window starts at `at_s`.
    #[serde(default)]
    pub when_holding: Vec<usize>,
    /// How many builds each agent of `when_holding` must hold (same order; missing: 1).
    #[serde(default)]
    pub hold_min: Vec<usize>,
    /// When a `partition` or `refuse` window ends, the agents' session openings and
    /// heartbeats stay held this many more seconds while their other requests go through (a
    /// control connection still in TCP retransmission backoff): their pending uploads and
    /// results reach the coordinator before a heartbeat tells them what moved on.
    #[serde(default)]
    pub control_lag_s: f64,
    /// The longest a window waits for `when_holding`.
    #[serde(default = "default_hold_wait")]
    pub hold_wait_s: f64,
}

fn default_hold_wait() -> f64 {
    20.0
}

/// Minimum counts a run must reach; a run below any of them fails (a vacuous run proves
/// nothing). Names are the report's counters (docs/chaos.md, "Coverage").
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Coverage {
    #[serde(default)]
    pub resets_mid_upload: u64,
    #[serde(default)]
    pub resets_work_reply: u64,
    #[serde(default)]
    pub resets_other: u64,
    #[serde(default)]
    pub blackholed_exchanges: u64,
    #[serde(default)]
    pub refused_connections: u64,
    #[serde(default)]
    pub resumed_uploads: u64,
    #[serde(default)]
    pub readoptions: u64,
    #[serde(default)]
    pub reallocations: u64,
    #[serde(default)]
    pub stale_reports_refused: u64,
    #[serde(default)]
    pub agent_kills: u64,
    #[serde(default)]
    pub coordinator_kills: u64,
    #[serde(default)]
    pub lease_expiries: u64,
    /// TLS runs: handshakes of agents with their proxies that resumed an earlier session.
    #[serde(default)]
    pub tls_resumed_handshakes: u64,
}

impl Coverage {
    /// (counter name, minimum) for every counter.
    pub fn minimums(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("resets_mid_upload", self.resets_mid_upload),
            ("resets_work_reply", self.resets_work_reply),
            ("resets_other", self.resets_other),
            ("blackholed_exchanges", self.blackholed_exchanges),
            ("refused_connections", self.refused_connections),
            ("resumed_uploads", self.resumed_uploads),
            ("readoptions", self.readoptions),
            ("reallocations", self.reallocations),
            ("stale_reports_refused", self.stale_reports_refused),
            ("agent_kills", self.agent_kills),
            ("coordinator_kills", self.coordinator_kills),
            ("lease_expiries", self.lease_expiries),
            ("tls_resumed_handshakes", self.tls_resumed_handshakes),
        ]
    }
}

/// Which final checks run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksSpec {
    /// Copy the closure of the graph's roots with a real Nix client and verify it.
    #[serde(default = "yes")]
    pub nix: bool,
}

fn yes() -> bool {
    true
}

impl Default for ChecksSpec {
    fn default() -> Self {
        ChecksSpec { nix: true }
    }
}

impl Scenario {
    /// Read and check a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read scenario {}", path.display()))?;
        let s: Scenario = toml::from_str(&text)
            .with_context(|| format!("scenario {} is not valid", path.display()))?;
        s.validate()
            .with_context(|| format!("scenario {} is not valid", path.display()))?;
        Ok(s)
    }

    /// The checks the types cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        let g = &self.graph;
        anyhow::ensure!(g.builds >= 1, "graph.builds must be at least 1");
        anyhow::ensure!(g.layers >= 1, "graph.layers must be at least 1");
        anyhow::ensure!(g.max_inputs >= 1, "graph.max_inputs must be at least 1");
        anyhow::ensure!(g.batches >= 1, "graph.batches must be at least 1");
        for (key, r) in [
            ("graph.duration_ms", g.duration_ms),
            ("graph.output_kib", g.output_kib),
            ("graph.large_output_kib", g.large_output_kib),
            ("proxy.latency_ms", self.proxy.latency_ms),
            (
                "proxy.connection_reset_after_bytes",
                self.proxy.connection_reset_after_bytes,
            ),
        ] {
            anyhow::ensure!(
                r[0] <= r[1],
                "{key} = {r:?}: the minimum is above the maximum"
            );
        }
        for (key, p) in [
            ("graph.large_fraction", g.large_fraction),
            ("graph.alt_fraction", g.alt_fraction),
            (
                "proxy.connection_reset_probability",
                self.proxy.connection_reset_probability,
            ),
        ] {
            anyhow::ensure!(
                (0.0..=1.0).contains(&p),
                "{key} = {p} is not a share between 0 and 1"
            );
        }
        let n = self.agents.count;
        anyhow::ensure!(n >= 1, "agents.count must be at least 1");
        let in_range = |a: &usize| (1..=n).contains(a);
        anyhow::ensure!(
            self.agents.alt_agents.iter().all(in_range)
                && self.agents.alt_only_agents.iter().all(in_range),
            "agents.alt_agents or agents.alt_only_agents names an agent outside 1..={n}"
        );
        anyhow::ensure!(
            g.alt_fraction == 0.0
                || !self.agents.alt_agents.is_empty()
                || !self.agents.alt_only_agents.is_empty(),
            "graph.alt_fraction is set but no agent builds the alternative system: set agents.alt_agents or agents.alt_only_agents"
        );
        anyhow::ensure!(
            g.alt_fraction < 1.0
                || self.agents.alt_only_agents.len() + self.agents.alt_agents.len() > 0,
            "graph.alt_fraction = 1 needs agents for the alternative system"
        );
        anyhow::ensure!(
            (1..=n).any(|a| !self.agents.alt_only_agents.contains(&a)) || g.alt_fraction >= 1.0,
            "every agent is in agents.alt_only_agents: nobody builds the common system"
        );
        anyhow::ensure!(
            self.coordinator.agent_timeout_ms >= 1000
                && self.coordinator.heartbeat_ms < self.coordinator.agent_timeout_ms,
            "coordinator.agent_timeout_ms must be at least 1000 and above heartbeat_ms"
        );
        for (i, r) in self.proxy.rules.iter().enumerate() {
            anyhow::ensure!(
                (0.0..=1.0).contains(&r.probability),
                "proxy.rules[{i}].probability = {} is not between 0 and 1",
                r.probability
            );
            anyhow::ensure!(
                r.after_bytes[0] <= r.after_bytes[1],
                "proxy.rules[{i}].after_bytes: the minimum is above the maximum"
            );
            if let Some(f) = r.after_fraction {
                anyhow::ensure!(
                    0.0 <= f[0] && f[0] <= f[1] && f[1] <= 1.0,
                    "proxy.rules[{i}].after_fraction = {f:?} must be shares with min <= max"
                );
            }
        }
        for (i, s) in self.schedule.iter().enumerate() {
            anyhow::ensure!(s.at_s >= 0.0, "schedule[{i}].at_s is negative");
            anyhow::ensure!(s.repeat >= 1, "schedule[{i}].repeat must be at least 1");
            anyhow::ensure!(
                s.agents.iter().all(in_range),
                "schedule[{i}].agents names an agent outside 1..={n}"
            );
            anyhow::ensure!(
                s.when_holding.iter().all(in_range),
                "schedule[{i}].when_holding names an agent outside 1..={n}"
            );
            anyhow::ensure!(
                s.when_holding.is_empty()
                    || matches!(s.action, ScheduleAction::Partition | ScheduleAction::Refuse),
                "schedule[{i}].when_holding applies only to partition and refuse windows"
            );
            anyhow::ensure!(
                s.hold_min.len() <= s.when_holding.len(),
                "schedule[{i}].hold_min has more entries than when_holding"
            );
            anyhow::ensure!(
                (0.0..=60.0).contains(&s.control_lag_s),
                "schedule[{i}].control_lag_s must be between 0 and 60"
            );
            anyhow::ensure!(
                s.hold_wait_s >= 0.0,
                "schedule[{i}].hold_wait_s is negative"
            );
            let needs_agents = s.action != ScheduleAction::KillCoordinator;
            anyhow::ensure!(
                !needs_agents || !s.agents.is_empty() || s.random_agents > 0,
                "schedule[{i}] ({:?}) names no agent: set agents or random_agents",
                s.action
            );
            let window = matches!(s.action, ScheduleAction::Partition | ScheduleAction::Refuse);
            anyhow::ensure!(
                !window || s.duration_s > 0.0,
                "schedule[{i}] ({:?}) needs duration_s",
                s.action
            );
            if let Some(r) = s.restart_after_s {
                anyhow::ensure!(
                    0.0 <= r[0] && r[0] <= r[1],
                    "schedule[{i}].restart_after_s = {r:?}: the minimum is above the maximum"
                );
            }
        }
        Ok(())
    }

    /// The proxy's targeted rules.
    pub fn rules(&self) -> Vec<Rule> {
        self.proxy.rules.iter().map(RuleSpec::to_rule).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap();
                n += 1;
            }
        }
        assert!(n >= 4, "only {n} scenarios in {}", dir.display());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let base = "name = \"x\"\ntime_bound_s = 10\n[graph]\nbuilds = 3\n";
        let s: Scenario = toml::from_str(base).unwrap();
        s.validate().unwrap();
        let err = toml::from_str::<Scenario>(&format!("{base}bulids = 4\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bulids"), "{err}");
        let s: Scenario = toml::from_str(&format!(
            "{base}[[schedule]]\naction = \"partition\"\nat_s = 1\nagents = [1]\n"
        ))
        .unwrap();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("duration_s"), "{err}");
        let s: Scenario = toml::from_str(&format!(
            "{base}[[schedule]]\naction = \"kill-agent\"\nat_s = 1\nagents = [9]\n"
        ))
        .unwrap();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("outside 1..=2"), "{err}");
    }
}
