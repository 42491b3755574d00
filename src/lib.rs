//! Kiln: a build coordinator for Guix and Nix derivations.
//!
//! Operators submit derivations; the coordinator queues them, hands them to agents over links
//! that may drop at any moment, receives the outputs as NARs, keeps them with their narinfos
//! (so the coordinator is also a substitute server), runs hooks on events and exports metrics.
//! See `docs/architecture.md` for the whole picture.
//!
//! # Layout
//!
//! - [`protocol`]: wire types shared by the coordinator, the agent and the client: requests,
//!   responses, error codes, the protocol version.
//! - [`derivation`]: the `.drv` ATerm format (parse, print), store paths and store directories,
//!   Nix base32, hashes, and Nix's path computations.
//! - [`nar`]: NAR write/restore/validate, narinfo, ed25519 signatures, reference scanning.
//! - [`retry`]: the one retry policy (exponential backoff, full jitter, cap, `Retry-After`)
//!   shared by the agent, the hook processor and the client.
//!
//! With the default `coordinator` feature:
//!
//! - `store`: sled trees, versioned bincode records, the group-commit committer, the NAR
//!   cache (uploads, verification, narinfos, logs) and `kiln state dump`.
//! - `actors`: one actor per file: `BuildQueue`, `Allocator`, `AgentSession` (and its
//!   registry), `HookProcessor`, `EventLog`; plus the panic guard and the rebuild every restart
//!   does (`guard`), and the restart counters with the restart intensity (`restarts`).
//! - `supervisor`: builds the actors from their factories and starts them supervised on their
//!   arbiters; installs the panic hook.
//! - `http`: actix-web routes; handlers only translate HTTP to actor messages and back.
//! - `client`: the HTTP client behind `kiln submit`, `kiln builds`, ... and `kiln demo` (with
//!   the generator of derivation graphs the demo and the tests build).
//! - `config`: the coordinator's TOML configuration.
//! - `coordinator`: `kiln coordinator`: opens the state, starts committer, actors and
//!   listeners, writes the ready file, shuts down cleanly on SIGTERM.
//! - `telemetry`: the Prometheus recorder and the description of every metric.
//!
//! `protocol`, `derivation`, `nar` and `retry` never depend on actix or sled: the agent
//! (`kiln-agent`, in `agent/`) uses `kiln` with default features off.

pub mod derivation;
pub mod nar;
pub mod protocol;
pub mod retry;

#[cfg(feature = "coordinator")]
pub mod actors;
#[cfg(feature = "coordinator")]
pub mod client;
#[cfg(feature = "coordinator")]
pub mod config;
#[cfg(feature = "coordinator")]
pub mod coordinator;
#[cfg(feature = "coordinator")]
pub mod http;
#[cfg(feature = "coordinator")]
pub mod store;
#[cfg(feature = "coordinator")]
pub mod supervisor;
#[cfg(feature = "coordinator")]
pub mod telemetry;
