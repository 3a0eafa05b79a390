//! What the rollout shows: one [`RolloutView`] per leader's snapshot (the
//! gate, alert blockers, canaries, the failure budget, the policy in
//! force) for `batonctl status`, the metrics that describe it, and a
//! Kubernetes Event for every change a person would care about.
//!
//! Events are recorded on changes, never per look: the gate's Event comes
//! when the *kind* of reason it waits for changes (its sentences carry ages
//! and times that change every round) and only while a node waits; an
//! alert blocker's when it starts or stops firing; a canary's when its soak
//! starts and ends; a node's and a pause's from new audit records (the
//! same records, seen once each, that the webhooks get).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::budget::{self, FailureBudget};
use super::canary::CanaryPhase;
use super::gate::{Cause, HealthGate, Hold};
use super::metrics::{AlertLabel, CauseLabel, PolicyInfo, PoolLabel, RolloutMetrics};
use super::notify::{Event as AuditEvent, Observer};
use super::reload::{PolicyHandle, ReloadOutcome};
use super::rule::PolicyRule;
use super::schema::EventKind;
use super::stuck;
use crate::engine::Snapshot;
use crate::kube::events::{EventRecorder, RolloutEvent, Subject};

/// One pool's canary, as status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CanaryView {
    /// The pool (or `(no pool)`).
    pub pool: String,
    /// `idle`, `running`, `soaking` or `done`.
    pub phase: &'static str,
    /// The canary node, while running or soaking.
    pub node: String,
    /// When the soak ends, while soaking.
    pub soak_until: Option<DateTime<Utc>>,
}

/// The rollout's state as the leader saw it last (≤ one observer tick old).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutView {
    /// True once a leader's snapshot filled this in.
    pub known: bool,
    /// True while the health gate and alert blockers let grants through.
    pub gate_open: bool,
    /// What the gate waits for (a [`Cause`] name; empty while open).
    pub gate_cause: String,
    /// Why, as the waiters see it (empty while open).
    pub gate_reason: String,
    /// Alert blockers firing now.
    pub alerts_firing: Vec<String>,
    /// Canaries by pool (pools with a canary that a rollout reached).
    pub canaries: Vec<CanaryView>,
    /// `maxFailedNodes` (`None` without a budget).
    pub budget_max: Option<u32>,
    /// Failed nodes counted against the budget, by pool.
    pub budget_spent: BTreeMap<String, u32>,
    /// Failures still allowed before the rollout pauses itself.
    pub budget_remaining: u32,
    /// True while the failure budget keeps the rollout paused.
    pub paused_by_budget: bool,
    /// Policies put in force since the coordinator started.
    pub policy_generation: u64,
    /// The policy file's SHA-256 (empty without a file).
    pub policy_sha256: String,
    /// Why the last reload was refused (empty when it was not).
    pub policy_reload_error: String,
}

/// Shares the view with the API.
pub type ViewHandle = Arc<watch::Sender<RolloutView>>;

/// Turns snapshots into the view, metrics and Events.
pub struct Reporter {
    policy: Arc<PolicyHandle>,
    gate: Arc<HealthGate>,
    rule: Arc<PolicyRule>,
    metrics: RolloutMetrics,
    events: EventRecorder,
    view: ViewHandle,
    /// New audit records (the webhooks' observer, reused).
    audit: Option<Observer>,
    /// The gate cause the last gate Event announced.
    announced: Option<Cause>,
    firing: BTreeSet<String>,
    canaries: BTreeMap<String, CanaryPhase>,
}

fn node_event(e: &AuditEvent) -> Option<RolloutEvent> {
    let node = Subject::Node(e.node.clone());
    let token = e.token;
    Some(match e.kind {
        EventKind::Granted => RolloutEvent::normal(
            node,
            "BatonGranted",
            format!("granted the baton (token {token}): {}", e.reason),
        ),
        EventKind::Released => RolloutEvent::normal(
            node,
            "BatonReleased",
            format!(
                "released the baton (token {token}) by {}: {}",
                e.actor, e.reason
            ),
        ),
        EventKind::Failed => RolloutEvent::warning(
            node,
            "BatonFailed",
            format!(
                "maintenance failed (token {token}); the node keeps the baton: {}",
                e.reason
            ),
        ),
        EventKind::Overdue => RolloutEvent::warning(
            node,
            "BatonOverdue",
            format!(
                "the holder stopped renewing (token {token}); it keeps the baton: {}",
                e.reason
            ),
        ),
        EventKind::ForceReleased if e.actor == stuck::ACTOR => RolloutEvent::warning(
            node,
            "BatonStuckLockReleased",
            format!("stuck lock released (token {token}): {}", e.reason),
        ),
        EventKind::ForceReleased => RolloutEvent::warning(
            node,
            "BatonForceReleased",
            format!(
                "force-released (token {token}) by {}: {}",
                e.actor, e.reason
            ),
        ),
        EventKind::Paused if e.actor == budget::ACTOR => RolloutEvent::warning(
            Subject::Rollout,
            "RolloutPausedByFailureBudget",
            e.reason.clone(),
        ),
        EventKind::Paused => RolloutEvent::normal(
            Subject::Rollout,
            "RolloutPaused",
            format!("paused by {}: {}", e.actor, e.reason),
        ),
        EventKind::Resumed => RolloutEvent::normal(
            Subject::Rollout,
            "RolloutResumed",
            format!("resumed by {}", e.actor),
        ),
        EventKind::Finished => RolloutEvent::normal(Subject::Rollout, "RolloutFinished", &e.reason),
    })
}

impl Reporter {
    /// A reporter publishing on `view`.
    pub fn new(
        policy: Arc<PolicyHandle>,
        gate: Arc<HealthGate>,
        rule: Arc<PolicyRule>,
        metrics: RolloutMetrics,
        events: EventRecorder,
        view: ViewHandle,
    ) -> Self {
        Self {
            policy,
            gate,
            rule,
            metrics,
            events,
            view,
            audit: None,
            announced: None,
            firing: BTreeSet::new(),
            canaries: BTreeMap::new(),
        }
    }

    /// Counts every reload of `policy` and records an Event for each one
    /// that changed the policy or was refused (with the line and reason).
    pub fn follow_reloads(policy: &PolicyHandle, metrics: RolloutMetrics, events: EventRecorder) {
        policy.on_reload(Box::new(move |outcome| match outcome {
            ReloadOutcome::Changed {
                generation,
                source,
                sha256,
            } => {
                metrics.reload("changed");
                metrics.policy_reload_refused.set(0);
                metrics.policy_generation.set(*generation as i64);
                events.record(RolloutEvent::normal(
                    Subject::Rollout,
                    "PolicyReloaded",
                    format!("policy generation {generation} in force: {source} (sha256 {sha256})"),
                ));
            }
            ReloadOutcome::Unchanged => {
                metrics.reload("unchanged");
                metrics.policy_reload_refused.set(0);
            }
            ReloadOutcome::Refused(e) => {
                metrics.reload("refused");
                metrics.policy_reload_refused.set(1);
                events.record(RolloutEvent::warning(
                    Subject::Rollout,
                    "PolicyReloadRefused",
                    format!("policy reload refused; the running policy stays: {e}"),
                ));
            }
        }));
    }

    /// This replica stopped leading: the next leadership starts afresh.
    pub fn reset(&mut self) {
        self.audit = None;
        self.announced = None;
        self.firing.clear();
        self.canaries.clear();
    }

    /// Looks at a leader's `snap`.
    pub fn on_snapshot(&mut self, snap: &Snapshot, budget: &FailureBudget) {
        let first = self.audit.is_none();
        for e in self
            .audit
            .get_or_insert_with(Observer::default)
            .observe(snap)
        {
            if let Some(event) = node_event(&e) {
                self.events.record(event);
            }
        }
        // One verdict per snapshot: the view, the metrics and the Events
        // say the same thing.
        let verdict = self.gate.verdict(&snap.state, snap.now);
        let view = self.view_of(snap, budget, &verdict);
        self.publish_metrics(&view);
        if first {
            // A new leadership announces what holds grants now (an alert
            // that fires, the gate's wait), but not the canaries' past
            // transitions: it starts from their phases as they are.
            self.canaries = self.rule.canaries().phases;
        }
        self.record_changes(snap, &view, verdict.err());
        self.view.send_replace(view);
    }

    fn view_of(
        &self,
        snap: &Snapshot,
        budget: &FailureBudget,
        verdict: &Result<(), Hold>,
    ) -> RolloutView {
        let loaded = self.policy.current();
        let canaries = self.rule.canaries();
        let mut spent: BTreeMap<String, u32> = BTreeMap::new();
        for (node, _) in budget.counted() {
            *spent.entry(self.rule.pool_name(node)).or_default() += 1;
        }
        let budget_max = loaded
            .effective
            .failure_budget
            .as_ref()
            .map(|b| b.max_failed_nodes);
        let total: u32 = spent.values().sum();
        RolloutView {
            known: true,
            gate_open: verdict.is_ok(),
            gate_cause: verdict
                .as_ref()
                .err()
                .map(|h| h.cause.name().to_string())
                .unwrap_or_default(),
            gate_reason: verdict
                .as_ref()
                .err()
                .map(|h| h.reason.clone())
                .unwrap_or_default(),
            alerts_firing: self.gate.firing_alerts(snap.now),
            canaries: canaries
                .phases
                .iter()
                .map(|(pool, phase)| match phase {
                    CanaryPhase::Idle => CanaryView {
                        pool: pool.clone(),
                        phase: "idle",
                        ..Default::default()
                    },
                    CanaryPhase::Running { node, .. } => CanaryView {
                        pool: pool.clone(),
                        phase: "running",
                        node: node.to_string(),
                        soak_until: None,
                    },
                    CanaryPhase::Soaking { node, until } => CanaryView {
                        pool: pool.clone(),
                        phase: "soaking",
                        node: node.to_string(),
                        soak_until: Some(*until),
                    },
                    CanaryPhase::Done => CanaryView {
                        pool: pool.clone(),
                        phase: "done",
                        ..Default::default()
                    },
                })
                .collect(),
            budget_max,
            budget_remaining: budget_max.map_or(0, |m| m.saturating_sub(total)),
            budget_spent: spent,
            paused_by_budget: snap
                .state
                .paused
                .as_ref()
                .is_some_and(|p| p.actor == budget::ACTOR),
            policy_generation: self.policy.generation(),
            policy_sha256: loaded.sha256.clone(),
            policy_reload_error: self
                .policy
                .last_error()
                .map(|(e, _)| e.to_string())
                .unwrap_or_default(),
        }
    }

    fn publish_metrics(&self, view: &RolloutView) {
        let m = &self.metrics;
        let loaded = self.policy.current();
        m.policy_generation.set(view.policy_generation as i64);
        m.policy_reload_refused
            .set(i64::from(!view.policy_reload_error.is_empty()));
        m.policy_info.set(vec![(
            PolicyInfo {
                sha256: loaded.sha256.clone(),
                source: loaded.source.clone(),
            },
            1,
        )]);
        m.gate_open.set(i64::from(view.gate_open));
        // Every cause has a series (0 or 1), so a query sees 0, not nothing.
        m.gate_waiting.set(
            Cause::ALL
                .iter()
                .map(|c| {
                    let waiting = !view.gate_open && view.gate_cause == c.name();
                    (
                        CauseLabel {
                            cause: c.name().to_string(),
                        },
                        i64::from(waiting),
                    )
                })
                .collect(),
        );
        let alerts = loaded
            .effective
            .alert_blockers
            .as_ref()
            .map(|b| b.alerts.clone())
            .unwrap_or_default();
        m.alert_blockers_firing.set(
            alerts
                .into_iter()
                .map(|alert| {
                    let firing = view.alerts_firing.contains(&alert);
                    (AlertLabel { alert }, i64::from(firing))
                })
                .collect(),
        );
        m.canary_soaking.set(
            view.canaries
                .iter()
                .map(|c| {
                    (
                        PoolLabel {
                            pool: c.pool.clone(),
                        },
                        i64::from(c.phase == "soaking"),
                    )
                })
                .collect(),
        );
        m.failure_budget_spent.set(
            view.budget_spent
                .iter()
                .map(|(pool, n)| (PoolLabel { pool: pool.clone() }, i64::from(*n)))
                .collect(),
        );
        m.failure_budget_max
            .set(i64::from(view.budget_max.unwrap_or(0)));
        m.failure_budget_remaining
            .set(i64::from(view.budget_remaining));
        m.paused_by_failure_budget
            .set(i64::from(view.paused_by_budget));
    }

    fn record_changes(&mut self, snap: &Snapshot, view: &RolloutView, cause: Option<Hold>) {
        // The gate: once per change of what it waits for, while a node waits.
        match (&cause, self.announced) {
            (Some(hold), announced) if !snap.queue.is_empty() && announced != Some(hold.cause) => {
                self.announced = Some(hold.cause);
                self.events.record(RolloutEvent::normal(
                    Subject::Rollout,
                    "HealthGateWaiting",
                    format!("{} node(s) wait: {}", snap.queue_length, hold.reason),
                ));
            }
            (None, Some(_)) => {
                self.announced = None;
                self.events.record(RolloutEvent::normal(
                    Subject::Rollout,
                    "HealthGateOpen",
                    "the health gate and the alert blockers let grants through again",
                ));
            }
            _ => {}
        }
        // Alert blockers.
        let now: BTreeSet<String> = view.alerts_firing.iter().cloned().collect();
        for alert in now.difference(&self.firing) {
            self.events.record(RolloutEvent::warning(
                Subject::Rollout,
                "AlertBlockerFiring",
                format!("alert {alert} fires: nothing is granted while it does"),
            ));
        }
        for alert in self.firing.difference(&now) {
            self.events.record(RolloutEvent::normal(
                Subject::Rollout,
                "AlertBlockerCleared",
                format!("alert {alert} no longer fires"),
            ));
        }
        self.firing = now;
        // Canaries: a soak starts, a soak ends.
        let phases = self.rule.canaries().phases;
        for (pool, phase) in &phases {
            let before = self.canaries.get(pool);
            match (before, phase) {
                (Some(CanaryPhase::Soaking { .. }), CanaryPhase::Soaking { .. }) => {}
                (_, CanaryPhase::Soaking { node, until }) => {
                    self.events.record(RolloutEvent::normal(
                        Subject::Rollout,
                        "CanarySoaking",
                        format!(
                            "pool {pool}: canary {node} released; the pool's other nodes wait until {} (and for the health gate)",
                            until.format("%Y-%m-%dT%H:%M:%SZ")
                        ),
                    ));
                }
                (Some(CanaryPhase::Soaking { node, .. }), _) => {
                    self.events.record(RolloutEvent::normal(
                        Subject::Rollout,
                        "CanarySoakDone",
                        format!(
                            "pool {pool}: the soak after canary {node} is over; the pool goes on"
                        ),
                    ));
                }
                _ => {}
            }
        }
        for (pool, before) in &self.canaries {
            if let (CanaryPhase::Soaking { node, .. }, false) = (before, phases.contains_key(pool))
            {
                self.events.record(RolloutEvent::normal(
                    Subject::Rollout,
                    "CanarySoakDone",
                    format!("pool {pool}: the soak after canary {node} is over"),
                ));
            }
        }
        self.canaries = phases;
    }
}
