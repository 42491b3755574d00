//! The `kiln` command: the coordinator, the client subcommands and the format tools.

fn main() {}
