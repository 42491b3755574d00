//! The client side of the client API: the HTTP client behind `kiln submit`, `kiln builds`,
//! `kiln build ...`, `kiln agent ...`, and `kiln demo`, plus the derivation-graph generator
//! the demo and the integration tests share.
//!
//! - [`http`]: the one HTTP client, with the error messages every command shows.
//! - [`cli`]: the clap commands and what they print ([`render`] formats the human output);
//!   [`enroll`]: secret rotation and registration tokens.
//! - [`submit`]: reads a `.drv` closure and its sources from the store dir and submits it.
//! - [`graph`]: generates graphs of derivations with correct store paths.
//! - [`demo`]: `kiln demo`, a coordinator and two agents on a temporary directory; [`procs`]
//!   cleans up its child processes and directory.

pub mod cli;
pub mod demo;
pub mod enroll;
pub mod graph;
pub mod http;
pub mod procs;
pub mod render;
pub mod submit;
