//! `batonctl plan`: a dry run of the grant rule on a copy of the state.
//!
//! The same pure rule ([`decide`]) with the same guards runs against a
//! copy of the state and queue: each node it would grant is granted in the
//! copy; when nobody more can go, the earliest holder (current, then
//! planned) is assumed to release, and the rule runs again. Nothing is
//! saved, nobody is told, nothing is prepared (no etcd snapshot is taken).

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};

use super::granter::PrepareFailures;
use super::{Engine, EngineError};
use crate::node::NodeName;
use crate::policy::{GrantGuard, Waiter, decide};

/// One waiting node in the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    /// The node.
    pub node: NodeName,
    /// True for control-plane nodes.
    pub control_plane: bool,
    /// 1-based FIFO position now.
    pub queue_position: u32,
    /// 1-based order it would be granted in; 0 when the plan cannot place it.
    pub order: u32,
    /// 0 = granted now; N = after N releases.
    pub round: u32,
    /// Why it is not granted now (empty for round 0).
    pub reason: String,
}

/// The dry run's result.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Waiting nodes in planned order; unplaced ones last.
    pub entries: Vec<PlanEntry>,
    /// The holders now, earliest grant first.
    pub holders: Vec<NodeName>,
    /// When it was computed.
    pub now: DateTime<Utc>,
}

impl Engine {
    /// Computes the plan. Only the confirmed leader answers (the store
    /// confirmed its state is the latest, as for status).
    pub async fn plan(&self) -> Result<Plan, EngineError> {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        let fence = self.ensure_current(&mut inner).await?;
        self.confirm(&mut inner, &fence).await?;
        let mut state = inner.state.clone();
        let queue: Vec<Waiter> = inner
            .queue
            .waiters()
            .filter(|w| {
                inner
                    .queue
                    .get(&w.node)
                    .is_some_and(|q| !q.events.is_closed())
            })
            .cloned()
            .collect();
        let unavailable = inner.unavailable.clone();
        let prepare_failed = inner.prepare_failed.clone();
        drop(inner);

        let policy = self.policy();
        let failures = PrepareFailures(&prepare_failed);
        let mut guards: Vec<&dyn GrantGuard> = self.guards.iter().map(|g| g.as_ref()).collect();
        guards.push(&failures);

        let mut holders: Vec<(NodeName, DateTime<Utc>)> = state
            .holders
            .iter()
            .map(|(n, h)| (n.clone(), h.granted_at))
            .collect();
        holders.sort_by_key(|(n, t)| (*t, n.clone()));
        let current_holders: Vec<NodeName> = holders.iter().map(|(n, _)| n.clone()).collect();
        let mut release_order: VecDeque<NodeName> = current_holders.iter().cloned().collect();

        let positions: HashMap<NodeName, u32> = queue
            .iter()
            .enumerate()
            .map(|(i, w)| (w.node.clone(), i as u32 + 1))
            .collect();
        let mut reasons: HashMap<NodeName, String> = HashMap::new();
        let mut remaining = queue.clone();
        let mut entries = Vec::new();
        let (mut round, mut order) = (0u32, 0u32);
        // Every round either grants or releases one node, so this ends;
        // the bound is a second guarantee.
        let max_steps = 2 * (queue.len() + current_holders.len()) + 2;
        for _ in 0..max_steps {
            if remaining.is_empty() {
                break;
            }
            let decision = decide(&state, &remaining, &unavailable, &policy, &guards, now);
            if decision.grant.is_none() {
                // What each waits for is the first reason it is given once
                // nobody else can go (while the rule still grants, the
                // others only wait for that grant).
                for (i, waiter) in remaining.iter().enumerate() {
                    if let Some(reason) = decision.reason_at(i) {
                        reasons
                            .entry(waiter.node.clone())
                            .or_insert_with(|| reason.text.to_string());
                    }
                }
            }
            if let Some(node) = decision.grant {
                let idx = remaining
                    .iter()
                    .position(|w| w.node == node)
                    .expect("the rule grants a waiter");
                let waiter = remaining.remove(idx);
                order += 1;
                let reason = if round == 0 {
                    String::new()
                } else {
                    reasons.get(&node).cloned().unwrap_or_default()
                };
                let _ = state.grant(&node, waiter.control_plane, false, "plan", now);
                release_order.push_back(node.clone());
                entries.push(PlanEntry {
                    queue_position: positions[&node],
                    node,
                    control_plane: waiter.control_plane,
                    order,
                    round,
                    reason,
                });
                continue;
            }
            let Some(done) = release_order.pop_front() else {
                break;
            };
            state.holders.remove(&done);
            round += 1;
        }
        for waiter in remaining {
            entries.push(PlanEntry {
                queue_position: positions[&waiter.node],
                reason: reasons.get(&waiter.node).cloned().unwrap_or_default(),
                node: waiter.node,
                control_plane: waiter.control_plane,
                order: 0,
                round: 0,
            });
        }
        Ok(Plan {
            entries,
            holders: current_holders,
            now,
        })
    }
}
