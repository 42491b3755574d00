//! Fuzz target `drv`: the `.drv` parser, printer and the path computations a submission runs. The properties are in
//! `fuzz/src/checks.rs` ([`kiln_fuzz::checks::drv`]).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::checks::drv(data);
});
