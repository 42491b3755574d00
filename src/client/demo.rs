//! `kiln demo`: a demo farm in one command.

/// Options of `kiln demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
}

/// Run the demo; returns the exit code.
pub fn run(_args: DemoArgs) -> anyhow::Result<i32> {
    anyhow::bail!("kiln demo is not implemented yet")
}
