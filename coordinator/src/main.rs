//! The `baton-coordinator` binary: parses arguments and runs the server.

use baton_coordinator::config::{Cli, Command, LogFormat};
use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let Command::Serve(args) = cli.command;
    init_logging(args.log_format);
    if let Err(e) = serve(*args).await {
        eprintln!("baton-coordinator: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(args: baton_coordinator::config::ServeArgs) -> anyhow::Result<()> {
    let running =
        baton_coordinator::server::start(args, baton_coordinator::server::shutdown_signal())
            .await?;
    running.done.await??;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
