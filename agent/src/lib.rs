//! `kiln-agent`: one per build machine. It dials out to the coordinator (so it works behind
//! NAT), asks for work, builds with an executor, spools and uploads the outputs as
//! zstd-compressed NARs and reports results, keeping everything it still owes the coordinator
//! in its state dir across a SIGKILL. See `docs/agent.md`.
//!
//! # Layout
//!
//! - [`cli`]: the command line.
//! - [`retry`]: how every network call is retried, with `kiln::retry`'s one policy.
//! - [`client`]: the coordinator's agent API over HTTP; sessions and their reopening.
//! - [`session`]: the session loop: heartbeats, work requests, commands, shutdown.
//! - [`deliver`]: uploads of outputs and logs, and result reports.
//! - [`transfer`]: the progress watchdog that aborts (for resumption) transfers that stall.
//! - [`state`]: the state dir: build dirs, durable reports, recovery at start.
//! - [`store_view`]: each agent's private view of the store dir (mount namespace or lock).
//! - [`executor`]: executors (`native`), builder environment and processes, input fetching.
//! - [`nario`]: NAR dump/restore, reference scanning, hashing counters.
//! - [`metrics`]: a few Prometheus metrics and their tiny TCP responder.

pub mod cli;
pub mod client;
pub mod deliver;
pub mod executor;
pub mod metrics;
pub mod nario;
pub mod retry;
pub mod session;
pub mod state;
pub mod store_view;
pub mod transfer;
