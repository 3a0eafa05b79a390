//! The grant rule: who may have the baton now. A pure function of the lease
//! state, the queue, the node facts and the clock, so it can be tested
//! exhaustively.
//!
//! A waiting node N gets the baton only if:
//! 1. granting is not paused;
//! 2. now is inside a maintenance window with enough time left (if any are
//!    configured);
//! 3. the nodes that hold the baton (counting failed and overdue holders) plus
//!    the nodes that are unexpectedly unavailable stay below `max_concurrent`;
//! 4. if N is a control-plane node, no other control-plane node holds it
//!    (whatever `max_concurrent` says);
//! 5. every guard (etcd quorum, blockers) allows N;
//! 6. N is the first waiter, in FIFO order, for which 1-5 hold.
//!
//! [`decide`] names at most one node to grant; the engine grants it and asks
//! again, so the second grant of a pass sees the first.

use chrono::{DateTime, Utc};

use crate::node::NodeName;
use crate::state::LeaseState;
use crate::window::WindowSet;

/// The grant settings.
#[derive(Clone, Debug)]
pub struct Policy {
    /// How many nodes may hold the baton at once (at least 1).
    pub max_concurrent: u32,
    /// When grants may be given.
    pub windows: WindowSet,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_concurrent: 1,
            windows: WindowSet::default(),
        }
    }
}

/// A node waiting for the baton.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// The node.
    pub node: NodeName,
    /// True for control-plane nodes.
    pub control_plane: bool,
}

/// A check beyond the built-in rule (the etcd quorum guard, blockers). It
/// must be a cheap, synchronous look at data the guard keeps fresh itself;
/// when that data is missing or stale the guard must answer no.
pub trait GrantGuard: Send + Sync {
    /// `Ok(())` when `candidate` may be granted as far as this guard knows,
    /// else the exact reason it waits.
    fn check(
        &self,
        candidate: &Waiter,
        state: &LeaseState,
        now: DateTime<Utc>,
    ) -> Result<(), String>;

    /// Like [`GrantGuard::check`], seeing the whole queue in FIFO order
    /// (for rules about order: control-plane nodes first, pools in turn).
    /// [`decide`] calls this one; the default ignores the queue.
    fn check_in_queue(
        &self,
        candidate: &Waiter,
        _queue: &[Waiter],
        state: &LeaseState,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        self.check(candidate, state, now)
    }
}

/// What the rule decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// The node to grant now, if any.
    pub grant: Option<NodeName>,
    /// Every other waiter with the reason it waits, in queue order.
    pub waiting: Vec<(NodeName, String)>,
}

/// Applies the grant rule. `queue` is in FIFO order; `unavailable` lists nodes
/// that are down without holding the baton (they count against the limit).
pub fn decide(
    state: &LeaseState,
    queue: &[Waiter],
    unavailable: &[NodeName],
    policy: &Policy,
    guards: &[&dyn GrantGuard],
    now: DateTime<Utc>,
) -> Decision {
    let mut decision = Decision::default();
    let global = global_block(state, unavailable, policy, now);
    for waiter in queue {
        let verdict = match &global {
            Some(reason) => Err(reason.clone()),
            None if decision.grant.is_some() => {
                Err("another node is being granted the baton".to_string())
            }
            None => check_waiter(state, waiter, queue, guards, now),
        };
        match verdict {
            Ok(()) => decision.grant = Some(waiter.node.clone()),
            Err(reason) => decision.waiting.push((waiter.node.clone(), reason)),
        }
    }
    decision
}

/// A reason that holds every waiter back, if any.
fn global_block(
    state: &LeaseState,
    unavailable: &[NodeName],
    policy: &Policy,
    now: DateTime<Utc>,
) -> Option<String> {
    if let Some(pause) = &state.paused {
        return Some(if pause.reason.is_empty() {
            "paused".to_string()
        } else {
            format!("paused: {}", pause.reason)
        });
    }
    if let Err(reason) = policy.windows.check(now) {
        return Some(reason);
    }
    let down: Vec<&NodeName> = unavailable
        .iter()
        .filter(|n| !state.holders.contains_key(*n))
        .collect();
    let in_use = state.holders.len() + down.len();
    let limit = policy.max_concurrent.max(1) as usize;
    if in_use >= limit {
        let mut who: Vec<String> = state
            .holders
            .keys()
            .map(|n| format!("{n} holds it"))
            .collect();
        who.extend(down.iter().map(|n| format!("{n} is unavailable")));
        return Some(format!(
            "concurrency limit: {in_use} of {limit} in use ({})",
            who.join(", ")
        ));
    }
    None
}

fn check_waiter(
    state: &LeaseState,
    waiter: &Waiter,
    queue: &[Waiter],
    guards: &[&dyn GrantGuard],
    now: DateTime<Utc>,
) -> Result<(), String> {
    if waiter.control_plane
        && let Some((other, _)) = state.holders.iter().find(|(_, h)| h.control_plane)
    {
        return Err(format!(
            "control-plane node {other} holds the baton; only one control-plane node at a time"
        ));
    }
    guards
        .iter()
        .try_for_each(|g| g.check_in_queue(waiter, queue, state, now))
}

#[cfg(test)]
mod tests;
