//! NAR archives (write from a path, restore to a path, validate and hash a stream), narinfos
//! and Nix's ed25519 signatures. Streaming in constant memory; compiles without the
//! coordinator's dependencies.

pub mod cli;
