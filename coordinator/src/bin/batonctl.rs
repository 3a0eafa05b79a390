//! The `batonctl` binary.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = baton_coordinator::ctl::Cli::parse();
    match baton_coordinator::ctl::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("batonctl: {e:#}");
            std::process::exit(1);
        }
    }
}
