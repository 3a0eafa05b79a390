//! The policy's part of the grant rule: pools, zones and order. A pure
//! function of the policy, the nodes' labels, the queue, the lease state
//! and the clock ([`check`]), plugged into [`crate::policy::decide`] as a
//! guard ([`PolicyRule`]), so the engine, `batonctl plan` and the property
//! tests run the very same rule.
//!
//! For a waiting node N (in pool P, zone Z):
//! - P's holders (and every holder whose labels are unknown) stay below
//!   P's `maxUnavailable` (a count, or a percentage of P's nodes);
//! - P's own windows are open (if it has any);
//! - no node of a pool with a lower `order` waits or holds;
//! - the canary of N's pool (see [`super::canary`]) went alone and its
//!   soak passed;
//! - `order.controlPlaneFirst`: a worker waits while a control-plane node
//!   waits or holds; `order.byLabel`: N waits while a waiter has a lower
//!   value (FIFO among equals, nodes without the label last);
//! - fewer holders than `failureBudget.maxFailedNodes` are Failed;
//! - `topology.maxZonesInMaintenance`: Z is already in maintenance or
//!   fewer zones are (a holder whose labels are unknown is a zone of its
//!   own); `finishZoneFirst`: while a node of a zone in maintenance (or of
//!   the zone granted last) waits, nodes of other zones wait.
//!
//! Labels that are not known (a standalone agent that has not called since
//! this replica started) hold the waiter back and make a holder count
//! against every pool and zone: never fewer nodes counted than are down.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::canary::{self, Canaries, CanaryPhase, CanaryTracker, scope_of};
use super::labels::LabelBook;
use super::reload::PolicyHandle;
use super::schema::{ExpressionSpec, Operator, PolicyFile, SelectorSpec};
use crate::kube::nodes::{CONTROL_PLANE_LABELS, NodeFacts};
use crate::node::NodeName;
use crate::policy::{GrantGuard, Waiter};
use crate::state::LeaseState;
use crate::window::WindowSet;

/// A node's labels.
pub type Labels = BTreeMap<String, String>;

/// What the rule knows about nodes: their labels (`None`: unknown), and
/// every node known, for pool sizes.
pub trait NodeDirectory {
    /// `node`'s labels, if known.
    fn labels(&self, node: &NodeName) -> Option<Labels>;
    /// Every known node and its labels.
    fn all(&self) -> Vec<(NodeName, Labels)>;
}

/// True when `selector` selects the node `name` with `labels`.
pub fn selects(selector: &SelectorSpec, name: &str, labels: &Labels) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(&k.0) == Some(v))
        && selector
            .match_expressions
            .iter()
            .all(|e| expression(e, labels))
        && (selector.node_names.is_empty() || selector.node_names.iter().any(|p| p.matches(name)))
}

fn expression(e: &ExpressionSpec, labels: &Labels) -> bool {
    let value = labels.get(&e.key.0);
    match e.operator {
        Operator::In => value.is_some_and(|v| e.values.contains(v)),
        Operator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
        Operator::Exists => value.is_some(),
        Operator::DoesNotExist => value.is_none(),
    }
}

/// The pool a node belongs to: the first that selects it, `None` for the
/// nodes no pool selects.
pub fn pool_of(policy: &PolicyFile, name: &str, labels: &Labels) -> Option<usize> {
    policy
        .pools
        .iter()
        .position(|p| selects(&p.selector, name, labels))
}

fn is_control_plane(flag: bool, labels: Option<&Labels>) -> bool {
    flag || labels.is_some_and(|l| CONTROL_PLANE_LABELS.iter().any(|k| l.contains_key(*k)))
}

fn zone_of(policy: &PolicyFile, labels: Option<&Labels>) -> Option<String> {
    let topology = policy.topology.as_ref()?;
    Some(match labels {
        None => "(unknown labels)".to_string(),
        Some(l) => l
            .get(&topology.zone_label.0)
            .cloned()
            .unwrap_or_else(|| "(no zone)".to_string()),
    })
}

/// Compares label values: as integers when both are, else as text; a
/// missing value sorts last.
fn compare_values(a: Option<&String>, b: Option<&String>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(a), Some(b)) => match (a.parse::<i64>(), b.parse::<i64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        },
    }
}

/// True when the policy has rules that read labels (pools, zones, order,
/// canaries); only those read the queue.
fn uses_labels(policy: &PolicyFile) -> bool {
    !policy.pools.is_empty()
        || policy.topology.is_some()
        || policy.order.is_some()
        || policy.canary.is_some()
}

/// The policy's rule for `candidate` (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn check(
    policy: &PolicyFile,
    nodes: &dyn NodeDirectory,
    canaries: &Canaries,
    candidate: &Waiter,
    queue: &[Waiter],
    state: &LeaseState,
    now: DateTime<Utc>,
) -> Result<(), String> {
    // The failure budget, at once (the audited pause that follows is
    // taken by a task that may lag the engine by a moment).
    if let Some(budget) = &policy.failure_budget {
        let failed: Vec<&str> = state
            .holders
            .iter()
            .filter(|(_, h)| h.phase == crate::state::Phase::Failed)
            .map(|(n, _)| n.as_str())
            .collect();
        if failed.len() >= budget.max_failed_nodes.max(1) as usize {
            return Err(format!(
                "failure budget spent: {} holder(s) failed ({}), the policy allows {}",
                failed.len(),
                failed.join(", "),
                budget.max_failed_nodes
            ));
        }
    }
    if !uses_labels(policy) {
        return Ok(());
    }
    let Some(labels) = nodes.labels(&candidate.node) else {
        return Err(format!(
            "the labels of {} are not known yet (its agent sends them with its next Acquire)",
            candidate.node
        ));
    };
    let holders: Vec<(&NodeName, Option<Labels>, bool)> = state
        .holders
        .iter()
        .map(|(n, h)| (n, nodes.labels(n), h.control_plane))
        .collect();
    let waiters: Vec<(&Waiter, Option<Labels>)> = queue
        .iter()
        .filter(|w| w.node != candidate.node)
        .map(|w| (w, nodes.labels(&w.node)))
        .collect();

    // Control-plane nodes one at a time, by their labels too (the grant
    // rule itself only sees what agents say).
    let candidate_cp = is_control_plane(candidate.control_plane, Some(&labels));
    if candidate_cp
        && let Some((other, _, _)) = holders
            .iter()
            .find(|(_, l, cp)| is_control_plane(*cp, l.as_ref()))
    {
        return Err(format!(
            "control-plane node {other} holds the baton; only one control-plane node at a time"
        ));
    }

    // Pools.
    if let Some(i) = pool_of(policy, candidate.node.as_str(), &labels) {
        let pool = &policy.pools[i];
        let size = nodes
            .all()
            .iter()
            .filter(|(n, l)| pool_of(policy, n.as_str(), l) == Some(i))
            .count()
            .max(1);
        let limit = pool.max_unavailable.limit(size);
        let in_pool: Vec<String> = holders
            .iter()
            .filter_map(|(n, l, _)| match l {
                None => Some(format!("{n} (labels unknown)")),
                Some(l) if pool_of(policy, n.as_str(), l) == Some(i) => Some(n.to_string()),
                Some(_) => None,
            })
            .collect();
        if in_pool.len() >= limit {
            return Err(format!(
                "pool {}: {} of {limit} in maintenance ({})",
                pool.name,
                in_pool.len(),
                in_pool.join(", ")
            ));
        }
        if !pool.windows.is_empty() {
            let min_remaining = policy
                .min_window_remaining
                .and_then(|d| chrono::Duration::from_std(d.0).ok())
                .unwrap_or_default();
            WindowSet {
                windows: pool.windows.iter().map(|w| w.0.clone()).collect(),
                min_remaining,
            }
            .check(now)
            .map_err(|r| format!("pool {}: {r}", pool.name))?;
        }
        let earlier = |n: &NodeName, l: &Option<Labels>| {
            l.as_ref()
                .and_then(|l| pool_of(policy, n.as_str(), l))
                .filter(|j| policy.pools[*j].order < pool.order)
        };
        let blocking = waiters
            .iter()
            .find_map(|(w, l)| earlier(&w.node, l).map(|j| (&w.node, j, "waits")))
            .or_else(|| {
                holders
                    .iter()
                    .find_map(|(n, l, _)| earlier(n, l).map(|j| (*n, j, "holds the baton")))
            });
        if let Some((n, j, what)) = blocking {
            return Err(format!(
                "pool {} goes after pool {} (order {} < {}): {n} {what}",
                pool.name, policy.pools[j].name, policy.pools[j].order, pool.order
            ));
        }
    }

    // Canary: the scope's first node goes alone, the others after it and
    // its soak.
    let (scope, spec) = scope_of(policy, candidate.node.as_str(), &labels);
    if let Some(spec) = spec {
        let in_scope = |n: &NodeName, l: &Option<Labels>| {
            l.as_ref()
                .is_none_or(|l| scope_of(policy, n.as_str(), l).0 == scope)
        };
        let scope_holders: Vec<String> = holders
            .iter()
            .filter(|(n, l, _)| in_scope(n, l))
            .map(|(n, _, _)| n.to_string())
            .collect();
        let scope_waiters: Vec<&NodeName> = waiters
            .iter()
            .filter(|(w, l)| l.is_some() && in_scope(&w.node, l))
            .map(|(w, _)| &w.node)
            .collect();
        let phase = canaries
            .phases
            .get(&scope)
            .cloned()
            .unwrap_or(CanaryPhase::Idle);
        let went_first = match canaries.floor(&scope) {
            None => Some("(unknown: the canary tracker has not looked yet)".to_string()),
            Some(floor) => state
                .audit
                .iter()
                .filter(|a| a.action == "grant" && a.fencing_token > floor)
                .find(|a| {
                    NodeName::new(a.node.as_str())
                        .ok()
                        .and_then(|n| nodes.labels(&n))
                        .is_some_and(|l| scope_of(policy, &a.node, &l).0 == scope)
                })
                .map(|a| a.node.clone()),
        };
        canary::check(
            spec,
            &scope,
            &phase,
            &candidate.node,
            &scope_holders,
            &scope_waiters,
            went_first.as_deref(),
            now,
        )?;
    }

    // Order.
    if let Some(order) = &policy.order {
        if order.control_plane_first && !candidate_cp {
            let cp = waiters
                .iter()
                .find(|(w, l)| is_control_plane(w.control_plane, l.as_ref()))
                .map(|(w, _)| format!("{} waits", w.node))
                .or_else(|| {
                    holders
                        .iter()
                        .find(|(_, l, cp)| is_control_plane(*cp, l.as_ref()))
                        .map(|(n, _, _)| format!("{n} holds the baton"))
                });
            if let Some(cp) = cp {
                return Err(format!("control-plane nodes first: {cp}"));
            }
        }
        if let Some(key) = &order.by_label {
            let mine = labels.get(&key.0);
            // With control-plane nodes first, each kind is ordered apart
            // (a worker's label must not hold a control-plane node back).
            let before = waiters.iter().find(|(w, l)| {
                (!order.control_plane_first
                    || is_control_plane(w.control_plane, l.as_ref()) == candidate_cp)
                    && compare_values(l.as_ref().and_then(|l| l.get(&key.0)), mine)
                        == Ordering::Less
            });
            if let Some((w, l)) = before {
                return Err(format!(
                    "order by {key}: {} ({key}={}) goes first",
                    w.node,
                    l.as_ref()
                        .and_then(|l| l.get(&key.0))
                        .map(String::as_str)
                        .unwrap_or("")
                ));
            }
        }
    }

    // Zones.
    if let Some(topology) = &policy.topology {
        let zone = zone_of(policy, Some(&labels)).unwrap_or_default();
        let busy: BTreeSet<String> = holders
            .iter()
            .filter_map(|(n, l, _)| match l {
                None => Some(format!("(labels of {n} unknown)")),
                Some(_) => zone_of(policy, l.as_ref()),
            })
            .collect();
        if let Some(max) = topology.max_zones_in_maintenance
            && !busy.contains(&zone)
            && busy.len() >= max.max(1) as usize
        {
            return Err(format!(
                "zone limit: {} in maintenance, at most {max} zone(s) at a time",
                busy.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if topology.finish_zone_first {
            let mut current = busy.clone();
            if current.is_empty()
                && let Some(last) = state.audit.iter().rev().find(|a| a.action == "grant")
                && let Ok(last) = NodeName::new(last.node.as_str())
                && let Some(z) = zone_of(policy, nodes.labels(&last).as_ref())
            {
                current.insert(z);
            }
            if !current.contains(&zone)
                && let Some((w, z)) = waiters
                    .iter()
                    .filter_map(|(w, l)| {
                        l.as_ref()
                            .map(|l| (w, zone_of(policy, Some(l)).unwrap_or_default()))
                    })
                    .find(|(_, z)| current.contains(z))
            {
                return Err(format!("finish zone {z} first: {} waits there", w.node));
            }
        }
    }
    Ok(())
}

/// The rule as a guard over the policy in force, with labels from the node
/// watch (in a cluster) or from the agents (standalone).
pub struct PolicyRule {
    policy: Arc<PolicyHandle>,
    nodes: Option<Arc<NodeFacts>>,
    book: Arc<LabelBook>,
    canaries: std::sync::RwLock<CanaryTracker>,
}

impl PolicyRule {
    /// In a cluster `nodes` is the node watch's facts; else the labels
    /// agents sent (`book`) are used.
    pub fn new(
        policy: Arc<PolicyHandle>,
        nodes: Option<Arc<NodeFacts>>,
        book: Arc<LabelBook>,
    ) -> Self {
        Self {
            policy,
            nodes,
            book,
            canaries: std::sync::RwLock::new(CanaryTracker::default()),
        }
    }

    fn with_directory<T>(&self, f: impl FnOnce(&dyn NodeDirectory) -> T) -> T {
        match &self.nodes {
            Some(facts) => f(&FromFacts(facts.snapshot())),
            None => f(self.book.as_ref()),
        }
    }

    /// The canaries' phases now (for status and metrics).
    pub fn canaries(&self) -> super::canary::Canaries {
        self.canaries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .phases()
            .clone()
    }

    /// The pool `node` belongs to under the policy in force (its name, or
    /// [`super::canary::NO_POOL`]).
    pub fn pool_name(&self, node: &NodeName) -> String {
        let policy = self.policy.current();
        self.with_directory(|d| {
            let labels = d.labels(node).unwrap_or_default();
            pool_of(&policy.effective, node.as_str(), &labels)
                .map(|i| policy.effective.pools[i].name.clone())
                .unwrap_or_else(|| super::canary::NO_POOL.to_string())
        })
    }

    /// Advances the canaries from `snap` (off the engine's lock); a
    /// follower forgets them.
    pub fn observe_canaries(&self, snap: &crate::engine::Snapshot) {
        let mut tracker = self.canaries.write().unwrap_or_else(|e| e.into_inner());
        if snap.leadership.is_leader {
            let policy = self.policy.current();
            self.with_directory(|d| tracker.observe(snap, &policy.effective, d));
        } else {
            *tracker = CanaryTracker::default();
        }
    }
}

/// Labels from the node watch's facts (a snapshot).
struct FromFacts(Option<BTreeMap<String, crate::kube::nodes::NodeFact>>);

impl NodeDirectory for FromFacts {
    fn labels(&self, node: &NodeName) -> Option<Labels> {
        self.0
            .as_ref()?
            .get(node.as_str())
            .map(|f| f.labels.clone())
    }
    fn all(&self) -> Vec<(NodeName, Labels)> {
        self.0
            .iter()
            .flatten()
            .filter_map(|(n, f)| Some((NodeName::new(n.as_str()).ok()?, f.labels.clone())))
            .collect()
    }
}

impl NodeDirectory for LabelBook {
    fn labels(&self, node: &NodeName) -> Option<Labels> {
        self.get(node)
    }
    fn all(&self) -> Vec<(NodeName, Labels)> {
        self.entries()
    }
}

impl GrantGuard for PolicyRule {
    fn check(
        &self,
        candidate: &Waiter,
        state: &LeaseState,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        self.check_in_queue(candidate, &[], state, now)
    }

    fn wants_queue(&self) -> bool {
        uses_labels(&self.policy.current().effective)
    }

    /// Canaries (who went first) and `finishZoneFirst` (the zone granted
    /// last) read the audit; both are rules about labels.
    fn reads_audit(&self) -> bool {
        uses_labels(&self.policy.current().effective)
    }

    fn check_in_queue(
        &self,
        candidate: &Waiter,
        queue: &[Waiter],
        state: &LeaseState,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let loaded = self.policy.current();
        let canaries = self
            .canaries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .phases()
            .clone();
        self.with_directory(|d| {
            check(
                &loaded.effective,
                d,
                &canaries,
                candidate,
                queue,
                state,
                now,
            )
        })
    }
}

#[cfg(test)]
mod tests;
