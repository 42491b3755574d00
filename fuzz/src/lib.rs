//! Kiln's fuzz harness: the properties each fuzz target checks ([`checks`]) and the counting
//! allocator that lets them bound memory ([`alloc`]). The targets in `fuzz_targets/` are one
//! line each around [`checks`]; `tests/fuzz_regressions.rs` replays reproducers through the
//! same functions. See `docs/fuzzing.md`.

pub mod alloc;
pub mod checks;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;
