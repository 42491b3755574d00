//! Client subcommands (`kiln submit`, `kiln builds`, `kiln build show|log|cancel`,
//! `kiln agent new`, `kiln agents`).

/// The client subcommands, flattened into `kiln`'s top-level commands.
#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {}

/// Run one client subcommand; returns the exit code.
pub fn run(cmd: ClientCommand) -> anyhow::Result<i32> {
    match cmd {}
}
