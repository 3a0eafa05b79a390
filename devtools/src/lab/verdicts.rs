//! The end of a run: the monitors' verdicts (what each checked, what it
//! found) and the figures (rollout time, per-node phase times, coordination
//! overhead). Pure functions over [`Seen`] and what the lab read from the
//! nodes and the final status, so they are unit-tested with made-up runs.

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use serde::Serialize;

use super::seen::{Seen, Time};

/// One monitor's verdict.
#[derive(Serialize, Clone, Debug)]
pub struct Verdict {
    /// The monitor.
    pub monitor: String,
    /// It found nothing wrong.
    pub ok: bool,
    /// What it checked and found.
    pub summary: String,
}

/// Facts read at the end, outside the live record.
#[derive(Default, Clone, Debug)]
pub struct FinalFacts {
    /// node → the installed version of the demo package.
    pub versions: BTreeMap<String, String>,
    /// The audit of the final status, in order: (time, action, node, token).
    pub audit: Vec<(Time, String, String, u64)>,
    /// node → the lab's timing records (what, seconds since the epoch).
    pub timings: BTreeMap<String, Vec<(String, f64)>>,
    /// The limits the lab configured.
    pub max_concurrent: usize,
    /// The probe's deadline.
    pub probe_deadline: std::time::Duration,
    /// The chaos plan ran.
    pub chaos: bool,
    /// The rollout finished in time.
    pub finished_in_time: bool,
    /// node → the control-plane backups the coordinators kept for it, as
    /// the lab verified them.
    pub backups: BTreeMap<String, super::backups::NodeBackups>,
}

/// Per-node figures (seconds).
#[derive(Serialize, Clone, Debug, Default)]
pub struct NodeFigures {
    /// The node.
    pub node: String,
    /// It carries an etcd member.
    pub etcd: bool,
    /// Asked → granted.
    pub waiting: f64,
    /// Granted → updating.
    pub preparing: f64,
    /// Updating → rebooting.
    pub updating: f64,
    /// Rebooting → verifying.
    pub rebooting: f64,
    /// Verifying → released.
    pub verifying: f64,
    /// The update script's own run time (node's records).
    pub update_run: f64,
    /// The post-check's own run time (node's records).
    pub post_check_run: f64,
    /// Reboot as the host saw it: the reboot request (the Rebooting report)
    /// until the agent ran again in the next boot.
    pub reboot: f64,
    /// Host view: the container stopped until the agent ran again.
    pub down: f64,
    /// Granted → released minus the update, the reboot and the post-check
    /// runs: report and release round trips, state saves, agent start-up.
    pub overhead: f64,
    /// The previous release (or the request, if later) → this grant: the
    /// handoff. For etcd nodes it includes the guard's wait for the previous
    /// etcd node to count as back and the snapshot.
    pub handoff: f64,
}

/// Everything a report carries besides the raw record.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Figures {
    /// Update published → last node released (s).
    pub rollout_seconds: f64,
    /// Per node.
    pub nodes: Vec<NodeFigures>,
    /// The mean in-maintenance overhead per node (s).
    pub mean_overhead: f64,
    /// The largest in-maintenance overhead of a node (s).
    pub max_overhead: f64,
    /// The mean handoff gap (s) of workers and of etcd nodes.
    pub mean_handoff_workers: f64,
    /// The mean handoff gap of etcd nodes (s).
    pub mean_handoff_etcd: f64,
    /// Writes committed within the deadline / writes.
    pub probe_success_rate: f64,
    /// Writes made.
    pub probe_writes: usize,
    /// The longest time without a committed write (s).
    pub probe_longest_gap: f64,
    /// The slowest committed write (ms).
    pub probe_max_latency_ms: f64,
    /// The most nodes down at once, and of them etcd nodes.
    pub max_nodes_down: usize,
    /// The most etcd nodes down at once.
    pub max_etcd_nodes_down: usize,
    /// The most etcd members down at once (etcd's view).
    pub max_members_down: usize,
}

fn seconds(d: Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// The most intervals open at once, with when and which.
pub fn max_overlap<'a>(
    intervals: impl Iterator<Item = (&'a str, Time, Option<Time>)>,
    end: Time,
) -> (usize, Option<Time>, Vec<String>) {
    let all: Vec<(&str, Time, Time)> = intervals
        .map(|(n, a, b)| (n, a, b.unwrap_or(end)))
        .collect();
    let mut best = (0, None, Vec::new());
    for (_, start, _) in &all {
        let open: Vec<String> = all
            .iter()
            .filter(|(_, a, b)| a <= start && start < b)
            .map(|(n, ..)| n.to_string())
            .collect();
        if open.len() > best.0 {
            best = (open.len(), Some(*start), open);
        }
    }
    best
}

/// The first time at or after `from` a phase named `phase` was seen with `token`.
fn phase_at(seen: &Seen, node: &str, token: u64, phase: &str) -> Option<Time> {
    seen.nodes
        .get(node)?
        .phases
        .iter()
        .find(|(_, p, t)| *t == token && p == phase)
        .map(|(at, ..)| *at)
}

/// The figures of a run.
pub fn figures(seen: &Seen, facts: &FinalFacts) -> Figures {
    let start = seen.started.unwrap_or_default();
    let end = seen.finished.unwrap_or_else(Utc::now);
    let mut out = Figures {
        rollout_seconds: seconds(end - start),
        ..Default::default()
    };
    let all_releases: Vec<Time> = seen
        .nodes
        .values()
        .flat_map(|n| n.releases.iter().map(|(t, ..)| *t))
        .filter(|t| *t >= start)
        .collect();
    for (name, node) in &seen.nodes {
        let Some(&(granted, token)) = node.grants.iter().find(|(t, _)| *t >= start) else {
            continue;
        };
        let released = node
            .releases
            .iter()
            .find(|(_, t, ..)| *t == token)
            .map(|(t, ..)| *t);
        let timing = facts.timings.get(name).cloned().unwrap_or_default();
        let record = |what: &str| timing.iter().rfind(|(w, _)| w == what).map(|(_, t)| *t);
        let at = |what: &str| {
            record(what).map(|t| {
                chrono::DateTime::<Utc>::from_timestamp_millis((t * 1000.0) as i64)
                    .unwrap_or_default()
            })
        };
        // A phase whose report is missing (refused, or lost in a failover)
        // is taken from the node's own record of the update.
        let updating = phase_at(seen, name, token, "updating").or_else(|| at("update-start"));
        // When the agent's Rebooting report is missing (refused or lost),
        // the reboot is taken to start when the update ended (the node's
        // own record): the agent asks for the reboot right after.
        let rebooting = phase_at(seen, name, token, "rebooting").or_else(|| at("update-end"));
        let verifying = phase_at(seen, name, token, "verifying");
        let span = |a: Option<Time>, b: Option<Time>| match (a, b) {
            (Some(a), Some(b)) if b >= a => seconds(b - a),
            _ => 0.0,
        };
        let run = |what: &str| match (
            record(&format!("{what}-start")),
            record(&format!("{what}-end")),
        ) {
            (Some(s), Some(e)) if e >= s => e - s,
            _ => 0.0,
        };
        let down = node
            .down
            .iter()
            .find(|(a, _)| *a >= granted && released.is_none_or(|r| *a <= r));
        let back = down.and_then(|d| d.1);
        let reboot = span(rebooting, back);
        let (update_run, post_check_run) = (run("update"), run("check"));
        let total = span(Some(granted), released);
        let previous_release = all_releases
            .iter()
            .filter(|t| **t <= granted)
            .max()
            .copied();
        let from = match (node.asked, previous_release) {
            (Some(a), Some(r)) => Some(a.max(r)),
            (a, r) => a.or(r),
        };
        out.nodes.push(NodeFigures {
            node: name.clone(),
            etcd: node.etcd,
            waiting: span(node.asked, Some(granted)),
            preparing: span(Some(granted), updating),
            updating: span(updating, rebooting),
            rebooting: span(rebooting, verifying),
            verifying: span(verifying, released),
            update_run,
            post_check_run,
            reboot,
            down: down.map_or(0.0, |d| span(Some(d.0), d.1)),
            overhead: (total - update_run - reboot - post_check_run).max(0.0),
            handoff: span(from, Some(granted)),
        });
    }
    let n = out.nodes.len().max(1) as f64;
    out.mean_overhead = out.nodes.iter().map(|f| f.overhead).sum::<f64>() / n;
    out.max_overhead = out.nodes.iter().map(|f| f.overhead).fold(0.0, f64::max);
    let mean = |etcd: bool| {
        let v: Vec<f64> = out
            .nodes
            .iter()
            .filter(|f| f.etcd == etcd)
            .map(|f| f.handoff)
            .collect();
        v.iter().sum::<f64>() / (v.len().max(1) as f64)
    };
    out.mean_handoff_workers = mean(false);
    out.mean_handoff_etcd = mean(true);
    let probes = &seen.probes;
    out.probe_writes = probes.len();
    out.probe_success_rate = if probes.is_empty() {
        0.0
    } else {
        probes.iter().filter(|p| p.ok).count() as f64 / probes.len() as f64
    };
    let mut commits: Vec<Time> = probes
        .iter()
        .filter(|p| p.ok)
        .map(|p| p.at + Duration::milliseconds(p.latency_ms as i64))
        .collect();
    commits.sort();
    out.probe_longest_gap = commits
        .windows(2)
        .map(|w| seconds(w[1] - w[0]))
        .fold(0.0, f64::max);
    out.probe_max_latency_ms = probes
        .iter()
        .filter(|p| p.ok)
        .map(|p| p.latency_ms)
        .fold(0.0, f64::max);
    let now = Utc::now();
    let node_downs = || {
        seen.nodes
            .iter()
            .flat_map(|(n, s)| s.down.iter().map(move |d| (n.as_str(), d.0, d.1)))
    };
    out.max_nodes_down = max_overlap(node_downs(), now).0;
    out.max_etcd_nodes_down = max_overlap(
        node_downs().filter(|(n, ..)| seen.nodes.get(*n).is_some_and(|s| s.etcd)),
        now,
    )
    .0;
    out.max_members_down = max_overlap(
        seen.members
            .iter()
            .flat_map(|(n, m)| m.down.iter().map(move |d| (n.as_str(), d.0, d.1))),
        now,
    )
    .0;
    out
}

fn verdict(monitor: &str, ok: bool, summary: String) -> Verdict {
    Verdict {
        monitor: monitor.into(),
        ok,
        summary,
    }
}

/// Every monitor's verdict. Live violations already in `seen` make their
/// monitor fail too.
pub fn verdicts(seen: &Seen, facts: &FinalFacts, figures: &Figures) -> Vec<Verdict> {
    let live = |monitor: &str| {
        seen.violations
            .iter()
            .filter(|v| v.monitor == monitor)
            .map(|v| format!("{}: {}", v.at.format("%H:%M:%S%.3f"), v.why))
            .collect::<Vec<_>>()
    };
    let mut out = Vec::new();

    let v = live("nodes-down");
    out.push(verdict(
        "nodes-down",
        v.is_empty()
            && figures.max_nodes_down <= facts.max_concurrent
            && figures.max_etcd_nodes_down <= 1,
        format!(
            "at most {} nodes down at once (limit {}), at most {} etcd node(s) (limit 1), from the host's boot records{}",
            figures.max_nodes_down,
            facts.max_concurrent,
            figures.max_etcd_nodes_down,
            if v.is_empty() { String::new() } else { format!("; {}", v.join("; ")) }
        ),
    ));

    let v = live("etcd-writes");
    out.push(verdict(
        "etcd-writes",
        v.is_empty() && figures.probe_writes > 0 && figures.probe_success_rate == 1.0,
        format!(
            "{} writes, {:.2}% committed within {:.1} s, longest gap {:.2} s, slowest {:.0} ms{}",
            figures.probe_writes,
            figures.probe_success_rate * 100.0,
            facts.probe_deadline.as_secs_f64(),
            figures.probe_longest_gap,
            figures.probe_max_latency_ms,
            v.first()
                .map(|s| format!("; first failure {s}"))
                .unwrap_or_default()
        ),
    ));

    let v = live("etcd-members-down");
    out.push(verdict(
        "etcd-members-down",
        v.is_empty() && figures.max_members_down <= 1,
        format!(
            "at most {} etcd member(s) down at once by etcd's own view (limit 1){}",
            figures.max_members_down,
            if v.is_empty() {
                String::new()
            } else {
                format!("; {}", v.join("; "))
            }
        ),
    ));

    // Reboots: from the host's boot records, against the audit's grants
    // and releases. Every maintenance of this update reboots once.
    let start = seen.started.unwrap_or_default();
    let mut problems = Vec::new();
    let mut total_reboots = 0;
    for (name, node) in &seen.nodes {
        let reboots: Vec<Time> = node
            .boots
            .iter()
            .filter(|b| b.exit_code == Some(133))
            .filter_map(|b| b.ended)
            .filter(|t| *t >= start)
            .collect();
        total_reboots += reboots.len();
        let pairs: Vec<(Time, Time)> = facts
            .audit
            .iter()
            .filter(|(t, a, n, _)| a == "grant" && n == name && *t >= start)
            // An aborted maintenance took nothing down: no reboot is owed.
            .filter(|(_, _, _, token)| {
                !node
                    .releases
                    .iter()
                    .any(|(_, t, _, r)| t == token && super::seen::aborted(r))
            })
            .filter_map(|(g, _, _, token)| {
                let r = facts
                    .audit
                    .iter()
                    .find(|(_, a, n, t)| a == "release" && n == name && t == token)?;
                Some((*g, r.0))
            })
            .collect();
        if reboots.len() != pairs.len() {
            problems.push(format!(
                "{name} rebooted {} time(s) but the audit has {} completed maintenance(s)",
                reboots.len(),
                pairs.len()
            ));
        }
        for r in &reboots {
            if !pairs.iter().any(|(g, rel)| g <= r && r <= rel) {
                problems.push(format!(
                    "{name} rebooted at {} outside any grant..release of its own",
                    r.format("%H:%M:%S%.3f")
                ));
            }
        }
        let ids: Vec<&str> = node.boots.iter().map(|b| b.boot_id.as_str()).collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        if unique.len() != ids.len() {
            problems.push(format!("{name} booted twice with the same boot_id"));
        }
    }
    out.push(verdict(
        "reboots-match-audit",
        problems.is_empty() && total_reboots > 0,
        if problems.is_empty() {
            format!(
                "{total_reboots} reboots (boot_id changed each time, host records), each inside its node's grant..release, as many as the audit's maintenances"
            )
        } else {
            problems.join("; ")
        },
    ));

    let wrong: Vec<String> = facts
        .versions
        .iter()
        .filter(|(_, v)| v.as_str() != "2")
        .map(|(n, v)| format!("{n} has {v:?}"))
        .collect();
    out.push(verdict(
        "package-updated",
        wrong.is_empty() && !facts.versions.is_empty(),
        if wrong.is_empty() {
            format!(
                "baton-demo 2 installed on all {} nodes (dpkg-query inside each node)",
                facts.versions.len()
            )
        } else {
            wrong.join("; ")
        },
    ));

    // Control-plane backups: every etcd node whose maintenance completed
    // has a kept archive that verifies beside its etcd snapshot.
    let mut problems = Vec::new();
    let mut verified = 0;
    for (name, node) in seen.nodes.iter().filter(|(_, n)| n.etcd) {
        let completed = facts.audit.iter().any(|(_, a, n, token)| {
            a == "release"
                && n == name
                && !node
                    .releases
                    .iter()
                    .any(|(_, t, _, r)| t == token && super::seen::aborted(r))
                && facts
                    .audit
                    .iter()
                    .any(|(_, g, m, t)| g == "grant" && m == name && t == token)
        });
        let kept = facts.backups.get(name).cloned().unwrap_or_default();
        verified += kept.verified;
        if completed && kept.verified == 0 {
            problems.push(format!("{name} was maintained without a kept backup"));
        }
    }
    problems.extend(facts.backups.values().flat_map(|b| b.problems.clone()));
    out.push(verdict(
        "control-plane-backups",
        problems.is_empty(),
        if problems.is_empty() {
            format!("{verified} control-plane backup(s) kept beside their etcd snapshots; sha256sum -c and tar -tzf pass on each")
        } else {
            problems.join("; ")
        },
    ));

    let mut problems = Vec::new();
    let mut last = 0u64;
    let mut grants: BTreeMap<&str, u64> = BTreeMap::new();
    for (t, action, node, token) in &facts.audit {
        match action.as_str() {
            "grant" => {
                if *token <= last {
                    problems.push(format!(
                        "grant to {node} at {} has token {token}, not above {last}",
                        t.format("%H:%M:%S%.3f")
                    ));
                }
                last = last.max(*token);
                grants.insert(node, *token);
            }
            "release" if grants.get(node.as_str()) != Some(token) => {
                problems.push(format!(
                    "release of {node} with token {token}, which is not its last grant's"
                ));
            }
            _ => {}
        }
    }
    let grant_count = facts.audit.iter().filter(|a| a.1 == "grant").count();
    out.push(verdict(
        "fencing-tokens",
        problems.is_empty() && grant_count > 0,
        if problems.is_empty() {
            format!(
                "{grant_count} grants in the audit, tokens strictly increasing (last {last}), every release with its grant's token"
            )
        } else {
            problems.join("; ")
        },
    ));

    let unfinished: Vec<&str> = seen
        .nodes
        .iter()
        .filter(|(_, n)| !seen.finished_node(n))
        .map(|(name, _)| name.as_str())
        .collect();
    let failed: Vec<String> = seen
        .nodes
        .iter()
        .filter(|(_, n)| n.phase == "failed")
        .map(|(name, n)| format!("{name} failed: {}", n.reason))
        .collect();
    let v = live("rollout");
    out.push(verdict(
        "rollout",
        unfinished.is_empty() && failed.is_empty() && facts.finished_in_time && v.is_empty(),
        if unfinished.is_empty() && failed.is_empty() && v.is_empty() {
            format!(
                "every node updated, rebooted and released in {:.1} s",
                figures.rollout_seconds
            )
        } else {
            let mut why = Vec::new();
            if !unfinished.is_empty() {
                why.push(format!("not finished: {}", unfinished.join(", ")));
            }
            why.extend(failed);
            why.extend(v);
            why.join("; ")
        },
    ));

    if facts.chaos {
        out.push(chaos_verdict(seen));
    }
    out
}

/// Every fault injected; the etcd pause held the waiting etcd node with a
/// reason naming the paused member, and no etcd node was granted while it
/// was paused.
fn chaos_verdict(seen: &Seen) -> Verdict {
    let mut problems = Vec::new();
    for kind in [
        "kill-coordinator",
        "kill-agent",
        "pause-etcd-member",
        "freeze-coordinator",
    ] {
        if !seen.faults.iter().any(|f| f.kind == kind) {
            problems.push(format!("{kind} was never injected"));
        }
    }
    for f in seen.faults.iter().filter(|f| f.kind == "pause-etcd-member") {
        let until = f.until.unwrap_or_else(Utc::now);
        for (name, node) in seen.nodes.iter().filter(|(_, n)| n.etcd) {
            for (t, token) in &node.grants {
                if *t >= f.at && *t <= until {
                    problems.push(format!(
                        "{name} was granted (token {token}) at {} while an etcd member was paused ({})",
                        t.format("%H:%M:%S%.3f"),
                        f.detail
                    ));
                }
            }
        }
        if !f.effect.contains("was held") {
            problems.push(format!("no visible reason during the pause: {}", f.effect));
        }
    }
    Verdict {
        monitor: "chaos".into(),
        ok: problems.is_empty(),
        summary: if problems.is_empty() {
            let list: Vec<String> = seen
                .faults
                .iter()
                .map(|f| format!("{} ({})", f.kind, f.effect))
                .collect();
            format!("{} faults injected: {}", seen.faults.len(), list.join("; "))
        } else {
            problems.join("; ")
        },
    }
}

/// The summary table printed at the end.
pub fn table(figures: &Figures, verdicts: &[Verdict], observations: &[String]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\n{:<10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
        "NODE", "WAIT", "PREPARE", "UPDATE", "REBOOT", "VERIFY", "DOWN", "OVERHEAD", "HANDOFF"
    ));
    for f in &figures.nodes {
        out.push_str(&format!(
            "{:<10} {:>7.2}s {:>8.2}s {:>8.2}s {:>8.2}s {:>8.2}s {:>8.2}s {:>8.2}s {:>7.2}s\n",
            f.node,
            f.waiting,
            f.preparing,
            f.updating,
            f.rebooting,
            f.verifying,
            f.down,
            f.overhead,
            f.handoff
        ));
    }
    out.push_str(&format!(
        "\nrollout {:.1} s; coordination overhead per node: mean {:.2} s, max {:.2} s (aim < 1 s); handoff: workers {:.2} s, etcd nodes {:.2} s\n",
        figures.rollout_seconds,
        figures.mean_overhead,
        figures.max_overhead,
        figures.mean_handoff_workers,
        figures.mean_handoff_etcd
    ));
    out.push_str(&format!(
        "etcd probe: {} writes, {:.2}% within the deadline, longest gap {:.2} s\n",
        figures.probe_writes,
        figures.probe_success_rate * 100.0,
        figures.probe_longest_gap
    ));
    for o in observations {
        out.push_str(&format!("note: {o}\n"));
    }
    out.push('\n');
    for v in verdicts {
        out.push_str(&format!(
            "{} {:<20} {}\n",
            if v.ok { "PASS" } else { "FAIL" },
            v.monitor,
            v.summary
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::seen::{BootSeen, NodeSeen, Probe};

    fn t(s: i64) -> Time {
        chrono::DateTime::<Utc>::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn run_with(down: &[(&str, bool, i64, i64)]) -> (Seen, FinalFacts) {
        let mut seen = Seen {
            started: Some(t(0)),
            finished: Some(t(100)),
            ..Default::default()
        };
        let mut facts = FinalFacts {
            max_concurrent: 2,
            probe_deadline: std::time::Duration::from_secs(5),
            finished_in_time: true,
            ..Default::default()
        };
        let mut token = 0;
        for (name, etcd, a, b) in down {
            token += 1;
            let node = seen.nodes.entry(name.to_string()).or_default();
            node.etcd = *etcd;
            node.phase = "done".into();
            node.grants.push((t(a - 5), token));
            node.releases
                .push((t(b + 5), token, "release".into(), "done".into()));
            node.down.push((t(*a), Some(t(*b))));
            node.boots = vec![
                BootSeen {
                    boot_id: format!("{name}-1"),
                    started: t(-10),
                    ended: Some(t(*a)),
                    exit_code: Some(133),
                },
                BootSeen {
                    boot_id: format!("{name}-2"),
                    started: t(a + 1),
                    ended: None,
                    exit_code: None,
                },
            ];
            facts
                .audit
                .push((t(a - 5), "grant".into(), name.to_string(), token));
            facts
                .audit
                .push((t(b + 5), "release".into(), name.to_string(), token));
            facts.versions.insert(name.to_string(), "2".into());
            if *etcd {
                facts.backups.insert(
                    name.to_string(),
                    crate::lab::backups::NodeBackups {
                        verified: 1,
                        problems: vec![],
                    },
                );
            }
        }
        facts.audit.sort_by_key(|a| a.0);
        seen.probes.push(Probe {
            at: t(1),
            latency_ms: 5.0,
            ok: true,
            via: "etcd-1".into(),
        });
        (seen, facts)
    }

    fn failing(seen: &Seen, facts: &FinalFacts) -> Vec<String> {
        let f = figures(seen, facts);
        verdicts(seen, facts, &f)
            .into_iter()
            .filter(|v| !v.ok)
            .map(|v| format!("{}: {}", v.monitor, v.summary))
            .collect()
    }

    #[test]
    fn a_clean_run_passes_every_monitor() {
        let (seen, facts) = run_with(&[("etcd-1", true, 10, 12), ("w-1", false, 11, 13)]);
        assert_eq!(failing(&seen, &facts), Vec::<String>::new());
    }

    #[test]
    fn a_control_plane_node_maintained_without_a_verified_backup_fails() {
        let (seen, mut facts) = run_with(&[("etcd-1", true, 10, 12), ("w-1", false, 11, 13)]);
        facts.backups.clear();
        let f = failing(&seen, &facts);
        assert!(
            f.iter()
                .any(|v| v.starts_with("control-plane-backups") && v.contains("etcd-1")),
            "{f:?}"
        );
        facts.backups.insert(
            "etcd-1".into(),
            crate::lab::backups::NodeBackups {
                verified: 1,
                problems: vec!["x.tar.gz: sha256sum --check: FAILED".into()],
            },
        );
        let f = failing(&seen, &facts);
        assert!(f.iter().any(|v| v.contains("FAILED")), "{f:?}");
    }

    /// A maintenance its agent aborted before taking the node down (its
    /// backup could not be kept after a failover) owes no reboot and no
    /// backup; the node's next maintenance does.
    #[test]
    fn an_aborted_maintenance_owes_no_reboot_but_the_next_one_does() {
        let (mut seen, mut facts) = run_with(&[("etcd-1", true, 10, 12)]);
        let node = seen.nodes.get_mut("etcd-1").unwrap();
        node.grants.push((t(20), 2));
        node.releases.push((
            t(21),
            2,
            "release by cert:etcd-1".into(),
            "maintenance aborted: control-plane backup: snapshot gone".into(),
        ));
        facts
            .audit
            .push((t(20), "grant".into(), "etcd-1".into(), 2));
        facts
            .audit
            .push((t(21), "release".into(), "etcd-1".into(), 2));
        facts.audit.sort_by_key(|a| a.0);
        assert_eq!(failing(&seen, &facts), Vec::<String>::new());
        assert!(seen.finished_node(&seen.nodes["etcd-1"]));
        // Without its completed maintenance the node is not finished.
        let node = seen.nodes.get_mut("etcd-1").unwrap();
        node.releases.retain(|r| r.1 == 2);
        assert!(!seen.finished_node(&seen.nodes["etcd-1"]));
    }

    #[test]
    fn two_etcd_nodes_down_at_once_fail() {
        let (seen, facts) = run_with(&[("etcd-1", true, 10, 14), ("etcd-2", true, 12, 16)]);
        let f = failing(&seen, &facts);
        assert!(f.iter().any(|v| v.starts_with("nodes-down")), "{f:?}");
    }

    #[test]
    fn more_nodes_down_than_the_limit_fail() {
        let (seen, facts) = run_with(&[
            ("w-1", false, 10, 14),
            ("w-2", false, 11, 15),
            ("w-3", false, 12, 16),
        ]);
        let f = failing(&seen, &facts);
        assert!(f.iter().any(|v| v.starts_with("nodes-down")), "{f:?}");
    }

    #[test]
    fn a_reboot_outside_the_grant_or_an_old_version_or_a_reused_token_fail() {
        let (mut seen, mut facts) = run_with(&[("w-1", false, 10, 12), ("w-2", false, 20, 22)]);
        seen.nodes.get_mut("w-1").unwrap().boots[0].ended = Some(t(1));
        facts.versions.insert("w-2".into(), "1".into());
        facts.audit.push((t(30), "grant".into(), "w-1".into(), 2));
        let f = failing(&seen, &facts);
        for monitor in ["reboots-match-audit", "package-updated", "fencing-tokens"] {
            assert!(f.iter().any(|v| v.starts_with(monitor)), "{monitor}: {f:?}");
        }
    }

    #[test]
    fn an_unfinished_node_or_a_lost_write_fail() {
        let (mut seen, facts) = run_with(&[("w-1", false, 10, 12)]);
        seen.nodes.insert("w-2".into(), NodeSeen::default());
        seen.probes.push(Probe {
            at: t(2),
            latency_ms: 5000.0,
            ok: false,
            via: "no answer".into(),
        });
        let f = failing(&seen, &facts);
        assert!(f.iter().any(|v| v.starts_with("rollout")), "{f:?}");
        assert!(f.iter().any(|v| v.starts_with("etcd-writes")), "{f:?}");
    }

    #[test]
    fn overhead_is_the_span_minus_update_reboot_and_check() {
        let (mut seen, mut facts) = run_with(&[("w-1", false, 10, 12)]);
        // grant at 5, release at 17: 12 s; update 3 s, reboot (rebooting
        // report at 9 → back at 12) 3 s, check 1 s: overhead 5 s.
        seen.nodes.get_mut("w-1").unwrap().phases = vec![
            (t(5), "granted".into(), 1),
            (t(6), "updating".into(), 1),
            (t(9), "rebooting".into(), 1),
            (t(13), "verifying".into(), 1),
        ];
        let base = t(0).timestamp() as f64;
        facts.timings.insert(
            "w-1".into(),
            vec![
                ("update-start".into(), base + 6.0),
                ("update-end".into(), base + 9.0),
                ("check-start".into(), base + 13.0),
                ("check-end".into(), base + 14.0),
            ],
        );
        let f = figures(&seen, &facts);
        let n = &f.nodes[0];
        assert_eq!((n.updating, n.rebooting, n.reboot), (3.0, 4.0, 3.0));
        assert_eq!(n.overhead, 5.0);
    }
}
