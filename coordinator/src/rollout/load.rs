//! Reading and checking a policy file, and merging it with the flags.
//!
//! [`parse`] is pure (text in, checked policy or an error with the line
//! out); [`load`] reads the file. The command-line flags are the defaults:
//! a field the file sets overrides them, and a field set in both places is
//! an error that names both, so nobody wonders which one is in force.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::locate::{Seg, line_of, path_text};
use super::schema::{
    EventKind, HumanDuration, Operator, PolicyFile, RAW_MARK, SelectorSpec, Window,
    check_label_value,
};
use super::template::Template;
use crate::node::NodeName;
use crate::policy::Policy;
use crate::window::{MaintenanceWindow, WindowSet};

/// The largest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 256 * 1024;

/// What the command line says, and what the file is checked against.
#[derive(Clone, Debug, Default)]
pub struct FlagDefaults {
    /// `--max-concurrent`, if given.
    pub max_concurrent: Option<u32>,
    /// `--window` values, as given (empty: none given).
    pub windows: Vec<String>,
    /// `--min-window-remaining`, if given.
    pub min_window_remaining: Option<Duration>,
    /// `--overdue-after` (an automatic force-release must come later).
    pub overdue_after: Duration,
    /// True when the Kubernetes node watch runs (the node and budget parts
    /// of the health gate need it).
    pub kubernetes: bool,
}

/// The default of `--min-window-remaining`.
pub const DEFAULT_MIN_WINDOW_REMAINING: Duration = Duration::from_secs(30 * 60);

/// A policy that passed every check, ready to be put in force.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The effective policy (file and flags merged), in the file's schema.
    pub effective: PolicyFile,
    /// The grant rule's settings derived from it.
    pub engine_policy: Policy,
    /// Where it came from ("flags", or "file PATH (+ flags)").
    pub source: String,
    /// The file, if any.
    pub path: Option<PathBuf>,
    /// SHA-256 of the file's bytes (empty without a file).
    pub sha256: String,
    /// When it was loaded.
    pub loaded_at: DateTime<Utc>,
}

impl Loaded {
    /// The effective policy as YAML.
    pub fn yaml(&self) -> String {
        serde_norway::to_string(&self.effective)
            .unwrap_or_else(|e| format!("# cannot render the policy: {e}\n"))
    }
}

/// Why a policy was refused: the file, the line (and column when known),
/// the field and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{}{}", file, line.map(|l| format!(":{l}")).unwrap_or_default(), column.map(|c| format!(":{c}")).unwrap_or_default(), field.as_ref().map(|f| format!(": {f}: {message}")).unwrap_or_else(|| format!(": {message}")))]
pub struct PolicyError {
    /// The file (or "flags").
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The field path (`pools[1].maxUnavailable`), when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Reads and checks `path` (or only the flags when there is no file).
pub fn load(
    path: Option<&Path>,
    flags: &FlagDefaults,
    now: DateTime<Utc>,
) -> Result<Loaded, PolicyError> {
    let Some(path) = path else {
        return parse(None, "", flags, now);
    };
    let file = path.display().to_string();
    let refuse = |message: String| PolicyError {
        file: file.clone(),
        line: None,
        column: None,
        field: None,
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| refuse(format!("cannot read: {e}")))?;
    if meta.len() > MAX_POLICY_BYTES as u64 {
        return Err(refuse(format!(
            "{} bytes long, the limit is {MAX_POLICY_BYTES}",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| refuse(format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| refuse("not UTF-8 text".to_string()))?;
    parse(Some(path), &text, flags, now)
}

/// Checks `text` (the file at `path`, or nothing) and merges it with `flags`.
pub fn parse(
    path: Option<&Path>,
    text: &str,
    flags: &FlagDefaults,
    now: DateTime<Utc>,
) -> Result<Loaded, PolicyError> {
    let file_name = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "flags".to_string());
    let flag_windows = parse_flag_windows(&flags.windows)?;
    let file: PolicyFile = match path {
        None => PolicyFile::default(),
        Some(_) if text.trim().is_empty() => PolicyFile::default(),
        Some(_) => serde_norway::from_str(text).map_err(|e| {
            let location = e.location();
            let (mut line, mut column) = (
                location.as_ref().map(|l| l.line()),
                location.as_ref().map(|l| l.column()),
            );
            let full = strip_location(&e.to_string());
            // A value our own types refused: serde_norway places it at its
            // enclosing mapping; the line that holds the raw value is exact.
            let message = match full.split_once(RAW_MARK) {
                Some((message, raw)) => {
                    if let Some((l, c)) = find_value(text, line.unwrap_or(1), raw) {
                        (line, column) = (Some(l), Some(c));
                    }
                    message.to_string()
                }
                None => full,
            };
            PolicyError {
                file: file_name.clone(),
                line,
                column,
                field: None,
                message,
            }
        })?,
    };
    let checker = Checker {
        file: &file_name,
        text,
    };
    checker.check(&file, flags)?;

    let mut effective = file.clone();
    effective.max_concurrent = Some(file.max_concurrent.or(flags.max_concurrent).unwrap_or(1));
    effective.windows = Some(file.windows.clone().unwrap_or(flag_windows));
    effective.min_window_remaining = Some(HumanDuration(
        file.min_window_remaining
            .map(|d| d.0)
            .or(flags.min_window_remaining)
            .unwrap_or(DEFAULT_MIN_WINDOW_REMAINING),
    ));
    let engine_policy = engine_policy(&effective);
    let sha256 = if path.is_some() {
        hex::encode(Sha256::digest(text.as_bytes()))
    } else {
        String::new()
    };
    Ok(Loaded {
        effective,
        engine_policy,
        source: match path {
            Some(p) => format!("file {} (+ flags)", p.display()),
            None => "flags".to_string(),
        },
        path: path.map(Path::to_path_buf),
        sha256,
        loaded_at: now,
    })
}

/// The grant rule's settings of an effective policy.
fn engine_policy(effective: &PolicyFile) -> Policy {
    Policy {
        max_concurrent: effective.max_concurrent.unwrap_or(1).max(1),
        windows: WindowSet {
            windows: effective
                .windows
                .iter()
                .flatten()
                .map(|w| w.0.clone())
                .collect(),
            min_remaining: chrono::Duration::from_std(
                effective
                    .min_window_remaining
                    .map(|d| d.0)
                    .unwrap_or(DEFAULT_MIN_WINDOW_REMAINING),
            )
            .unwrap_or(chrono::Duration::MAX),
        },
    }
}

fn parse_flag_windows(windows: &[String]) -> Result<Vec<Window>, PolicyError> {
    windows
        .iter()
        // An empty string (`--window ""`, a trailing `;`) is refused by the
        // parser: it is a mistake, not "always".
        .map(|w| {
            w.parse::<MaintenanceWindow>()
                .map(Window)
                .map_err(|e| PolicyError {
                    file: "flags".to_string(),
                    line: None,
                    column: None,
                    field: Some("--window".to_string()),
                    message: e.to_string(),
                })
        })
        .collect()
}

/// serde_norway appends " at line L column C" to its messages; the error
/// carries them separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// The first line at or after `from` (1-based) that holds `raw`, and the
/// column where it starts.
fn find_value(text: &str, from: usize, raw: &str) -> Option<(usize, usize)> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find_map(|(i, l)| l.find(raw).map(|c| (i + 1, c + 1)))
}

/// The longest alert name or query accepted.
const MAX_QUERY: usize = 4096;

struct Checker<'a> {
    file: &'a str,
    text: &'a str,
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

impl Checker<'_> {
    fn error(&self, path: &[Seg], message: impl Into<String>) -> PolicyError {
        PolicyError {
            file: self.file.to_string(),
            line: line_of(self.text, path),
            column: None,
            field: Some(path_text(path)),
            message: message.into(),
        }
    }

    fn check(&self, file: &PolicyFile, flags: &FlagDefaults) -> Result<(), PolicyError> {
        // Set in two places: refuse, naming both.
        if let (Some(f), Some(c)) = (file.max_concurrent, flags.max_concurrent) {
            return Err(self.error(
                &[key("maxConcurrent")],
                format!("set to {f} here and --max-concurrent={c} on the command line; set it in one place"),
            ));
        }
        if file.windows.is_some() && !flags.windows.is_empty() {
            return Err(self.error(
                &[key("windows")],
                format!(
                    "set here and with --window ({}) on the command line; set them in one place",
                    flags.windows.join("; ")
                ),
            ));
        }
        if let (Some(_), Some(c)) = (file.min_window_remaining, flags.min_window_remaining) {
            return Err(self.error(
                &[key("minWindowRemaining")],
                format!(
                    "set here and --min-window-remaining={} on the command line; set it in one place",
                    humantime::format_duration(c)
                ),
            ));
        }
        if file.max_concurrent == Some(0) {
            return Err(self.error(&[key("maxConcurrent")], "must be at least 1"));
        }
        self.check_pools(file)?;
        self.check_rollout_shape(file)?;
        self.check_prometheus(file, flags)?;
        if let Some(after) = file
            .stuck_locks
            .as_ref()
            .and_then(|s| s.force_release_overdue_after)
            && after.0 <= flags.overdue_after
        {
            return Err(self.error(
                &[key("stuckLocks"), key("forceReleaseOverdueAfter")],
                format!(
                    "{after} is not longer than --overdue-after ({}): a holder must be overdue before it is force-released",
                    humantime::format_duration(flags.overdue_after)
                ),
            ));
        }
        self.check_webhooks(file)
    }

    fn check_pools(&self, file: &PolicyFile) -> Result<(), PolicyError> {
        let mut names = std::collections::BTreeSet::new();
        for (i, pool) in file.pools.iter().enumerate() {
            let at = |k: &str| vec![key("pools"), Seg::Index(i), key(k)];
            if NodeName::new(pool.name.as_str()).is_err() || pool.name.contains('.') {
                return Err(self.error(
                    &at("name"),
                    format!("{:?} is not a lowercase RFC 1123 label", pool.name),
                ));
            }
            if !names.insert(pool.name.clone()) {
                return Err(self.error(
                    &at("name"),
                    format!("pool {:?} is defined twice", pool.name),
                ));
            }
            self.check_selector(&pool.selector, &at("selector"))?;
            if let Some(canary) = &pool.canary {
                self.check_canary(canary, &at("canary"))?;
            }
        }
        Ok(())
    }

    fn check_selector(&self, selector: &SelectorSpec, at: &[Seg]) -> Result<(), PolicyError> {
        if selector.match_labels.is_empty()
            && selector.match_expressions.is_empty()
            && selector.node_names.is_empty()
        {
            return Err(self.error(
                at,
                "selects every node: give matchLabels, matchExpressions or nodeNames",
            ));
        }
        for (k, v) in &selector.match_labels {
            let mut path = at.to_vec();
            path.extend([key("matchLabels"), key(&k.0)]);
            check_label_value(&k.0, v).map_err(|m| self.error(&path, m))?;
        }
        for (j, e) in selector.match_expressions.iter().enumerate() {
            let mut path = at.to_vec();
            path.extend([key("matchExpressions"), Seg::Index(j)]);
            let needs_values = matches!(e.operator, Operator::In | Operator::NotIn);
            if needs_values == e.values.is_empty() {
                return Err(self.error(
                    &path,
                    if needs_values {
                        format!("{:?} needs at least one value", e.operator)
                    } else {
                        format!("{:?} takes no values", e.operator)
                    },
                ));
            }
            for v in &e.values {
                check_label_value(&e.key.0, v).map_err(|m| self.error(&path, m))?;
            }
        }
        Ok(())
    }

    fn check_canary(
        &self,
        canary: &super::schema::CanarySpec,
        at: &[Seg],
    ) -> Result<(), PolicyError> {
        for (j, n) in canary.nodes.iter().enumerate() {
            let mut path = at.to_vec();
            path.extend([key("nodes"), Seg::Index(j)]);
            NodeName::new(n.as_str()).map_err(|e| self.error(&path, e.to_string()))?;
        }
        Ok(())
    }

    /// The canary, the failure budget and the zone limit.
    fn check_rollout_shape(&self, file: &PolicyFile) -> Result<(), PolicyError> {
        if let Some(canary) = &file.canary {
            self.check_canary(canary, &[key("canary")])?;
        }
        if file
            .failure_budget
            .as_ref()
            .is_some_and(|b| b.max_failed_nodes == 0)
        {
            return Err(self.error(
                &[key("failureBudget"), key("maxFailedNodes")],
                "must be at least 1",
            ));
        }
        if let Some(t) = &file.topology
            && t.max_zones_in_maintenance == Some(0)
        {
            return Err(self.error(
                &[key("topology"), key("maxZonesInMaintenance")],
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn check_prometheus(&self, file: &PolicyFile, flags: &FlagDefaults) -> Result<(), PolicyError> {
        if let Some(prom) = &file.prometheus {
            if prom.timeout.0 < Duration::from_millis(100)
                || prom.timeout.0 > Duration::from_secs(60)
            {
                return Err(self.error(
                    &[key("prometheus"), key("timeout")],
                    "must be from 100ms to 60s",
                ));
            }
            if prom.interval.0 < Duration::from_secs(1)
                || prom.interval.0 > Duration::from_secs(600)
            {
                return Err(self.error(
                    &[key("prometheus"), key("interval")],
                    "must be from 1s to 10m",
                ));
            }
        }
        if let Some(gate) = &file.health_gate {
            if gate.interval.0 < Duration::from_secs(1)
                || gate.interval.0 > Duration::from_secs(600)
            {
                return Err(self.error(
                    &[key("healthGate"), key("interval")],
                    "must be from 1s to 10m",
                ));
            }
            if let Some(query) = &gate.query {
                if file.prometheus.is_none() {
                    return Err(self.error(
                        &[key("healthGate"), key("query")],
                        "needs the prometheus section (where to send the query)",
                    ));
                }
                if query.trim().is_empty() || query.len() > MAX_QUERY {
                    return Err(self.error(
                        &[key("healthGate"), key("query")],
                        format!("must be a PromQL query of 1 to {MAX_QUERY} bytes"),
                    ));
                }
            }
            if (gate.nodes_ready || gate.pod_disruption_budgets) && !flags.kubernetes {
                let field = if gate.nodes_ready {
                    "nodesReady"
                } else {
                    "podDisruptionBudgets"
                };
                return Err(self.error(
                    &[key("healthGate"), key(field)],
                    "needs the Kubernetes node watch (--watch-nodes or --store kubernetes); set it to false without Kubernetes",
                ));
            }
        }
        if let Some(blockers) = &file.alert_blockers {
            if blockers.alerts.is_empty() {
                return Err(self.error(&[key("alertBlockers"), key("alerts")], "names no alert"));
            }
            for (i, name) in blockers.alerts.iter().enumerate() {
                if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                    return Err(self.error(
                        &[key("alertBlockers"), key("alerts"), Seg::Index(i)],
                        "an alert name is 1 to 256 characters without control characters",
                    ));
                }
            }
            if blockers.alertmanager_url.is_none() && file.prometheus.is_none() {
                return Err(self.error(
                    &[key("alertBlockers")],
                    "needs the prometheus section or alertmanagerUrl (where to look for firing alerts)",
                ));
            }
        }
        Ok(())
    }

    fn check_webhooks(&self, file: &PolicyFile) -> Result<(), PolicyError> {
        if file.webhooks.len() > 16 {
            return Err(self.error(&[key("webhooks")], "at most 16 webhooks"));
        }
        for (i, hook) in file.webhooks.iter().enumerate() {
            let at = |k: &str| vec![key("webhooks"), Seg::Index(i), key(k)];
            if let Some(template) = &hook.template {
                Template::parse(template).map_err(|m| self.error(&at("template"), m))?;
            }
            if !(1..=20).contains(&hook.max_attempts) {
                return Err(self.error(&at("maxAttempts"), "must be from 1 to 20"));
            }
            if hook.timeout.0 < Duration::from_millis(100)
                || hook.timeout.0 > Duration::from_secs(60)
            {
                return Err(self.error(&at("timeout"), "must be from 100ms to 60s"));
            }
            let mut seen = std::collections::BTreeSet::new();
            for e in &hook.events {
                if !seen.insert(*e) {
                    return Err(self.error(
                        &at("events"),
                        format!("{} is listed twice", EventKind::name(*e)),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
