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

/// What the tracker knows, as the rule reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Canaries {
    /// Each scope's phase (missing = idle).
    pub phases: BTreeMap<String, CanaryPhase>,
    /// Per scope: grants with a token at or below this are not its canary
    /// (a canary that was force-released).
    pub floors: BTreeMap<String, u64>,
    /// The last token before this rollout began (`None` until the tracker
    /// saw its first snapshot).
    pub start: Option<u64>,
}

impl Canaries {
    /// Nothing known yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants in `scope` with a token above this belong to this rollout.
    pub fn floor(&self, scope: &str) -> Option<u64> {
        self.floors.get(scope).copied().or(self.start)
    }
}

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
    known: Canaries,
}

impl CanaryTracker {
    /// The phases now.
    pub fn phases(&self) -> &Canaries {
        &self.known
    }

    /// Advances the phases from `snap`. The canary is found from the audit
    /// trail's grants (so a canary that came and went between two
    /// snapshots is not missed), or from the holders if its record has
    /// left the bounded trail.
    pub fn observe(&mut self, snap: &Snapshot, policy: &PolicyFile, nodes: &dyn NodeDirectory) {
        let state = &snap.state;
        if state.holders.is_empty() && snap.queue.is_empty() {
            // The rollout finished: the next one starts with a canary.
            self.known.phases.clear();
            self.known.floors.clear();
            self.known.start = Some(state.last_token);
            return;
        }
        let start = *self.known.start.get_or_insert_with(|| {
            // Taking over mid-rollout: the earliest holder may be the canary.
            state
                .holders
                .values()
                .map(|h| h.fencing_token.saturating_sub(1))
                .min()
                .unwrap_or(state.last_token)
        });
        let scope_of_node = |node: &str| -> Option<String> {
            let name = NodeName::new(node).ok()?;
            let labels = nodes.labels(&name)?;
            let (scope, spec) = scope_of(policy, node, &labels);
            spec.map(|_| scope)
        };
        let mut grants: Vec<(u64, NodeName, String)> = state
            .audit
            .iter()
            .filter(|a| a.action == "grant")
            .filter_map(|a| {
                Some((
                    a.fencing_token,
                    NodeName::new(a.node.as_str()).ok()?,
                    scope_of_node(&a.node)?,
                ))
            })
            .chain(state.holders.iter().filter_map(|(n, h)| {
                Some((h.fencing_token, n.clone(), scope_of_node(n.as_str())?))
            }))
            .collect();
        grants.sort();
        grants.dedup();
        let scopes: Vec<(String, Option<std::time::Duration>)> = policy
            .pools
            .iter()
            .map(|p| (p.name.clone(), p.canary.as_ref().or(policy.canary.as_ref())))
            .chain([(NO_POOL.to_string(), policy.canary.as_ref())])
            .filter_map(|(k, spec)| spec.map(|s| (k, s.soak.map(|d| d.0))))
            .collect();
        for (scope, soak) in scopes {
            let floor = self.known.floors.get(&scope).copied().unwrap_or(start);
            let phase = self
                .known
                .phases
                .get(&scope)
                .cloned()
                .unwrap_or(CanaryPhase::Idle);
            let phase = match phase {
                CanaryPhase::Idle => grants
                    .iter()
                    .find(|(t, _, s)| *t > floor && *s == scope)
                    .map(|(t, n, _)| CanaryPhase::Running {
                        node: n.clone(),
                        token: *t,
                    })
                    .unwrap_or(CanaryPhase::Idle),
                other => other,
            };
            let next = match phase {
                CanaryPhase::Running { node, token } => {
                    if state
                        .holders
                        .get(&node)
                        .is_some_and(|h| h.fencing_token == token)
                    {
                        CanaryPhase::Running { node, token }
                    } else {
                        let ended = state.audit.iter().rev().find(|a| {
                            a.node == node.as_str()
                                && a.fencing_token == token
                                && a.action != "grant"
                        });
                        match ended {
                            Some(a) if a.action == "release" => CanaryPhase::Soaking {
                                until: a.time
                                    + chrono::Duration::from_std(soak.unwrap_or_default())
                                        .unwrap_or(chrono::Duration::MAX),
                                node,
                            },
                            // Force-released (or its record is gone): it
                            // proved nothing; the next grant is the canary.
                            _ => {
                                self.known.floors.insert(scope.clone(), token);
                                CanaryPhase::Idle
                            }
                        }
                    }
                }
                CanaryPhase::Soaking { until, .. } if snap.now >= until => CanaryPhase::Done,
                other => other,
            };
            self.known.phases.insert(scope, next);
        }
    }
}

/// The canary part of the rule for a candidate of `scope`.
#[allow(clippy::too_many_arguments)]
pub fn check(
    spec: &CanarySpec,
    scope: &str,
    phase: &CanaryPhase,
    candidate: &NodeName,
    scope_holders: &[String],
    scope_waiters: &[&NodeName],
    went_first: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), String> {
    match phase {
        CanaryPhase::Idle => {
            if let Some(h) = scope_holders.first() {
                return Err(format!("canary of {scope}: {h} goes alone"));
            }
            // The tracker lags: a canary that was granted (and maybe
            // released) since it last looked still counts (for the others:
            // the canary itself is not held back by its own run, as when it
            // confirms a step).
            if let Some(w) = went_first
                && w != candidate.as_str()
            {
                return Err(format!(
                    "canary of {scope}: {w} went first; the others wait until it is seen done"
                ));
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
        // The canary confirming its own steps goes on.
        CanaryPhase::Running { node, .. } if node == candidate => Ok(()),
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
