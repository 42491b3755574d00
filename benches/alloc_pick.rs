//! Benchmark: picking a build from the allocator's index with 1,000,000 runnable builds over 8
//! systems and 3 tag classes (10,000 with `KILN_BENCH_QUICK=1`). Fills a `RunnableIndex` the
//! way the build queue's load does, then times 100,000 picks (one build each, as a work
//! request for one slot asks) by agents of one or two systems with and without tags; each
//! picked build is put back with a new id so the index stays at its size. Also times re-keying
//! (a priority change) and the fill itself. Prints one JSON object with p50/p99/max in µs.
//!
//! Reproduce: `cargo bench --bench alloc_pick` (figures in docs/performance.md).

use std::sync::Arc;
use std::time::Instant;

use kiln::actors::runnable_index::{AgentMatch, Group, RunnableEntry, RunnableIndex};
use kiln::actors::symbols::Symbols;

const SYSTEMS: [&str; 8] = [
    "x86_64-linux",
    "i686-linux",
    "aarch64-linux",
    "armhf-linux",
    "i586-gnu",
    "powerpc64le-linux",
    "riscv64-linux",
    "x86_64-darwin",
];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A small deterministic generator (no dependency, same numbers every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn main() {
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let n: u64 = if quick { 10_000 } else { 1_000_000 };
    let picks: usize = if quick { 10_000 } else { 100_000 };
    let symbols = Arc::new(Symbols::default());
    let classes: Vec<Vec<(String, String)>> = vec![
        vec![],
        vec![("big-memory".into(), "yes".into())],
        vec![("origin".into(), "ci".into())],
    ];
    let tag_ids: Vec<u32> = classes.iter().map(|c| symbols.tag_set(c)).collect();
    let system_ids: Vec<u32> = SYSTEMS.iter().map(|s| symbols.system(s)).collect();
    let mut rng = Lcg(42);
    let entry = |id: u64, rng: &mut Lcg| RunnableEntry {
        id,
        group: Group {
            system: system_ids[(rng.next() % 8) as usize],
            tags: tag_ids[(rng.next() % 3) as usize],
        },
        effective: (rng.next() % 100) as i32,
        rdeps: (rng.next() % 8) as u32,
    };
    let mut ix = RunnableIndex::new(symbols.clone(), Arc::from(vec!["big-memory".to_string()]));
    let entries: Vec<RunnableEntry> = (1..=n).map(|id| entry(id, &mut rng)).collect();
    let t = Instant::now();
    for e in entries {
        ix.insert(e);
    }
    let fill_s = t.elapsed().as_secs_f64();
    assert_eq!(ix.len() as u64, n);

    let agents: Vec<AgentMatch> = vec![
        AgentMatch {
            systems: vec!["x86_64-linux".into(), "i686-linux".into()],
            ..Default::default()
        },
        AgentMatch {
            systems: vec!["aarch64-linux".into()],
            offers: vec![("big-memory".into(), "yes".into())],
            ..Default::default()
        },
        AgentMatch {
            systems: vec!["i586-gnu".into()],
            ..Default::default()
        },
        AgentMatch {
            systems: vec!["riscv64-linux".into()],
            requires: vec![("big-memory".into(), "yes".into())],
            ..Default::default()
        },
    ];
    let mut next_id = n + 1;
    let mut lat = Vec::with_capacity(picks);
    let mut empty = 0usize;
    for i in 0..picks {
        let a = &agents[i % agents.len()];
        let t = Instant::now();
        let got = ix.take_for(a, 1);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        if got.is_empty() {
            empty += 1;
        }
        for mut e in got {
            e.id = next_id;
            next_id += 1;
            ix.insert(e);
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));

    let mut rekey = Vec::with_capacity(picks);
    for _ in 0..picks {
        let id = 1 + rng.next() % n;
        let t = Instant::now();
        ix.rekey(id, (rng.next() % 100) as i32, (rng.next() % 8) as u32);
        rekey.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rekey.sort_by(|a, b| a.total_cmp(b));

    let out = serde_json::json!({
        "runnable": n,
        "systems": SYSTEMS.len(),
        "tag_classes": classes.len(),
        "picks": picks,
        "empty_picks": empty,
        "fill_seconds": fill_s,
        "pick_us_p50": percentile(&lat, 0.50),
        "pick_us_p99": percentile(&lat, 0.99),
        "pick_us_max": lat.last().copied().unwrap_or(0.0),
        "rekey_us_p50": percentile(&rekey, 0.50),
        "rekey_us_p99": percentile(&rekey, 0.99),
        "target_pick_us_p99": 50,
    });
    println!("{out}");
}
