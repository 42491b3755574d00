//! Fuzz target `protocol_json`: every JSON body of the agent and client APIs. The properties are in
//! `fuzz/src/checks.rs` ([`kiln_fuzz::checks::protocol_json`]).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::checks::protocol_json(data);
});
