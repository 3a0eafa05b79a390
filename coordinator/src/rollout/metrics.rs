//! The rollout policy's metrics: reloads and the policy in force, the
//! health gate, alert blockers, canaries, the failure budget, webhooks and
//! Kubernetes Events.
//!
//! Label values come only from the policy (pool names, alert names, hooks
//! by their position and host) or from small fixed sets (results, the
//! gate's causes), never from node names, so the number of series stays
//! bounded whatever the cluster's size. Gauges that describe "what is now"
//! are replaced as a whole ([`SeriesSet`]), so a pool or an alert that left
//! the policy leaves no stale series behind.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ResultLabel {
    /// A value from a fixed set.
    pub result: String,
}

/// A pool label (a pool name from the policy, or `(no pool)`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PoolLabel {
    /// The pool.
    pub pool: String,
}

/// An alert blocker's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct AlertLabel {
    /// The alert name from the policy.
    pub alert: String,
}

/// A webhook, named by its position in the policy and its URL's host (the
/// path may carry a secret, as Slack's do).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct HookLabel {
    /// `N:host`.
    pub hook: String,
}

/// A webhook delivery's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct HookResult {
    /// `N:host`.
    pub hook: String,
    /// `delivered`, `retried`, `given_up` or `dropped` (queue full).
    pub result: String,
}

/// The gate's cause label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct CauseLabel {
    /// A cause from [`crate::rollout::gate::Cause`].
    pub cause: String,
}

/// The policy in force, as an info series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PolicyInfo {
    /// SHA-256 of the file (empty without one).
    pub sha256: String,
    /// Where it came from.
    pub source: String,
}

/// A gauge family whose whole set of series is replaced at once: new
/// series are set before the old ones go, so a scrape never sees a gap.
#[derive(Clone)]
pub struct SeriesSet<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug> {
    family: Family<L, Gauge>,
    now: Arc<Mutex<Vec<L>>>,
}

impl<L> SeriesSet<L>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let family = Family::<L, Gauge>::default();
        registry.register(name, help, family.clone());
        Self {
            family,
            now: Arc::default(),
        }
    }

    /// Makes the family show exactly `series`.
    pub fn set(&self, series: Vec<(L, i64)>) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        for (labels, value) in &series {
            self.family.get_or_create(labels).set(*value);
        }
        let keep: Vec<L> = series.into_iter().map(|(l, _)| l).collect();
        for gone in now.iter().filter(|l| !keep.contains(l)) {
            self.family.remove(gone);
        }
        *now = keep;
    }
}

/// The rollout's series (registered into the coordinator's registry).
#[derive(Clone)]
pub struct RolloutMetrics {
    /// Reload attempts by result: `changed`, `unchanged`, `refused`.
    pub policy_reloads: Family<ResultLabel, Counter>,
    /// 1 while the last reload attempt was refused.
    pub policy_reload_refused: Gauge,
    /// How many policies were put in force since start (1 = the first).
    pub policy_generation: Gauge,
    /// 1, labelled with the policy in force.
    pub policy_info: SeriesSet<PolicyInfo>,
    /// 1 while the health gate and alert blockers let grants through.
    pub gate_open: Gauge,
    /// 1 for the cause the gate waits for now, 0 for every other.
    pub gate_waiting: SeriesSet<CauseLabel>,
    /// 1 per alert blocker firing now.
    pub alert_blockers_firing: SeriesSet<AlertLabel>,
    /// 1 per pool whose canary soaks now (0 for the others with a canary).
    pub canary_soaking: SeriesSet<PoolLabel>,
    /// Failed nodes counted against the failure budget, by pool.
    pub failure_budget_spent: SeriesSet<PoolLabel>,
    /// The failure budget (`maxFailedNodes`; 0 without one). The budget is
    /// one for the whole rollout; what each pool spent is by pool.
    pub failure_budget_max: Gauge,
    /// Failures the budget still allows before the rollout pauses (0
    /// without a budget).
    pub failure_budget_remaining: Gauge,
    /// 1 while the rollout is paused by the failure budget.
    pub paused_by_failure_budget: Gauge,
    /// Webhook deliveries by hook and result.
    pub webhook_deliveries: Family<HookResult, Counter>,
    /// Events queued per webhook now.
    pub webhook_queue_length: Family<HookLabel, Gauge>,
    /// Kubernetes Events recorded (created or counted again).
    pub events_recorded: Counter,
    /// Kubernetes Events dropped, by why: `queue_full`, `api_error`.
    pub events_dropped: Family<ResultLabel, Counter>,
}

impl RolloutMetrics {
    /// Registers every series in `registry` (prefix `baton_`).
    pub fn register(registry: &mut Registry) -> Self {
        let policy_reloads = Family::<ResultLabel, Counter>::default();
        // Every result exists from the start: increase() sees the first one.
        for result in ["changed", "unchanged", "refused"] {
            drop(policy_reloads.get_or_create(&ResultLabel {
                result: result.to_string(),
            }));
        }
        registry.register(
            "policy_reloads",
            "Policy reload attempts by result (changed, unchanged, refused)",
            policy_reloads.clone(),
        );
        let policy_reload_refused = Gauge::default();
        registry.register(
            "policy_reload_refused",
            "1 while the last policy reload was refused (the previous policy stays in force)",
            policy_reload_refused.clone(),
        );
        let policy_generation = Gauge::default();
        registry.register(
            "policy_generation",
            "Policies put in force since the coordinator started (1 = the one it started with)",
            policy_generation.clone(),
        );
        let policy_info = SeriesSet::register(
            registry,
            "policy_info",
            "1, labelled with the policy in force (its file's sha256 and source)",
        );
        let gate_open = Gauge::default();
        registry.register(
            "health_gate_open",
            "1 while the health gate and the alert blockers let grants through",
            gate_open.clone(),
        );
        let gate_waiting = SeriesSet::register(
            registry,
            "health_gate_waiting",
            "1 for what the health gate waits for now, 0 for the other causes",
        );
        let alert_blockers_firing = SeriesSet::register(
            registry,
            "alert_blocker_firing",
            "1 per alert blocker of the policy that fires now",
        );
        let canary_soaking = SeriesSet::register(
            registry,
            "canary_soaking",
            "1 while the pool's canary soaks, 0 for the other pools with a canary",
        );
        let failure_budget_spent = SeriesSet::register(
            registry,
            "failure_budget_spent",
            "Failed nodes counted against the failure budget, by pool",
        );
        let failure_budget_max = Gauge::default();
        registry.register(
            "failure_budget_max",
            "The failure budget: failed nodes after which the rollout pauses itself (0 = no budget)",
            failure_budget_max.clone(),
        );
        let failure_budget_remaining = Gauge::default();
        registry.register(
            "failure_budget_remaining",
            "Failed nodes the budget still allows before the rollout pauses itself (0 without a budget)",
            failure_budget_remaining.clone(),
        );
        let paused_by_failure_budget = Gauge::default();
        registry.register(
            "paused_by_failure_budget",
            "1 while the failure budget keeps the rollout paused",
            paused_by_failure_budget.clone(),
        );
        let webhook_deliveries = Family::<HookResult, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by hook and result (delivered, retried, given_up, dropped)",
            webhook_deliveries.clone(),
        );
        let webhook_queue_length = Family::<HookLabel, Gauge>::default();
        registry.register(
            "webhook_queue_length",
            "Events waiting in a webhook's queue",
            webhook_queue_length.clone(),
        );
        let events_recorded = Counter::default();
        registry.register(
            "kube_events_recorded",
            "Kubernetes Events recorded (created, or a repeat counted)",
            events_recorded.clone(),
        );
        let events_dropped = Family::<ResultLabel, Counter>::default();
        for result in ["queue_full", "api_error"] {
            drop(events_dropped.get_or_create(&ResultLabel {
                result: result.to_string(),
            }));
        }
        registry.register(
            "kube_events_dropped",
            "Kubernetes Events dropped, by why (queue_full, api_error); grants never wait for Events",
            events_dropped.clone(),
        );
        Self {
            policy_reloads,
            policy_reload_refused,
            policy_generation,
            policy_info,
            gate_open,
            gate_waiting,
            alert_blockers_firing,
            canary_soaking,
            failure_budget_spent,
            failure_budget_max,
            failure_budget_remaining,
            paused_by_failure_budget,
            webhook_deliveries,
            webhook_queue_length,
            events_recorded,
            events_dropped,
        }
    }

    /// Counts one reload attempt.
    pub fn reload(&self, result: &str) {
        self.policy_reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Counts one webhook delivery outcome.
    pub fn webhook(&self, hook: &str, result: &str) {
        self.webhook_deliveries
            .get_or_create(&HookResult {
                hook: hook.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// Counts one dropped Event.
    pub fn event_dropped(&self, why: &str) {
        self.events_dropped
            .get_or_create(&ResultLabel {
                result: why.to_string(),
            })
            .inc();
    }
}
