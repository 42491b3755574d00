//! Fuzz target `nar_restore`: NAR restore into a temporary directory, and dump back. The properties are in
//! `fuzz/src/checks.rs` ([`kiln_fuzz::checks::nar_restore`]).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::checks::nar_restore(data);
});
