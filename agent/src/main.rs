//! `kiln-agent`: one per build machine.

fn main() {}
