//! The load generator (`kiln-chaos load …`, issue [4/8] item 11): many simulated agents that
//! speak the agent protocol over real HTTP ([`agents`]), a submitter that fills the queue
//! ([`submit`], with derivations from [`drvs`]), what both measure ([`stats`]: latency
//! percentiles, the coordinator's flushes and commits from `/metrics`, its CPU time from
//! `/proc/PID/stat`), a real coordinator to run them against ([`coordinator`]), and the
//! benchmarks of `scripts/bench` ([`bench`], and [`farm`] with real agents). Usage in `docs/performance.md`.

pub mod agents;
pub mod bench;
pub mod coordinator;
pub mod drvs;
pub mod farm;
pub mod stats;
pub mod submit;
