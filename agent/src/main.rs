//! The `baton-agent` binary: parses the command line and runs the agent.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    baton_agent::run(baton_agent::cli::Cli::parse()).await?;
    Ok(())
}
