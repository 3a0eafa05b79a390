//! Canaries and soak: in each pool (and among the nodes in no pool) the
//! first node of a rollout goes alone — or, with `canary.nodes`, the first
//! of those that asks; the others wait until it released and the soak time
//! passed (and, as before every grant, for the health gate).
//!
//! [`CanaryTracker::observe`] follows the engine's snapshots off its lock
//! and keeps each scope's [`CanaryPhase`]; the rule reads the phases. The
//! tracker may lag the engine, so every phase but `Done` (and a finished
//! soak) holds the scope's other nodes: a lag only ever delays a grant. A
//! rollout ends, and the next starts with a new canary, when no node holds
//! the baton and none waits. After a failover the tracker starts afresh
//! (one more canary, never one fewer).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::rule::{Labels, NodeDirectory, pool_of};
use super::schema::{CanarySpec, PolicyFile};
use crate::engine::Snapshot;
use crate::node::NodeName;

/// Where a scope's canary is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanaryPhase {
    /// No node of the scope went yet in this rollout: the next one goes alone.
    Idle,
    /// The canary holds the baton.
    Running {
        /// The canary.
        node: NodeName,
        /// Its grant.
        token: u64,
    },
    /// The canary released; the others wait until `until`.
    Soaking {
        /// The canary.
        node: NodeName,
        /// When the soak ends.
        until: DateTime<Utc>,
    },
    /// The scope's canary is done: its nodes go within their limits.
    Done,
}

/// Each scope's phase (missing = idle).
pub type Canaries = BTreeMap<String, CanaryPhase>;

/// The scope key of the nodes in no pool.
pub const NO_POOL: &str = "(no pool)";

/// The canary scope of a node and its canary settings, if it has any.
pub fn scope_of<'a>(
    policy: &'a PolicyFile,
    node: &str,
    labels: &Labels,
) -> (String, Option<&'a CanarySpec>) {
    match pool_of(policy, node, labels) {
        Some(i) => {
            let pool = &policy.pools[i];
            (
                pool.name.clone(),
                pool.canary.as_ref().or(policy.canary.as_ref()),
            )
        }
        None => (NO_POOL.to_string(), policy.canary.as_ref()),
    }
}

/// Keeps the phases.
#[derive(Debug, Default)]
pub struct CanaryTracker {
    phases: Canaries,
}

impl CanaryTracker {
    /// The phases now.
    pub fn phases(&self) -> &Canaries {
        &self.phases
    }

    /// Advances the phases from `snap`.
    pub fn observe(&mut self, snap: &Snapshot, policy: &PolicyFile, nodes: &dyn NodeDirectory) {
        let state = &snap.state;
        if state.holders.is_empty() && snap.queue.is_empty() {
            // The rollout finished: the next one starts with a canary.
            self.phases.clear();
            return;
        }
        let mut holders: Vec<(&NodeName, &crate::state::Holding)> = state.holders.iter().collect();
        holders.sort_by_key(|(n, h)| (h.granted_at, (*n).clone()));
        let scoped: Vec<(String, &NodeName, u64)> = holders
            .iter()
            .filter_map(|(n, h)| {
                let labels = nodes.labels(n)?;
                let (scope, spec) = scope_of(policy, n.as_str(), &labels);
                spec.map(|_| (scope, *n, h.fencing_token))
            })
            .collect();
        let scopes: Vec<(String, Option<std::time::Duration>)> = policy
            .pools
            .iter()
            .map(|p| (p.name.clone(), p.canary.as_ref().or(policy.canary.as_ref())))
            .chain([(NO_POOL.to_string(), policy.canary.as_ref())])
            .filter_map(|(k, spec)| spec.map(|s| (k, s.soak.map(|d| d.0))))
            .collect();
        for (scope, soak) in scopes {
            let phase = self
                .phases
                .get(&scope)
                .cloned()
                .unwrap_or(CanaryPhase::Idle);
            let next = match phase {
                CanaryPhase::Idle => scoped
                    .iter()
                    .find(|(s, _, _)| *s == scope)
                    .map(|(_, n, t)| CanaryPhase::Running {
                        node: (*n).clone(),
                        token: *t,
                    })
                    .unwrap_or(CanaryPhase::Idle),
                CanaryPhase::Running { node, token } => {
                    if state
                        .holders
                        .get(&node)
                        .is_some_and(|h| h.fencing_token == token)
                    {
                        CanaryPhase::Running { node, token }
                    } else {
                        let ended = state
                            .audit
                            .iter()
                            .rev()
                            .find(|a| a.node == node.as_str() && a.fencing_token == token);
                        match ended {
                            Some(a) if a.action == "release" => CanaryPhase::Soaking {
                                until: a.time
                                    + chrono::Duration::from_std(soak.unwrap_or_default())
                                        .unwrap_or(chrono::Duration::MAX),
                                node,
                            },
                            // Force-released: it proved nothing; the next
                            // node is the canary.
                            _ => CanaryPhase::Idle,
                        }
                    }
                }
                CanaryPhase::Soaking { until, .. } if snap.now >= until => CanaryPhase::Done,
                other => other,
            };
            self.phases.insert(scope, next);
        }
    }
}

/// The canary part of the rule for a candidate of `scope`.
pub fn check(
    spec: &CanarySpec,
    scope: &str,
    phase: &CanaryPhase,
    candidate: &NodeName,
    scope_holders: &[String],
    scope_waiters: &[&NodeName],
    now: DateTime<Utc>,
) -> Result<(), String> {
    match phase {
        CanaryPhase::Idle => {
            if let Some(h) = scope_holders.first() {
                return Err(format!("canary of {scope}: {h} goes alone"));
            }
            let listed = |n: &NodeName| spec.nodes.iter().any(|c| c == n.as_str());
            if !spec.nodes.is_empty()
                && !listed(candidate)
                && let Some(w) = scope_waiters.iter().find(|w| listed(w))
            {
                return Err(format!("canary of {scope}: {w} goes first"));
            }
            Ok(())
        }
        CanaryPhase::Running { node, .. } => Err(format!(
            "canary of {scope}: {node} is in maintenance; the others wait for it"
        )),
        CanaryPhase::Soaking { node, until } if now < *until => Err(format!(
            "canary of {scope}: {node} done; soaking until {}",
            until.format("%Y-%m-%dT%H:%M:%SZ")
        )),
        CanaryPhase::Soaking { .. } | CanaryPhase::Done => Ok(()),
    }
}
