//! `kiln-chaos`: Kiln's chaos harness. It runs the real `kiln coordinator` and real
//! `kiln-agent` processes, each agent behind a fault-injecting proxy, submits a generated
//! derivation graph, injects faults on a schedule (resets, latency, bandwidth caps,
//! blackholes, partitions, SIGKILLs and restarts), and then checks Kiln's guarantees from
//! evidence the coordinator does not control: the proxies' logs, the builders' stamp files,
//! a hook's output, the durable event log, and a real Nix client.
//!
//! # Layout
//!
//! - [`rng`]: the seeded generator every random decision comes from.
//! - [`scenario`]: the TOML scenario format (a contract, `docs/chaos.md`).
//! - [`proxy`]: the HTTP/1.1-aware fault-injecting TCP proxy and its exchange log.
//! - [`graph`]: derivation graphs with drawn builder durations, output sizes and failures.
//! - [`procs`]: child processes in their own process groups, killed with the harness.
//! - [`farm`]: the coordinator and agents of one run: configs, start, SIGKILL, restart.
//! - [`run`]: one scenario run: start, play the fault schedule (`schedule`), submit from a
//!   thread of its own (`submitter`), wait for the builds, end and check (`finish`).
//! - [`evidence`]: what a run leaves behind, read back (state dump, stamps, hook runs).
//! - [`check`]: the invariants, from the evidence.
//! - [`counters`]: the report's fault and recovery counters and lost-agent timings.
//! - [`served`]: the served NARs and the real Nix client's copy and verify.
//! - [`report`]: the run's report (JSON and text) and its coverage.
//! - [`load`]: the load generator (simulated agents, a submitter) and the benchmarks of
//!   `scripts/bench`.

pub mod check;
pub mod counters;
pub mod evidence;
pub mod farm;
mod finish;
pub mod graph;
pub mod load;
pub mod procs;
pub mod proxy;
pub mod report;
pub mod rng;
pub mod run;
pub mod scenario;
mod schedule;
pub mod served;
mod submitter;
