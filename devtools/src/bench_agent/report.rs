//! What `bench agent` writes and prints, and its verdict: pure functions
//! over what a run measured, so the rules are tested without running one.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::util::Build;

/// The goal for the agent: idle RSS under 10 MiB, for the release
/// build (a debug build is several times bigger and is not held to it).
pub const RELEASE_IDLE_RSS_GOAL_KIB: u64 = 10 * 1024;

/// The most idle RSS the verdict accepts, and why that figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// No limit: the RSS is measured and reported only.
    None,
    /// At most this many KiB; `from` says where the figure comes from.
    Kib { kib: u64, from: &'static str },
}

impl Budget {
    /// `--max-idle-rss-kib`'s value: a number of KiB, or `none`.
    pub fn parse(value: &str) -> Result<Self> {
        if value == "none" {
            return Ok(Budget::None);
        }
        match value.replace('_', "").parse::<u64>() {
            Ok(kib) if kib > 0 => Ok(Budget::Kib {
                kib,
                from: "--max-idle-rss-kib",
            }),
            _ => bail!("--max-idle-rss-kib {value}: a positive number of KiB, or none"),
        }
    }

    /// Without `--max-idle-rss-kib`: the goal for a release agent, and no
    /// limit for any other (a debug agent would always be over it, and the
    /// suite measures the debug build).
    pub fn default_for(build: Build) -> Self {
        match build {
            Build::Release => Budget::Kib {
                kib: RELEASE_IDLE_RSS_GOAL_KIB,
                from: "the goal for a release agent (under 10 MiB)",
            },
            Build::Debug | Build::Unknown => Budget::None,
        }
    }
}

/// The agent's idle figures.
#[derive(Clone, Copy, Debug)]
pub struct Idle {
    pub rss_kib_max: u64,
    pub rss_kib_end: u64,
    pub cpu_seconds: f64,
}

/// What a run measured before it ended (all of it, or what came before a
/// failure).
#[derive(Debug, Default)]
pub struct Measured {
    pub idle: Option<Idle>,
    /// Sentinel created → queued, one per sample completed.
    pub latencies: Vec<Duration>,
}

/// What the run was asked to do.
pub struct Setup<'a> {
    pub agent: &'a Path,
    pub build: Build,
    pub coordinator: &'a Path,
    pub duration: Duration,
    pub samples_asked: usize,
    pub budget: Budget,
}

/// The report: the figures (null where not measured), the run's failure
/// (null when it ran to the end) and the verdict over both
/// ([`failures`]).
pub fn build(setup: &Setup, measured: &Measured, failed: Option<String>) -> Value {
    let secs = setup.duration.as_secs_f64();
    let idle = measured.idle;
    let mut sorted = measured.latencies.clone();
    sorted.sort();
    let pct = |p: f64| -> Option<f64> {
        let last = sorted.len().checked_sub(1)?;
        let i = (last as f64 * p).round() as usize;
        Some(sorted[i].as_secs_f64() * 1000.0)
    };
    let (budget, budget_from) = match setup.budget {
        Budget::None => (None, None),
        Budget::Kib { kib, from } => (Some(kib), Some(from)),
    };
    let mut report = json!({
        "bench": "agent",
        "agent_binary": setup.agent.display().to_string(),
        "agent_build": setup.build.name(),
        "coordinator_binary": setup.coordinator.display().to_string(),
        "idle_seconds": secs,
        "idle_rss_kib_max": idle.map(|i| i.rss_kib_max),
        "idle_rss_kib_end": idle.map(|i| i.rss_kib_end),
        "idle_cpu_seconds": idle.map(|i| i.cpu_seconds),
        "idle_cpu_percent": idle.map(|i| i.cpu_seconds / secs * 100.0),
        "idle_rss_budget_kib": budget,
        "idle_rss_budget_from": budget_from,
        "sentinel_to_queued_ms": {
            "samples": sorted.len(),
            "samples_asked": setup.samples_asked,
            "p50": pct(0.5),
            "p90": pct(0.9),
            "max": pct(1.0),
        },
        "failed": failed,
    });
    let failures = failures(&report);
    report["verdict"] = json!({ "ok": failures.is_empty(), "failures": failures });
    report
}

/// What went wrong, one line each; empty when the run measured the idle
/// agent and every reaction sample asked for, and the idle RSS is within
/// its budget (if it has one).
pub fn failures(report: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some(why) = report["failed"].as_str() {
        failures.push(why.to_string());
    } else {
        if report["idle_rss_kib_max"]
            .as_u64()
            .is_none_or(|kib| kib == 0)
        {
            failures.push("no idle RSS was measured".to_string());
        }
        let reaction = &report["sentinel_to_queued_ms"];
        let (done, asked) = (
            reaction["samples"].as_u64(),
            reaction["samples_asked"].as_u64(),
        );
        if done != asked {
            failures.push(format!(
                "{} of {} reaction samples were measured",
                done.unwrap_or(0),
                asked.unwrap_or(0)
            ));
        }
    }
    if let (Some(rss), Some(budget)) = (
        report["idle_rss_kib_max"].as_u64(),
        report["idle_rss_budget_kib"].as_u64(),
    ) && rss > budget
    {
        failures.push(format!(
            "idle RSS {rss} KiB is over the budget of {budget} KiB ({})",
            report["idle_rss_budget_from"].as_str().unwrap_or("?")
        ));
    }
    failures
}

/// The table a person reads (figures not measured show as "-").
pub fn print_table(report: &Value) {
    let f = |v: &Value, decimals: usize| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |x| format!("{x:.decimals$}"))
    };
    let reaction = &report["sentinel_to_queued_ms"];
    println!(
        "baton-agent ({} build: {})",
        report["agent_build"].as_str().unwrap_or("?"),
        report["agent_binary"].as_str().unwrap_or("?")
    );
    println!("{:<38}{:>12}", "", "value");
    let budget = report["idle_rss_budget_kib"]
        .as_u64()
        .map_or_else(String::new, |b| format!("  (budget {b} KiB)"));
    println!(
        "{:<38}{:>8} KiB{budget}",
        format!("idle RSS, max over {} s", f(&report["idle_seconds"], 0)),
        f(&report["idle_rss_kib_max"], 0)
    );
    println!(
        "{:<38}{:>10} s ({} %)",
        "idle CPU",
        f(&report["idle_cpu_seconds"], 3),
        f(&report["idle_cpu_percent"], 3)
    );
    for (label, key) in [("p50", "p50"), ("p90", "p90"), ("max", "max")] {
        println!(
            "{:<38}{:>9} ms",
            format!("sentinel -> queued {label}"),
            f(&reaction[key], 2)
        );
    }
    println!(
        "({} of {} samples)",
        reaction["samples"], reaction["samples_asked"]
    );
    if let Some(failures) = report["verdict"]["failures"].as_array() {
        for failure in failures {
            println!("FAILED: {}", failure.as_str().unwrap_or("?"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(budget: Budget) -> Setup<'static> {
        Setup {
            agent: Path::new("/x/target/release/baton-agent"),
            build: Build::Release,
            coordinator: Path::new("/x/target/release/baton-coordinator"),
            duration: Duration::from_secs(2),
            samples_asked: 3,
            budget,
        }
    }

    fn complete() -> Measured {
        Measured {
            idle: Some(Idle {
                rss_kib_max: 9000,
                rss_kib_end: 8900,
                cpu_seconds: 0.0,
            }),
            latencies: [30, 10, 20].map(Duration::from_millis).to_vec(),
        }
    }

    #[test]
    fn a_complete_run_within_its_budget_passes_with_its_percentiles() {
        let report = build(
            &setup(Budget::default_for(Build::Release)),
            &complete(),
            None,
        );
        assert_eq!(report["verdict"]["ok"], true, "{report:#}");
        assert_eq!(report["sentinel_to_queued_ms"]["p50"], 20.0);
        assert_eq!(report["sentinel_to_queued_ms"]["max"], 30.0);
        assert_eq!(report["idle_rss_budget_kib"], 10240);
        assert_eq!(report["agent_build"], "release");
    }

    #[test]
    fn a_run_over_its_budget_short_of_samples_or_failed_does_not_pass() {
        let over = Budget::Kib {
            kib: 8999,
            from: "--max-idle-rss-kib",
        };
        let report = build(&setup(over), &complete(), None);
        assert_eq!(
            failures(&report),
            ["idle RSS 9000 KiB is over the budget of 8999 KiB (--max-idle-rss-kib)"]
        );

        let mut short = complete();
        short.latencies.pop();
        let report = build(&setup(Budget::None), &short, None);
        assert_eq!(failures(&report), ["2 of 3 reaction samples were measured"]);

        // A failed run says why, once, and its budget still applies to
        // what it measured.
        let failed = build(&setup(over), &short, Some("the agent exited".into()));
        assert_eq!(failed["verdict"]["ok"], false);
        assert_eq!(failures(&failed).len(), 2, "{failed:#}");
        assert_eq!(failures(&failed)[0], "the agent exited");

        let nothing = build(&setup(Budget::None), &Measured::default(), None);
        assert_eq!(
            failures(&nothing),
            [
                "no idle RSS was measured",
                "0 of 3 reaction samples were measured"
            ]
        );
        assert_eq!(nothing["sentinel_to_queued_ms"]["p50"], Value::Null);
        assert_eq!(nothing["idle_cpu_percent"], Value::Null);
    }

    #[test]
    fn only_a_release_agent_is_held_to_the_goal_by_default() {
        assert_eq!(
            Budget::default_for(Build::Release),
            Budget::Kib {
                kib: 10240,
                from: "the goal for a release agent (under 10 MiB)"
            }
        );
        assert_eq!(Budget::default_for(Build::Debug), Budget::None);
        assert_eq!(Budget::default_for(Build::Unknown), Budget::None);
        assert_eq!(Budget::parse("none").unwrap(), Budget::None);
        assert!(matches!(
            Budget::parse("12_000").unwrap(),
            Budget::Kib { kib: 12000, .. }
        ));
        assert!(Budget::parse("0").is_err());
        assert!(Budget::parse("10MB").is_err());
    }
}
