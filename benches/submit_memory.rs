//! Benchmark: one big submission to the real `kiln coordinator` process — 100,000 small
//! derivations in one `POST /api/v1/builds` (10,000 with `KILN_BENCH_QUICK=1`) — while an
//! agent keeps asking for work. Reports the request's size, the coordinator's resident memory
//! (`VmRSS` of `/proc/PID/status`, sampled every 10 ms) before, at its peak and 3 s after the
//! answer, the submission's duration, and the latency of the work requests sent during it
//! (each leases one build, so each includes a committed lease), p50/p99/max. For reference it
//! then restarts the coordinator on the same state dir and reports its resident memory 3 s
//! after it answers: what the queued builds cost without the submission's leftovers.
//!
//! Targets ([4/8]): the rise ≤ 2× the request size and returned afterwards; work p99 ≤ 50 ms.
//! Reproduce: `cargo bench --bench submit_memory` (figures in docs/performance.md). Loops are
//! bounded in count and time; only 127.0.0.1 is used.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{b64, simple_drv, Coordinator};
use kiln::derivation::store_path::StoreDir;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn main() {
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let n: usize = if quick { 10_000 } else { 100_000 };
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let sd = StoreDir::new(&store).unwrap();
    let mut c = Coordinator::start(tmp.path(), &store, "[limits]\nsubmit_body_mb = 512\n");
    let pid = c.child.as_ref().expect("running").id();

    // An agent that asks for one build at a time, for as long as the submission runs.
    let (code, a) = common::post(
        &c.url("/api/v1/agents"),
        &serde_json::json!({"name": "bench", "systems": ["x86_64-linux"]}),
    );
    assert_eq!(code, 200, "{a}");
    let (code, s) = common::post(
        &c.agent("/api/agent/v1/session"),
        &serde_json::json!({"name": "bench", "secret": a["secret"], "protocol_version": 1,
            "systems": ["x86_64-linux"], "max_parallel_builds": 1}),
    );
    assert_eq!(code, 200, "{s}");
    let token = s["session_token"].as_str().unwrap().to_string();

    let mut derivations = Vec::with_capacity(n);
    let mut builds = Vec::with_capacity(n);
    for i in 0..n {
        let (p, bytes) = simple_drv(&sd, &format!("bulk-{i}"), "echo > $out");
        derivations.push(serde_json::json!({"path": p, "contents": b64(&bytes)}));
        builds.push(p);
    }
    let body =
        serde_json::to_vec(&serde_json::json!({"derivations": derivations, "builds": builds}))
            .unwrap();
    drop((derivations, builds));
    let request_bytes = body.len() as u64;
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid);

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            // Bounded: at most 10 minutes of samples.
            for _ in 0..60_000 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let worker = {
        let (done, url, token) = (done.clone(), c.agent("/api/agent/v1/work"), token.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            // Bounded: at most 100,000 requests.
            for i in 0..100_000u64 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let t = Instant::now();
                let r = ureq::post(&url)
                    .set(kiln::protocol::SESSION_HEADER, &token)
                    .timeout(Duration::from_secs(60))
                    .send_json(serde_json::json!({"max_builds": 1,
                        "request_id": format!("w-{i}")}));
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(r.is_ok(), "work request failed: {r:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            lat
        })
    };
    let t = Instant::now();
    let resp = ureq::post(&c.url("/api/v1/builds"))
        .set("content-type", "application/json")
        .timeout(Duration::from_secs(600))
        .send_bytes(&body)
        .expect("submission");
    let submit_s = t.elapsed().as_secs_f64();
    assert_eq!(resp.status(), 200);
    drop(resp);
    drop(body);
    done.store(true, Ordering::SeqCst);
    let mut lat = worker.join().unwrap();
    sampler.join().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(pid);
    lat.sort_by(|a, b| a.total_cmp(b));
    let peak = peak.load(Ordering::SeqCst);
    // For reference, what the same queue costs without any submission's leftovers: the
    // coordinator restarted on the same state dir, once it answers.
    c.stop();
    c.spawn();
    let (code, _) = common::get(&c.url("/api/v1/builds?limit=1"));
    assert_eq!(code, 200);
    std::thread::sleep(Duration::from_secs(3));
    let restarted = rss_kib(c.child.as_ref().expect("running").id());
    let out = serde_json::json!({
        "derivations": n,
        "request_bytes": request_bytes,
        "submit_seconds": submit_s,
        "rss_kib_before": before,
        "rss_kib_peak": peak,
        "rss_kib_after_3s": after,
        "rise_over_request": ((peak.saturating_sub(before)) * 1024) as f64 / request_bytes as f64,
        "kept_after_over_request": ((after.saturating_sub(before)) * 1024) as f64 / request_bytes as f64,
        "rss_kib_restarted_same_queue": restarted,
        "work_requests": lat.len(),
        "work_ms_p50": percentile(&lat, 0.5),
        "work_ms_p99": percentile(&lat, 0.99),
        "work_ms_max": lat.last().copied().unwrap_or(0.0),
    });
    println!("{out}");
}
