//! Fuzz target `nar`: the validating NAR reader (whole and dribbled) and the reference scanner. The properties are in
//! `fuzz/src/checks.rs` ([`kiln_fuzz::checks::nar`]).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::checks::nar(data);
});
