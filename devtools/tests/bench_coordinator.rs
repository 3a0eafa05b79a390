//! `bench coordinator` end to end, small: the real `baton-devtools bench
//! coordinator` against the workspace's debug coordinator, on the embedded
//! store (30 waiters run down one queue) and on a real 3-member etcd
//! cluster (a few grant cycles, handoffs and one failover); checked from
//! the exit status and the report. Runs that cannot succeed (a coordinator
//! that exits at once, one that never grants before the deadline) must
//! exit non-zero, promptly, with a report that says so: a bench that
//! stopped granting fails the suite instead of hanging or printing a table
//! of nothing.
//!
//! Needs etcd (Debian's etcd-server), which `cargo xtask test` installs.

mod common;

use std::path::{Path, PathBuf};

use common::{Bench, assert_positive, number, script};
use serde_json::Value;

/// Runs `bench coordinator` with `args` against `coordinator` (see
/// [`Bench::run`]); reads its report (`report`.json).
fn bench(coordinator: Option<&Path>, args: &[&str], report: &str) -> Bench {
    Bench::run("coordinator", coordinator, args, &[], report)
}

/// Checks an embedded run that did its whole job with `waiters` waiters:
/// each granted once after one handoff, the tokens consecutive and rising
/// (a fresh coordinator), every figure measured against a measured floor
/// of `floor_samples` samples.
fn assert_ran_down_the_chain(report: &Value, waiters: u64, floor_samples: u64) {
    let at = |p: &str| report.pointer(p).cloned().unwrap_or(Value::Null);
    assert_eq!(at("/stopped"), Value::Null, "{report:#}");
    assert_eq!(at("/coordinator_exited"), Value::Null, "{report:#}");
    assert_eq!(at("/grants").as_u64(), Some(waiters), "{report:#}");
    assert_eq!(at("/waiters_granted_twice").as_u64(), Some(0), "{report:#}");
    // The first holder's release starts the chain: every waiter's grant
    // follows a release.
    assert_eq!(at("/handoffs").as_u64(), Some(waiters), "{report:#}");
    // The first holder's token and one per waiter, each one above the last.
    assert_eq!(
        at("/fencing_tokens/distinct").as_u64(),
        Some(waiters + 1),
        "{report:#}"
    );
    assert_eq!(
        at("/fencing_tokens/rising"),
        Value::Bool(true),
        "{report:#}"
    );
    assert_eq!(
        number(report, "/fencing_tokens/last") - number(report, "/fencing_tokens/first"),
        waiters as f64,
        "{report:#}"
    );
    assert_positive(
        report,
        &[
            "/handoff_us/p50",
            "/handoff_us/p99",
            "/handoff_us/max",
            "/release_rtt_us/p50",
            "/cycles_per_second",
            "/elapsed_s",
            "/state_file_bytes",
            "/baseline/grpc_rtt_us/p50",
            "/baseline/atomic_write_us/p50",
            "/baseline/floor_us_p50",
            "/handoff_p50_over_floor",
        ],
    );
    assert!(number(report, "/handoff_us/p99") >= number(report, "/handoff_us/p50"));
    assert!(number(report, "/handoff_us/max") >= number(report, "/handoff_us/p99"));
    for p in [
        "/baseline/grpc_rtt_us/samples",
        "/baseline/atomic_write_us/samples",
    ] {
        assert_eq!(number(report, p) as u64, floor_samples, "{report:#}");
    }
}

#[test]
fn thirty_waiters_are_each_granted_once_down_one_queue_on_the_embedded_store() {
    let bench = bench(
        None,
        &[
            "--waiters",
            "30",
            "--per-connection",
            "10",
            "--floor-samples",
            "30",
            "--deadline",
            "60",
        ],
        "coordinator",
    );
    let report = bench.succeeded();
    assert_eq!(report["store"], "embedded");
    assert_eq!(report["waiters"], 30);
    assert_ran_down_the_chain(report, 30, 30);
    // The coordinator's data and log went to --out too.
    let out = bench.out.path();
    assert!(out.join("coordinator-data/state.json").is_file());
    assert!(out.join("coordinator.log").is_file());
}

#[test]
fn a_few_grants_handoffs_and_a_failover_are_measured_on_a_real_etcd_cluster() {
    let bench = bench(
        None,
        &[
            "--store",
            "etcd",
            "--txns",
            "30",
            "--cycles",
            "5",
            "--handoffs",
            "4",
            "--deadline",
            "120",
        ],
        "coordinator-etcd",
    );
    let report = bench.succeeded();
    assert_eq!(report["grant_cycles_done"], 5, "{report:#}");
    assert_eq!(report["handoffs_done"], 4, "{report:#}");
    assert_eq!(report["fencing_tokens_rising"], true, "{report:#}");
    assert_positive(
        report,
        &[
            "/raw_etcd_txn_per_s",
            "/grants_per_s",
            "/grant_to_raw_txn_ratio",
            "/handoff_ms_p50",
            "/handoff_ms_p99",
            "/handoff_ms_max",
            "/failover_ms",
        ],
    );
    assert!(number(report, "/handoff_ms_p99") >= number(report, "/handoff_ms_p50"));
    // Both coordinators' logs are kept beside the report.
    for name in ["coordinator-etcd-a.log", "coordinator-etcd-b.log"] {
        assert!(bench.out.path().join(name).is_file(), "{name} not kept");
    }
}

#[test]
fn a_coordinator_that_exits_at_once_fails_the_bench_after_its_report() {
    let bench = bench(
        Some(Path::new("/bin/false")),
        &["--waiters", "10", "--deadline", "60"],
        "coordinator",
    );
    let report = bench.failed("exited at start");
    assert!(
        report["failed"]
            .as_str()
            .is_some_and(|f| f.contains("exited at start")),
        "{report:#}"
    );
}

#[test]
fn a_coordinator_that_exits_at_once_fails_the_etcd_bench_after_its_report() {
    let bench = bench(
        Some(Path::new("/bin/false")),
        &[
            "--store",
            "etcd",
            "--txns",
            "10",
            "--cycles",
            "2",
            "--handoffs",
            "2",
            "--deadline",
            "60",
        ],
        "coordinator-etcd",
    );
    let report = bench.failed("exited at start");
    // The raw rate was measured before; nothing was granted after.
    assert!(number(report, "/raw_etcd_txn_per_s") > 0.0, "{report:#}");
    assert!(report["grants_per_s"].is_null(), "{report:#}");
    let failures = report["verdict"]["failures"].as_array().unwrap();
    assert!(
        failures
            .iter()
            .any(|f| f.as_str().unwrap().contains("0 of 2 grant cycles granted")),
        "{report:#}"
    );
}

/// A script in `dir` that runs the workspace's debug coordinator with
/// `extra` arguments after the bench's.
fn coordinator_with(dir: &Path, extra: &str) -> PathBuf {
    let coordinator = baton_tests::binary("baton-coordinator");
    let body = format!("exec '{}' \"$@\" {extra}", coordinator.display());
    script(dir, "coordinator-with", &body)
}

/// A coordinator guarding an etcd cluster it cannot reach grants nothing
/// (it fails closed): the bench gives up at its 2 s deadline instead of
/// the default ten minutes, and says so.
#[test]
fn a_coordinator_that_never_grants_fails_the_bench_at_its_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = coordinator_with(dir.path(), "--etcd-endpoints http://127.0.0.1:1");
    let bench = bench(
        Some(&script),
        &["--waiters", "10", "--deadline", "2"],
        "coordinator",
    );
    let report = bench.failed("deadline");
    assert!(
        report["failed"]
            .as_str()
            .is_some_and(|f| f.contains("deadline") && f.contains("first holder was not granted")),
        "{report:#}"
    );
}

/// A coordinator that lets two nodes hold at once breaks the rule the
/// bench measures: the first waiter's grant comes while the first holder
/// still holds, and the run stops there (not at its 60 s deadline) with a
/// verdict that says so.
#[test]
fn a_coordinator_that_grants_two_at_once_fails_the_bench_at_the_first_overlap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = coordinator_with(dir.path(), "--max-concurrent 2");
    let bench = bench(
        Some(&script),
        &["--waiters", "10", "--deadline", "60"],
        "coordinator",
    );
    let report = bench.failed("still held the baton");
    let stopped = report["stopped"].as_str().expect("stopped");
    assert!(
        stopped.starts_with("a waiter failed: bench-")
            && stopped.contains("while the first holder still held the baton"),
        "{report:#}"
    );
    assert!(!stopped.contains("deadline"), "{report:#}");
    // No floor for a run that did not do its job.
    assert!(report["handoff_p50_over_floor"].is_null(), "{report:#}");
}
