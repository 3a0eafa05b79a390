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
//! Results go to `coordinator.json` in `--out DIR` (default `target/bench`,
//! which also holds the coordinator's data and log) and a table on stdout.
//!
//! A bench that did not do its job fails: when a waiter's stream failed,
//! the coordinator exited or never started, the `--deadline` passed, a
//! waiter was granted twice or never, two holders overlapped or the
//! fencing tokens did not rise along the chain, the run stops at once, the
//! report's `verdict` says which, and the bench exits non-zero after
//! writing it (devtools/tests/bench_coordinator.rs runs it small).

use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use baton_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tonic::transport::Channel;

use crate::args::{Args, Run};
use crate::floor;
use crate::util::{connect, job_done, start_embedded_coordinator};

const USAGE: &str = "bench coordinator [--waiters N (default 1000)] [--per-connection N (default 50)] \
[--coordinator PATH (default: the release build)] [--out DIR (default: target/bench)] \
[--floor-samples N (default: 500 round trips, 300 writes)] [--deadline SECS (default 600)]";

struct Options {
    waiters: usize,
    per_connection: usize,
    /// `--coordinator`, `--out`, `--deadline`.
    run: Run,
    /// Round trips and writes measured for the floor; `None`: 500 round
    /// trips and 300 writes.
    floor_samples: Option<usize>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options {
        waiters: 1000,
        per_connection: 50,
        run: Run::default(),
        floor_samples: None,
    };
    let mut args = Args::new(args, USAGE);
    while let Some(flag) = args.flag() {
        match flag.as_str() {
            "coordinator" => {}
            "--waiters" => opts.waiters = args.number()?,
            "--per-connection" => opts.per_connection = args.at_least(1)?,
            "--floor-samples" => opts.floor_samples = Some(args.number()?),
            other if args.run_flag(other, &mut opts.run, "embedded")? => {}
            other => bail!("unknown argument {other}; usage: {USAGE}"),
        }
    }
    if opts.waiters < 2 {
        bail!("--waiters must be at least 2");
    }
    if opts.floor_samples.is_some_and(|n| n < 10) {
        bail!("--floor-samples must be at least 10 (a floor needs a distribution)");
    }
    Ok(opts)
}

/// Runs the bench; `args` are the words after `bench`.
pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    std::fs::create_dir_all(&opts.run.out)
        .with_context(|| format!("creating {}", opts.run.out.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let log = opts.run.out.join("coordinator.log");
    let started = start_embedded_coordinator(
        &opts.run.binary,
        opts.run.out.join("coordinator-data"),
        &log,
        &[],
    )
    .and_then(|mut server| {
        server.wait_listening(&log)?;
        Ok(server)
    });
    let mut report = match started {
        Ok(mut server) => {
            let data = server.data.clone();
            let report = runtime.block_on(bench(&opts, server.port, &mut server.process.0, &data));
            report.unwrap_or_else(|e| json!({ "failed": format!("{e:#}") }))
        }
        Err(e) => json!({ "failed": format!("{e:#}") }),
    };
    report["waiters"] = json!(opts.waiters);
    report["store"] = json!("embedded");
    report["coordinator_binary"] = json!(opts.run.binary.display().to_string());
    report["deadline_s"] = json!(opts.run.deadline.as_secs());
    let failures = verdict(&report);
    report["verdict"] = json!({ "ok": failures.is_empty(), "failures": failures });

    let out = opts.run.out.join("coordinator.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    print_table(&report);
    println!("\nwritten to {}", out.display());
    let written = format!(
        "report written to {}; the coordinator's log is {}",
        out.display(),
        log.display()
    );
    job_done("bench coordinator", &written, &failures)
}

/// What went wrong in `report`, one line each; empty when the run ran to
/// the end with every waiter granted exactly once, one handoff per waiter,
/// the fencing tokens distinct and rising along the chain, and the
/// coordinator still running.
fn verdict(report: &Value) -> Vec<String> {
    if let Some(why) = report["failed"].as_str() {
        return vec![format!("failed: {why}")];
    }
    let mut failures = Vec::new();
    let waiters = report["waiters"].as_u64().unwrap_or(0);
    let grants = report["grants"].as_u64().unwrap_or(0);
    if let Some(why) = report["stopped"].as_str() {
        failures.push(format!("stopped after {grants} of {waiters} grants: {why}"));
    } else if grants != waiters {
        failures.push(format!("{grants} of {waiters} waiters granted"));
    }
    let handoffs = report["handoffs"].as_u64().unwrap_or(0);
    if report["stopped"].is_null() && handoffs != waiters {
        failures.push(format!(
            "{handoffs} handoffs measured for {waiters} waiters"
        ));
    }
    // The holder's grant starts the chain: one token more than grants.
    let tokens = &report["fencing_tokens"];
    let distinct = tokens["distinct"].as_u64().unwrap_or(0);
    if distinct != grants + 1 {
        failures.push(format!(
            "{} grants (the holder's included) carried {distinct} distinct fencing tokens",
            grants + 1
        ));
    }
    if tokens["rising"] != json!(true) {
        failures.push("the fencing tokens did not rise along the chain".to_string());
    }
    if let Some(exit) = report["coordinator_exited"].as_str() {
        failures.push(format!("the coordinator exited during the run ({exit})"));
    }
    failures
}

/// The grants seen so far, checked as they come: one holder at a time,
/// each waiter once, tokens rising.
struct Chain {
    /// When the last holder sent its Release.
    released_at: Option<Instant>,
    /// Who holds the baton now (`usize::MAX`: the first holder).
    holding: Option<usize>,
    handoffs: Histogram<u64>,
    /// Release call round trips (part of each handoff).
    releases: Histogram<u64>,
    /// Fencing tokens in grant order, the first holder's first.
    tokens: Vec<u64>,
    /// Grants per waiter.
    granted: Vec<u32>,
}

/// The first holder's index in [`Chain::holding`].
const HOLDER: usize = usize::MAX;

impl Chain {
    /// Waiter `i` was granted `token` at `now`; an error when another
    /// holder has not released, when `i` was granted before, or when the
    /// token does not rise above the previous grant's.
    fn grant(&mut self, i: usize, token: u64, now: Instant) -> Result<()> {
        if let Some(other) = self.holding {
            let other = if other == HOLDER {
                "the first holder".to_string()
            } else {
                format!("bench-{other:05}")
            };
            bail!("granted (token {token}) while {other} still held the baton");
        }
        if self.granted[i] > 0 {
            bail!("granted a second time (token {token})");
        }
        if let Some(last) = self.tokens.last().filter(|last| **last >= token) {
            bail!("granted token {token}, not above the previous grant's {last}");
        }
        self.granted[i] += 1;
        self.tokens.push(token);
        self.holding = Some(i);
        if let Some(released) = self.released_at.take() {
            let _ = self.handoffs.record((now - released).as_micros() as u64);
        }
        Ok(())
    }

    /// The holder is about to send Release: the next grant may come now.
    fn releasing(&mut self) {
        self.holding = None;
        self.released_at = Some(Instant::now());
    }
}

/// What a waiter tells the bench.
enum Note {
    /// Its first Queued event.
    Queued,
    /// Granted once, released, and its stream ended.
    Done,
    /// What went wrong ("bench-00012: ...").
    Failed(String),
}

/// How many waiters queued and finished so far.
#[derive(Default)]
struct Counts {
    queued: usize,
    done: usize,
}

/// Reads the waiters' notes until `enough` says so. `Some(why)` when the
/// run must stop first: a waiter failed, the coordinator exited, or the
/// deadline passed.
async fn wait_for(
    notes: &mut mpsc::Receiver<Note>,
    counts: &mut Counts,
    enough: impl Fn(&Counts) -> bool,
    process: &mut Child,
    deadline: tokio::time::Instant,
    (chain, waiters, limit): (&Mutex<Chain>, usize, Duration),
) -> Option<String> {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !enough(counts) {
        tokio::select! {
            note = notes.recv() => match note {
                Some(Note::Queued) => counts.queued += 1,
                Some(Note::Done) => counts.done += 1,
                Some(Note::Failed(why)) => return Some(format!("a waiter failed: {why}")),
                None => return Some("every waiter ended early".to_string()),
            },
            _ = tick.tick() => {
                if let Ok(Some(status)) = process.try_wait() {
                    return Some(format!("the coordinator exited during the run ({status})"));
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let grants = chain.lock().await.tokens.len().saturating_sub(1);
                return Some(format!(
                    "unfinished at the {} s deadline ({} of {waiters} queued, {grants} granted)",
                    limit.as_secs(),
                    counts.queued
                ));
            }
        }
    }
    None
}

/// One waiter: asks, waits, releases at once, then reads its stream to
/// the end (a second grant there is an error).
async fn waiter(
    i: usize,
    mut client: CoordinatorClient<Channel>,
    chain: Arc<Mutex<Chain>>,
    notes: mpsc::Sender<Note>,
) -> Result<()> {
    let node = format!("bench-{i:05}");
    let mut stream = client
        .acquire(pb::AcquireRequest {
            node: node.clone(),
            ..Default::default()
        })
        .await
        .context("Acquire")?
        .into_inner();
    let mut told = false;
    let mut granted = None;
    while let Some(event) = stream.message().await.context("the Acquire stream")? {
        match event.event {
            Some(pb::acquire_event::Event::Queued(_)) if !told => {
                told = true;
                let _ = notes.send(Note::Queued).await;
            }
            Some(pb::acquire_event::Event::Granted(g)) => {
                let now = Instant::now();
                if let Some(first) = granted {
                    bail!(
                        "granted a second time on one stream (tokens {first} and {})",
                        g.fencing_token
                    );
                }
                granted = Some(g.fencing_token);
                {
                    let mut c = chain.lock().await;
                    c.grant(i, g.fencing_token, now)?;
                    c.releasing();
                }
                let sent = Instant::now();
                client
                    .release(pb::ReleaseRequest {
                        node: node.clone(),
                        fencing_token: g.fencing_token,
                        reason: "bench".into(),
                    })
                    .await
                    .context("Release")?;
                let took = sent.elapsed();
                let _ = chain.lock().await.releases.record(took.as_micros() as u64);
            }
            _ => {}
        }
    }
    if granted.is_none() {
        bail!("the Acquire stream ended without a grant");
    }
    Ok(())
}

async fn bench(opts: &Options, port: u16, process: &mut Child, data: &Path) -> Result<Value> {
    let url = format!("http://127.0.0.1:{port}");
    let first = connect(&url).await?;
    let deadline = tokio::time::Instant::now() + opts.run.deadline;

    // Baseline 1: unary gRPC round trip.
    let rtt = floor::grpc_round_trips(first.clone(), opts.floor_samples.unwrap_or(500)).await?;

    // Waiters: a holder first, then N queued behind it.
    let mut lease = CoordinatorClient::new(first.clone());
    let mut told = String::from("nothing");
    let holder = tokio::time::timeout_at(deadline, async {
        let mut holder = lease
            .acquire(pb::AcquireRequest {
                node: "bench-holder".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        loop {
            match holder.message().await?.and_then(|e| e.event) {
                Some(pb::acquire_event::Event::Granted(g)) => break Ok(g.fencing_token),
                Some(pb::acquire_event::Event::Queued(q)) => told = format!("queued: {}", q.reason),
                None => bail!("the first holder's Acquire stream ended without a grant"),
            }
        }
    })
    .await;
    let holder_token = match holder {
        Ok(token) => token.context("the first holder's Acquire")?,
        Err(_) => bail!(
            "unfinished at the {} s deadline: the first holder was not granted (it was told {told})",
            opts.run.deadline.as_secs()
        ),
    };
    let chain = Arc::new(Mutex::new(Chain {
        released_at: None,
        holding: Some(HOLDER),
        handoffs: Histogram::new(3)?,
        releases: Histogram::new(3)?,
        tokens: vec![holder_token],
        granted: vec![0; opts.waiters],
    }));
    let mut channels = Vec::new();
    for _ in 0..opts.waiters.div_ceil(opts.per_connection) {
        channels.push(connect(&url).await?);
    }
    // Each waiter sends at most two notes: the channel never blocks.
    let (notes_tx, mut notes) = mpsc::channel::<Note>(2 * opts.waiters);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.waiters {
        let client = CoordinatorClient::new(channels[i / opts.per_connection].clone());
        let (chain, notes_tx) = (chain.clone(), notes_tx.clone());
        tasks.spawn(async move {
            let outcome = waiter(i, client, chain, notes_tx.clone()).await;
            let _ = notes_tx
                .send(match outcome {
                    Ok(()) => Note::Done,
                    Err(e) => Note::Failed(format!("bench-{i:05}: {e:#}")),
                })
                .await;
        });
    }
    drop(notes_tx);
    let mut counts = Counts::default();
    let context = (&*chain, opts.waiters, opts.run.deadline);
    let waiters = opts.waiters;
    let mut stopped = wait_for(
        &mut notes,
        &mut counts,
        |c| c.queued == waiters,
        process,
        deadline,
        context,
    )
    .await;
    // Start the chain.
    let start = Instant::now();
    if stopped.is_none() {
        chain.lock().await.releasing();
        lease
            .release(pb::ReleaseRequest {
                node: "bench-holder".into(),
                fencing_token: holder_token,
                reason: "bench".into(),
            })
            .await
            .context("the first holder's Release")?;
        stopped = wait_for(
            &mut notes,
            &mut counts,
            |c| c.done == waiters,
            process,
            deadline,
            context,
        )
        .await;
    }
    let elapsed = start.elapsed();
    // A stopped run ends now: its waiters are of no more use.
    tasks.abort_all();
    let coordinator_exited = process.try_wait().ok().flatten().map(|s| s.to_string());

    // Baseline 2: an atomic write of a state file of the same size (only
    // for a run that finished: a stopped one ends promptly).
    let state_size = std::fs::metadata(data.join("state.json"))
        .map(|m| m.len())
        .unwrap_or(4096) as usize;
    let fsync = match stopped {
        None => Some(floor::atomic_writes(
            &data.join("baseline"),
            state_size,
            opts.floor_samples.unwrap_or(300),
        )?),
        Some(_) => None,
    };

    let c = chain.lock().await;
    let h = &c.handoffs;
    let grants = c.tokens.len() - 1;
    let mut distinct = c.tokens.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let rising = c.tokens.windows(2).all(|w| w[0] < w[1]);
    let floor_p50 = fsync
        .as_ref()
        .map(|f| 2 * f.value_at_quantile(0.5) + 2 * rtt.value_at_quantile(0.5));
    let q = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
    Ok(json!({
        "stopped": stopped,
        "coordinator_exited": coordinator_exited,
        "grants": grants,
        "waiters_granted_twice": c.granted.iter().filter(|n| **n > 1).count(),
        "fencing_tokens": {
            "distinct": distinct.len(),
            "first": c.tokens.first(),
            "last": c.tokens.last(),
            "rising": rising,
        },
        "handoffs": h.len(),
        "handoff_us": {"p50": q(h, 0.5), "p99": q(h, 0.99), "max": (!h.is_empty()).then(|| h.max()), "mean": h.mean()},
        "release_rtt_us": {"p50": q(&c.releases, 0.5), "p99": q(&c.releases, 0.99)},
        "cycles_per_second": grants as f64 / elapsed.as_secs_f64(),
        "elapsed_s": elapsed.as_secs_f64(),
        "state_file_bytes": state_size,
        "baseline": {
            "grpc_rtt_us": {"p50": rtt.value_at_quantile(0.5), "p99": rtt.value_at_quantile(0.99), "samples": rtt.len()},
            "atomic_write_us": {
                "p50": fsync.as_ref().map(|f| f.value_at_quantile(0.5)),
                "p99": fsync.as_ref().map(|f| f.value_at_quantile(0.99)),
                "samples": fsync.as_ref().map(|f| f.len()),
            },
            "floor_us_p50": floor_p50,
        },
        "handoff_p50_over_floor": floor_p50
            .filter(|_| !h.is_empty())
            .map(|f| h.value_at_quantile(0.5) as f64 / f.max(1) as f64),
    }))
}

fn print_table(r: &Value) {
    println!(
        "coordinator bench: {} waiters, embedded store",
        r["waiters"]
    );
    if let Some(why) = r["failed"].as_str() {
        println!("failed: {why}");
        return;
    }
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
    if let Some(why) = r["stopped"].as_str() {
        println!("stopped: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(grants: u64, distinct: u64, rising: bool) -> Value {
        json!({
            "waiters": 3,
            "stopped": null,
            "coordinator_exited": null,
            "grants": grants,
            "handoffs": grants,
            "fencing_tokens": { "distinct": distinct, "rising": rising },
        })
    }

    #[test]
    fn only_a_chain_that_granted_every_waiter_once_with_rising_tokens_passes() {
        assert!(verdict(&finished(3, 4, true)).is_empty());
        assert_eq!(
            verdict(&finished(3, 3, true)),
            ["4 grants (the holder's included) carried 3 distinct fencing tokens"]
        );
        assert_eq!(
            verdict(&finished(3, 4, false)),
            ["the fencing tokens did not rise along the chain"]
        );
        assert_eq!(
            verdict(&finished(2, 3, true)),
            [
                "2 of 3 waiters granted",
                "2 handoffs measured for 3 waiters"
            ]
        );
        let mut stopped = finished(1, 2, true);
        stopped["stopped"] = json!("unfinished at the 1 s deadline");
        stopped["coordinator_exited"] = json!("signal: 9 (SIGKILL)");
        assert_eq!(
            verdict(&stopped),
            [
                "stopped after 1 of 3 grants: unfinished at the 1 s deadline",
                "the coordinator exited during the run (signal: 9 (SIGKILL))"
            ]
        );
        assert_eq!(
            verdict(&json!({ "failed": "the coordinator exited at start" })),
            ["failed: the coordinator exited at start"]
        );
    }

    #[test]
    fn the_chain_refuses_a_second_holder_a_second_grant_and_a_falling_token() {
        let chain = || Chain {
            released_at: None,
            holding: Some(HOLDER),
            handoffs: Histogram::new(3).unwrap(),
            releases: Histogram::new(3).unwrap(),
            tokens: vec![10],
            granted: vec![0; 3],
        };
        let now = Instant::now();
        let mut c = chain();
        let err = c.grant(0, 11, now).unwrap_err().to_string();
        assert!(err.contains("while the first holder still held"), "{err}");
        c.releasing();
        c.grant(0, 11, now).unwrap();
        c.releasing();
        let err = c.grant(0, 12, now).unwrap_err().to_string();
        assert!(err.contains("second time"), "{err}");
        let err = c.grant(1, 11, now).unwrap_err().to_string();
        assert!(err.contains("not above the previous grant's 11"), "{err}");
        c.grant(1, 12, now).unwrap();
        assert_eq!(c.tokens, [10, 11, 12]);
        assert_eq!(c.handoffs.len(), 2);
    }
}
