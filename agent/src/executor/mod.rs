//! Executors: how an agent turns an assignment into outputs. Only `native` exists in this
//! issue; `nix` and `guix` come with issue [8/8].
//!
//! - [`env`]: the builder's environment, as Nix builds it.
//! - [`process`]: one builder process: process group, death with the agent, timeouts, kill.
//! - [`native`]: the `native` executor: run the builder, check and spool the outputs.
//! - [`inputs`]: fetch input NARs from the coordinator into the store, atomically.
//! - [`builtin`]: builtin builders (`builtin:fetchurl`) and the fixed-output hash check.
//! - [`cache`]: the input cache's index: LRU eviction under a size cap, pins of held builds.

pub mod builtin;
pub mod cache;
pub mod env;
pub mod inputs;
pub mod native;
pub mod process;

pub use native::{BuildResult, NativeExecutor};
pub use process::{Limits, StopReason};
