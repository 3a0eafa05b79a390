//! `cargo xtask bench coordinator`: N agents (default 1,000) wait on Acquire
//! streams against a real coordinator process (release build, embedded
//! store) on loopback. Each grant is released at once, so the baton runs
//! down the queue; the bench measures
//! - handoff latency: from the moment a holder sends Release until the next
//!   waiter receives its Granted event (client-side clocks, one process);
//! - throughput: acquire+release cycles per second over the whole run;
//! - in the same run, two baselines the handoff cannot beat: a unary gRPC
//!   round trip (Status) and an atomic state write (write + fsync + rename +
//!   fsync dir of a file of the state's size). A handoff costs one release
//!   save, one grant save and two round trips, so the ratio to the baseline
//!   is the figure that travels between machines.
//!
//! Results go to target/bench/coordinator.json and a table on stdout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use baton_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

use crate::floor;
use crate::util::{connect, release_dir, start_embedded_coordinator, workspace_root};

struct Options {
    waiters: usize,
    per_connection: usize,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        waiters: 1000,
        per_connection: 50,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--waiters" => opts.waiters = it.next().context("--waiters N")?.parse()?,
            "--per-connection" => {
                opts.per_connection = it.next().context("--per-connection N")?.parse()?
            }
            other => bail!("unknown argument {other} (known: --waiters N, --per-connection N)"),
        }
    }
    if opts.waiters < 2 {
        bail!("--waiters must be at least 2");
    }
    Ok(opts)
}

/// Runs the bench.
pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let root = workspace_root();
    let server = start_embedded_coordinator(
        &release_dir().join("baton-coordinator"),
        root.join("target/bench/coordinator-data"),
        &root.join("target/bench/coordinator.log"),
        &[],
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(bench(&opts, server.port, &server.data))?;
    drop(server);

    let json = serde_json::to_string_pretty(&report)?;
    let out = root.join("target/bench/coordinator.json");
    std::fs::write(&out, &json)?;
    print_table(&report);
    println!("\nwritten to {}", out.display());
    Ok(())
}

/// One step of the chain: when the previous holder released.
struct Chain {
    released_at: Option<Instant>,
    handoffs: Histogram<u64>,
    /// Release call round trips (part of each handoff).
    releases: Histogram<u64>,
    done: usize,
}

async fn bench(opts: &Options, port: u16, data: &std::path::Path) -> Result<serde_json::Value> {
    let url = format!("http://127.0.0.1:{port}");
    let first = connect(&url).await?;

    // Baseline 1: unary gRPC round trip.
    let rtt = floor::grpc_round_trips(first.clone(), 500).await?;

    // Waiters: a holder first, then N queued behind it.
    let mut lease = CoordinatorClient::new(first.clone());
    let mut holder = lease
        .acquire(pb::AcquireRequest {
            node: "bench-holder".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let holder_token = loop {
        match holder.message().await?.and_then(|e| e.event) {
            Some(pb::acquire_event::Event::Granted(g)) => break g.fencing_token,
            Some(_) => {}
            None => bail!("holder stream ended"),
        }
    };
    let chain = Arc::new(Mutex::new(Chain {
        released_at: None,
        handoffs: Histogram::new(3)?,
        releases: Histogram::new(3)?,
        done: 0,
    }));
    let (all_done_tx, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    let mut channels = Vec::new();
    for _ in 0..opts.waiters.div_ceil(opts.per_connection) {
        channels.push(connect(&url).await?);
    }
    let (queued_tx, mut queued_rx) = tokio::sync::mpsc::channel::<()>(opts.waiters);
    for i in 0..opts.waiters {
        let mut client = CoordinatorClient::new(channels[i / opts.per_connection].clone());
        let chain = chain.clone();
        let all_done_tx = all_done_tx.clone();
        let queued_tx = queued_tx.clone();
        let waiters = opts.waiters;
        tokio::spawn(async move {
            let node = format!("bench-{i:05}");
            let mut stream = client
                .acquire(pb::AcquireRequest {
                    node: node.clone(),
                    ..Default::default()
                })
                .await
                .expect("acquire")
                .into_inner();
            let mut told = false;
            while let Some(event) = stream.message().await.expect("stream") {
                match event.event {
                    Some(pb::acquire_event::Event::Queued(_)) if !told => {
                        told = true;
                        let _ = queued_tx.send(()).await;
                    }
                    Some(pb::acquire_event::Event::Granted(g)) => {
                        let now = Instant::now();
                        {
                            let mut c = chain.lock().await;
                            if let Some(released) = c.released_at.take() {
                                let _ = c.handoffs.record((now - released).as_micros() as u64);
                            }
                            c.released_at = Some(Instant::now());
                        }
                        let sent = Instant::now();
                        client
                            .release(pb::ReleaseRequest {
                                node,
                                fencing_token: g.fencing_token,
                                reason: "bench".into(),
                            })
                            .await
                            .expect("release");
                        let took = sent.elapsed();
                        let mut c = chain.lock().await;
                        let _ = c.releases.record(took.as_micros() as u64);
                        c.done += 1;
                        if c.done == waiters {
                            let _ = all_done_tx.send(()).await;
                        }
                        return;
                    }
                    _ => {}
                }
            }
        });
    }
    for _ in 0..opts.waiters {
        queued_rx
            .recv()
            .await
            .context("a waiter failed before queueing")?;
    }
    // Start the chain.
    let start = Instant::now();
    chain.lock().await.released_at = Some(Instant::now());
    lease
        .release(pb::ReleaseRequest {
            node: "bench-holder".into(),
            fencing_token: holder_token,
            reason: "bench".into(),
        })
        .await?;
    tokio::time::timeout(Duration::from_secs(600), all_done.recv())
        .await
        .context("the chain did not finish in 10 minutes")?;
    let elapsed = start.elapsed();

    // Baseline 2: an atomic write of a state file of the same size.
    let state_size = std::fs::metadata(data.join("state.json"))
        .map(|m| m.len())
        .unwrap_or(4096) as usize;
    let fsync = floor::atomic_writes(&data.join("baseline"), state_size, 300)?;

    let c = chain.lock().await;
    let h = &c.handoffs;
    let floor_p50 = 2 * fsync.value_at_quantile(0.5) + 2 * rtt.value_at_quantile(0.5);
    Ok(serde_json::json!({
        "waiters": opts.waiters,
        "store": "embedded",
        "handoffs": h.len(),
        "handoff_us": {"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "max": h.max(), "mean": h.mean()},
        "release_rtt_us": {"p50": c.releases.value_at_quantile(0.5), "p99": c.releases.value_at_quantile(0.99)},
        "cycles_per_second": opts.waiters as f64 / elapsed.as_secs_f64(),
        "elapsed_s": elapsed.as_secs_f64(),
        "state_file_bytes": state_size,
        "baseline": {
            "grpc_rtt_us": {"p50": rtt.value_at_quantile(0.5), "p99": rtt.value_at_quantile(0.99)},
            "atomic_write_us": {"p50": fsync.value_at_quantile(0.5), "p99": fsync.value_at_quantile(0.99)},
            "floor_us_p50": floor_p50,
        },
        "handoff_p50_over_floor": h.value_at_quantile(0.5) as f64 / floor_p50.max(1) as f64,
    }))
}

fn print_table(r: &serde_json::Value) {
    println!(
        "coordinator bench: {} waiters, embedded store",
        r["waiters"]
    );
    println!("{:<44} {:>12}", "figure", "value");
    let rows = [
        ("handoff p50 (µs)", r["handoff_us"]["p50"].to_string()),
        ("handoff p99 (µs)", r["handoff_us"]["p99"].to_string()),
        ("handoff max (µs)", r["handoff_us"]["max"].to_string()),
        (
            "acquire+release cycles/s",
            format!("{:.0}", r["cycles_per_second"].as_f64().unwrap_or(0.0)),
        ),
        (
            "baseline: gRPC round trip p50 (µs)",
            r["baseline"]["grpc_rtt_us"]["p50"].to_string(),
        ),
        (
            "baseline: atomic state write p50 (µs)",
            r["baseline"]["atomic_write_us"]["p50"].to_string(),
        ),
        (
            "floor = 2 writes + 2 round trips p50 (µs)",
            r["baseline"]["floor_us_p50"].to_string(),
        ),
        (
            "handoff p50 / floor",
            format!("{:.2}", r["handoff_p50_over_floor"].as_f64().unwrap_or(0.0)),
        ),
    ];
    for (k, v) in rows {
        println!("{k:<44} {v:>12}");
    }
}
