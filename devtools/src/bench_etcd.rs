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
//! Writes `target/bench/coordinator-etcd.json` and prints a table.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use baton_proto::v1::ReleaseRequest;
use baton_tests::etcd::EtcdCluster;
use baton_tests::etcd::coordinator::{Coordinator, acquire, wait_granted};

use crate::util::release_dir;

/// Bench settings (from the command line).
struct Settings {
    txns: usize,
    cycles: usize,
    handoffs: usize,
    election_ttl: String,
}

fn parse(args: &[String]) -> Result<Settings> {
    let mut s = Settings {
        txns: 500,
        cycles: 100,
        handoffs: 50,
        election_ttl: "2s".to_string(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "coordinator" => {}
            "--store" => {
                let store = value()?;
                if store != "etcd" {
                    bail!("this bench measures --store etcd, not {store}");
                }
            }
            "--txns" => s.txns = value()?.parse()?,
            "--cycles" => s.cycles = value()?.parse()?,
            "--handoffs" => s.handoffs = value()?.parse()?,
            "--election-ttl" => s.election_ttl = value()?.clone(),
            other => bail!(
                "unknown argument {other} (--store etcd, --txns N, --cycles N, --handoffs N, --election-ttl D)"
            ),
        }
    }
    Ok(s)
}

/// Runs the bench; `args` are the words after `cargo xtask bench`.
pub fn run(args: &[String]) -> Result<()> {
    let settings = parse(args)?;
    let root = crate::util::workspace_root();
    let binary = release_dir().join("baton-coordinator");
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(measure(&settings, &binary))?;
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join("coordinator-etcd.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    print_table(&report);
    println!("\nwritten to {}", path.display());
    Ok(())
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

async fn measure(s: &Settings, binary: &std::path::Path) -> Result<serde_json::Value> {
    let cluster = EtcdCluster::start(3).await?;

    // Raw etcd: sequential guarded transactions of a state-sized document.
    let mut etcd = cluster.client().await?;
    let (_, txn_rate) = crate::floor::etcd_txns(&mut etcd, 4096, s.txns).await?;

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
    let mut a = Coordinator::start_binary(binary, "a", &first)?;
    a.wait_ready().await?;
    let b = Coordinator::start_binary(binary, "b", &args)?;
    let mut client = a.client().await?;

    // Grant throughput: acquire → granted → release, one node.
    let started = Instant::now();
    for _ in 0..s.cycles {
        let mut stream = acquire(&mut client, "w1", false).await?;
        let (token, _) = wait_granted(&mut stream).await?;
        client
            .release(ReleaseRequest {
                node: "w1".into(),
                fencing_token: token,
                reason: "bench".into(),
            })
            .await?;
    }
    let grant_rate = s.cycles as f64 / started.elapsed().as_secs_f64();

    // Handoff: w1 holds, w2 waits; release → w2's grant; then swap.
    let mut holder = (
        "w1".to_string(),
        wait_granted(&mut acquire(&mut client, "w1", false).await?)
            .await?
            .0,
    );
    let mut handoffs = Vec::new();
    for i in 0..s.handoffs {
        let waiter = if i % 2 == 0 { "w2" } else { "w1" };
        let mut stream = acquire(&mut client, waiter, false).await?;
        // The first event is Queued (the holder has it).
        baton_tests::etcd::coordinator::next(&mut stream).await?;
        let t0 = Instant::now();
        client
            .release(ReleaseRequest {
                node: holder.0.clone(),
                fencing_token: holder.1,
                reason: "bench".into(),
            })
            .await?;
        let (token, _) = wait_granted(&mut stream).await?;
        handoffs.push(t0.elapsed().as_secs_f64() * 1000.0);
        holder = (waiter.to_string(), token);
    }
    client
        .release(ReleaseRequest {
            node: holder.0.clone(),
            fencing_token: holder.1,
            reason: "bench".into(),
        })
        .await?;
    handoffs.sort_by(f64::total_cmp);

    // Failover: SIGKILL the leader, then ask the follower until it grants.
    let mut follower = b.client().await?;
    let t0 = Instant::now();
    a.kill();
    let failover = loop {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the follower never took over");
        }
        match acquire(&mut follower, "w3", false).await {
            Ok(mut stream) => {
                if let Ok(Ok((_, _))) =
                    tokio::time::timeout(Duration::from_secs(30), wait_granted(&mut stream)).await
                {
                    break t0.elapsed().as_secs_f64() * 1000.0;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };

    Ok(serde_json::json!({
        "etcd_members": 3,
        "coordinator_profile": "release",
        "election_ttl": s.election_ttl,
        "raw_etcd_txn_per_s": txn_rate,
        "grant_cycles": s.cycles,
        "grants_per_s": grant_rate,
        "grant_to_raw_txn_ratio": grant_rate / txn_rate,
        "handoffs": s.handoffs,
        "handoff_ms_p50": percentile(&handoffs, 0.5),
        "handoff_ms_p99": percentile(&handoffs, 0.99),
        "handoff_ms_max": handoffs.last().copied().unwrap_or(f64::NAN),
        "failover_ms": failover,
    }))
}

fn print_table(r: &serde_json::Value) {
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
}
