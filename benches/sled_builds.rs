//! Benchmark: the state database with 1,000,000 build records (10,000 with
//! `KILN_BENCH_QUICK=1`). Writes them through the real committer in group commits, then, in a
//! fresh process state (the database closed), measures: the time to open sled, the time to
//! rebuild the build queue's memory from it (`QueueState::load`, a full scan), resident memory
//! after that with the configured cache capacity, and bytes on disk. Prints one JSON object.
//!
//! Reproduce: `cargo bench --bench sled_builds` (figures in docs/performance.md).

use std::time::Instant;

use kiln::actors::queue_state::QueueState;
use kiln::protocol::BuildState;
use kiln::store::committer::CommitterOptions;
use kiln::store::keys::u64_key;
use kiln::store::records::{BuildRecord, EventRecord};
use kiln::store::{meta, Batch, Committer, Store, StoreOptions, TreeId};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn dir_size(p: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    n
}

fn record(id: u64) -> BuildRecord {
    let h = |salt: u64| {
        format!(
            "{:032x}",
            (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt) as u128 * 7
        )
    };
    let store = "/gnu/store";
    BuildRecord {
        id,
        drv_path: format!("{store}/{}-package-{id}.drv", &h(1)[..32]),
        system: ["x86_64-linux", "aarch64-linux", "i586-gnu"][(id % 3) as usize].into(),
        priority: (id % 7) as i32,
        tags: vec![],
        state: BuildState::Runnable,
        attempt: 0,
        agent_id: 0,
        outputs: vec![(
            "out".into(),
            format!("{store}/{}-package-{id}", &h(2)[..32]),
        )],
        needs: (0..5)
            .map(|k| format!("{store}/{}-input-{k}", &h(10 + k)[..32]))
            .collect(),
        created_ms: 1_700_000_000_000 + id,
        allocated_ms: 0,
        started_ms: 0,
        finished_ms: 0,
        reason: String::new(),
        log_attempt: 0,
        request: String::new(),
        retries: 0,
        builder_retries: 0,
        defer_until_ms: 0,
    }
}

fn main() {
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let n: u64 = if quick { 10_000 } else { 1_000_000 };
    let cache_mb = 64u64;
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = StoreOptions {
        background_flush_ms: None,
        cache_capacity_bytes: cache_mb << 20,
    };
    let encoded = kiln::store::codec::encode(&record(1)).unwrap().len();

    let t = Instant::now();
    {
        let store = Store::open(tmp.path(), &opts).unwrap();
        let c = Committer::start(
            store.clone(),
            CommitterOptions {
                fsync: false,
                max_batch: 64,
                ..Default::default()
            },
            Box::new(|_: &[EventRecord]| {}),
        )
        .unwrap();
        let per_batch = 1000u64;
        let mut id = 1;
        while id <= n {
            let mut b = Batch::new();
            for i in id..(id + per_batch).min(n + 1) {
                b.put(TreeId::Builds, &u64_key(i), &record(i)).unwrap();
            }
            id += per_batch;
            b.put_raw(TreeId::Meta, meta::NEXT_BUILD_ID, &u64_key(id));
            c.commit_blocking(b).unwrap();
        }
        c.shutdown_blocking();
    }
    let write_s = t.elapsed().as_secs_f64();
    let disk = dir_size(tmp.path());

    let rss_before = rss_kib();
    let t = Instant::now();
    let store = Store::open(tmp.path(), &opts).unwrap();
    let open_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut scanned = 0u64;
    for kv in store.scan::<BuildRecord>(TreeId::Builds) {
        kv.unwrap();
        scanned += 1;
    }
    let scan_s = t.elapsed().as_secs_f64();
    assert_eq!(scanned, n);
    // The scan the queue's load makes: borrowed views, no copies.
    let t = Instant::now();
    let mut viewed = 0u64;
    store
        .visit_builds(|_| -> Result<(), kiln::store::StoreError> {
            viewed += 1;
            Ok(())
        })
        .unwrap();
    let view_s = t.elapsed().as_secs_f64();
    assert_eq!(viewed, n);
    let t = Instant::now();
    let state = QueueState::load(
        store.clone(),
        std::sync::Arc::new(kiln::actors::symbols::Symbols::default()),
    )
    .unwrap();
    let load_s = t.elapsed().as_secs_f64();
    assert_eq!(state.live_len() as u64, n);
    let rss_after = rss_kib();
    let out = serde_json::json!({
        "records": n,
        "record_bytes_encoded": encoded,
        "write_seconds": write_s,
        "write_records_per_s": n as f64 / write_s,
        "bytes_on_disk": disk,
        "disk_bytes_per_record": disk as f64 / n as f64,
        "open_seconds": open_s,
        "scan_decode_seconds": scan_s,
        "scan_borrowed_view_seconds": view_s,
        "queue_load_seconds": load_s,
        "cache_capacity_mb": cache_mb,
        "rss_kib_after_open_and_load": rss_after,
        "rss_growth_kib": rss_after.saturating_sub(rss_before),
        "rss_bytes_per_record": (rss_after.saturating_sub(rss_before) * 1024) as f64 / n as f64,
    });
    println!("{out}");
}
