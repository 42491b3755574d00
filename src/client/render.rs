//! Human output of the client commands: build lines, tables and the detail of one build.
//!
//! Kept apart from the commands so it can be tested on values, without a coordinator. Times
//! are printed in UTC (`2026-04-14 09:12:03.481 UTC`) without a time-zone database.

use std::io::Write;

use anyhow::Context as _;

use crate::protocol::{AgentInfo, BuildDetail, BuildSummary, TokenInfo};

/// One line per build: id, state, drv path (what `kiln submit` and `kiln build cancel` print).
pub fn summary_line(out: &mut dyn Write, b: &BuildSummary) -> anyhow::Result<()> {
    let existing = if b.existing {
        "  (already submitted)"
    } else {
        ""
    };
    writeln!(
        out,
        "{:<6} {:<10} {}{existing}",
        b.id,
        b.state.as_str(),
        b.drv_path
    )
    .context("failed to write to stdout")
}

/// The table of `kiln builds`.
pub fn builds_table(out: &mut dyn Write, builds: &[BuildSummary]) -> anyhow::Result<()> {
    if builds.is_empty() {
        writeln!(out, "no builds").context("failed to write to stdout")?;
        return Ok(());
    }
    let sys_w = builds
        .iter()
        .map(|b| b.system.len())
        .max()
        .unwrap_or(0)
        .max(6);
    writeln!(
        out,
        "{:<6} {:<10} {:>5} {:<sys_w$} DRV",
        "ID", "STATE", "PRIO", "SYSTEM"
    )
    .context("failed to write to stdout")?;
    for b in builds {
        writeln!(
            out,
            "{:<6} {:<10} {:>5} {:<sys_w$} {}",
            b.id,
            b.state.as_str(),
            b.priority,
            b.system,
            b.drv_path
        )
        .context("failed to write to stdout")?;
    }
    Ok(())
}

/// The table of `kiln agents`.
pub fn agents_table(out: &mut dyn Write, agents: &[AgentInfo], now_ms: u64) -> anyhow::Result<()> {
    if agents.is_empty() {
        writeln!(
            out,
            "no agents (register one with `kiln agent new NAME --system S`)"
        )
        .context("failed to write to stdout")?;
        return Ok(());
    }
    let name_w = agents
        .iter()
        .map(|a| a.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    writeln!(
        out,
        "{:<4} {:<name_w$} {:<10} {:<24} {:>10} {:<20} BUILDS",
        "ID", "NAME", "STATUS", "CONTROL", "SEEN", "SYSTEMS"
    )
    .context("failed to write to stdout")?;
    for a in agents {
        let seen = match a.last_seen_ms_ago {
            Some(ms) => format!("{:.1} s ago", ms as f64 / 1000.0),
            None => "-".to_string(),
        };
        let builds: Vec<String> = a.builds.iter().map(|b| b.to_string()).collect();
        writeln!(
            out,
            "{:<4} {:<name_w$} {:<10} {:<24} {:>10} {:<20} {}",
            a.id,
            a.name,
            a.status,
            control_text(a, now_ms),
            seen,
            a.systems.join(","),
            if builds.is_empty() {
                "-".to_string()
            } else {
                builds.join(",")
            }
        )
        .context("failed to write to stdout")?;
    }
    Ok(())
}

/// An agent's control as a person reads it: `paused`, `drained`, `quarantined 59 s` (the time
/// left), ...
pub fn control_text(a: &AgentInfo, now_ms: u64) -> String {
    match a.quarantined_until_ms {
        Some(until) => {
            let left = until.saturating_sub(now_ms).div_ceil(1000);
            if a.control == "active" {
                format!("quarantined {left} s")
            } else {
                format!("{},quarantined {left} s", a.control)
            }
        }
        None => a.control.clone(),
    }
}

/// `kiln build show`: everything about one build, and for a blocked build what it waits for.
pub fn build_detail(out: &mut dyn Write, d: &BuildDetail, now_ms: u64) -> anyhow::Result<()> {
    let mut text = String::new();
    let s = &d.summary;
    text.push_str(&format!("build {}: {}\n", s.id, s.state));
    text.push_str(&format!("  drv:       {}\n", s.drv_path));
    text.push_str(&format!("  system:    {}\n", s.system));
    text.push_str(&format!("  priority:  {}\n", s.priority));
    let agent = d.agent.as_deref().unwrap_or("-");
    text.push_str(&format!("  agent:     {agent} (attempt {})\n", d.attempt));
    text.push_str(&format!(
        "  created:   {} ({} ago)\n",
        utc(d.created_ms),
        seconds(now_ms.saturating_sub(d.created_ms))
    ));
    if let Some(t) = d.started_ms {
        text.push_str(&format!(
            "  started:   {} (waited {})\n",
            utc(t),
            seconds(t.saturating_sub(d.created_ms))
        ));
    }
    if let Some(t) = d.finished_ms {
        let took = d
            .started_ms
            .map(|st| format!(" (took {})", seconds(t.saturating_sub(st))));
        text.push_str(&format!(
            "  finished:  {}{}\n",
            utc(t),
            took.unwrap_or_default()
        ));
    }
    if !d.tags.is_empty() {
        let tags: Vec<String> = d.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        text.push_str(&format!("  tags:      {}\n", tags.join(" ")));
    }
    if !d.outputs.is_empty() {
        text.push_str("  outputs:\n");
        let w = d.outputs.iter().map(|o| o.name.len()).max().unwrap_or(0);
        for o in &d.outputs {
            text.push_str(&format!("    {:<w$}  {}\n", o.name, o.path));
        }
    }
    if d.retries > 0 || d.builder_retries > 0 {
        text.push_str(&format!(
            "  retries:   {} infrastructure, {} builder\n",
            d.retries, d.builder_retries
        ));
    }
    if let Some(t) = d.defer_until_ms {
        let when = if t > now_ms {
            format!("in {}", seconds(t - now_ms))
        } else {
            "over".to_string()
        };
        text.push_str(&format!("  deferred:  until {} ({when})\n", utc(t)));
    }
    if let Some(reason) = &d.reason {
        text.push_str(&format!("  reason:    {reason}\n"));
    }
    for m in &d.waiting_for {
        text.push_str(&format!("  waiting for {}: {}\n", m.path, waiting_note(m)));
    }
    if d.has_log {
        text.push_str(&format!("  log:       kiln build log {}\n", s.id));
    }
    out.write_all(text.as_bytes())
        .context("failed to write to stdout")
}

fn waiting_note(m: &crate::protocol::MissingInput) -> String {
    let head = match (m.build, m.build_state) {
        (Some(id), Some(state)) => format!("build {id} {state}"),
        (Some(id), None) => format!("build {id}"),
        (None, _) => "no build produces it".to_string(),
    };
    if m.note.is_empty() || m.note == head {
        head
    } else {
        format!("{head} ({})", m.note)
    }
}

/// The table of `kiln token list`: id, scope, created, last used, name (never a token).
/// "Last used" is since the coordinator started (`-`: not since then).
pub fn tokens_table(out: &mut dyn Write, tokens: &[TokenInfo], now_ms: u64) -> anyhow::Result<()> {
    if tokens.is_empty() {
        writeln!(
            out,
            "no client tokens (the client API serves loopback connections only): make one with `kiln token new --scope admin`"
        )
        .context("failed to write to stdout")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<12}  {:<6}  {:<27}  {:<14}  NAME",
        "ID", "SCOPE", "CREATED", "LAST USED"
    )
    .context("failed to write to stdout")?;
    for t in tokens {
        let used = match t.last_used_ms {
            Some(ms) => format!("{} ago", seconds(now_ms.saturating_sub(ms))),
            None => "-".to_string(),
        };
        writeln!(
            out,
            "{:<12}  {:<6}  {:<27}  {:<14}  {}",
            t.id,
            t.scope.as_str(),
            utc(t.created_ms),
            used,
            t.name
        )
        .context("failed to write to stdout")?;
    }
    Ok(())
}

/// `1234` ms -> `1.2 s`.
pub fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BuildState, MissingInput, OutputSpec};

    #[test]
    fn token_table_shows_scope_and_use_and_no_secret() {
        let t = TokenInfo {
            id: "0123456789ab".into(),
            name: "ci".into(),
            scope: crate::protocol::Scope::Submit,
            created_ms: 0,
            last_used_ms: Some(1_000),
        };
        let never = TokenInfo {
            last_used_ms: None,
            ..t.clone()
        };
        let mut out = Vec::new();
        tokens_table(&mut out, &[t, never], 3_500).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("ID") && lines[0].contains("LAST USED"),
            "{text}"
        );
        assert!(
            lines[1].contains("0123456789ab  submit  1970-01-01 00:00:00.000 UTC  2.5 s ago"),
            "{text}"
        );
        assert!(
            lines[2].contains("UTC  -") && lines[2].ends_with("ci"),
            "{text}"
        );
        let mut out = Vec::new();
        tokens_table(&mut out, &[], 0).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("loopback"));
    }

    #[test]
    fn utc_matches_known_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        // 2000-02-29 12:34:56.789 UTC
        assert_eq!(utc(951_827_696_789), "2000-02-29 12:34:56.789 UTC");
    }

    #[test]
    fn blocked_build_says_which_input_failed() {
        let d = BuildDetail {
            summary: BuildSummary {
                id: 9,
                drv_path: "/s/abc-app.drv".into(),
                system: "x86_64-linux".into(),
                state: BuildState::Blocked,
                priority: 0,
                existing: false,
            },
            attempt: 0,
            agent: None,
            outputs: vec![OutputSpec {
                name: "out".into(),
                path: "/s/abc-app".into(),
            }],
            tags: vec![],
            created_ms: 1000,
            started_ms: None,
            finished_ms: None,
            reason: None,
            waiting_for: vec![MissingInput {
                path: "/s/def-foo".into(),
                build: Some(7),
                build_state: Some(BuildState::Failed),
                note: "input build 7 failed: builder exited with status 1".into(),
            }],
            has_log: false,
            retries: 2,
            builder_retries: 0,
            defer_until_ms: Some(5000),
        };
        let mut out = Vec::new();
        build_detail(&mut out, &d, 3000).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("build 9: blocked"), "{text}");
        assert!(
            text.contains("retries:   2 infrastructure, 0 builder"),
            "{text}"
        );
        assert!(
            text.contains("deferred:  until 1970-01-01 00:00:05.000 UTC (in 2"),
            "{text}"
        );
        assert!(
            text.contains("waiting for /s/def-foo: build 7 failed"),
            "{text}"
        );
        assert!(text.contains("builder exited with status 1"), "{text}");
    }
}
