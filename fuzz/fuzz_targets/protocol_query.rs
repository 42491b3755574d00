//! Fuzz target `protocol_query`: every query string of the agent and client APIs. The properties are in
//! `fuzz/src/checks.rs` ([`kiln_fuzz::checks::protocol_query`]).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_fuzz::checks::protocol_query(data);
});
