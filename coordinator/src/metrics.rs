//! Prometheus metrics (names prefixed `baton_`) and the HTTP endpoints
//! `/metrics`, `/healthz` (the process is alive) and `/readyz` (this replica
//! leads and grants: the Service routes agents only to it).
//!
//! The alerts and the dashboard in `manifests/overlays/monitoring` use these
//! names; a test there compares every name they use with a real
//! coordinator's `/metrics`. Only the leader's gauges describe the rollout
//! (a follower's are from when it last led), so queries join them with
//! `baton_is_leader == 1`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::Engine;

/// The coordinator's metrics. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Nodes holding the baton.
    pub holders: Gauge,
    /// Nodes waiting.
    pub queue_length: Gauge,
    /// Holders that are overdue now.
    pub overdue: Gauge,
    /// 1 while granting is paused.
    pub paused: Gauge,
    /// 1 while this replica leads.
    pub is_leader: Gauge,
    /// The last fencing token granted.
    pub last_token: Gauge,
    /// Grants given.
    pub grants: Counter,
    /// Releases (including forced ones).
    pub releases: Counter,
    /// Holders that became overdue.
    pub overdue_events: Counter,
    /// Failed state saves.
    pub store_errors: Counter,
    /// Seconds from a release that left waiters to the next grant.
    pub handoff_latency: Histogram,
    /// Handoffs measured (the histogram's count).
    pub handoffs: Counter,
    /// 1 while now is inside a maintenance window (or none is configured).
    pub window_open: Gauge,
    /// 1 per holder, labelled with its node and its last reported phase
    /// (set through [`Metrics::set_holder_phases`]).
    holder_phase: Family<HolderPhase, Gauge>,
    /// The label sets `holder_phase` carries now.
    holder_phase_set: Arc<Mutex<Vec<HolderPhase>>>,
    /// Waiters the etcd quorum guard holds back now.
    pub etcd_blocked_waiters: Gauge,
    /// Waiters whose agent makes no control-plane backups on a node whose
    /// grant needs one (an agent from before backups on a control-plane
    /// etcd node), counted from the queue whatever they are told now.
    pub waiters_without_backup_support: Gauge,
    /// Grants released at their Confirm(drain) for lacking their backup
    /// pairing (`baton_unpaired_grants_released_total`).
    pub unpaired_grants_released: Counter,
    /// Voting etcd members in the last health snapshot.
    pub etcd_voting_members: Gauge,
    /// Healthy voting etcd members in the last health snapshot.
    pub etcd_healthy_voting_members: Gauge,
    /// etcd snapshots taken before a grant, by result.
    etcd_snapshots: Family<SnapshotResult, Counter>,
    /// The rollout policy's series (issue 13: policy, gate, canaries,
    /// failure budget, webhooks, Events).
    pub rollout: crate::rollout::metrics::RolloutMetrics,
    /// Control-plane backups agents sent, by result.
    backups: Family<BackupResult, Counter>,
}

/// The labels of `baton_holder_phase`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HolderPhase {
    node: String,
    phase: String,
}

/// The results `baton_backups_total` counts.
const BACKUP_RESULTS: [&str; 3] = ["kept", "refused", "failed"];

/// The label of `baton_backups_total`: `kept`, `refused` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackupResult {
    result: &'static str,
}

/// The label of `baton_etcd_snapshots_total`: `ok` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SnapshotResult {
    result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every series.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("baton");
        let holders = Gauge::default();
        let queue_length = Gauge::default();
        let overdue = Gauge::default();
        let paused = Gauge::default();
        let is_leader = Gauge::default();
        let last_token = Gauge::default();
        let grants = Counter::default();
        let releases = Counter::default();
        let overdue_events = Counter::default();
        let store_errors = Counter::default();
        let handoffs = Counter::default();
        // 100 µs to ~26 s.
        let handoff_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 19),
        );
        registry.register("holders", "Nodes holding the baton", holders.clone());
        registry.register(
            "queue_length",
            "Nodes waiting for the baton",
            queue_length.clone(),
        );
        registry.register(
            "overdue_holders",
            "Holders that have not renewed in time (they keep the baton)",
            overdue.clone(),
        );
        registry.register("paused", "1 while granting is paused", paused.clone());
        registry.register(
            "is_leader",
            "1 while this coordinator leads",
            is_leader.clone(),
        );
        registry.register(
            "last_fencing_token",
            "The last fencing token granted",
            last_token.clone(),
        );
        registry.register("grants", "Grants given", grants.clone());
        registry.register(
            "releases",
            "Releases, including forced ones",
            releases.clone(),
        );
        registry.register(
            "overdue",
            "Holders that became overdue",
            overdue_events.clone(),
        );
        registry.register(
            "store_errors",
            "State saves that failed",
            store_errors.clone(),
        );
        registry.register(
            "handoff_latency_seconds",
            "Time from a release that left waiters to the next grant",
            handoff_latency.clone(),
        );
        registry.register(
            "handoffs",
            "Handoffs from a release to the next waiter",
            handoffs.clone(),
        );
        let window_open = Gauge::default();
        registry.register(
            "window_open",
            "1 while now is inside a maintenance window (always 1 without windows)",
            window_open.clone(),
        );
        let holder_phase = Family::<HolderPhase, Gauge>::default();
        registry.register(
            "holder_phase",
            "1 per holder, labelled with its node and last reported phase",
            holder_phase.clone(),
        );
        let etcd_blocked_waiters = Gauge::default();
        registry.register(
            "etcd_blocked_waiters",
            "Waiters the etcd quorum guard holds back now",
            etcd_blocked_waiters.clone(),
        );
        let unpaired_grants_released = Counter::default();
        registry.register(
            "unpaired_grants_released",
            "Grants of control-plane etcd nodes released at their Confirm(drain) because they carried no backup pairing (made by an older coordinator): about one per such node after an upgrade; more is a loop",
            unpaired_grants_released.clone(),
        );
        let waiters_without_backup_support = Gauge::default();
        registry.register(
            "waiters_without_backup_support",
            "Waiters whose agent makes no control-plane backups on a node whose grant needs one: never granted until baton-agent is upgraded there, whatever else holds them now",
            waiters_without_backup_support.clone(),
        );
        let etcd_voting_members = Gauge::default();
        registry.register(
            "etcd_voting_members",
            "Voting etcd members in the guard's last health snapshot",
            etcd_voting_members.clone(),
        );
        let etcd_healthy_voting_members = Gauge::default();
        registry.register(
            "etcd_healthy_voting_members",
            "Healthy voting etcd members in the guard's last health snapshot",
            etcd_healthy_voting_members.clone(),
        );
        let etcd_snapshots = Family::<SnapshotResult, Counter>::default();
        // Both series exist from the start, so increase() sees the first
        // failure (a series born at 1 shows no increase).
        for result in ["ok", "failed"] {
            drop(etcd_snapshots.get_or_create(&SnapshotResult { result }));
        }
        registry.register(
            "etcd_snapshots",
            "etcd snapshots taken before granting an etcd node, by result (ok, failed)",
            etcd_snapshots.clone(),
        );
        // The rollout policy's series, in their own module.
        let rollout = crate::rollout::metrics::RolloutMetrics::register(&mut registry);
        // Control-plane backups (issue 13 item 8): every result exists
        // from the start, as for the snapshots.
        let backups = Family::<BackupResult, Counter>::default();
        for result in BACKUP_RESULTS {
            drop(backups.get_or_create(&BackupResult { result }));
        }
        registry.register(
            "backups",
            "control-plane backups agents sent before maintenance, by result (kept; refused: a stale token, too large, a wrong checksum; failed: this coordinator could not keep it)",
            backups.clone(),
        );
        Self {
            rollout,
            registry: Arc::new(registry),
            window_open,
            holder_phase,
            holder_phase_set: Arc::default(),
            etcd_blocked_waiters,
            waiters_without_backup_support,
            unpaired_grants_released,
            etcd_voting_members,
            etcd_healthy_voting_members,
            etcd_snapshots,
            backups,
            handoffs,
            holders,
            queue_length,
            overdue,
            paused,
            is_leader,
            last_token,
            grants,
            releases,
            overdue_events,
            store_errors,
            handoff_latency,
        }
    }

    /// Makes `baton_holder_phase` show exactly `holders` (node, phase name).
    /// New series are set before old ones go, so a scrape never sees a
    /// holder missing.
    pub fn set_holder_phases<'a>(&self, holders: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let now: Vec<HolderPhase> = holders
            .into_iter()
            .map(|(node, phase)| HolderPhase {
                node: node.to_string(),
                phase: phase.to_string(),
            })
            .collect();
        let mut set = self
            .holder_phase_set
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *set == now {
            return;
        }
        for labels in &now {
            self.holder_phase.get_or_create(labels).set(1);
        }
        for gone in set.iter().filter(|l| !now.contains(l)) {
            self.holder_phase.remove(gone);
        }
        *set = now;
    }

    /// Counts one etcd snapshot attempt before a grant.
    pub fn etcd_snapshot(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.etcd_snapshots
            .get_or_create(&SnapshotResult { result })
            .inc();
    }

    /// Counts one control-plane backup upload: `kept`, `refused` or
    /// `failed` (anything else counts as `failed`).
    pub fn backup(&self, result: &str) {
        let result = BACKUP_RESULTS
            .into_iter()
            .find(|r| *r == result)
            .unwrap_or("failed");
        self.backups.get_or_create(&BackupResult { result }).inc();
    }

    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The router for `/metrics`, `/healthz` and `/readyz`.
pub fn router(engine: Arc<Engine>, metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state((engine, metrics))
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), else the
/// classic text format (`curl | promtool check metrics`, older scrapers).
async fn metrics_page(
    State((_, metrics)): State<(Arc<Engine>, Metrics)>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let encoded = metrics.encode();
    if openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], encoded)
    } else {
        (
            [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)],
            openmetrics_to_text(&encoded),
        )
    }
}

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites an OpenMetrics exposition of gauges, counters and histograms in
/// the classic text format: a counter family `x` is named `x_total` there
/// (its samples already are), and `# UNIT` and `# EOF` do not exist.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

async fn readyz(State((engine, _)): State<(Arc<Engine>, Metrics)>) -> impl IntoResponse {
    if engine.is_shutting_down().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    let leadership = engine.leadership();
    if leadership.is_leader && engine.is_current().await {
        (StatusCode::OK, "ready: leading\n".to_string())
    } else if leadership.is_leader {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: leading, the state is not loaded yet\n".to_string(),
        )
    } else {
        let leader = leadership.leader.unwrap_or_else(|| "unknown".into());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: following (leader: {leader})\n"),
        )
    }
}

/// Serves the router on `addr` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counter_families_with_total_and_has_no_eof() {
        let metrics = Metrics::new();
        metrics.grants.inc();
        metrics.set_holder_phases([("n1", "draining")]);
        let open = metrics.encode();
        assert!(open.contains("# TYPE baton_grants counter\n"), "{open}");
        let text = openmetrics_to_text(&open);
        assert!(
            text.contains("# HELP baton_grants_total Grants given.\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE baton_grants_total counter\nbaton_grants_total 1\n"));
        assert!(text.contains("# TYPE baton_holders gauge\nbaton_holders 0\n"));
        assert!(text.contains("baton_holder_phase{node=\"n1\",phase=\"draining\"} 1"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn holder_phases_follow_the_holders() {
        let metrics = Metrics::new();
        metrics.set_holder_phases([("n1", "draining"), ("n2", "failed")]);
        metrics.set_holder_phases([("n1", "rebooting")]);
        let text = metrics.encode();
        assert!(text.contains("baton_holder_phase{node=\"n1\",phase=\"rebooting\"} 1"));
        assert!(!text.contains("draining") && !text.contains("n2"), "{text}");
    }
}
