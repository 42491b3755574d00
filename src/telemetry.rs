//! Telemetry: the coordinator's Prometheus metrics: the recorder, and a description (help text and
//! unit) of every metric, so `promtool check metrics` accepts `/metrics`. Every name here is
//! listed in `docs/metrics.md`.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Install the global recorder (once per process) and describe every metric.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("failed to install the metrics recorder: {e}"))?;
    describe();
    metrics::gauge!("kiln_up").set(1.0);
    Ok(handle)
}

fn describe() {
    describe_gauge!("kiln_up", "1 while the coordinator runs");
    describe_gauge!("kiln_builds", "Live builds by state");
    describe_gauge!(
        "kiln_runnable_builds",
        "Builds in the allocator's runnable index"
    );
    describe_gauge!(
        "kiln_work_waiters",
        "Work requests waiting (long poll) for a build to become runnable for their agent"
    );
    describe_counter!(
        "kiln_builds_submitted_total",
        "Builds queued by submissions"
    );
    describe_counter!(
        "kiln_builds_finished_total",
        "Builds that reached a terminal state, by result"
    );
    describe_histogram!(
        "kiln_allocation_seconds",
        Unit::Seconds,
        "Time to pick builds from the runnable index"
    );
    describe_counter!(
        "kiln_commits_total",
        "Group commits of the state database, by result (ok, error; overloaded: a write refused because the queue was full)"
    );
    describe_gauge!(
        "kiln_commit_queue_depth",
        "Writes waiting for the committer (bounded by store.max_queued)"
    );
    describe_histogram!(
        "kiln_commit_seconds",
        Unit::Seconds,
        "Time of one group commit including its flush"
    );
    describe_histogram!(
        "kiln_commit_batch_size",
        "Requests folded into one group commit"
    );
    describe_counter!(
        "kiln_events_total",
        "Events appended to the durable event log"
    );
    describe_counter!(
        "kiln_actor_restarts_total",
        "Actor restarts by the supervisor, by actor"
    );
    describe_gauge!(
        "kiln_arbiter_lag_seconds",
        Unit::Seconds,
        "How late each arbiter's loop ran a 100 ms timer"
    );
    describe_histogram!(
        "kiln_loop_lag_seconds",
        Unit::Seconds,
        "Lag seen by the agent sessions' liveness checks"
    );
    describe_counter!(
        "kiln_agents_lost_total",
        "Agents declared lost after the agent timeout"
    );
    describe_counter!(
        "kiln_agents_quarantined_total",
        "Quarantines started after consecutive infrastructure failures of an agent"
    );
    describe_counter!(
        "kiln_agents_expired_total",
        "Agents removed after agents.expire_after_ms without being seen"
    );
    describe_gauge!(
        "kiln_agents",
        "Agents by status (as of the last agent listing)"
    );
    describe_counter!(
        "kiln_upload_bytes_total",
        Unit::Bytes,
        "Bytes of output NARs received"
    );
    describe_gauge!(
        "kiln_upload_slots",
        "Output uploads in progress or waiting to be resumed (their locks and verifiers)"
    );
    describe_counter!(
        "kiln_transfer_stalls_total",
        "Request bodies dropped because no byte arrived for timeouts.transfer_stall_ms"
    );
    describe_counter!(
        "kiln_slow_bodies_cut_total",
        "Request bodies cut for arriving slower than limits.min_body_rate_bytes_per_s"
    );
    describe_counter!(
        "kiln_uploads_refused_total",
        "Uploads refused over a cap, by cap (agent: max_uploads_per_agent, total: max_uploads)"
    );
    describe_gauge!("kiln_hook_pending", "Hook runs waiting or running, by hook");
    describe_counter!(
        "kiln_hook_runs_total",
        "Hook runs by hook and result (ok, failed, dead)"
    );
    describe_histogram!(
        "kiln_hook_run_seconds",
        Unit::Seconds,
        "Duration of hook runs, by hook"
    );
    describe_gauge!(
        "kiln_state_db_bytes",
        Unit::Bytes,
        "Size of the state database on disk"
    );
}

/// Give memory freed by the allocator back to the operating system (glibc keeps freed memory
/// in its arenas, so a big submission's peak would otherwise stay resident). Blocking: call it
/// on a blocking thread.
pub fn release_memory() {
    // SAFETY: malloc_trim only walks and trims glibc's own heaps; it takes no pointers from us.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Names following each of `markers` in the Rust files under `dir`.
    fn names(dir: &Path, markers: &[&str], out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                names(&p, markers, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for m in markers {
                    for (i, _) in text.match_indices(m) {
                        let rest = text[i + m.len()..].trim_start();
                        if let Some(r) = rest.strip_prefix('"') {
                            let name = r.split('"').next().unwrap();
                            if name.bytes().all(|c| c.is_ascii_lowercase() || c == b'_') {
                                out.insert(name.to_string());
                            }
                        }
                    }
                }
            }
        }
    }

    /// promtool accepts `/metrics` only when every metric is described: every metric the code
    /// records must have a description here.
    #[test]
    fn every_recorded_metric_is_described() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut used = BTreeSet::new();
        names(
            &src,
            &[
                "metrics::counter!(",
                "metrics::gauge!(",
                "metrics::histogram!(",
            ],
            &mut used,
        );
        let mut described = BTreeSet::new();
        names(
            &src,
            &[
                "describe_counter!(",
                "describe_gauge!(",
                "describe_histogram!(",
            ],
            &mut described,
        );
        assert!(used.len() > 10, "the scan found the metrics: {used:?}");
        let missing: Vec<_> = used.difference(&described).collect();
        assert!(
            missing.is_empty(),
            "metrics recorded but not described: {missing:?}"
        );
    }
}
