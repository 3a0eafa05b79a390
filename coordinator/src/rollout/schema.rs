//! The policy file's schema: what `--policy FILE` may say, as serde types.
//!
//! Unknown fields are refused (`deny_unknown_fields`), so a typo is an
//! error with its line rather than a setting silently ignored. Values that
//! can be checked on their own (durations, percentages, windows, label
//! keys, URLs) are checked while parsing, so their errors carry the line
//! and column serde_norway reports; checks across fields live in
//! [`super::load`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::window::MaintenanceWindow;

/// The whole file. Every field is optional; what is absent comes from the
/// command-line flags (for the global limit and windows) or is off.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyFile {
    /// How many nodes may hold the baton at once (`--max-concurrent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Maintenance windows (`--window`); an empty list means always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<Window>>,
    /// No grant when less than this is left of a window
    /// (`--min-window-remaining`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_window_remaining: Option<HumanDuration>,
    /// Groups of nodes with their own limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolSpec>,
    /// Zone limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologySpec>,
    /// The order nodes go in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderSpec>,
    /// Canary nodes for pools without their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
    /// Pause the rollout after this many failed nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_budget: Option<FailureBudgetSpec>,
    /// The Prometheus server the health gate and the alert blockers ask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSpec>,
    /// Wait until the cluster is healthy before each grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_gate: Option<HealthGateSpec>,
    /// Grant nothing while any of these alerts fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_blockers: Option<AlertBlockersSpec>,
    /// What happens to holders that are gone or overdue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck_locks: Option<StuckLocksSpec>,
    /// Where rollout events are posted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookSpec>,
}

/// A pool: nodes chosen by a selector, with their own limit and windows.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolSpec {
    /// Unique name (a lowercase RFC 1123 label).
    pub name: String,
    /// Which nodes belong (a node belongs to the first pool that selects it).
    pub selector: SelectorSpec,
    /// How many of the pool's nodes may hold the baton at once.
    #[serde(default = "MaxUnavailable::one")]
    pub max_unavailable: MaxUnavailable,
    /// When this pool's nodes may be granted (besides the global windows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
    /// Pools with a lower order go first (ties run in parallel).
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub order: i32,
    /// This pool's canary (overrides the top-level one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

/// A label selector (Kubernetes' semantics) and node name patterns. Every
/// part that is given must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorSpec {
    /// Labels the node must carry with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<LabelKey, String>,
    /// Set-based requirements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<ExpressionSpec>,
    /// Node name patterns (`*` any run of characters, `?` one); the node
    /// must match one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_names: Vec<NamePattern>,
}

/// One set-based requirement.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExpressionSpec {
    /// The label key.
    pub key: LabelKey,
    /// How it is compared.
    pub operator: Operator,
    /// The values (for In and NotIn; must be empty for the others).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A set-based operator.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum Operator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// A count of nodes or a percentage of a pool (rounded down, at least 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxUnavailable {
    /// At most this many nodes.
    Count(u32),
    /// At most this percentage of the pool's nodes.
    Percent(u32),
}

impl MaxUnavailable {
    fn one() -> Self {
        MaxUnavailable::Count(1)
    }

    /// The limit for a pool of `size` nodes: at least 1, so a pool always
    /// makes progress.
    pub fn limit(self, size: usize) -> usize {
        match self {
            MaxUnavailable::Count(n) => n.max(1) as usize,
            MaxUnavailable::Percent(p) => (size * p as usize / 100).max(1),
        }
    }
}

impl Serialize for MaxUnavailable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxUnavailable::Count(n) => s.serialize_u32(*n),
            MaxUnavailable::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for MaxUnavailable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(i64),
            Text(String),
        }
        let parsed = match Raw::deserialize(d).map_err(|_| {
            de::Error::custom(
                "maxUnavailable must be a number of nodes (e.g. 2) or a percentage (e.g. \"25%\")",
            )
        })? {
            Raw::Count(n) if (1..=100_000).contains(&n) => MaxUnavailable::Count(n as u32),
            Raw::Count(n) => {
                return Err(de::Error::custom(format!(
                    "maxUnavailable must be at least 1 (and at most 100000), not {n}"
                )));
            }
            Raw::Text(t) => {
                let p = t
                    .trim()
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| {
                        de::Error::custom(format!(
                            "maxUnavailable {t:?} is not a percentage from 1% to 100%"
                        ))
                    })?;
                MaxUnavailable::Percent(p)
            }
        };
        Ok(parsed)
    }
}

/// Zone limits.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TopologySpec {
    /// The label that names a node's zone.
    #[serde(default = "default_zone_label")]
    pub zone_label: LabelKey,
    /// How many zones may have nodes in maintenance at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_zones_in_maintenance: Option<u32>,
    /// Once a zone started, its waiting nodes go before any other zone's.
    #[serde(default)]
    pub finish_zone_first: bool,
}

fn default_zone_label() -> LabelKey {
    LabelKey("topology.kubernetes.io/zone".to_string())
}

/// The order nodes go in (FIFO within equals).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OrderSpec {
    /// Control-plane nodes before workers (the kubeadm upgrade order).
    #[serde(default)]
    pub control_plane_first: bool,
    /// Then by this label's value (ascending; nodes without it last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_label: Option<LabelKey>,
}

/// Canary nodes go alone; the rest wait a soak time and the health gate.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CanarySpec {
    /// These nodes are the canaries (default: the first node granted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// How long after the canaries released the others wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<HumanDuration>,
}

/// Pause after too many failures.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailureBudgetSpec {
    /// After this many failed nodes the rollout pauses itself.
    pub max_failed_nodes: u32,
}

/// The Prometheus (and optionally Alertmanager) to ask.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrometheusSpec {
    /// Base URL, e.g. `http://prometheus.monitoring:9090`.
    pub url: HttpUrl,
    /// Timeout of one query; a query that takes longer holds grants back.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// How often the queries run.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// The health gate between nodes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthGateSpec {
    /// Every node that does not hold the baton must be Ready (Kubernetes).
    #[serde(default = "yes")]
    pub nodes_ready: bool,
    /// No PodDisruptionBudget may be below its desired healthy count
    /// (Kubernetes).
    #[serde(default = "yes")]
    pub pod_disruption_budgets: bool,
    /// A PromQL query that must return an empty result (e.g.
    /// `up{job="node"} == 0`); while it returns anything, nothing is granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// How often the budgets (and, if it is sooner than Prometheus'
    /// interval, the query) are checked.
    #[serde(default = "default_gate_interval")]
    pub interval: HumanDuration,
}

fn default_gate_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn yes() -> bool {
    true
}

/// Alerts that block every grant while they fire.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AlertBlockersSpec {
    /// Alert names (`alertname` label).
    pub alerts: Vec<String>,
    /// Ask Alertmanager (`/api/v2/alerts`, active and not silenced) at this
    /// URL instead of Prometheus' `ALERTS` series.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager_url: Option<HttpUrl>,
}

/// Holders that are gone or overdue.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StuckLocksSpec {
    /// Release (audited) a holder whose Node object was deleted (Kubernetes).
    #[serde(default = "yes")]
    pub release_deleted_nodes: bool,
    /// How long a holder's Node must stay deleted before it is released
    /// (a kubelet that is still running registers its Node again).
    #[serde(default = "default_deleted_grace")]
    pub deleted_node_grace: HumanDuration,
    /// Force-release (audited) a holder that has not renewed for this long.
    /// Off unless set; must be longer than `--overdue-after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_release_overdue_after: Option<HumanDuration>,
}

fn default_deleted_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl Default for StuckLocksSpec {
    fn default() -> Self {
        Self {
            release_deleted_nodes: true,
            deleted_node_grace: default_deleted_grace(),
            force_release_overdue_after: None,
        }
    }
}

/// One webhook.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Where the JSON body is POSTed (http or https).
    pub url: HttpUrl,
    /// Which events (default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventKind>,
    /// The body, with `{{event}}`, `{{node}}`, `{{reason}}`, `{{token}}`,
    /// `{{actor}}`, `{{time}}`, `{{coordinator}}` replaced by their values,
    /// JSON-escaped (write them inside JSON strings). Default: a JSON object
    /// of all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Timeout of one attempt.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: HumanDuration,
    /// Attempts before an event is dropped (with a log line and a metric).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_webhook_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_attempts() -> u32 {
    5
}

/// A rollout event a webhook can be sent for.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A node was granted the baton.
    Granted,
    /// A node released the baton (its maintenance finished).
    Released,
    /// A holder reported a failed step (it keeps the baton).
    Failed,
    /// A holder stopped renewing (it keeps the baton).
    Overdue,
    /// The baton was taken from a holder (operator or stuck-lock policy).
    ForceReleased,
    /// Granting was paused (by an operator or the failure budget).
    Paused,
    /// Granting was resumed.
    Resumed,
    /// The last holder released and nobody waits: the rollout is done.
    Finished,
}

impl EventKind {
    /// The name used in the file and in webhook bodies.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Granted => "granted",
            EventKind::Released => "released",
            EventKind::Failed => "failed",
            EventKind::Overdue => "overdue",
            EventKind::ForceReleased => "force-released",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Finished => "finished",
        }
    }
}

/// Separates a value error's message from the raw value it is about (the
/// loader uses the raw value to find the exact line, then drops it).
pub const RAW_MARK: char = '\u{0}';

/// Implements string-based serde for a type with `FromStr` and `Display`,
/// so its parse errors carry the file position.
macro_rules! string_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse()
                    .map_err(|e: String| de::Error::custom(format!("{e}{RAW_MARK}{text}")))
            }
        }
    };
}

/// A duration written like `30s`, `5m`, `1h30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("{s:?} is not a duration like 30s, 5m or 1h30m: {e}"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}
string_serde!(HumanDuration);

/// A maintenance window, e.g. `Mon-Fri 22:00-04:00 Europe/Berlin`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window(pub MaintenanceWindow);

impl FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(Window).map_err(|e| e.to_string())
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
string_serde!(Window);

/// The longest label key prefix (a DNS subdomain).
const MAX_PREFIX: usize = 253;
/// The longest label name or value.
pub const MAX_LABEL_NAME: usize = 63;

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a
/// name of at most 63 characters of `[A-Za-z0-9._-]` that starts and ends
/// alphanumeric.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey(pub String);

impl FromStr for LabelKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        check_label_key(s)?;
        Ok(LabelKey(s.to_string()))
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_serde!(LabelKey);

fn name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL_NAME
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Checks a label key (see [`LabelKey`]).
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && (prefix.is_empty()
            || prefix.len() > MAX_PREFIX
            || crate::node::NodeName::new(prefix).is_err())
    {
        return Err(format!(
            "label key {key:?}: the prefix must be a lowercase DNS subdomain of at most {MAX_PREFIX} characters"
        ));
    }
    if !name_ok(name) {
        return Err(format!(
            "label key {key:?}: the name must be 1 to {MAX_LABEL_NAME} characters of [A-Za-z0-9._-], starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or at most 63 characters of
/// `[A-Za-z0-9._-]` starting and ending alphanumeric.
pub fn check_label_value(key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || name_ok(value) {
        Ok(())
    } else {
        Err(format!(
            "label {key}: value {value:?} must be at most {MAX_LABEL_NAME} characters of [A-Za-z0-9._-], starting and ending alphanumeric"
        ))
    }
}

/// A node name pattern: lowercase name characters and the wildcards `*`
/// and `?`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePattern(pub String);

impl NamePattern {
    /// True when `name` matches the pattern.
    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

/// `*` and `?` matching, iterative with one backtrack point (linear in
/// practice, never exponential).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

impl FromStr for NamePattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= crate::node::MAX_NODE_NAME_LEN
            && s.bytes().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'-' | b'.' | b'*' | b'?')
            });
        if ok {
            Ok(NamePattern(s.to_string()))
        } else {
            Err(format!(
                "node name pattern {s:?} may only hold lowercase letters, digits, '-', '.', '*' and '?'"
            ))
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_serde!(NamePattern);

/// An `http://` or `https://` URL with a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl(pub String);

impl FromStr for HttpUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(h)) if !h.is_empty() => {
                Ok(HttpUrl(s.trim_end_matches('/').to_string()))
            }
            _ => Err(format!(
                "{s:?} must be an http:// or https:// URL with a host"
            )),
        }
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_serde!(HttpUrl);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        let p = |s: &str| s.parse::<NamePattern>().unwrap();
        assert!(p("worker-*").matches("worker-1"));
        assert!(p("worker-*").matches("worker-"));
        assert!(!p("worker-*").matches("cp-1"));
        assert!(p("*-a-?").matches("rack-a-7"));
        assert!(!p("*-a-?").matches("rack-a-17"));
        assert!(p("*").matches(""));
        assert!(p("a*b*c").matches("aXbYbZc"));
        assert!(!p("a*b*c").matches("aXbYbZ"));
        assert!("Worker".parse::<NamePattern>().is_err());
    }

    #[test]
    fn max_unavailable_is_a_count_or_a_percentage() {
        let parse = |s: &str| serde_norway::from_str::<MaxUnavailable>(s);
        assert_eq!(parse("2").unwrap(), MaxUnavailable::Count(2));
        assert_eq!(parse("\"25%\"").unwrap(), MaxUnavailable::Percent(25));
        assert!(parse("0").is_err());
        assert!(parse("\"0%\"").is_err());
        assert!(parse("\"150%\"").is_err());
        assert!(parse("\"lots\"").is_err());
        assert_eq!(MaxUnavailable::Percent(25).limit(10), 2);
        assert_eq!(MaxUnavailable::Percent(10).limit(3), 1);
        assert_eq!(MaxUnavailable::Count(3).limit(1), 3);
    }

    #[test]
    fn label_keys_follow_kubernetes() {
        for ok in ["zone", "topology.kubernetes.io/zone", "a_b.c-d", "x/Y1"] {
            assert!(check_label_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/a", "a/", "-a", "a-", "UP.case/x", &"a".repeat(64)] {
            assert!(check_label_key(bad).is_err(), "{bad}");
        }
        assert!(check_label_value("k", "").is_ok());
        assert!(check_label_value("k", "eu-1a").is_ok());
        assert!(check_label_value("k", "a b").is_err());
    }
}
