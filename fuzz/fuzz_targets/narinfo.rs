//! Fuzz target `narinfo`: the narinfo parser, printer, fingerprint and signatures. The properties are in
//! `fuzz/src/checks.rs` ([`kiln_fuzz::checks::narinfo`]).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::checks::narinfo(data);
});
