//! How `batonctl status` prints: a table for people, JSON for scripts.

use baton_proto::v1 as pb;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::Format;

fn time(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

fn phase(value: i32) -> &'static str {
    match pb::Phase::try_from(value).unwrap_or(pb::Phase::Unspecified) {
        pb::Phase::Unspecified => "unspecified",
        pb::Phase::Granted => "granted",
        pb::Phase::Draining => "draining",
        pb::Phase::EtcdPrepare => "etcd-prepare",
        pb::Phase::Updating => "updating",
        pb::Phase::Rebooting => "rebooting",
        pb::Phase::Verifying => "verifying",
        pb::Phase::Uncordoning => "uncordoning",
        pb::Phase::Failed => "failed",
        pb::Phase::Manual => "manual",
    }
}

/// The JSON form of a status (stable field names; scripts rely on them).
pub fn status_json(s: &pb::StatusResponse) -> Value {
    json!({
        "coordinator_id": s.coordinator_id,
        "paused": s.paused,
        "pause_reason": s.pause_reason,
        "max_concurrent": s.max_concurrent,
        "window_open": s.window_open,
        "windows": s.windows,
        "last_fencing_token": s.last_fencing_token,
        "holders": s.holders.iter().map(|h| json!({
            "node": h.node,
            "token": h.fencing_token,
            "phase": phase(h.phase),
            "since": time(h.since.as_ref()),
            "phase_since": time(h.phase_since.as_ref()),
            "last_renewed": time(h.last_renewed.as_ref()),
            "overdue": h.overdue,
            "control_plane": h.control_plane,
            "boot_id": h.boot_id,
            "message": h.message,
            "error": h.error,
            "reason": h.reason,
        })).collect::<Vec<_>>(),
        "queue_length": s.queue_length,
        "queue": s.queue.iter().map(|q| json!({
            "node": q.node,
            "position": q.position,
            "reason": q.reason,
            "control_plane": q.control_plane,
            "waiting_since": time(q.waiting_since.as_ref()),
            "request_reason": q.request_reason,
        })).collect::<Vec<_>>(),
        "audit": s.audit.iter().map(|a| json!({
            "time": time(a.time.as_ref()),
            "action": a.action,
            "node": a.node,
            "token": a.fencing_token,
            "actor": a.actor,
            "reason": a.reason,
        })).collect::<Vec<_>>(),
        "rollout": s.rollout.as_ref().map(rollout_json),
        "backups": s.backups.iter().map(|b| json!({
            "name": b.name,
            "node": b.node,
            "snapshot": b.snapshot,
            "size": b.size,
            "kept_at": time(b.kept_at.as_ref()),
            "sha256": b.sha256,
        })).collect::<Vec<_>>(),
    })
}

/// The JSON form of the rollout policy's state (null before the leader's
/// first look).
fn rollout_json(r: &pb::RolloutStatus) -> Value {
    json!({
        "gate": {
            "open": r.gate_open,
            "cause": r.gate_cause,
            "reason": r.gate_reason,
        },
        "alerts_firing": r.alerts_firing,
        "canaries": r.canaries.iter().map(|c| json!({
            "pool": c.pool,
            "phase": c.phase,
            "node": c.node,
            "soak_until": time(c.soak_until.as_ref()),
        })).collect::<Vec<_>>(),
        "failure_budget": {
            "max": r.failure_budget_max,
            "remaining": r.failure_budget_remaining,
            "failed_by_pool": r.failures.iter().map(|f| (f.pool.clone(), json!(f.failed))).collect::<serde_json::Map<_, _>>(),
            "paused": r.paused_by_failure_budget,
        },
        "policy": {
            "generation": r.policy_generation,
            "sha256": r.policy_sha256,
            "reload_error": r.policy_reload_error,
        },
    })
}

/// The rollout policy's lines of the human status.
fn rollout_table(r: &pb::RolloutStatus) -> String {
    let mut out = String::new();
    let gate = if r.gate_open {
        "open".to_string()
    } else {
        format!("WAITING ({}): {}", r.gate_cause, r.gate_reason)
    };
    out.push_str(&format!("health gate: {gate}\n"));
    if !r.alerts_firing.is_empty() {
        out.push_str(&format!(
            "alert blockers firing: {}\n",
            r.alerts_firing.join(", ")
        ));
    }
    if r.failure_budget_max > 0 {
        let by_pool: Vec<String> = r
            .failures
            .iter()
            .map(|f| format!("{} {}", f.pool, f.failed))
            .collect();
        out.push_str(&format!(
            "failure budget: {} of {} left{}{}\n",
            r.failure_budget_remaining,
            r.failure_budget_max,
            if by_pool.is_empty() {
                String::new()
            } else {
                format!(" (failed: {})", by_pool.join(", "))
            },
            if r.paused_by_failure_budget {
                "; the rollout is PAUSED by it"
            } else {
                ""
            }
        ));
    }
    for c in &r.canaries {
        let detail = match (c.phase.as_str(), c.soak_until.as_ref()) {
            ("soaking", until) => format!(" ({} until {})", c.node, text(&time(until))),
            ("running", _) => format!(" ({})", c.node),
            _ => String::new(),
        };
        out.push_str(&format!("canary {}: {}{detail}\n", c.pool, c.phase));
    }
    let sha = r.policy_sha256.get(..12).unwrap_or(&r.policy_sha256);
    out.push_str(&format!(
        "policy: generation {}{}\n",
        r.policy_generation,
        if sha.is_empty() {
            " (flags)".to_string()
        } else {
            format!(", sha256 {sha}")
        }
    ));
    if !r.policy_reload_error.is_empty() {
        out.push_str(&format!(
            "policy reload REFUSED (the policy above stays): {}\n",
            r.policy_reload_error
        ));
    }
    out
}

/// Prints a status in `format`.
pub fn print_status(s: &pb::StatusResponse, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string(&status_json(s))?),
        Format::Table => print!("{}", status_table(s)),
    }
    Ok(())
}

fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| "-".to_string())
}

/// The human form of a status.
pub fn status_table(s: &pb::StatusResponse) -> String {
    let mut out = String::new();
    let state = if s.paused {
        format!("PAUSED ({})", s.pause_reason)
    } else {
        "granting".to_string()
    };
    let windows = if s.windows.is_empty() {
        "always".to_string()
    } else {
        format!(
            "{} ({})",
            s.windows.join("; "),
            if s.window_open { "open" } else { "closed" }
        )
    };
    out.push_str(&format!(
        "coordinator {}: {state}, max concurrent {}, windows: {windows}, last token {}\n\n",
        s.coordinator_id, s.max_concurrent, s.last_fencing_token
    ));
    if let Some(r) = &s.rollout {
        out.push_str(&rollout_table(r));
        out.push('\n');
    }
    out.push_str(&format!(
        "{:<30} {:>7} {:<13} {:<25} {:<8} {}\n",
        "HOLDER", "TOKEN", "PHASE", "SINCE", "OVERDUE", "MESSAGE"
    ));
    for h in &s.holders {
        let note = if h.error.is_empty() {
            h.message.clone()
        } else {
            format!("error: {}", h.error)
        };
        out.push_str(&format!(
            "{:<30} {:>7} {:<13} {:<25} {:<8} {}\n",
            h.node,
            h.fencing_token,
            phase(h.phase),
            text(&time(h.since.as_ref())),
            if h.overdue { "OVERDUE" } else { "no" },
            note.lines().last().unwrap_or("")
        ));
    }
    out.push_str(&format!("\n{:<4} {:<30} {}\n", "POS", "WAITING", "REASON"));
    for q in &s.queue {
        out.push_str(&format!("{:<4} {:<30} {}\n", q.position, q.node, q.reason));
    }
    let more = (s.queue_length as usize).saturating_sub(s.queue.len());
    if more > 0 {
        out.push_str(&format!("     ... and {more} more waiting\n"));
    }
    if !s.audit.is_empty() {
        out.push_str("\nRECENT\n");
        for a in &s.audit[s.audit.len().saturating_sub(5)..] {
            out.push_str(&format!(
                "{} {:<14} {:<30} token {:<6} by {} {}\n",
                text(&time(a.time.as_ref())),
                a.action,
                a.node,
                a.fencing_token,
                a.actor,
                a.reason
            ));
        }
    }
    if !s.backups.is_empty() {
        // Newest first, each with the snapshot it restores with (same
        // directory on the coordinator, --etcd-snapshot-dir).
        out.push_str(&format!(
            "\n{:<25} {:<20} {:>10} {}\n",
            "BACKUP KEPT", "NODE", "BYTES", "FILE"
        ));
        for b in &s.backups {
            out.push_str(&format!(
                "{:<25} {:<20} {:>10} {}\n",
                text(&time(b.kept_at.as_ref())),
                b.node,
                b.size,
                b.name
            ));
        }
    }
    out
}

/// The JSON form of the policy in force.
pub fn policy_json(p: &pb::GetPolicyResponse) -> Value {
    json!({
        "source": p.source,
        "loaded_at": time(p.loaded_at.as_ref()),
        "file_sha256": p.file_sha256,
        "last_error": p.last_error,
        "last_error_at": time(p.last_error_at.as_ref()),
        "yaml": p.yaml,
    })
}

/// Prints the policy: YAML with a header of comments, or JSON.
pub fn print_policy(p: &pb::GetPolicyResponse, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&policy_json(p))?),
        Format::Table => {
            println!("# source: {}", p.source);
            println!(
                "# loaded at: {}",
                time(p.loaded_at.as_ref()).as_str().unwrap_or("?")
            );
            if !p.file_sha256.is_empty() {
                println!("# sha256: {}", p.file_sha256);
            }
            if !p.last_error.is_empty() {
                println!(
                    "# LAST RELOAD REFUSED at {} (the policy below stays in force): {}",
                    time(p.last_error_at.as_ref()).as_str().unwrap_or("?"),
                    p.last_error
                );
            }
            print!("{}", p.yaml);
        }
    }
    Ok(())
}

/// The JSON form of a plan.
pub fn plan_json(p: &pb::PlanResponse) -> Value {
    json!({
        "computed_at": time(p.computed_at.as_ref()),
        "holders": p.holders,
        "entries": p.entries.iter().map(|e| json!({
            "node": e.node,
            "order": e.order,
            "round": e.round,
            "reason": e.reason,
            "control_plane": e.control_plane,
            "queue_position": e.queue_position,
        })).collect::<Vec<_>>(),
    })
}

/// Prints a plan as a table or JSON.
pub fn print_plan(p: &pb::PlanResponse, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&plan_json(p))?),
        Format::Table => {
            println!(
                "dry run (nothing granted); holders now: {}",
                if p.holders.is_empty() {
                    "none".to_string()
                } else {
                    p.holders.join(", ")
                }
            );
            if p.entries.is_empty() {
                println!("no node is waiting");
                return Ok(());
            }
            println!(
                "{:<6} {:<28} {:<16} {:<6} WAITS FOR",
                "ORDER", "NODE", "WHEN", "QUEUE"
            );
            for e in &p.entries {
                let order = if e.order == 0 {
                    "-".to_string()
                } else {
                    e.order.to_string()
                };
                let when = match (e.order, e.round) {
                    (0, _) => "not planned".to_string(),
                    (_, 0) => "now".to_string(),
                    (_, 1) => "after 1 release".to_string(),
                    (_, r) => format!("after {r} releases"),
                };
                let node = if e.control_plane {
                    format!("{} (cp)", e.node)
                } else {
                    e.node.clone()
                };
                println!(
                    "{:<6} {:<28} {:<16} {:<6} {}",
                    order,
                    node,
                    when,
                    e.queue_position,
                    if e.reason.is_empty() { "-" } else { &e.reason }
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with(rollout: Option<pb::RolloutStatus>) -> pb::StatusResponse {
        pb::StatusResponse {
            coordinator_id: "c0".into(),
            paused: true,
            pause_reason: "failure budget spent".into(),
            rollout,
            ..Default::default()
        }
    }

    fn rollout() -> pb::RolloutStatus {
        pb::RolloutStatus {
            gate_open: false,
            gate_cause: "nodes_not_ready".into(),
            gate_reason: "health gate: n4 not Ready".into(),
            alerts_firing: vec!["NodeDown".into()],
            canaries: vec![pb::CanaryStatus {
                pool: "web".into(),
                phase: "soaking".into(),
                node: "w1".into(),
                soak_until: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
            }],
            failure_budget_max: 2,
            failures: vec![pb::PoolFailures {
                pool: "web".into(),
                failed: 2,
            }],
            failure_budget_remaining: 0,
            paused_by_failure_budget: true,
            policy_generation: 3,
            policy_sha256: "0123456789abcdef".into(),
            policy_reload_error: "policy.yaml:3:16: failureBudget.maxFailedNodes: invalid".into(),
        }
    }

    #[test]
    fn the_table_shows_gate_budget_canaries_alerts_and_policy() {
        let table = status_table(&status_with(Some(rollout())));
        for line in [
            "health gate: WAITING (nodes_not_ready): health gate: n4 not Ready\n",
            "alert blockers firing: NodeDown\n",
            "failure budget: 0 of 2 left (failed: web 2); the rollout is PAUSED by it\n",
            "canary web: soaking (w1 until 2023-11-14T22:13:20.000Z)\n",
            "policy: generation 3, sha256 0123456789ab\n",
            "policy reload REFUSED (the policy above stays): policy.yaml:3:16",
        ] {
            assert!(table.contains(line), "{line:?} missing from\n{table}");
        }
        assert!(!status_table(&status_with(None)).contains("health gate"));
    }

    #[test]
    fn the_json_has_the_rollout_under_stable_names() {
        let json = status_json(&status_with(Some(rollout())));
        let r = &json["rollout"];
        assert_eq!(r["gate"]["open"], false);
        assert_eq!(r["gate"]["cause"], "nodes_not_ready");
        assert_eq!(r["alerts_firing"][0], "NodeDown");
        assert_eq!(r["canaries"][0]["phase"], "soaking");
        assert_eq!(r["failure_budget"]["failed_by_pool"]["web"], 2);
        assert_eq!(r["failure_budget"]["paused"], true);
        assert_eq!(r["policy"]["generation"], 3);
        assert!(status_json(&status_with(None))["rollout"].is_null());
    }

    #[test]
    fn status_shows_the_newest_backups_with_their_snapshot() {
        let name = "etcd-20261121T223000.123Z-cp-2.db.control-plane-cp-1.tar.gz";
        let s = pb::StatusResponse {
            backups: vec![pb::BackupRecord {
                name: name.into(),
                node: "cp-1".into(),
                snapshot: "etcd-20261121T223000.123Z-cp-2.db".into(),
                size: 4096,
                kept_at: None,
                sha256: "ab".repeat(32),
            }],
            ..Default::default()
        };
        let table = status_table(&s);
        assert!(table.contains("BACKUP KEPT"), "{table}");
        assert!(table.contains(name) && table.contains("cp-1"), "{table}");
        let json = status_json(&s);
        assert_eq!(
            json["backups"][0]["snapshot"],
            "etcd-20261121T223000.123Z-cp-2.db"
        );
        assert_eq!(json["backups"][0]["node"], "cp-1");
    }
}
