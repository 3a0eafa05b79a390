//! The `baton-agent` binary: parses the command line and runs the agent.
use clap::Parser;

#[tokio::main]
async fn main() {
    if let Err(e) = baton_agent::run(baton_agent::cli::Cli::parse()).await {
        eprintln!("baton-agent: {e}");
        std::process::exit(1);
    }
}
