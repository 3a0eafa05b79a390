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

use std::sync::Arc;

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
    /// True when the requester makes and sends the control-plane backup a
    /// grant may ask for (every current agent), or is an operator's hold
    /// (which runs no agent steps). The etcd guard never lets a waiter
    /// without it have a control-plane node that carries an etcd member.
    pub backs_up_control_plane: bool,
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

    /// True when [`GrantGuard::check_in_queue`] reads the queue: [`decide`]
    /// then copies the whole queue for it (a cost per decision that grows
    /// with the queue), else it reads the queue only as far as needed.
    fn wants_queue(&self) -> bool {
        false
    }

    /// True when the guard reads `state.audit` (the history of grants and
    /// releases). A group commit's copy of the state holds only the records
    /// of its own change, so with such a guard the grants a release makes
    /// possible are decided on the engine's memory, in writes of their own.
    fn reads_audit(&self) -> bool {
        false
    }

    /// True when this guard's preparation of a grant of `candidate` pairs
    /// a control-plane backup with it (the etcd guard: a control-plane
    /// node carrying an etcd member), judged now. Confirm releases a grant
    /// this says should carry a pairing and does not (one made by a
    /// release before backups, or while the node's role was not known
    /// yet), so the node asks again and its new grant pairs one, instead
    /// of draining without a backup.
    fn pairs_backup(&self, _candidate: &Waiter) -> bool {
        false
    }
}

/// What keeps a waiter waiting, as a kind of cause. Waiters are told at once
/// when the kind of their reason changes; a reason whose words change but
/// whose kind does not (another node holds the baton now) travels with the
/// next position update instead, so a handoff does not cost a message to
/// every waiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReasonKind {
    /// Granting is paused.
    Paused,
    /// Outside the maintenance windows (or too little of one is left).
    OutsideWindows,
    /// The holders and unavailable nodes fill the concurrency limit.
    ConcurrencyLimit,
    /// Another control-plane node holds the baton.
    ControlPlaneHeld,
    /// A guard (etcd quorum, node facts, a failed preparation) said no.
    Guard,
    /// A waiter ahead of this one is being granted now.
    AnotherGranted,
}

/// Why a waiter waits: its kind and the words shown to the waiter and in
/// status. Shared by every waiter it applies to (computed once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    /// The kind of cause.
    pub kind: ReasonKind,
    /// The reason in words.
    pub text: Arc<str>,
}

impl Reason {
    fn new(kind: ReasonKind, text: impl Into<Arc<str>>) -> Self {
        Self {
            kind,
            text: text.into(),
        }
    }
}

/// What the rule decided.
///
/// Waiters are judged one by one only until the grant is found; when a
/// reason holds every waiter back (pause, windows, the concurrency limit)
/// none is judged. So the cost of a decision does not grow with the queue
/// in the common cases, and the reasons many waiters share exist once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// The node to grant now, if any.
    pub grant: Option<NodeName>,
    /// The waiters judged one by one, in queue order, with the reason each
    /// waits: every waiter ahead of `grant`, or every waiter when nothing is
    /// granted and no reason holds them all back.
    pub judged: Vec<(NodeName, Reason)>,
    /// The reason of every waiter after `judged` (other than `grant`): what
    /// holds every waiter back, or that another node is being granted.
    pub rest: Option<Reason>,
}

impl Decision {
    /// The reason of the waiter at `index` (0-based, queue order); `None`
    /// for the node granted.
    pub fn reason_at(&self, index: usize) -> Option<&Reason> {
        match self.judged.get(index) {
            Some((_, reason)) => Some(reason),
            None if self.grant.is_some() && index == self.judged.len() => None,
            None => self.rest.as_ref(),
        }
    }
}

/// Applies the grant rule. `queue` is in FIFO order; `unavailable` lists nodes
/// that are down without holding the baton (they count against the limit).
/// The queue is read only as far as needed: not at all while a reason holds
/// every waiter back, up to the first eligible waiter otherwise.
pub fn decide<'q>(
    state: &LeaseState,
    queue: impl IntoIterator<Item = &'q Waiter>,
    unavailable: &[NodeName],
    policy: &Policy,
    guards: &[&dyn GrantGuard],
    now: DateTime<Utc>,
) -> Decision {
    if let Some(reason) = global_block(state, unavailable, policy, now) {
        return Decision {
            grant: None,
            judged: Vec::new(),
            rest: Some(reason),
        };
    }
    // A guard that judges by the whole queue (pools in turn, control-plane
    // nodes first) gets a copy of it; the others let the queue be read only
    // as far as needed.
    let mut lazy = queue.into_iter();
    let whole: Vec<Waiter> = if guards.iter().any(|g| g.wants_queue()) {
        lazy.by_ref().cloned().collect()
    } else {
        Vec::new()
    };
    // One of the two is empty (`whole` took every waiter, or none).
    let queue = whole.iter().chain(lazy.map(|w| -> &Waiter { w }));
    let mut control_plane_held = None;
    let mut judged = Vec::new();
    for waiter in queue {
        match check_waiter(state, waiter, &whole, guards, now, &mut control_plane_held) {
            Ok(()) => {
                return Decision {
                    grant: Some(waiter.node.clone()),
                    judged,
                    rest: Some(Reason::new(
                        ReasonKind::AnotherGranted,
                        "another node is being granted the baton",
                    )),
                };
            }
            Err(reason) => judged.push((waiter.node.clone(), reason)),
        }
    }
    Decision {
        grant: None,
        judged,
        rest: None,
    }
}

/// A reason that holds every waiter back, if any.
fn global_block(
    state: &LeaseState,
    unavailable: &[NodeName],
    policy: &Policy,
    now: DateTime<Utc>,
) -> Option<Reason> {
    if let Some(pause) = &state.paused {
        return Some(Reason::new(
            ReasonKind::Paused,
            if pause.reason.is_empty() {
                "paused".to_string()
            } else {
                format!("paused: {}", pause.reason)
            },
        ));
    }
    if let Err(reason) = policy.windows.check(now) {
        return Some(Reason::new(ReasonKind::OutsideWindows, reason));
    }
    let limit = policy.max_concurrent.max(1) as usize;
    // Cheap count first: the names are only written out when the limit is
    // reached (and then once for every waiter).
    let down = || {
        unavailable
            .iter()
            .filter(|n| !state.holders.contains_key(*n))
    };
    let in_use = state.holders.len() + down().count();
    if in_use >= limit {
        let mut who: Vec<String> = state
            .holders
            .keys()
            .map(|n| format!("{n} holds it"))
            .collect();
        who.extend(down().map(|n| format!("{n} is unavailable")));
        return Some(Reason::new(
            ReasonKind::ConcurrencyLimit,
            format!(
                "concurrency limit: {in_use} of {limit} in use ({})",
                who.join(", ")
            ),
        ));
    }
    None
}

/// Judges one waiter. `control_plane_held` caches, for the whole decision,
/// the reason control-plane waiters wait (`Some(None)`: none holds it).
fn check_waiter(
    state: &LeaseState,
    waiter: &Waiter,
    queue: &[Waiter],
    guards: &[&dyn GrantGuard],
    now: DateTime<Utc>,
    control_plane_held: &mut Option<Option<Reason>>,
) -> Result<(), Reason> {
    if waiter.control_plane {
        let held = control_plane_held.get_or_insert_with(|| {
            state
                .holders
                .iter()
                .find(|(_, h)| h.control_plane)
                .map(|(other, _)| {
                    Reason::new(
                        ReasonKind::ControlPlaneHeld,
                        format!(
                            "control-plane node {other} holds the baton; only one control-plane node at a time"
                        ),
                    )
                })
        });
        if let Some(reason) = held {
            return Err(reason.clone());
        }
    }
    guards
        .iter()
        .try_for_each(|g| g.check_in_queue(waiter, queue, state, now))
        .map_err(|text| Reason::new(ReasonKind::Guard, text))
}

#[cfg(test)]
mod tests;
