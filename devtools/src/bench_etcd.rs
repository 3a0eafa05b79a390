//! `cargo xtask bench coordinator --store etcd`: the coordinator on the etcd
//! store against a real 3-member etcd cluster on loopback.
//!
//! Measured in one run, on the same cluster:
//! - the raw etcd transaction rate (sequential guarded puts of a state-sized
//!   document, the same shape as a coordinator save);
//! - grant throughput (acquire → granted → release cycles of one node; each
//!   cycle is two saves), and its ratio to the raw rate;
//! - handoff latency (release of the holder → grant to the waiter);
//! - failover time (SIGKILL of the leading coordinator → first grant by the
//!   other replica), which is bounded below by the election TTL.
//!
//! Writes `coordinator-etcd.json` and the two coordinators' logs
//! (`coordinator-etcd-a.log`, `-b.log`) into `--out DIR` (default
//! `target/bench`) and prints a table.
//!
//! A bench that did not do its job fails: when a phase failed (a
//! coordinator that exited or never led, a stream error, the `--deadline`),
//! a cycle or handoff was not granted, the fencing tokens did not rise, or
//! the failover never happened, the report's `verdict` says which and the
//! bench exits non-zero after writing it (devtools/tests/bench_coordinator.rs
//! runs it small).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use baton_proto::v1::ReleaseRequest;
use baton_proto::v1::coordinator_client::CoordinatorClient;
use baton_tests::etcd::EtcdCluster;
use baton_tests::etcd::coordinator::{Coordinator, Said, acquire, next, wait_granted};
use serde_json::{Map, Value, json};
use tonic::transport::Channel;

use crate::args::{Args, Run};
use crate::bench_fleet::target::wait_leading;
use crate::util::{Build, job_done};

const USAGE: &str = "bench coordinator --store etcd [--txns N (default 500)] [--cycles N (default 100)] \
[--handoffs N (default 50)] [--election-ttl D (default 2s)] [--coordinator PATH (default: the release build)] \
[--out DIR (default: target/bench)] [--deadline SECS (default 600)]";

/// Bench settings (from the command line).
struct Settings {
    txns: usize,
    cycles: usize,
    handoffs: usize,
    election_ttl: String,
    /// `--coordinator`, `--out`, `--deadline`.
    run: Run,
}

fn parse(args: &[String]) -> Result<Settings> {
    let mut s = Settings {
        txns: 500,
        cycles: 100,
        handoffs: 50,
        election_ttl: "2s".to_string(),
        run: Run::default(),
    };
    let mut args = Args::new(args, USAGE);
    while let Some(flag) = args.flag() {
        match flag.as_str() {
            "coordinator" => {}
            "--txns" => s.txns = args.at_least(1)?,
            "--cycles" => s.cycles = args.at_least(1)?,
            "--handoffs" => s.handoffs = args.at_least(1)?,
            "--election-ttl" => s.election_ttl = args.value()?,
            other if args.run_flag(other, &mut s.run, "etcd")? => {}
            other => bail!("unknown argument {other}; usage: {USAGE}"),
        }
    }
    Ok(s)
}

/// Runs the bench; `args` are the words after `bench`.
pub fn run(args: &[String]) -> Result<()> {
    let settings = parse(args)?;
    std::fs::create_dir_all(&settings.run.out)
        .with_context(|| format!("creating {}", settings.run.out.display()))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut figures = Map::new();
    let outcome = runtime.block_on(measure(&settings, &mut figures));
    let mut report = Value::Object(figures);
    report["etcd_members"] = json!(3);
    // "release" for `cargo xtask bench` (the default), "debug" in tests.
    report["coordinator_profile"] = json!(Build::of(&settings.run.binary).name());
    report["coordinator_binary"] = json!(settings.run.binary.display().to_string());
    report["election_ttl"] = json!(settings.election_ttl);
    report["deadline_s"] = json!(settings.run.deadline.as_secs());
    report["grant_cycles"] = json!(settings.cycles);
    report["handoffs"] = json!(settings.handoffs);
    if let Err(e) = outcome {
        report["failed"] = json!(format!("{e:#}"));
    }
    let failures = verdict(&report);
    report["verdict"] = json!({ "ok": failures.is_empty(), "failures": failures });
    let path = settings.run.out.join("coordinator-etcd.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    print_table(&report);
    println!("\nwritten to {}", path.display());
    let written = format!(
        "report written to {}; the coordinators' logs are beside it",
        path.display()
    );
    job_done("bench coordinator --store etcd", &written, &failures)
}

/// What went wrong in `report`, one line each; empty when every cycle and
/// handoff was granted, the fencing tokens rose throughout, and the
/// standby took over after the leader was killed.
fn verdict(report: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some(why) = report["failed"].as_str() {
        failures.push(format!("failed: {why}"));
    }
    let count = |k: &str| report[k].as_u64().unwrap_or(0);
    let (cycles, done) = (count("grant_cycles"), count("grant_cycles_done"));
    if done == 0 || done != cycles {
        failures.push(format!("{done} of {cycles} grant cycles granted"));
    }
    let (handoffs, done) = (count("handoffs"), count("handoffs_done"));
    if done != handoffs {
        failures.push(format!("{done} of {handoffs} handoffs granted"));
    }
    if !report["failover_ms"].as_f64().is_some_and(|ms| ms > 0.0) {
        failures.push("the failover was not measured: the standby never granted".to_string());
    }
    if report["fencing_tokens_rising"] != json!(true) {
        failures.push("the fencing tokens did not rise from grant to grant".to_string());
    }
    failures
}

/// `--etcd-member-map` for a bench cluster: each member on a node of its
/// own name, so the guard knows the bench's nodes carry none (as the workers
/// of a real fleet; without it every node might carry an unplaced member
/// and none is granted).
pub fn member_map(cluster: &EtcdCluster) -> String {
    let map: Vec<String> = cluster
        .members
        .iter()
        .map(|m| format!("{0}={0}", m.name))
        .collect();
    map.join(",")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Measures into `report`, which keeps what was measured when a later
/// phase fails.
async fn measure(s: &Settings, report: &mut Map<String, Value>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + s.run.deadline;
    let late = |_| anyhow!("the {} s deadline passed", s.run.deadline.as_secs());
    let cluster = tokio::time::timeout_at(deadline, EtcdCluster::start(3))
        .await
        .map_err(late)??;

    // Raw etcd: sequential guarded transactions of a state-sized document.
    let mut etcd = cluster.client().await?;
    let (_, txn_rate) =
        tokio::time::timeout_at(deadline, crate::floor::etcd_txns(&mut etcd, 4096, s.txns))
            .await
            .map_err(late)??;
    report.insert("raw_etcd_txn_per_s".into(), json!(txn_rate));

    let endpoints = cluster.endpoints();
    // The etcd nodes are declared, so the guard knows the workers w1..w3
    // carry no member.
    let member_map = member_map(&cluster);
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoints.as_str(),
        "--etcd-election-ttl",
        s.election_ttl.as_str(),
        "--max-concurrent",
        "1",
        "--etcd-member-map",
        member_map.as_str(),
    ];
    // a creates the state (a new installation); b finds it.
    let first: Vec<&str> = args.iter().copied().chain(["--initialize"]).collect();
    let mut a = Coordinator::start_binary(&s.run.binary, "a", &first)?;
    let mut b = None;
    let outcome = tokio::time::timeout_at(deadline, async {
        wait_leading(&mut a).await?;
        let b = b.insert(Coordinator::start_binary(&s.run.binary, "b", &args)?);
        grants(s, &mut a, b, report).await
    })
    .await
    .map_err(late)
    .and_then(|r| r);
    // The coordinators' logs (their data directories go with them).
    keep_log(&a, &s.run.out.join("coordinator-etcd-a.log"));
    if let Some(b) = &b {
        keep_log(b, &s.run.out.join("coordinator-etcd-b.log"));
    }
    outcome
}

/// Copies `coordinator`'s log to `to` (a warning when it cannot).
fn keep_log(coordinator: &Coordinator, to: &Path) {
    if let Err(e) = std::fs::copy(coordinator.log_path(), to) {
        eprintln!("bench: could not keep {}: {e}", to.display());
    }
}

/// Releases `token` held by `node`.
async fn release(client: &mut CoordinatorClient<Channel>, node: &str, token: u64) -> Result<()> {
    client
        .release(ReleaseRequest {
            node: node.into(),
            fencing_token: token,
            reason: "bench".into(),
        })
        .await
        .with_context(|| format!("{node}'s Release of token {token}"))?;
    Ok(())
}

/// Notes `token`, the latest grant's: `fencing_tokens_rising` turns (and
/// stays) false when it is not above the one before (`last`).
fn rising(last: &mut Option<u64>, token: u64, report: &mut Map<String, Value>) {
    let ok = last.is_none_or(|last| last < token);
    *last = Some(token);
    if report.get("fencing_tokens_rising") != Some(&json!(false)) {
        report.insert("fencing_tokens_rising".into(), json!(ok));
    }
}

/// The grant cycles, the handoffs and the failover, against `a` (leading)
/// and `b` (standing by).
async fn grants(
    s: &Settings,
    a: &mut Coordinator,
    b: &mut Coordinator,
    report: &mut Map<String, Value>,
) -> Result<()> {
    let mut client = a.client().await?;
    // The latest grant's token: each must be above it.
    let mut last_token: Option<u64> = None;

    // Grant throughput: acquire → granted → release, one node.
    let started = Instant::now();
    for done in 0..s.cycles {
        let mut stream = acquire(&mut client, "w1", false).await?;
        let (token, _) = wait_granted(&mut stream)
            .await
            .with_context(|| format!("grant cycle {}", done + 1))?;
        rising(&mut last_token, token, report);
        release(&mut client, "w1", token).await?;
        report.insert("grant_cycles_done".into(), json!(done + 1));
    }
    let grant_rate = s.cycles as f64 / started.elapsed().as_secs_f64();
    report.insert("grants_per_s".into(), json!(grant_rate));
    if let Some(raw) = report.get("raw_etcd_txn_per_s").and_then(Value::as_f64) {
        report.insert("grant_to_raw_txn_ratio".into(), json!(grant_rate / raw));
    }

    // Handoff: w1 holds, w2 waits; release → w2's grant; then swap.
    let (token, _) = wait_granted(&mut acquire(&mut client, "w1", false).await?)
        .await
        .context("the first holder's grant")?;
    rising(&mut last_token, token, report);
    let mut holder = ("w1".to_string(), token);
    let mut handoffs = Vec::new();
    for i in 0..s.handoffs {
        let waiter = if i % 2 == 0 { "w2" } else { "w1" };
        let mut stream = acquire(&mut client, waiter, false).await?;
        // The first event is Queued (the holder has it).
        match next(&mut stream).await? {
            Said::Queued(_) => {}
            Said::Granted(t) => bail!(
                "{waiter} was granted (token {t}) while {} held the baton",
                holder.0
            ),
        }
        let t0 = Instant::now();
        release(&mut client, &holder.0, holder.1).await?;
        let (token, _) = wait_granted(&mut stream)
            .await
            .with_context(|| format!("handoff {} to {waiter}", i + 1))?;
        handoffs.push(t0.elapsed().as_secs_f64() * 1000.0);
        rising(&mut last_token, token, report);
        holder = (waiter.to_string(), token);
        report.insert("handoffs_done".into(), json!(i + 1));
    }
    release(&mut client, &holder.0, holder.1).await?;
    handoffs.sort_by(f64::total_cmp);
    report.insert("handoff_ms_p50".into(), json!(percentile(&handoffs, 0.5)));
    report.insert("handoff_ms_p99".into(), json!(percentile(&handoffs, 0.99)));
    report.insert("handoff_ms_max".into(), json!(handoffs.last()));

    // Failover: SIGKILL the leader, then ask the follower until it grants.
    let mut follower = b.client().await?;
    let t0 = Instant::now();
    a.kill();
    let (token, failover) = loop {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the standby never took over within 120 s of the leader's SIGKILL");
        }
        if let Some(status) = b.exit_status() {
            bail!(
                "the standby exited during the failover ({status}); its log ends:\n{}",
                crate::util::log_tail(&b.log_path(), 10)
            );
        }
        match acquire(&mut follower, "w3", false).await {
            Ok(mut stream) => {
                if let Ok(Ok((token, _))) =
                    tokio::time::timeout(Duration::from_secs(30), wait_granted(&mut stream)).await
                {
                    break (token, t0.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    rising(&mut last_token, token, report);
    report.insert("failover_ms".into(), json!(failover));
    Ok(())
}

fn print_table(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "coordinator on the etcd store (3 etcd members, election TTL {})",
        r["election_ttl"].as_str().unwrap_or("?")
    );
    println!("{:<38} {:>12}", "metric", "value");
    println!(
        "{:<38} {:>12.1}",
        "raw etcd txn/s (sequential)",
        f("raw_etcd_txn_per_s")
    );
    println!(
        "{:<38} {:>12.1}",
        "grants/s (acquire+release cycles)",
        f("grants_per_s")
    );
    println!(
        "{:<38} {:>12.3}",
        "grants/s ÷ raw txn/s",
        f("grant_to_raw_txn_ratio")
    );
    println!("{:<38} {:>12.1}", "handoff p50 (ms)", f("handoff_ms_p50"));
    println!("{:<38} {:>12.1}", "handoff p99 (ms)", f("handoff_ms_p99"));
    println!(
        "{:<38} {:>12.1}",
        "failover: SIGKILL → first grant (ms)",
        f("failover_ms")
    );
    if let Some(why) = r["failed"].as_str() {
        println!("failed: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole() -> Value {
        json!({
            "grant_cycles": 5, "grant_cycles_done": 5,
            "handoffs": 4, "handoffs_done": 4,
            "failover_ms": 2100.0,
            "fencing_tokens_rising": true,
        })
    }

    #[test]
    fn only_a_run_that_granted_every_cycle_and_handoff_and_failed_over_passes() {
        assert!(verdict(&whole()).is_empty());
        let mut nothing = whole();
        nothing["grant_cycles_done"] = json!(0);
        nothing["handoffs_done"] = json!(0);
        nothing["failover_ms"] = Value::Null;
        nothing["failed"] = json!("the coordinator exited at start");
        assert_eq!(
            verdict(&nothing),
            [
                "failed: the coordinator exited at start",
                "0 of 5 grant cycles granted",
                "0 of 4 handoffs granted",
                "the failover was not measured: the standby never granted"
            ]
        );
        let mut falling = whole();
        falling["fencing_tokens_rising"] = json!(false);
        assert_eq!(
            verdict(&falling),
            ["the fencing tokens did not rise from grant to grant"]
        );
    }
}
