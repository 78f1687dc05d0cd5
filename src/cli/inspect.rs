//! `divergence inspect` (under construction).
use super::CliResult;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> CliResult {
    Err(anyhow::anyhow!("not yet implemented").into())
}
