//! `cargo xtask`: the project's automation, one module per task.
//!
//! - `deps`: install the Debian packages builds and tests need (as root);
//! - `test`: deps, build every binary, run the whole test suite;
//! - `serve`: deps, build, run a local coordinator (the quick start);
//! - `bench coordinator [--store etcd]`: handoff latency and throughput with
//!   1,000 waiters; on etcd also the raw txn rate and failover time;
//! - `bench agent`: the agent's idle footprint and reaction time.

mod bench_agent;
mod bench_coordinator;
mod bench_etcd;
mod deps;
mod util;

use anyhow::{Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r))
        .unwrap_or(("help", &[]));
    match task {
        "deps" => deps::ensure(deps::ALL),
        "test" => test(rest),
        "serve" => serve(rest),
        "bench" => match rest.split_first() {
            Some((what, rest))
                if what == "coordinator"
                    && rest.iter().any(|a| a == "etcd" || a == "--store=etcd") =>
            {
                bench_etcd::run(rest)
            }
            Some((what, rest)) if what == "coordinator" => bench_coordinator::run(rest),
            Some((what, rest)) if what == "agent" => bench_agent::run(rest),
            _ => bail!(
                "usage: cargo xtask bench coordinator [--waiters N] [--store etcd] | agent [--duration S]"
            ),
        },
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 deps                  install the Debian packages the build and tests need (root)\n  \
                 test [ARGS]           install deps, build, run every test (ARGS go to cargo test)\n  \
                 serve [ARGS]          install deps, build, run a local coordinator (ARGS go to serve)\n  \
                 bench coordinator     handoff latency and throughput (target/bench/coordinator.json)\n  \
                 bench coordinator --store etcd   the same on the etcd store, with raw etcd txn rate and failover\n  \
                 bench agent           idle RSS and CPU of the agent, sentinel-to-Acquire latency"
            );
            Ok(())
        }
    }
}

/// `cargo xtask test`: everything the suite needs, then the suite.
fn test(extra: &[String]) -> Result<()> {
    deps::ensure(deps::ALL)?;
    util::cargo(&["build", "--workspace", "--bins"])?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    util::cargo(&args)
}

/// `cargo xtask serve`: a local coordinator on 127.0.0.1:7443 (plaintext,
/// unauthenticated: a lab), state under target/baton-data.
fn serve(extra: &[String]) -> Result<()> {
    deps::ensure(deps::BUILD)?;
    util::build_release_bins()?;
    let root = util::workspace_root();
    let data = root.join("target/baton-data");
    let mut cmd = std::process::Command::new(root.join("target/release/baton-coordinator"));
    cmd.args([
        "serve",
        "--insecure",
        "--listen=127.0.0.1:7443",
        "--metrics-listen=127.0.0.1:9443",
    ])
    .arg(format!("--data-dir={}", data.display()))
    // The lab's first run is a new installation; later runs keep its state.
    .args((!data.join("state.json").exists()).then_some("--initialize"))
    .args(extra);
    eprintln!(
        "coordinator on 127.0.0.1:7443; try: target/release/batonctl --insecure --coordinator http://127.0.0.1:7443 status"
    );
    let status = cmd.status()?;
    if !status.success() {
        bail!("baton-coordinator exited with {status}");
    }
    Ok(())
}
