//! `cargo xtask bench fleet`: a whole fleet asks for the baton at once (a
//! kernel CVE on every node) against one release coordinator.
//!
//! For every `--max-concurrent` and every fleet size (default 1,000, 10,000
//! and 30,000 waiters) a fresh coordinator process is started and the
//! simulated agents ([`agents`]) all send Acquire at the same moment, over a
//! few shared HTTP/2 connections. The run reports:
//! - handoff latency p50/p99/max (holder sends Release → next waiter has its
//!   grant) and grants per second;
//! - how long the ask storm took to answer (first Queued/Granted per agent);
//! - the coordinator's CPU seconds and peak RSS (`/proc/<pid>`, VmHWM);
//! - in the same run, the floor: two saves on the run's store (atomic file
//!   write, or a guarded etcd transaction of the state's size) plus two gRPC
//!   round trips, and the raw sequential save rate (etcd: raw txn/s).
//!
//! `--store etcd` runs the same against a real 3-member etcd cluster
//! ([`target`]); by default its agents release at once (`--agent instant`),
//! so grants per second compare directly with the raw transaction rate.
//!
//! Writes `fleet.json` (`fleet-etcd.json`) and an SVG plot of handoff
//! latency and RSS against the number of waiters (`fleet.svg`, [`plot`])
//! into `--out DIR` (default `target/bench`), and prints a table.
//!
//! A bench that did not do its job fails: when a run did not grant every
//! waiter exactly once (deadline, agent errors, a coordinator that exited
//! or never started, duplicate fencing tokens) or was skipped, the report
//! says which in its `verdict` and the bench exits non-zero after writing
//! it, so a suite that runs it (devtools/tests/bench_fleet.rs) notices a
//! bench that stopped granting.

mod agents;
mod plot;
pub(crate) mod target;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::args::Args;
use crate::floor;
use crate::procstat::{cpu_seconds, peak_rss_kib, rss_kib};
use crate::util::{connect, job_done, release_dir, workspace_root};
use agents::{AgentMode, Fleet};
use target::{Backend, Store};

const USAGE: &str = "bench fleet [--waiters 1000,10000,30000] [--max-concurrent 1,50] \
[--store embedded|etcd] [--agent real|instant] [--hold-ms 4] [--per-connection 1000] \
[--deadline SECS (default: 60 ms per waiter, at least 600)] [--seed N] [--coordinator PATH] \
[--floor-samples N (default 300)] [--out DIR (default: target/bench)] | bench fleet --replot OUT.json IN.json...";

/// The default time a run is given per waiter. A real agent's turn is five
/// durable saves in a row (Draining, renew, Rebooting, Verifying, the
/// release with the next grant) plus its hold: 25-35 ms on this machine's
/// disk whatever the queue's length, so 30,000 waiters need 15-18 minutes.
/// The deadline scales with the fleet so every size can finish; it only
/// stops a run that is far slower than that.
const DEADLINE_PER_WAITER: Duration = Duration::from_millis(60);

/// The least default deadline (small fleets).
const DEADLINE_MIN: Duration = Duration::from_secs(600);

struct Options {
    waiters: Vec<usize>,
    max_concurrent: Vec<usize>,
    store: Store,
    mode: AgentMode,
    hold_max: Duration,
    per_connection: usize,
    /// `None`: [`DEADLINE_PER_WAITER`] per waiter, at least [`DEADLINE_MIN`].
    deadline: Option<Duration>,
    seed: u64,
    /// The coordinator binary (another build, e.g. a baseline kept aside).
    binary: PathBuf,
    /// Where the report, the plot, the coordinators' data and logs go.
    out: PathBuf,
    /// Saves and round trips measured for each floor (before and after
    /// every run); fewer make a quick run (the suite's) quicker.
    floor_samples: usize,
}

fn list(value: &str) -> Result<Vec<usize>> {
    value
        .split(',')
        .map(|v| v.trim().replace('_', "").parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{value:?} is not a comma-separated list of numbers"))
}

fn parse(args: &[String]) -> Result<Options> {
    let mut waiters = None;
    let mut max_concurrent = None;
    let mut mode = None;
    let mut opts = Options {
        waiters: Vec::new(),
        max_concurrent: Vec::new(),
        store: Store::Embedded,
        mode: AgentMode::Real,
        hold_max: Duration::from_millis(4),
        per_connection: 1000,
        deadline: None,
        seed: 12,
        binary: release_dir().join("baton-coordinator"),
        out: workspace_root().join("target/bench"),
        floor_samples: 300,
    };
    let mut args = Args::new(args, USAGE);
    while let Some(flag) = args.flag() {
        match flag.as_str() {
            "fleet" => {}
            "--waiters" => waiters = Some(list(&args.value()?)?),
            "--max-concurrent" => max_concurrent = Some(list(&args.value()?)?),
            "--store" => {
                opts.store = match args.value()?.as_str() {
                    "embedded" => Store::Embedded,
                    "etcd" => Store::Etcd,
                    other => bail!("--store {other}: embedded or etcd"),
                }
            }
            "--agent" => {
                mode = Some(match args.value()?.as_str() {
                    "real" => AgentMode::Real,
                    "instant" => AgentMode::Instant,
                    other => bail!("--agent {other}: real or instant"),
                })
            }
            "--hold-ms" => opts.hold_max = Duration::from_millis(args.number()?),
            "--per-connection" => opts.per_connection = args.at_least(1)?,
            "--deadline" => opts.deadline = Some(args.seconds()?),
            "--seed" => opts.seed = args.number()?,
            "--coordinator" => opts.binary = PathBuf::from(args.value()?),
            "--out" => opts.out = PathBuf::from(args.value()?),
            "--floor-samples" => opts.floor_samples = args.number()?,
            other => bail!("unknown argument {other}; usage: {USAGE}"),
        }
    }
    let etcd = opts.store == Store::Etcd;
    opts.waiters = waiters.unwrap_or_else(|| {
        if etcd {
            vec![1000, 10_000]
        } else {
            vec![1000, 10_000, 30_000]
        }
    });
    opts.max_concurrent =
        max_concurrent.unwrap_or_else(|| if etcd { vec![1] } else { vec![1, 50] });
    opts.mode = mode.unwrap_or(if etcd {
        AgentMode::Instant
    } else {
        AgentMode::Real
    });
    if opts.waiters.iter().any(|w| *w < 2) || opts.max_concurrent.contains(&0) {
        bail!("--waiters must be at least 2 and --max-concurrent at least 1");
    }
    if opts.floor_samples < 10 {
        bail!("--floor-samples must be at least 10 (a floor needs a distribution)");
    }
    Ok(opts)
}

/// Runs the bench; `args` are the words after `bench`.
pub fn run(args: &[String]) -> Result<()> {
    if let Some(at) = args.iter().position(|a| a == "--replot") {
        return replot(&args[at + 1..]);
    }
    let opts = parse(args)?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = runtime.block_on(bench(&opts))?;
    let failures = verdict(&report);
    report["verdict"] = json!({ "ok": failures.is_empty(), "failures": failures });
    let name = match opts.store {
        Store::Embedded => "fleet",
        Store::Etcd => "fleet-etcd",
    };
    let json_path = opts.out.join(format!("{name}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let svg_path = opts.out.join(format!("{name}.svg"));
    std::fs::write(&svg_path, svg(&report))?;
    print_table(&report);
    println!(
        "\nwritten to {} and {}",
        json_path.display(),
        svg_path.display()
    );
    let written = format!("report written to {}", json_path.display());
    job_done("bench fleet", &written, &failures)
}

/// What went wrong in `report`'s runs, one line each; empty when every run
/// ran to the end and granted every waiter exactly once (one grant and one
/// distinct fencing token per waiter), with no agent failing and the
/// coordinator still running at the end.
fn verdict(report: &Value) -> Vec<String> {
    let runs = report["runs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if runs.is_empty() {
        return vec!["no run was made".to_string()];
    }
    let mut failures = Vec::new();
    for r in runs {
        let waiters = r["waiters"].as_u64().unwrap_or(0);
        let which = format!(
            "{waiters} waiters, --max-concurrent {}",
            r["max_concurrent"].as_u64().unwrap_or(0)
        );
        if let Some(why) = r["skipped"].as_str() {
            failures.push(format!("{which}: skipped ({why})"));
            continue;
        }
        if let Some(why) = r["failed"].as_str() {
            failures.push(format!("{which}: failed: {why}"));
            continue;
        }
        let grants = r["grants"].as_u64().unwrap_or(0);
        if r["finished"] != json!(true) {
            failures.push(format!(
                "{which}: unfinished at the {} s deadline ({grants} of {waiters} granted)",
                r["deadline_s"]
            ));
        } else if grants != waiters {
            failures.push(format!("{which}: {grants} of {waiters} granted"));
        }
        if let Some(errors) = r["errors"].as_u64().filter(|e| *e > 0) {
            failures.push(format!(
                "{which}: {errors} agents failed; first: {}",
                r["first_error"].as_str().unwrap_or("?")
            ));
        }
        let distinct = r["fencing_tokens"]["distinct"].as_u64().unwrap_or(0);
        if distinct != grants {
            failures.push(format!(
                "{which}: {grants} grants carried {distinct} distinct fencing tokens"
            ));
        }
        if let Some(exit) = r["coordinator_exited"].as_str() {
            failures.push(format!(
                "{which}: the coordinator exited during the run ({exit})"
            ));
        }
    }
    failures
}

/// `bench fleet --replot OUT.json IN.json...`: one report of the runs of
/// several (e.g. a 30,000-waiter run made on its own, with its own
/// deadline, and the smaller sizes), written to `OUT.json` with its plot
/// beside it (`OUT.svg`) and its table; the settings are the first
/// report's, and each run keeps its own floor.
fn replot(paths: &[String]) -> Result<()> {
    let [out, inputs @ ..] = paths else {
        bail!("usage: bench fleet --replot OUT.json IN.json [IN.json...]");
    };
    let mut merged: Option<Value> = None;
    for path in inputs {
        let report: Value = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {path}"))?,
        )
        .with_context(|| format!("{path} is not a fleet report"))?;
        let runs = report["runs"].as_array().cloned().unwrap_or_default();
        match &mut merged {
            None => merged = Some(report),
            Some(m) => {
                if let Some(all) = m["runs"].as_array_mut() {
                    all.extend(runs);
                }
            }
        }
    }
    let mut report = merged.context("no reports given")?;
    if let Some(runs) = report["runs"].as_array_mut() {
        runs.sort_by_key(|r| (r["max_concurrent"].as_u64(), r["waiters"].as_u64()));
    }
    std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    let svg_path = PathBuf::from(out).with_extension("svg");
    std::fs::write(&svg_path, svg(&report))?;
    print_table(&report);
    println!("\nwritten to {out} and {}", svg_path.display());
    Ok(())
}

async fn bench(opts: &Options) -> Result<Value> {
    let mut backend = Backend::start(opts.store, opts.binary.clone(), opts.out.clone()).await?;
    let mut runs = Vec::new();
    for &max in &opts.max_concurrent {
        let mut gave_up = None;
        for &waiters in &opts.waiters {
            if let Some(smaller) = gave_up {
                runs.push(json!({
                    "waiters": waiters,
                    "max_concurrent": max,
                    "skipped": format!("the run with {smaller} waiters did not finish"),
                }));
                continue;
            }
            eprintln!(
                "fleet: {waiters} waiters, --max-concurrent {max}, {} store, {} agents",
                opts.store.name(),
                opts.mode.name()
            );
            // A run that cannot be made (the coordinator does not start, or
            // dies) is part of the report, which is still written.
            let run = match one_run(opts, &mut backend, waiters, max).await {
                Ok(run) => run,
                Err(e) => {
                    eprintln!("fleet: the run failed: {e:#}");
                    json!({
                        "waiters": waiters,
                        "max_concurrent": max,
                        "finished": false,
                        "failed": format!("{e:#}"),
                    })
                }
            };
            if run["finished"] != json!(true) {
                gave_up = Some(waiters);
            }
            runs.push(run);
        }
    }
    Ok(json!({
        "bench": "fleet",
        "store": opts.store.name(),
        "agent": opts.mode.name(),
        "hold_max_ms": opts.hold_max.as_millis() as u64,
        "per_connection": opts.per_connection,
        "deadline_s": opts.deadline.map(|d| d.as_secs()),
        "deadline_per_waiter_ms": DEADLINE_PER_WAITER.as_millis() as u64,
        "seed": opts.seed,
        "coordinator_binary": opts.binary.display().to_string(),
        "runs": runs,
    }))
}

async fn one_run(
    opts: &Options,
    backend: &mut Backend,
    waiters: usize,
    max: usize,
) -> Result<Value> {
    let mut target = backend.coordinator(max).await?;
    let first = connect(&target.url).await?;
    // The gRPC floor on the idle coordinator, before the storm.
    let rtt = floor::grpc_round_trips(first, opts.floor_samples).await?;
    let mut channels = Vec::new();
    for _ in 0..waiters.div_ceil(opts.per_connection) {
        channels.push(connect(&target.url).await?);
    }
    // The raw save rate before the storm, and again after it: the machine
    // is shared, so the run is bracketed by its baseline.
    let save_before = target.save_floor(opts.floor_samples).await?;
    let etcd_before = backend.etcd_counters()?;
    let saves_before = target.saves_so_far();
    let sampler = target.sample_saves().await?;
    let cpu_before = cpu_seconds(target.pid)?;
    let own_cpu_before = cpu_seconds(std::process::id())?;
    let fleet = Fleet {
        agents: waiters,
        max_concurrent: max,
        mode: opts.mode,
        hold_max: opts.hold_max,
        seed: opts.seed,
        deadline: opts
            .deadline
            .unwrap_or_else(|| (DEADLINE_PER_WAITER * waiters as u32).max(DEADLINE_MIN)),
    };
    let deadline = fleet.deadline;
    let outcome = agents::run(fleet, &channels).await?;
    let cpu = cpu_seconds(target.pid)? - cpu_before;
    let own_cpu = cpu_seconds(std::process::id())? - own_cpu_before;
    let peak_kib = peak_rss_kib(target.pid)?;
    let end_kib = rss_kib(target.pid)?;
    drop(channels);
    let during = sampler.finish().await?;
    // A coordinator that died under the storm is a failed run even when
    // every agent happened to be done first.
    let coordinator_exited = target.exit_status();
    // Durable writes per grant (embedded store): what group commit saves.
    let saves_per_grant = target
        .saves_so_far()
        .zip(saves_before)
        .map(|(after, before)| (after - before) as f64 / outcome.grants.max(1) as f64);
    // What the run cost etcd per grant (the sampler's one save per 50 ms
    // and its size lookups included, as noted in the report).
    let etcd_per_grant: serde_json::Map<String, Value> = backend
        .etcd_counters()?
        .into_iter()
        .map(|(name, after)| {
            let before = etcd_before.get(&name).copied().unwrap_or(0.0);
            (name, json!((after - before) / outcome.grants.max(1) as f64))
        })
        .filter(|(_, v)| v.as_f64().is_some_and(|v| v > 0.0))
        .collect();
    let save = target.save_floor(opts.floor_samples).await?;
    drop(target);

    let h = &outcome.handoffs;
    let secs = outcome.elapsed.as_secs_f64();
    let grants_per_s = outcome.grants as f64 / secs;
    let raw_per_s = (save_before.saves_per_s + save.saves_per_s) / 2.0;
    let floor_us = 2 * during.value_at_quantile(0.5) + 2 * rtt.value_at_quantile(0.5);
    // The same floor at the 99th percentile, and the tail of the one
    // durable write a handoff costs since group commit: a handoff p99 near
    // the bare save's p99 is the disk's (or etcd's) tail, not ours.
    let save_p99_us = during.value_at_quantile(0.99);
    let floor_p99_us = 2 * save_p99_us + 2 * rtt.value_at_quantile(0.99);
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(json!({
        "waiters": waiters,
        "max_concurrent": max,
        "finished": outcome.finished,
        "deadline_s": deadline.as_secs(),
        "elapsed_s": secs,
        "grants": outcome.grants,
        "grants_per_s": grants_per_s,
        "handoffs": h.len(),
        "handoff_ms": {
            "p50": ms(h.value_at_quantile(0.5)),
            "p99": ms(h.value_at_quantile(0.99)),
            "max": ms(h.max()),
            "mean": h.mean() / 1000.0,
        },
        "first_answer_ms": {
            "p50": ms(outcome.first_answer.value_at_quantile(0.5)),
            "p99": ms(outcome.first_answer.value_at_quantile(0.99)),
            "max": ms(outcome.first_answer.max()),
        },
        "all_answered_s": outcome.all_answered.map(|d| d.as_secs_f64()),
        "queued_updates": outcome.queued_updates,
        "queued_updates_per_grant": outcome.queued_updates as f64 / outcome.grants.max(1) as f64,
        "errors": outcome.errors,
        "first_error": outcome.first_error,
        "fencing_tokens": {
            "distinct": outcome.tokens.len(),
            "min": outcome.tokens.first(),
            "max": outcome.tokens.last(),
        },
        "coordinator_exited": coordinator_exited,
        "coordinator": {
            "cpu_s": cpu,
            "cpu_cores": cpu / secs,
            "peak_rss_mib": peak_kib as f64 / 1024.0,
            "end_rss_mib": end_kib as f64 / 1024.0,
        },
        // The simulated agents and the sampler run in this process, on the
        // same 2 cores as the coordinator.
        "bench_process": {
            "cpu_s": own_cpu,
            "cpu_cores": own_cpu / secs,
            "peak_rss_mib": peak_rss_kib(std::process::id())? as f64 / 1024.0,
        },
        "by_tenth": by_tenth(&outcome.grant_log, waiters),
        "etcd_per_grant": etcd_per_grant,
        "saves_per_grant": saves_per_grant,
        "floor": {
            "grpc_rtt_ms_p50": ms(rtt.value_at_quantile(0.5)),
            "save_ms_p50": ms(during.value_at_quantile(0.5)),
            "save_ms_p99": ms(during.value_at_quantile(0.99)),
            "save_samples": during.len(),
            "raw_save_ms_p50_after": ms(save.save_us.value_at_quantile(0.5)),
            "raw_saves_per_s": raw_per_s,
            "raw_saves_per_s_before": save_before.saves_per_s,
            "raw_saves_per_s_after": save.saves_per_s,
            "raw_save_ms_p99_before": ms(save_before.save_us.value_at_quantile(0.99)),
            "raw_save_ms_p99_after": ms(save.save_us.value_at_quantile(0.99)),
            "state_bytes": save.state_bytes,
            "floor_ms": ms(floor_us),
            "grpc_rtt_ms_p99": ms(rtt.value_at_quantile(0.99)),
            "floor_p99_ms": ms(floor_p99_us),
        },
        "handoff_p50_over_floor": h.value_at_quantile(0.5) as f64 / floor_us.max(1) as f64,
        "handoff_p99_over_floor_p99": h.value_at_quantile(0.99) as f64 / floor_p99_us.max(1) as f64,
        "handoff_p99_over_save_p99": h.value_at_quantile(0.99) as f64 / save_p99_us.max(1) as f64,
        "grants_over_raw_saves": grants_per_s / raw_per_s,
    }))
}

/// The run cut into tenths of its grants: for each, the waiters left when
/// it began, its grants per second and its handoff p50 (ms). A per-grant
/// cost that grew with the queue's length would show as a rate rising
/// towards the end.
fn by_tenth(log: &[(Duration, Option<u64>)], waiters: usize) -> Vec<Value> {
    let mut tenths = Vec::new();
    let mut before = Duration::ZERO;
    for k in 0..10 {
        let (from, to) = (k * log.len() / 10, (k + 1) * log.len() / 10);
        let Some(slice) = log.get(from..to).filter(|s| !s.is_empty()) else {
            continue;
        };
        let end = slice[slice.len() - 1].0;
        let mut handoffs: Vec<u64> = slice.iter().filter_map(|(_, h)| *h).collect();
        handoffs.sort_unstable();
        let p50 = handoffs
            .get(handoffs.len() / 2)
            .map(|us| *us as f64 / 1000.0);
        tenths.push(json!({
            "waiting_at_start": waiters - from,
            "grants": slice.len(),
            "grants_per_s": slice.len() as f64 / (end - before).as_secs_f64().max(1e-9),
            "handoff_ms_p50": p50,
        }));
        before = end;
    }
    tenths
}

fn svg(report: &Value) -> String {
    let runs = report["runs"].as_array().cloned().unwrap_or_default();
    let mut maxes: Vec<u64> = runs
        .iter()
        .filter_map(|r| r["max_concurrent"].as_u64())
        .collect();
    maxes.sort_unstable();
    maxes.dedup();
    let series = maxes
        .iter()
        .map(|max| plot::Series {
            label: format!(
                "--max-concurrent {max} ({} store, {} agents)",
                report["store"].as_str().unwrap_or("?"),
                report["agent"].as_str().unwrap_or("?")
            ),
            points: runs
                .iter()
                .filter(|r| {
                    r["max_concurrent"].as_u64() == Some(*max)
                        && r["skipped"].is_null()
                        && r["failed"].is_null()
                })
                .map(|r| plot::Point {
                    waiters: r["waiters"].as_f64().unwrap_or(f64::NAN),
                    p50_ms: r["handoff_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
                    p99_ms: r["handoff_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
                    rss_mib: r["coordinator"]["peak_rss_mib"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    finished: r["finished"] == json!(true),
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    plot::render("baton fleet bench", &series)
}

fn print_table(report: &Value) {
    println!(
        "\nfleet bench: {} store, {} agents (hold up to {} ms), {} waiters per connection",
        report["store"].as_str().unwrap_or("?"),
        report["agent"].as_str().unwrap_or("?"),
        report["hold_max_ms"],
        report["per_connection"]
    );
    println!(
        "{:>7} {:>4} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>7} {:>9} {:>8}",
        "waiters",
        "max",
        "p50 ms",
        "p99 ms",
        "max ms",
        "grants/s",
        "floor ms",
        "p50/floor",
        "raw/s",
        "CPU s",
        "CPU cores",
        "RSS MiB"
    );
    for r in report["runs"].as_array().into_iter().flatten() {
        if let Some(why) = r["skipped"].as_str().or(r["failed"].as_str()) {
            let what = if r["failed"].is_null() {
                "skipped"
            } else {
                "failed"
            };
            println!(
                "{:>7} {:>4}  {what}: {why}",
                r["waiters"].as_u64().unwrap_or(0),
                r["max_concurrent"].as_u64().unwrap_or(0)
            );
            continue;
        }
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>7} {:>4} {:>9.2} {:>9.2} {:>9.1} {:>9.1} {:>8.2} {:>9.2} {:>8.1} {:>7.1} {:>9.2} {:>8.1}{}",
            r["waiters"].as_u64().unwrap_or(0),
            r["max_concurrent"].as_u64().unwrap_or(0),
            f(&r["handoff_ms"]["p50"]),
            f(&r["handoff_ms"]["p99"]),
            f(&r["handoff_ms"]["max"]),
            f(&r["grants_per_s"]),
            f(&r["floor"]["floor_ms"]),
            f(&r["handoff_p50_over_floor"]),
            f(&r["floor"]["raw_saves_per_s"]),
            f(&r["coordinator"]["cpu_s"]),
            f(&r["coordinator"]["cpu_cores"]),
            f(&r["coordinator"]["peak_rss_mib"]),
            if r["finished"] == json!(true) {
                String::new()
            } else {
                format!("  (deadline: {} of {} granted)", r["grants"], r["waiters"])
            }
        );
        let tenths: Vec<String> = r["by_tenth"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| format!("{:.1}", f(&t["grants_per_s"])))
            .collect();
        if !tenths.is_empty() {
            println!(
                "        saves per grant {:.2}; p99: {:.2}x the save's p99 ({:.1} ms), {:.2}x the floor's p99 ({:.1} ms); \
                 grants/s by tenth of the run: {}; bench process {:.2} cores",
                f(&r["saves_per_grant"]),
                f(&r["handoff_p99_over_save_p99"]),
                f(&r["floor"]["save_ms_p99"]),
                f(&r["handoff_p99_over_floor_p99"]),
                f(&r["floor"]["floor_p99_ms"]),
                tenths.join(" "),
                f(&r["bench_process"]["cpu_cores"])
            );
        }
        if let Some(e) = r["first_error"].as_str() {
            println!("        {} agents failed; first: {e}", r["errors"]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(grants: u64, distinct: u64) -> Value {
        json!({
            "waiters": 3,
            "max_concurrent": 1,
            "finished": true,
            "deadline_s": 600,
            "grants": grants,
            "errors": 0,
            "fencing_tokens": { "distinct": distinct },
            "coordinator_exited": null,
        })
    }

    #[test]
    fn only_a_run_that_granted_every_waiter_once_passes() {
        assert!(verdict(&json!({ "runs": [run(3, 3)] })).is_empty());
        assert_eq!(verdict(&json!({ "runs": [] })), ["no run was made"]);
        let shared_token = verdict(&json!({ "runs": [run(3, 2)] }));
        assert_eq!(
            shared_token,
            ["3 waiters, --max-concurrent 1: 3 grants carried 2 distinct fencing tokens"]
        );
        let mut short = run(2, 2);
        short["finished"] = json!(false);
        assert_eq!(
            verdict(&json!({ "runs": [short] })),
            ["3 waiters, --max-concurrent 1: unfinished at the 600 s deadline (2 of 3 granted)"]
        );
        let mut died = run(3, 3);
        died["coordinator_exited"] = json!("signal: 9 (SIGKILL)");
        died["errors"] = json!(1);
        died["first_error"] = json!("release: transport error");
        assert_eq!(verdict(&json!({ "runs": [died] })).len(), 2);
        let skipped = json!({ "waiters": 5, "max_concurrent": 1, "skipped": "the run with 3 waiters did not finish" });
        assert_eq!(verdict(&json!({ "runs": [run(3, 3), skipped] })).len(), 1);
    }
}
