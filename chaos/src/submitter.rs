//! The submitter: a thread of its own that submits the graph in batches (inputs first) at
//! their times, retrying each batch until the coordinator acknowledges it, so a coordinator
//! kill can land in the middle of a submission. What was acknowledged is the evidence for
//! "no acknowledged submission lost".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln::client::submit::{self, SubmitOptions};
use kiln::derivation::StorePath;

use crate::graph::ChaosGraph;

/// What the submitter thread shares with the run.
#[derive(Default)]
pub(crate) struct Submissions {
    pub(crate) acknowledged: Mutex<Vec<(u64, String)>>,
    pub(crate) problems: Mutex<Vec<String>>,
    pub(crate) done: AtomicBool,
}

/// Submit the graph in batches (inputs first) through `client` (the farm's: its token, and
/// its CA in a TLS run), retrying each until acknowledged.
pub(crate) fn submit_batches(
    client: kiln::client::http::Client,
    graph: &ChaosGraph,
    batches: usize,
    spread: Duration,
    deadline: Instant,
    out: Arc<Submissions>,
) -> std::thread::JoinHandle<()> {
    let store_dir = graph.store_dir.clone();
    let n = graph.drvs.len();
    let per = n.div_ceil(batches.max(1));
    let chunks: Vec<Vec<String>> = graph
        .drvs
        .chunks(per.max(1))
        .map(|c| c.iter().map(|d| d.drv_path.clone()).collect())
        .collect();
    let start = Instant::now();
    std::thread::spawn(move || {
        let k = chunks.len().max(1) as u32;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let at = start + spread * i as u32 / k;
            while Instant::now() < at {
                std::thread::sleep(Duration::from_millis(20));
            }
            let targets: Result<Vec<StorePath>, _> = chunk
                .iter()
                .map(|p| store_dir.parse_path(p.as_bytes()))
                .collect();
            let targets = match targets {
                Ok(t) => t,
                Err(e) => {
                    push(&out.problems, format!("batch {i}: bad path: {e}"));
                    break;
                }
            };
            let opts = SubmitOptions {
                only_targets: true,
                ..SubmitOptions::default()
            };
            // Bounded by the run's deadline: a refused or unanswered submission is retried.
            loop {
                match submit::submit(&client, &store_dir, &targets, &opts) {
                    Ok(s) => {
                        let mut acked = out.acknowledged.lock().unwrap_or_else(|p| p.into_inner());
                        acked.extend(s.builds.into_iter().map(|b| (b.id, b.drv_path)));
                        break;
                    }
                    Err(e) if Instant::now() < deadline => {
                        tracing::info!(
                            batch = i,
                            error = format!("{e:#}"),
                            "submission failed, retrying"
                        );
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    Err(e) => {
                        push(
                            &out.problems,
                            format!("batch {i} was never acknowledged: {e:#}"),
                        );
                        break;
                    }
                }
            }
        }
        out.done.store(true, Ordering::SeqCst);
    })
}

pub(crate) fn push(v: &Mutex<Vec<String>>, s: String) {
    v.lock().unwrap_or_else(|p| p.into_inner()).push(s);
}
