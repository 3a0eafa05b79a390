//! `cargo xtask`: the project's automation, one module per task.
//!
//! xtask builds with nothing but the Rust toolchain (its only dependency is
//! anyhow), so it can install what the rest of the workspace needs before
//! anything else is built. `.ci/run` proves it on every run by building
//! xtask into an empty target directory with `PROTOC` pointing nowhere.
//! The heavy tasks (benches) live in `baton-devtools`, which xtask builds
//! and starts only after the packages are installed.
//!
//! - `deps`: install the Debian packages builds and tests need (as root);
//! - `test`: deps, build every binary, run the whole test suite;
//! - `lab`: deps, build, roll an update through a lab cluster of real
//!   systemd nodes and real etcd (the main job; see baton-devtools);
//! - `serve`: deps, build, run a local coordinator;
//! - `bench coordinator [--store etcd]`, `bench agent`, `bench fleet
//!   [--store etcd]`: see baton-devtools;
//! - `image`: the agent and coordinator images (podman, no registry);
//! - `gen-cli`: completions and man pages into docs/cli (baton-devtools).

mod deps;
mod image;
mod util;

use anyhow::{Result, bail};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  lab [ARGS]            the main job: roll an OS update through a lab cluster (root;
                        --nodes N --workers M --chaos [--seed S] --keep; target/lab/report.html)
  deps                  install the Debian packages the build and tests need (root)
  test [ARGS]           install deps, build, run every test (ARGS go to cargo test)
  serve [ARGS]          install deps, build, run a local coordinator (ARGS go to serve)
  bench coordinator     handoff latency and throughput (target/bench/coordinator.json; --waiters N
                        --per-connection N --floor-samples N --deadline S --coordinator PATH --out DIR)
  bench coordinator --store etcd   the same on the etcd store, with raw etcd txn rate and failover
                        (--txns N --cycles N --handoffs N --election-ttl D --deadline S --coordinator PATH --out DIR)
  bench agent           idle RSS and CPU of the agent, sentinel-to-Acquire latency (target/bench/agent.json;
                        --duration S --samples N --agent PATH --coordinator PATH --max-idle-rss-kib N|none --out DIR)
  bench fleet           1,000 to 30,000 agents asking at once (target/bench/fleet.json, fleet.svg)
  bench fleet --store etcd   the same on a 3-member etcd cluster, against the raw etcd txn rate
  gen-cli               regenerate docs/cli (completions, man pages) from the CLIs
  image [--tag T] [--repository R] [--bins-from DIR]
                        build localhost/baton-agent and baton-coordinator images with podman (root)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r))
        .unwrap_or(("help", &[]));
    match task {
        "deps" => deps::ensure(&deps::all()),
        "test" => test(rest),
        "lab" => lab(rest),
        "serve" => serve(rest),
        "bench" => bench(rest),
        "image" => image::run(rest),
        "gen-cli" => gen_cli(),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task {other:?}\n\n{USAGE}"),
    }
}

/// `cargo xtask test`: everything the suite needs, then the suite.
fn test(extra: &[String]) -> Result<()> {
    deps::ensure(&deps::all())?;
    util::cargo(&["build", "--workspace", "--bins"])?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    // The binaries were just built: tests need not check them for
    // staleness (each check would rebuild them with other features).
    util::cargo_with_env(&args, &[("BATON_BINARIES_FRESH", "1")])
}

/// `cargo xtask bench ...`: installs what the bench starts, builds every
/// release binary and hands over to `baton-devtools bench ...`.
fn bench(rest: &[String]) -> Result<()> {
    let needs = match rest.first().map(String::as_str) {
        Some("coordinator") if rest.iter().any(|a| a == "etcd" || a == "--store=etcd") => {
            [deps::BUILD, deps::ETCD].concat()
        }
        Some("coordinator") => deps::BUILD.to_vec(),
        Some("fleet") if rest.iter().any(|a| a == "etcd" || a == "--store=etcd") => {
            [deps::BUILD, deps::ETCD].concat()
        }
        Some("fleet") => deps::BUILD.to_vec(),
        Some("agent") => [deps::BUILD, deps::NODES].concat(),
        _ => bail!(
            "usage: cargo xtask bench coordinator [--store etcd] [--waiters N] [--deadline S] [--coordinator PATH] [--out DIR] | agent [--duration S] [--agent PATH] [--max-idle-rss-kib N|none] [--out DIR] | fleet [--store etcd] [--waiters N,N,N] [--max-concurrent N,N] [--deadline S] [--out DIR]"
        ),
    };
    deps::ensure(&needs)?;
    util::build_release_bins()?;
    let mut args = vec!["bench".to_string()];
    args.extend(rest.iter().cloned());
    util::run_release_bin("baton-devtools", &args)
}

/// `cargo xtask lab`: installs what the lab starts (etcd, systemd-nspawn,
/// debootstrap), builds every release binary and hands over to
/// `baton-devtools lab ...`.
fn lab(rest: &[String]) -> Result<()> {
    deps::ensure(&[deps::BUILD, deps::ETCD, deps::NODES, deps::ESSENTIAL].concat())?;
    util::build_release_bins()?;
    let mut args = vec!["lab".to_string()];
    args.extend(rest.iter().cloned());
    util::run_release_bin("baton-devtools", &args)
}

/// `cargo xtask gen-cli`: xtask cannot depend on the CLIs (they need the
/// whole build), so baton-devtools renders them; a test in baton-devtools
/// fails while docs/cli differs from what this writes.
fn gen_cli() -> Result<()> {
    deps::ensure(deps::BUILD)?;
    let dir = util::workspace_root().join("docs/cli");
    util::cargo(&[
        "run",
        "--quiet",
        "--package",
        "baton-devtools",
        "--",
        "gen-cli",
        &dir.display().to_string(),
    ])
}

/// `cargo xtask serve`: a local coordinator on 127.0.0.1:7443 (plaintext,
/// unauthenticated: a lab), state under target/baton-data.
fn serve(extra: &[String]) -> Result<()> {
    deps::ensure(deps::BUILD)?;
    util::build_release_bins()?;
    let data = util::target_dir().join("baton-data");
    let mut args = vec![
        "serve".to_string(),
        "--insecure".to_string(),
        "--listen=127.0.0.1:7443".to_string(),
        "--metrics-listen=127.0.0.1:9443".to_string(),
        format!("--data-dir={}", data.display()),
    ];
    // The first run is a new installation; later runs keep its state.
    if !data.join("state.json").exists() {
        args.push("--initialize".to_string());
    }
    args.extend(extra.iter().cloned());
    eprintln!(
        "coordinator on 127.0.0.1:7443; try: target/release/batonctl --insecure --coordinator http://127.0.0.1:7443 status"
    );
    util::run_release_bin("baton-coordinator", &args)
}
