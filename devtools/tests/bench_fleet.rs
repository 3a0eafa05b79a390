//! `bench fleet` end to end, small: the real `baton-devtools bench fleet`
//! against the workspace's debug coordinator, on the embedded store with
//! agents that renew and report, and on a real 3-member etcd cluster with
//! instant agents; checked from the exit status and the report. And runs
//! that cannot succeed (a coordinator that exits at once, a deadline too
//! short to grant everyone) must exit non-zero with a report that says so:
//! a bench that stopped granting fails the suite instead of printing a
//! table of nothing.
//!
//! Every run is bounded by `--deadline`, so a bench that grants nothing
//! fails in that time instead of the default ten minutes. Needs etcd
//! (Debian's etcd-server), which `cargo xtask test` installs.

mod common;

use std::path::Path;

use common::{Bench, assert_positive, number};
use serde_json::Value;

/// Runs `bench fleet` with `args` against `coordinator` (see
/// [`Bench::run`]), with a floor of few samples: enough for a
/// distribution, few enough for a quick run.
fn fleet(coordinator: Option<&Path>, args: &[&str], report: &str) -> Bench {
    let small = ["--floor-samples", "30"];
    Bench::run("fleet", coordinator, args.iter().chain(&small), &[], report)
}

/// A fleet report's runs.
fn runs(report: &Value) -> &[Value] {
    report["runs"].as_array().expect("runs")
}

/// Checks one run that must have done its whole job: finished, every
/// waiter granted exactly once with one fencing token each (a fresh
/// coordinator per run: consecutive tokens), no agent failed, handoffs
/// measured against a measured floor.
fn assert_granted_everyone(run: &Value, waiters: u64) {
    let at = |p: &str| run.pointer(p).cloned().unwrap_or(Value::Null);
    assert_eq!(at("/finished"), Value::Bool(true), "{run:#}");
    assert_eq!(at("/grants").as_u64(), Some(waiters), "{run:#}");
    assert_eq!(at("/errors").as_u64(), Some(0), "{run:#}");
    assert_eq!(at("/coordinator_exited"), Value::Null, "{run:#}");
    assert_eq!(
        at("/fencing_tokens/distinct").as_u64(),
        Some(waiters),
        "{run:#}"
    );
    let (min, max) = (
        number(run, "/fencing_tokens/min") as u64,
        number(run, "/fencing_tokens/max") as u64,
    );
    assert_eq!(max - min + 1, waiters, "tokens not one per grant: {run:#}");
    // With `max` holders the first `max` grants fill free slots; every
    // later one is a handoff.
    let max_concurrent = number(run, "/max_concurrent") as u64;
    assert_eq!(
        at("/handoffs").as_u64(),
        Some(waiters - max_concurrent),
        "{run:#}"
    );
    assert_positive(
        run,
        &[
            "/handoff_ms/p50",
            "/handoff_ms/p99",
            "/handoff_ms/max",
            "/grants_per_s",
            "/floor/floor_ms",
            "/floor/grpc_rtt_ms_p50",
            "/floor/save_ms_p50",
            "/floor/raw_saves_per_s",
            "/handoff_p50_over_floor",
            "/grants_over_raw_saves",
            "/coordinator/peak_rss_mib",
        ],
    );
    assert!(number(run, "/handoff_ms/p99") >= number(run, "/handoff_ms/p50"));
}

/// The plot is an SVG document whose tags balance, with one point per run
/// on each of its three lines (p50, p99, RSS) and no missing figure.
fn assert_svg(path: &Path, points: usize) {
    let svg = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} not written: {e}", path.display()));
    assert!(
        svg.starts_with("<svg") && svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#),
        "not an SVG document: {}",
        &svg[..svg.len().min(200)]
    );
    let mut open = Vec::new();
    let mut rest = svg.as_str();
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("an unclosed tag") + start;
        let tag = &rest[start + 1..end];
        let name = |t: &str| t.split_whitespace().next().unwrap_or("").to_string();
        if let Some(closing) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(name(closing)), "unbalanced </{closing}>");
        } else if !tag.ends_with('/') && !tag.starts_with('!') && !tag.starts_with('?') {
            open.push(name(tag));
        }
        rest = &rest[end + 1..];
    }
    assert!(open.is_empty(), "tags left open: {open:?}");
    assert_eq!(svg.matches("<circle").count(), 3 * points, "{svg}");
    assert!(!svg.contains("NaN"), "{svg}");
}

#[test]
fn thirty_real_agents_are_each_granted_once_at_one_and_two_holders() {
    let bench = fleet(
        None,
        &[
            "--waiters",
            "30",
            "--max-concurrent",
            "1,2",
            "--agent",
            "real",
            "--deadline",
            "60",
        ],
        "fleet",
    );
    let runs = runs(bench.succeeded());
    assert_eq!(bench.report["store"], "embedded");
    assert_eq!(bench.report["agent"], "real");
    assert_eq!(runs.len(), 2, "{:#}", bench.report);
    for (run, max) in runs.iter().zip([1, 2]) {
        assert_eq!(run["max_concurrent"], max);
        assert_granted_everyone(run, 30);
        // Real agents report three phases and renew: more than one durable
        // write per grant.
        assert!(number(run, "/saves_per_grant") > 1.0, "{run:#}");
    }
    assert_svg(&bench.out.path().join("fleet.svg"), 2);
}

#[test]
fn twenty_instant_agents_are_each_granted_once_on_a_real_etcd_cluster() {
    let bench = fleet(
        None,
        &[
            "--store",
            "etcd",
            "--waiters",
            "20",
            "--max-concurrent",
            "1",
            "--deadline",
            "60",
        ],
        "fleet-etcd",
    );
    let runs = runs(bench.succeeded());
    assert_eq!(bench.report["store"], "etcd");
    assert_eq!(
        bench.report["agent"], "instant",
        "etcd defaults to instant agents"
    );
    assert_eq!(runs.len(), 1, "{:#}", bench.report);
    let run = &runs[0];
    assert_granted_everyone(run, 20);
    // The raw etcd transaction rate, measured before and after the run.
    assert!(number(run, "/floor/raw_saves_per_s_before") > 0.0);
    assert!(number(run, "/floor/raw_saves_per_s_after") > 0.0);
    // What the run cost etcd: at least one committed proposal per grant.
    assert!(
        number(run, "/etcd_per_grant/proposals_committed") >= 1.0,
        "{run:#}"
    );
    assert_svg(&bench.out.path().join("fleet-etcd.svg"), 1);
}

#[test]
fn a_coordinator_that_exits_at_once_fails_the_bench_after_its_report() {
    let bench = fleet(
        Some(Path::new("/bin/false")),
        &[
            "--waiters",
            "10",
            "--max-concurrent",
            "1",
            "--deadline",
            "60",
        ],
        "fleet",
    );
    let runs = runs(bench.failed("exited at start"));
    assert_eq!(runs[0]["finished"], Value::Bool(false), "{runs:#?}");
    assert!(
        runs[0]["failed"]
            .as_str()
            .is_some_and(|f| f.contains("exited at start")),
        "{runs:#?}"
    );
}

/// 100 agents holding the baton 20 ms on average, one at a time, need at
/// least 2 s whatever the machine's speed: a 1 s deadline cannot be met.
#[test]
fn a_run_cut_by_its_deadline_fails_the_bench_and_is_reported_unfinished() {
    let bench = fleet(
        None,
        &[
            "--waiters",
            "100,200",
            "--max-concurrent",
            "1",
            "--agent",
            "real",
            "--hold-ms",
            "40",
            "--deadline",
            "1",
        ],
        "fleet",
    );
    let runs = runs(bench.failed("unfinished at the 1 s deadline"));
    assert_eq!(runs[0]["finished"], Value::Bool(false), "{runs:#?}");
    assert!(runs[0]["grants"].as_u64().unwrap() < 100, "{runs:#?}");
    // The larger fleet is not run after the smaller did not finish, and
    // the verdict counts the skip too.
    assert!(runs[1]["skipped"].is_string(), "{runs:#?}");
    let failures = bench.report["verdict"]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2, "{:#}", bench.report);
    // The plot still has the unfinished run.
    assert_svg(&bench.out.path().join("fleet.svg"), 1);
}
