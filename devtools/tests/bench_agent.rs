//! `bench agent` end to end, small: the real `baton-devtools bench agent`
//! against the workspace's debug agent and coordinator and a private
//! dbus-daemon, checked from the exit status and the report. Runs that
//! cannot succeed (an agent that exits at once or later, a real agent
//! watching the wrong file, a coordinator that exits at once, no
//! dbus-daemon, an RSS over its budget) must end promptly with a non-zero
//! exit and a report that says why: a bench that broke fails the suite
//! instead of printing a table of nothing.
//!
//! Each run idles 2 s and takes 3 samples (a few seconds). Needs
//! dbus-daemon (Debian's dbus), which `cargo xtask test` installs.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::{Bench, assert_positive, number, program, script};
use serde_json::Value;

/// Runs `bench agent --duration 2 --samples 3` and `args` against `agent`
/// or the workspace's debug agent, and `coordinator` or the workspace's
/// debug coordinator (both built first when stale), with `env` added to
/// its environment.
fn bench(
    agent: Option<&Path>,
    coordinator: Option<&Path>,
    args: &[&str],
    env: &[(&str, &OsStr)],
) -> Bench {
    let agent = program(agent, "baton-agent");
    let small = ["--duration", "2", "--samples", "3"].map(OsStr::new);
    let args = [OsStr::new("--agent"), agent.as_os_str()]
        .into_iter()
        .chain(small)
        .chain(args.iter().map(OsStr::new));
    Bench::run("agent", coordinator, args, env, "agent")
}

/// The end of the run's failure, for assertions about its cause.
fn failed_because(report: &Value) -> &str {
    report["failed"]
        .as_str()
        .unwrap_or_else(|| panic!("no failure in {report:#}"))
}

#[test]
fn a_debug_agent_idles_then_queues_and_withdraws_three_times() {
    let bench = bench(None, None, &[], &[]);
    let report = bench.succeeded();
    assert_eq!(report["bench"], "agent");
    assert_eq!(
        report["agent_binary"].as_str(),
        Some(
            baton_tests::binary("baton-agent")
                .display()
                .to_string()
                .as_str()
        )
    );
    // A debug agent is not held to the release build's RSS goal.
    assert_eq!(report["agent_build"], "debug", "{report:#}");
    assert_eq!(report["idle_rss_budget_kib"], Value::Null, "{report:#}");
    assert_eq!(report["failed"], Value::Null, "{report:#}");
    assert_positive(report, &["/idle_rss_kib_max", "/idle_rss_kib_end"]);
    assert!(number(report, "/idle_rss_kib_end") <= number(report, "/idle_rss_kib_max"));
    assert!(number(report, "/idle_cpu_seconds") >= 0.0, "{report:#}");
    assert!(number(report, "/idle_cpu_percent") >= 0.0, "{report:#}");
    assert_eq!(number(report, "/idle_seconds"), 2.0);
    assert_eq!(number(report, "/sentinel_to_queued_ms/samples"), 3.0);
    let (p50, p90, max) = (
        number(report, "/sentinel_to_queued_ms/p50"),
        number(report, "/sentinel_to_queued_ms/p90"),
        number(report, "/sentinel_to_queued_ms/max"),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= max, "{report:#}");
    let stdout = String::from_utf8_lossy(&bench.output.stdout);
    assert!(stdout.contains("sentinel -> queued p50"), "{stdout}");
    // The bus, the logs and the state went under --out too.
    let work = bench.out.path().join("agent-work");
    for kept in ["agent.log", "coordinator.log", "state", "coordinator"] {
        assert!(work.join(kept).exists(), "no {kept} in {}", work.display());
    }
}

#[test]
fn an_agent_that_exits_at_once_fails_the_bench_with_its_exit_status() {
    let bench = bench(Some(Path::new("/bin/false")), None, &[], &[]);
    let report = bench.failed("the agent exited at start");
    assert!(
        failed_because(report).contains("exit status: 1"),
        "{report:#}"
    );
    assert_eq!(report["idle_rss_kib_max"], Value::Null, "{report:#}");
    assert_eq!(number(report, "/sentinel_to_queued_ms/samples"), 0.0);
}

/// The real agent, stopped (SIGTERM) 3 s after it starts: after the 2 s
/// warm-up, inside the 4 s idle measurement.
#[test]
fn an_agent_that_exits_while_idle_fails_the_bench_with_the_end_of_its_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = baton_tests::binary("baton-agent");
    let stopped = script(
        dir.path(),
        "baton-agent",
        &format!("exec timeout 3 {} \"$@\"", agent.display()),
    );
    let bench = bench(Some(&stopped), None, &["--duration", "4"], &[]);
    let report = bench.failed("the agent exited while idle");
    // Its log is the real agent's, which said what it was doing.
    assert!(failed_because(report).contains("its log"), "{report:#}");
    assert!(!failed_because(report).ends_with("(nothing)"), "{report:#}");
    assert_eq!(number(report, "/sentinel_to_queued_ms/samples"), 0.0);
}

/// The real agent, but watching another file than the bench's sentinel (a
/// broken inotify watch looks the same): it idles like any agent and never
/// queues.
#[test]
fn an_agent_that_never_queues_fails_the_bench_at_its_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = baton_tests::binary("baton-agent");
    let elsewhere = dir.path().join("elsewhere");
    let deaf = script(
        dir.path(),
        "baton-agent",
        &format!(
            "for a; do shift; case $a in --reboot-sentinel=*) set -- \"$@\" \"--reboot-sentinel={}\";; \
             *) set -- \"$@\" \"$a\";; esac; done\nexec {} \"$@\"",
            elsewhere.display(),
            agent.display()
        ),
    );
    let bench = bench(Some(&deaf), None, &["--timeout", "2"], &[]);
    let report = bench.failed("the agent did not queue within 2 s");
    assert!(
        failed_because(report).contains("sample 1 of 3"),
        "{report:#}"
    );
    // The idle figures were measured before and stay in the report.
    assert!(number(report, "/idle_rss_kib_max") > 0.0, "{report:#}");
    assert_eq!(number(report, "/sentinel_to_queued_ms/samples"), 0.0);
}

#[test]
fn a_coordinator_that_exits_at_once_fails_the_bench() {
    let bench = bench(None, Some(Path::new("/bin/false")), &[], &[]);
    let report = bench.failed("the coordinator exited at start");
    assert_eq!(report["idle_rss_kib_max"], Value::Null, "{report:#}");
}

#[test]
fn without_dbus_daemon_the_bench_fails_saying_which_package_to_install() {
    let empty = tempfile::tempdir().expect("temp dir");
    let bench = bench(None, None, &[], &[("PATH", empty.path().as_os_str())]);
    bench.failed("dbus-daemon could not be started");
    assert!(
        failed_because(&bench.report).contains("dbus package"),
        "{:#}",
        bench.report
    );
}

#[test]
fn an_idle_rss_over_its_budget_fails_the_bench_after_measuring_everything() {
    let bench = bench(None, None, &["--max-idle-rss-kib", "1"], &[]);
    let report = bench.failed("over the budget of 1 KiB (--max-idle-rss-kib)");
    // Only the budget failed: the run itself went to the end.
    assert_eq!(report["failed"], Value::Null, "{report:#}");
    assert_eq!(report["idle_rss_budget_kib"], 1);
    assert_eq!(number(report, "/sentinel_to_queued_ms/samples"), 3.0);
    assert_eq!(
        report["verdict"]["failures"].as_array().map(Vec::len),
        Some(1),
        "{report:#}"
    );
}
