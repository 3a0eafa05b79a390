//! `baton-devtools`: the heavy half of `cargo xtask`.
//!
//! xtask must build on a bare machine (only the Rust toolchain), so it has
//! no dependency that needs protoc or a C library. Everything that talks to
//! a coordinator, etcd or an agent lives here instead, and xtask builds and
//! starts this binary only after it has installed what the build needs
//! (protobuf-compiler for etcd-client) and built every release binary.
//!
//! - `bench coordinator [--waiters N] [--out DIR]`: handoff latency and
//!   throughput on the embedded store (`bench_coordinator`);
//! - `bench coordinator --store etcd`: the same on a real 3-member etcd
//!   cluster, with the raw etcd transaction rate and failover (`bench_etcd`);
//!   both exit non-zero, after writing their report, when the run did not
//!   grant what it had to;
//! - `bench agent [--duration S] [--agent PATH] [--out DIR]`: the agent's
//!   idle footprint and reaction time; exits non-zero when the run did not
//!   measure them or the idle RSS is over its budget (`bench_agent`);
//! - `bench fleet [--store etcd] [--out DIR]`: 1,000 to 30,000 simulated
//!   agents asking at once; exits non-zero when a run did not grant every
//!   waiter (`bench_fleet`);
//! - `lab [--nodes N] [--workers M] [--chaos [--seed S]] [--keep]`: a whole
//!   rollout through real etcd and real reboots, watched from outside
//!   ([`lab`]);
//! - `gen-cli DIR`: completions and man pages of the three programs
//!   (`gen_cli`; `cargo xtask gen-cli` writes docs/cli).

mod args;
mod bench_agent;
mod bench_coordinator;
mod bench_etcd;
mod bench_fleet;
mod floor;
mod gen_cli;
mod lab;
mod procstat;
mod util;

use anyhow::{Result, bail};

const USAGE: &str = "usage: baton-devtools bench coordinator [--waiters N] [--per-connection N] [--floor-samples N] [--deadline S] [--coordinator PATH] [--out DIR] \
     | bench coordinator --store etcd [--txns N] [--cycles N] [--handoffs N] [--election-ttl D] [--deadline S] [--coordinator PATH] [--out DIR] \
     | bench agent [--duration S] [--samples N] [--agent PATH] [--coordinator PATH] [--max-idle-rss-kib N|none] [--timeout S] [--out DIR] \
     | bench fleet [--store etcd] [--waiters N,N] [--max-concurrent N,N] [--deadline S] [--out DIR] | lab [--help] | gen-cli DIR\n\
     (started by `cargo xtask bench ...`, which installs and builds what it needs first)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["bench", "coordinator", rest @ ..] if store_is_etcd(rest) => bench_etcd::run(&args[2..]),
        ["bench", "coordinator", ..] => bench_coordinator::run(&args[2..]),
        ["bench", "agent", ..] => bench_agent::run(&args[2..]),
        ["bench", "fleet", ..] => bench_fleet::run(&args[2..]),
        ["lab", ..] => lab::main(&args[1..]),
        ["gen-cli", ..] => gen_cli::run(&args[1..]),
        _ => bail!("{USAGE}"),
    }
}

/// Whether a bench's words ask for `--store etcd` (or `--store=etcd`):
/// that flag, not a word `etcd` anywhere (`--out etcd` is a directory).
fn store_is_etcd(words: &[&str]) -> bool {
    words.contains(&"--store=etcd") || words.windows(2).any(|w| w == ["--store", "etcd"])
}

#[cfg(test)]
mod tests {
    use super::store_is_etcd;

    #[test]
    fn only_the_store_flag_picks_the_etcd_bench() {
        assert!(store_is_etcd(&["--waiters", "3", "--store", "etcd"]));
        assert!(store_is_etcd(&["--store=etcd"]));
        assert!(!store_is_etcd(&["--out", "etcd"]));
        assert!(!store_is_etcd(&["--store", "embedded", "--out", "etcd"]));
        assert!(!store_is_etcd(&[]));
    }
}
