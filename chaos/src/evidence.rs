//! What a run leaves behind, read back for the checker: the coordinator's state through
//! `kiln state dump` (taken after the coordinator stopped, so it is exactly what sled holds),
//! the recording hook's output, and Prometheus text scraped from the agents.
//!
//! The dump is read as JSON values, field by field, so records that gain fields in later
//! versions still parse.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use serde_json::Value;

/// One event of the durable log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    pub kind: String,
    /// 0 = none.
    pub build_id: u64,
    /// 0 = none.
    pub agent_id: u64,
    pub data: Value,
}

impl Event {
    /// `attempt` of the event's data, when it has one.
    pub fn attempt(&self) -> Option<u32> {
        self.data
            .get("attempt")
            .and_then(Value::as_u64)
            .map(|a| a as u32)
    }

    /// The agent the data names (`agent_id` of the data, else of the record).
    pub fn agent(&self) -> u64 {
        self.data
            .get("agent_id")
            .and_then(Value::as_u64)
            .unwrap_or(self.agent_id)
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "build-succeeded" | "build-failed" | "build-canceled"
        )
    }
}

/// A build record.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRow {
    pub id: u64,
    pub drv_path: String,
    pub state: String,
    pub attempt: u32,
    pub agent_id: u64,
    pub reason: String,
}

/// An available path (`outputs` tree).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRow {
    pub path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    pub file_hash: String,
    pub file_size: u64,
    pub build_id: u64,
}

/// The coordinator's state, as `kiln state dump` prints it.
#[derive(Debug, Default)]
pub struct Dump {
    pub builds: BTreeMap<u64, BuildRow>,
    /// In sequence order.
    pub events: Vec<Event>,
    /// By full store path.
    pub outputs: BTreeMap<String, OutputRow>,
    /// Agent id -> name.
    pub agents: BTreeMap<u64, String>,
    /// Keys (`hook/seq`) of pending and dead hook work.
    pub hook_work: Vec<String>,
    pub hook_dead: Vec<String>,
}

/// Run `kiln state dump` on a stopped coordinator's state dir.
pub fn state_dump(kiln: &Path, state_dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(kiln)
        .args(["state", "dump", "--state-dir"])
        .arg(state_dir)
        .output()
        .with_context(|| format!("failed to run {} state dump", kiln.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "kiln state dump --state-dir {} failed ({}): {}",
        state_dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).context("kiln state dump printed bytes that are not UTF-8")
}

fn field_u64(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// A build state as the dump writes it: the stored code (`state_code` in
/// `src/store/records.rs`), or a name.
fn state_name(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(1) => "blocked",
            Some(2) => "runnable",
            Some(3) => "allocated",
            Some(4) => "building",
            Some(5) => "uploading",
            Some(6) => "succeeded",
            Some(7) => "failed",
            Some(8) => "canceled",
            _ => "unknown",
        }
        .to_string(),
        Some(Value::String(s)) => s.clone(),
        _ => "unknown".to_string(),
    }
}

fn field_str(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Parse the dump's `<tree> <key> <value>` lines.
pub fn parse_dump(text: &str) -> anyhow::Result<Dump> {
    let mut d = Dump::default();
    for (n, line) in text.lines().enumerate() {
        let mut it = line.splitn(3, ' ');
        let (Some(tree), Some(key), Some(value)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let json = || -> anyhow::Result<Value> {
            serde_json::from_str(value)
                .with_context(|| format!("dump line {}: {tree} {key}: not JSON", n + 1))
        };
        match tree {
            "builds" => {
                let v = json()?;
                let id = field_u64(&v, "id");
                d.builds.insert(
                    id,
                    BuildRow {
                        id,
                        drv_path: field_str(&v, "drv_path"),
                        state: state_name(v.get("state")),
                        attempt: field_u64(&v, "attempt") as u32,
                        agent_id: field_u64(&v, "agent_id"),
                        reason: field_str(&v, "reason"),
                    },
                );
            }
            "events" => {
                let v = json()?;
                let payload = field_str(&v, "payload");
                d.events.push(Event {
                    seq: field_u64(&v, "seq"),
                    time_ms: field_u64(&v, "time_ms"),
                    kind: field_str(&v, "kind"),
                    build_id: field_u64(&v, "build_id"),
                    agent_id: field_u64(&v, "agent_id"),
                    data: serde_json::from_str(&payload).unwrap_or(Value::Null),
                });
            }
            "outputs" => {
                let v = json()?;
                let path = field_str(&v, "path");
                d.outputs.insert(
                    path.clone(),
                    OutputRow {
                        path,
                        nar_hash: field_str(&v, "nar_hash"),
                        nar_size: field_u64(&v, "nar_size"),
                        file_hash: field_str(&v, "file_hash"),
                        file_size: field_u64(&v, "file_size"),
                        build_id: field_u64(&v, "build_id"),
                    },
                );
            }
            "agents" => {
                let v = json()?;
                d.agents.insert(field_u64(&v, "id"), field_str(&v, "name"));
            }
            "hook_work" => d.hook_work.push(key.to_string()),
            "hook_dead" => d.hook_dead.push(key.to_string()),
            _ => {}
        }
    }
    d.events.sort_by_key(|e| e.seq);
    Ok(d)
}

/// Event ids the recording hook wrote (`<id> <kind>` per line), with how many times each.
pub fn hook_runs(file: &Path) -> BTreeMap<u64, u32> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut runs = BTreeMap::new();
    for line in text.lines() {
        if let Some(id) = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
        {
            *runs.entry(id).or_insert(0) += 1;
        }
    }
    runs
}

/// The sum of every sample of `metric` in Prometheus text (all label sets).
pub fn metric_sum(text: &str, metric: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Build ids of the events of each kind, for quick lookups.
pub fn builds_with(events: &[Event], kind: &str) -> BTreeSet<u64> {
    events
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.build_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_lines_parse() {
        let text = r#"builds 1 {"id":1,"drv_path":"/s/a.drv","system":"x","priority":0,"tags":[],"state":6,"attempt":2,"agent_id":3,"outputs":[],"needs":[],"created_ms":1,"allocated_ms":2,"started_ms":3,"finished_ms":4,"reason":"","log_attempt":2}
derivations /s/a.drv {"size":3,"sha256":"x"}
events 2 {"seq":2,"time_ms":99,"kind":"build-allocated","build_id":1,"agent_id":3,"payload":"{\"agent_id\":3,\"attempt\":2,\"build_id\":1}"}
events 1 {"seq":1,"time_ms":98,"kind":"build-submitted","build_id":1,"agent_id":0,"payload":"{}"}
hook_work chaos-record/7 {"attempts":1,"next_attempt_ms":0,"last_error":""}
agents 3 {"id":3,"name":"agent-1","salt":[],"secret_hash":[],"systems":[],"created_ms":0}
"#;
        let d = parse_dump(text).unwrap();
        assert_eq!(d.builds[&1].state, "succeeded");
        assert_eq!(d.builds[&1].attempt, 2);
        assert_eq!(d.events[0].seq, 1);
        assert_eq!(d.events[1].attempt(), Some(2));
        assert_eq!(d.events[1].agent(), 3);
        assert_eq!(d.hook_work, vec!["chaos-record/7"]);
        assert_eq!(d.agents[&3], "agent-1");
    }

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP x y\nkiln_agent_retries_total 4\nkiln_hook_pending{hook=\"a\"} 2\nkiln_hook_pending{hook=\"b\"} 1\nkiln_agent_retries_total_other 9\n";
        assert_eq!(metric_sum(text, "kiln_agent_retries_total"), Some(4.0));
        assert_eq!(metric_sum(text, "kiln_hook_pending"), Some(3.0));
        assert_eq!(metric_sum(text, "missing"), None);
    }
}
