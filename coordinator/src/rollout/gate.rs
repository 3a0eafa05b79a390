//! The health gate and the alert blockers: a [`GrantGuard`] that holds
//! every grant while the cluster is not healthy, and the task that keeps
//! its knowledge fresh.
//!
//! Held while (each part only when the policy turns it on):
//! - a named alert fires (Prometheus' `ALERTS` series, or Alertmanager);
//! - a node that does not hold the baton is not Ready (the node watch);
//! - a PodDisruptionBudget has fewer healthy pods than it desires;
//! - the health query returns anything.
//!
//! Fail closed: no answer yet, an error, a timeout, or an answer older than
//! a few rounds holds grants, with the reason. After a release, an answer
//! counts only if its check *started* after that release, so the next
//! grant waits for the cluster to be seen healthy again.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use tokio::sync::watch;
use tracing::{info, warn};

use super::http::HttpClient;
use super::load::Loaded;
use super::prometheus::{firing_in_alertmanager, firing_in_prometheus, query};
use super::reload::PolicyHandle;
use super::schema::PolicyFile;
use crate::engine::Engine;
use crate::kube::nodes::NodeFacts;
use crate::policy::{GrantGuard, Waiter};
use crate::state::LeaseState;

/// How often the budgets are read when no Prometheus interval applies.
pub const DEFAULT_ROUND: Duration = Duration::from_secs(5);
/// The most series or budgets named in a reason.
const NAMED: usize = 3;

/// What the gate waits for, from a small fixed set: the label of
/// `baton_health_gate_waiting`, and what "the reason changed" is measured
/// by (the sentences carry ages and times that change every round).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// A named alert fires.
    AlertFiring,
    /// A node that does not hold the baton is not Ready.
    NodesNotReady,
    /// A PodDisruptionBudget is below its desired healthy count.
    DisruptionBudgets,
    /// The health query returned series.
    Query,
    /// A check failed, timed out or cannot run here (fail closed).
    Unavailable,
    /// A check has not answered yet, or not under the reloaded policy.
    NoAnswer,
    /// The last answer is from before the last release.
    AfterRelease,
    /// The last answer is too old.
    Stale,
}

impl Cause {
    /// Every cause (each has a `baton_health_gate_waiting` series).
    pub const ALL: [Cause; 8] = [
        Cause::AlertFiring,
        Cause::NodesNotReady,
        Cause::DisruptionBudgets,
        Cause::Query,
        Cause::Unavailable,
        Cause::NoAnswer,
        Cause::AfterRelease,
        Cause::Stale,
    ];

    /// The name in metrics and status.
    pub fn name(self) -> &'static str {
        match self {
            Cause::AlertFiring => "alert_firing",
            Cause::NodesNotReady => "nodes_not_ready",
            Cause::DisruptionBudgets => "disruption_budgets",
            Cause::Query => "query",
            Cause::Unavailable => "check_unavailable",
            Cause::NoAnswer => "no_answer",
            Cause::AfterRelease => "after_release",
            Cause::Stale => "stale_answer",
        }
    }
}

/// Why the gate holds grants now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// The kind of reason.
    pub cause: Cause,
    /// The sentence (as the waiters' reason shows it).
    pub reason: String,
}

impl Hold {
    fn new(cause: Cause, reason: impl Into<String>) -> Self {
        Self {
            cause,
            reason: reason.into(),
        }
    }
}

/// One check's last answer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observed {
    /// What it answered (the query, the alerts and their source): an
    /// answer to another question does not count after a reload.
    key: String,
    /// When the check started.
    started: DateTime<Utc>,
    /// `None`: healthy; else why grants are held.
    blocked: Option<Hold>,
    /// The alert blockers that fire (alerts only).
    firing: Vec<String>,
}

#[derive(Clone, Debug, Default)]
struct Answers {
    alerts: Option<Observed>,
    query: Option<Observed>,
    budgets: Option<Observed>,
}

/// The guard, and the source of its answers.
pub struct HealthGate {
    policy: Arc<PolicyHandle>,
    nodes: Option<Arc<NodeFacts>>,
    kube: Option<::kube::Client>,
    http: HttpClient,
    answers: RwLock<Answers>,
}

fn alerts_key(p: &PolicyFile) -> Option<String> {
    let b = p.alert_blockers.as_ref()?;
    let source = match (&b.alertmanager_url, &p.prometheus) {
        (Some(am), _) => format!("Alertmanager {am}"),
        (None, Some(prom)) => format!("Prometheus {}", prom.url),
        (None, None) => return None,
    };
    Some(format!("{} in {source}", b.alerts.join(", ")))
}

/// The time of the last release or force-release in the audit trail.
pub fn last_release(state: &LeaseState) -> Option<DateTime<Utc>> {
    state
        .audit
        .iter()
        .rev()
        .find(|a| a.action == "release" || a.action == "force-release")
        .map(|a| a.time)
}

fn round_every(p: &PolicyFile) -> Duration {
    p.prometheus
        .as_ref()
        .map(|p| p.interval.0)
        .unwrap_or(DEFAULT_ROUND)
}

/// An answer older than this is stale (a few rounds missed).
fn max_age(p: &PolicyFile) -> chrono::Duration {
    let timeout = p
        .prometheus
        .as_ref()
        .map(|p| p.timeout.0)
        .unwrap_or_default();
    chrono::Duration::from_std(2 * round_every(p) + timeout + Duration::from_secs(5))
        .unwrap_or(chrono::Duration::MAX)
}

fn judge(
    what: &str,
    observed: Option<&Observed>,
    key: &str,
    after: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    max_age: chrono::Duration,
) -> Result<(), Hold> {
    let Some(o) = observed else {
        return Err(Hold::new(Cause::NoAnswer, format!("{what}: no answer yet")));
    };
    if o.key != key {
        return Err(Hold::new(
            Cause::NoAnswer,
            format!("{what}: waiting for the first answer under the reloaded policy"),
        ));
    }
    if let Some(t) = after
        && o.started <= t
    {
        return Err(Hold::new(
            Cause::AfterRelease,
            format!(
                "{what}: waiting for a check that started after the last release ({})",
                t.format("%H:%M:%SZ")
            ),
        ));
    }
    if now - o.started > max_age {
        return Err(Hold::new(
            Cause::Stale,
            format!(
                "{what}: the last answer is {}s old; holding grants until a fresh one (fail closed)",
                (now - o.started).num_seconds()
            ),
        ));
    }
    o.blocked.clone().map_or(Ok(()), Err)
}

impl HealthGate {
    /// A gate over the policy in force; `nodes` and `kube` in a cluster.
    pub fn new(
        policy: Arc<PolicyHandle>,
        nodes: Option<Arc<NodeFacts>>,
        kube: Option<::kube::Client>,
    ) -> Arc<Self> {
        Arc::new(Self {
            policy,
            nodes,
            kube,
            http: HttpClient::new(),
            answers: RwLock::new(Answers::default()),
        })
    }

    fn answers(&self) -> Answers {
        self.answers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn check_nodes(&self, state: &LeaseState) -> Result<(), Hold> {
        let Some(nodes) = &self.nodes else {
            return Err(Hold::new(
                Cause::Unavailable,
                "health gate: nodesReady needs the Kubernetes node watch",
            ));
        };
        let Some(facts) = nodes.snapshot() else {
            return Err(Hold::new(
                Cause::NoAnswer,
                "health gate: the Node list has not been read yet",
            ));
        };
        let not_ready: Vec<&String> = facts
            .iter()
            .filter(|(name, f)| {
                !f.ready && !state.holders.keys().any(|h| h.as_str() == name.as_str())
            })
            .map(|(name, _)| name)
            .collect();
        if not_ready.is_empty() {
            return Ok(());
        }
        Err(Hold::new(
            Cause::NodesNotReady,
            format!(
                "health gate: {} not Ready{}",
                not_ready
                    .iter()
                    .take(NAMED)
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                more(not_ready.len())
            ),
        ))
    }

    /// Runs the checks the policy asks for, one round every interval (and
    /// at once after a release: `releases` carries the time of the last
    /// one), until the engine shuts down.
    pub async fn run(
        self: Arc<Self>,
        engine: Arc<Engine>,
        mut releases: watch::Receiver<Option<DateTime<Utc>>>,
    ) {
        let mut policies = self.policy.subscribe();
        let mut changes = engine.subscribe();
        loop {
            let loaded = self.policy.current();
            let started = Utc::now();
            self.round(&loaded, started).await;
            engine.poke();
            let deadline = tokio::time::Instant::now() + round_every(&loaded.effective);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    changed = policies.changed() => {
                        if changed.is_err() { return; }
                        break;
                    }
                    changed = releases.changed() => {
                        if changed.is_err() { return; }
                        // A release since this round started: check again now.
                        if releases.borrow_and_update().is_some_and(|t| t >= started) {
                            break;
                        }
                    }
                    changed = changes.changed() => {
                        if changed.is_err() || engine.is_shutting_down().await { return; }
                    }
                }
            }
            if engine.is_shutting_down().await {
                return;
            }
        }
    }

    /// One round: every enabled check, concurrently, each bounded by its
    /// timeout.
    async fn round(&self, loaded: &Loaded, started: DateTime<Utc>) {
        let p = &loaded.effective;
        let timeout = p
            .prometheus
            .as_ref()
            .map(|p| p.timeout.0)
            .unwrap_or(Duration::from_secs(5));
        let alerts = async {
            let (b, key) = (p.alert_blockers.as_ref()?, alerts_key(p)?);
            let found = match (&b.alertmanager_url, &p.prometheus) {
                (Some(am), _) => {
                    firing_in_alertmanager(&self.http, &am.0, &b.alerts, timeout).await
                }
                (None, Some(prom)) => {
                    firing_in_prometheus(&self.http, &prom.url.0, &b.alerts, timeout).await
                }
                (None, None) => return None,
            };
            let (blocked, firing) = match found {
                Ok(firing) if firing.is_empty() => (None, firing),
                Ok(firing) => (
                    Some(Hold::new(
                        Cause::AlertFiring,
                        format!("alert blocker: {} firing", firing.join(", ")),
                    )),
                    firing,
                ),
                Err(e) => (
                    Some(Hold::new(
                        Cause::Unavailable,
                        format!(
                            "alert blocker: cannot tell whether {key} fire: {e}; holding grants (fail closed)"
                        ),
                    )),
                    Vec::new(),
                ),
            };
            Some(Observed {
                key,
                started,
                blocked,
                firing,
            })
        };
        let health_query = async {
            let q = p.health_gate.as_ref()?.query.as_ref()?;
            let prom = p.prometheus.as_ref()?;
            let blocked = match query(&self.http, &prom.url.0, q, timeout).await {
                Ok(series) if series.is_empty() => None,
                Ok(series) => Some(Hold::new(
                    Cause::Query,
                    format!(
                        "health gate: query `{q}` returned {} series: {}{}",
                        series.len(),
                        series
                            .iter()
                            .take(NAMED)
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; "),
                        more(series.len())
                    ),
                )),
                Err(e) => Some(Hold::new(
                    Cause::Unavailable,
                    format!("health gate: query `{q}` failed: {e}; holding grants (fail closed)"),
                )),
            };
            Some(Observed {
                key: q.clone(),
                started,
                blocked,
                firing: Vec::new(),
            })
        };
        let budgets = async {
            if !p.health_gate.as_ref()?.pod_disruption_budgets {
                return None;
            }
            let blocked = match &self.kube {
                None => Some(Hold::new(
                    Cause::Unavailable,
                    "health gate: podDisruptionBudgets needs the Kubernetes API",
                )),
                Some(client) => {
                    let api: ::kube::Api<PodDisruptionBudget> = ::kube::Api::all(client.clone());
                    match tokio::time::timeout(timeout, api.list(&Default::default())).await {
                        Ok(Ok(list)) => budget_problems(&list.items)
                            .map(|r| Hold::new(Cause::DisruptionBudgets, r)),
                        Ok(Err(e)) => Some(Hold::new(
                            Cause::Unavailable,
                            format!(
                                "health gate: listing PodDisruptionBudgets failed: {e}; holding grants (fail closed)"
                            ),
                        )),
                        Err(_) => Some(Hold::new(
                            Cause::Unavailable,
                            format!(
                                "health gate: listing PodDisruptionBudgets took longer than {}; holding grants (fail closed)",
                                humantime::format_duration(timeout)
                            ),
                        )),
                    }
                }
            };
            Some(Observed {
                key: "budgets".to_string(),
                started,
                blocked,
                firing: Vec::new(),
            })
        };
        let (alerts, health_query, budgets) = tokio::join!(alerts, health_query, budgets);
        let mut guard = self.answers.write().unwrap_or_else(|e| e.into_inner());
        let answers = &mut *guard;
        for (slot, new, what) in [
            (&mut answers.alerts, alerts, "alert blockers"),
            (&mut answers.query, health_query, "health query"),
            (&mut answers.budgets, budgets, "disruption budgets"),
        ] {
            let was = slot.as_ref().and_then(|o| o.blocked.clone());
            let now = new.as_ref().and_then(|o| o.blocked.clone());
            if was != now {
                match &now {
                    Some(hold) => warn!(check = what, reason = %hold.reason, "health gate closed"),
                    None => info!(check = what, "health gate open"),
                }
            }
            *slot = new;
        }
    }
}

fn more(n: usize) -> String {
    if n > NAMED {
        format!(" and {} more", n - NAMED)
    } else {
        String::new()
    }
}

/// Why the budgets hold grants, if they do: a budget with fewer healthy
/// pods than it desires, or whose status is missing or behind its spec.
pub fn budget_problems(budgets: &[PodDisruptionBudget]) -> Option<String> {
    let problems: Vec<String> = budgets
        .iter()
        .filter_map(|b| {
            let name = format!(
                "{}/{}",
                b.metadata.namespace.as_deref().unwrap_or(""),
                b.metadata.name.as_deref().unwrap_or("")
            );
            let Some(status) = &b.status else {
                return Some(format!("{name} has no status yet"));
            };
            if let (Some(generation), Some(observed)) =
                (b.metadata.generation, status.observed_generation)
                && observed < generation
            {
                return Some(format!("{name}'s status is behind its spec"));
            }
            let (Some(current), Some(desired)) = (status.current_healthy, status.desired_healthy)
            else {
                return Some(format!("{name}'s status has no healthy counts yet"));
            };
            (current < desired)
                .then(|| format!("{name} has {current} healthy pods, desires {desired}"))
        })
        .collect();
    if problems.is_empty() {
        return None;
    }
    Some(format!(
        "health gate: PodDisruptionBudget {}{}",
        problems
            .iter()
            .take(NAMED)
            .cloned()
            .collect::<Vec<_>>()
            .join("; "),
        more(problems.len())
    ))
}

impl HealthGate {
    /// The alert blockers that fired at the last fresh answer (empty when
    /// none does, or none is configured, or the answer is stale).
    pub fn firing_alerts(&self, now: DateTime<Utc>) -> Vec<String> {
        let loaded = self.policy.current();
        let Some(key) = alerts_key(&loaded.effective) else {
            return Vec::new();
        };
        let answers = self.answers();
        match answers.alerts {
            Some(o) if o.key == key && now - o.started <= max_age(&loaded.effective) => o.firing,
            _ => Vec::new(),
        }
    }

    /// Whether the gate lets grants through now, and if not why: the
    /// same verdict [`GrantGuard::check`] gives every candidate.
    pub fn verdict(&self, state: &LeaseState, now: DateTime<Utc>) -> Result<(), Hold> {
        let loaded = self.policy.current();
        let p = &loaded.effective;
        let answers = self.answers();
        let age = max_age(p);
        if let Some(key) = alerts_key(p) {
            judge(
                "alert blocker",
                answers.alerts.as_ref(),
                &key,
                None,
                now,
                age,
            )?;
        }
        let Some(gate) = &p.health_gate else {
            return Ok(());
        };
        let released = last_release(state);
        if gate.nodes_ready {
            self.check_nodes(state)?;
        }
        if gate.pod_disruption_budgets {
            judge(
                "health gate (disruption budgets)",
                answers.budgets.as_ref(),
                "budgets",
                released,
                now,
                age,
            )?;
        }
        if let Some(q) = &gate.query {
            judge(
                "health gate (query)",
                answers.query.as_ref(),
                q,
                released,
                now,
                age,
            )?;
        }
        Ok(())
    }
}

impl GrantGuard for HealthGate {
    /// Holds every candidate while any enabled check is unhealthy, has no
    /// fresh answer, or (for the gate's checks) has not been seen healthy
    /// since the last release.
    fn check(
        &self,
        _candidate: &Waiter,
        state: &LeaseState,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        self.verdict(state, now).map_err(|h| h.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(key: &str, started: DateTime<Utc>, blocked: Option<&str>) -> Observed {
        Observed {
            key: key.to_string(),
            started,
            blocked: blocked.map(|b| Hold::new(Cause::Query, b)),
            firing: Vec::new(),
        }
    }

    #[test]
    fn answers_that_are_missing_stale_foreign_or_from_before_a_release_hold_grants() {
        let now = Utc::now();
        let age = chrono::Duration::seconds(30);
        let fresh = observed("q", now - chrono::Duration::seconds(1), None);
        assert!(judge("g", Some(&fresh), "q", None, now, age).is_ok());
        assert!(
            judge("g", None, "q", None, now, age)
                .unwrap_err()
                .reason
                .contains("no answer")
        );
        assert!(
            judge("g", Some(&fresh), "other", None, now, age)
                .unwrap_err()
                .reason
                .contains("reloaded")
        );
        let old = observed("q", now - chrono::Duration::seconds(31), None);
        assert!(
            judge("g", Some(&old), "q", None, now, age)
                .unwrap_err()
                .reason
                .contains("old")
        );
        let released = Some(now);
        assert!(
            judge("g", Some(&fresh), "q", released, now, age)
                .unwrap_err()
                .reason
                .contains("after the last release")
        );
        let blocked = observed("q", now, Some("health gate: bad"));
        assert_eq!(
            judge("g", Some(&blocked), "q", None, now, age).unwrap_err(),
            Hold::new(Cause::Query, "health gate: bad")
        );
    }

    #[test]
    fn budgets_below_their_desired_health_hold_grants() {
        let pdb = |name: &str, current: i32, desired: i32| -> PodDisruptionBudget {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "web", "generation": 2},
                "status": {"currentHealthy": current, "desiredHealthy": desired, "disruptionsAllowed": 0, "expectedPods": 3, "observedGeneration": 2},
            }))
            .unwrap()
        };
        assert_eq!(budget_problems(&[pdb("a", 3, 2)]), None);
        let reason = budget_problems(&[pdb("a", 3, 2), pdb("b", 1, 2)]).unwrap();
        assert!(
            reason.contains("web/b has 1 healthy pods, desires 2"),
            "{reason}"
        );
        let no_status: PodDisruptionBudget = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "c", "namespace": "web"}}),
        )
        .unwrap();
        assert!(budget_problems(&[no_status]).unwrap().contains("no status"));
    }
}
