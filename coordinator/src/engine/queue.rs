//! The wait queue: who waits for the baton, in FIFO order, and what each
//! waiter was last told, kept so that a handoff costs the same whatever the
//! queue's length.
//!
//! - Waiters are kept by ticket (join order) with an index by node, so
//!   joining, leaving and being granted cost O(log n).
//! - A waiter's position is derived when needed from a Fenwick tree over
//!   join slots ([`super::ranks`]), not stored and shifted on every handoff.
//! - Telling waiters walks only those that may have something new:
//!   - a new reason goes out at once: to waiters judged one by one (few),
//!     to waiters judged last time (a pass ago), to new waiters, and to
//!     everyone only when the kind of the reason all of them share changes
//!     (pause, resume, a window closing: not a handoff);
//!   - a position goes out when it has moved by a quarter of what the
//!     waiter last heard (at least one place), at most once per
//!     [`POSITION_UPDATE_EVERY`] per waiter. Each waiter's next look is
//!     scheduled by the number of departures it needs, so a handoff wakes
//!     only the waiters that are due. Over a wait from position p a waiter
//!     hears about O(log p) positions, not one per handoff;
//!   - a shared reason whose words changed but whose kind did not ("b holds
//!     it" instead of "a holds it") travels with the next position update.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::ranks::Ranks;
use super::{AcquireRequest, AcquireUpdate, EngineError};
use crate::node::NodeName;
use crate::policy::{Decision, Reason, ReasonKind, Waiter};

/// The least time between two position-only updates to one waiter.
pub const POSITION_UPDATE_EVERY: Duration = Duration::from_secs(1);

/// The channel behind a waiter's Acquire stream.
pub(super) type Events = mpsc::UnboundedSender<Result<AcquireUpdate, EngineError>>;

/// How many departures ahead of a waiter told `position` make a new position
/// worth a message: a quarter of it, at least one.
fn gap(position: u32) -> u64 {
    u64::from((position / 4).max(1))
}

/// What a waiter heard last.
struct Told {
    position: u32,
    reason: Reason,
    at: Instant,
}

/// A node waiting, with its channel.
pub(super) struct QueuedRequest {
    /// Identifies this request (to withdraw it).
    pub(super) ticket: u64,
    /// Its place in [`Ranks`] (grows with join order; renumbered on compaction).
    slot: usize,
    /// The node as the grant rule sees it.
    pub(super) waiter: Waiter,
    /// What was asked.
    pub(super) request: AcquireRequest,
    /// When it started waiting.
    pub(super) since: DateTime<Utc>,
    told: Option<Told>,
    /// Its live entry in `WaitQueue::due`.
    due_at: Option<u64>,
    /// Its live entry in `WaitQueue::deferred`.
    deferred_until: Option<Instant>,
    /// Where its updates go.
    pub(super) events: Events,
}

/// What one round of telling did (for logs).
#[derive(Debug, Default)]
pub(super) struct Telling {
    /// Queued updates sent.
    pub(super) sent: usize,
    /// Waiters judged one by one whose reason changed: node, position, reason.
    pub(super) new_reasons: Vec<(NodeName, u32, Reason)>,
    /// The reason every other waiter shares, when its kind just changed.
    pub(super) shared_changed: Option<Reason>,
}

/// The waiters, FIFO.
#[derive(Default)]
pub(super) struct WaitQueue {
    entries: BTreeMap<u64, QueuedRequest>,
    by_node: HashMap<NodeName, u64>,
    ranks: Ranks,
    /// The last slot handed out.
    last_slot: usize,
    /// Departures so far (grants, withdrawals, replacements).
    departures: u64,
    /// (departures, ticket): when a waiter's position is next worth a look.
    due: BinaryHeap<Reverse<(u64, u64)>>,
    /// (time, ticket): position updates held back by the rate limit.
    deferred: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Waiters not told anything yet.
    fresh: Vec<u64>,
    /// Waiters judged one by one in the last decision told, with their reasons.
    judged: HashMap<u64, Reason>,
    /// The reason the other waiters share, from that decision.
    rest: Option<Reason>,
    /// The kind of shared reason every waiter outside `judged` has been told.
    rest_told: Option<ReasonKind>,
}

impl WaitQueue {
    /// Waiters in all.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nobody waits.
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The waiters in FIFO order (read lazily by the grant rule).
    pub(super) fn waiters(&self) -> impl Iterator<Item = &Waiter> {
        self.entries.values().map(|q| &q.waiter)
    }

    /// The request of `node`, if it waits.
    pub(super) fn get(&self, node: &NodeName) -> Option<&QueuedRequest> {
        self.by_node.get(node).and_then(|t| self.entries.get(t))
    }

    /// Queues `request` at the back; returns the request it replaces (the
    /// same node asking again), if any.
    pub(super) fn push(
        &mut self,
        ticket: u64,
        request: AcquireRequest,
        since: DateTime<Utc>,
        events: Events,
    ) -> Option<QueuedRequest> {
        let replaced = self.take(&request.node);
        if self.last_slot >= self.ranks.capacity() {
            self.compact();
        }
        self.last_slot += 1;
        let slot = self.last_slot;
        self.ranks.insert(slot);
        self.by_node.insert(request.node.clone(), ticket);
        self.fresh.push(ticket);
        self.entries.insert(
            ticket,
            QueuedRequest {
                ticket,
                slot,
                waiter: Waiter {
                    node: request.node.clone(),
                    control_plane: request.control_plane,
                    // An operator's hold runs no agent steps: nothing of
                    // it drains on its own; the operator does the work by
                    // hand, as before backups (batonctl hold does not read
                    // `backup_required`).
                    backs_up_control_plane: request.backs_up_control_plane || request.manual,
                },
                request,
                since,
                told: None,
                due_at: None,
                deferred_until: None,
                events,
            },
        );
        replaced
    }

    /// Removes the request of `node` (granted, withdrawn or replaced).
    pub(super) fn take(&mut self, node: &NodeName) -> Option<QueuedRequest> {
        let ticket = self.by_node.remove(node)?;
        let entry = self.entries.remove(&ticket)?;
        self.ranks.remove(entry.slot);
        self.judged.remove(&ticket);
        self.departures += 1;
        if self.entries.is_empty() {
            // Nothing left to schedule: drop stale bookkeeping.
            // Every slot is free again (the tree is all zeros).
            *self = Self {
                departures: self.departures,
                ranks: std::mem::take(&mut self.ranks),
                rest_told: self.rest_told,
                ..Self::default()
            };
        }
        Some(entry)
    }

    /// Removes `node`'s request if it is still the one with `ticket`.
    pub(super) fn withdraw(&mut self, node: &NodeName, ticket: u64) -> bool {
        if self.by_node.get(node) != Some(&ticket) {
            return false;
        }
        self.take(node).is_some()
    }

    /// Empties the queue (leadership lost, shutdown).
    pub(super) fn drain(&mut self) -> Vec<QueuedRequest> {
        let entries = std::mem::take(&mut self.entries);
        *self = Self::default();
        entries.into_values().collect()
    }

    /// The first `limit` waiters with their position and current reason
    /// (status shows a bounded head of the queue).
    pub(super) fn head(
        &self,
        limit: usize,
    ) -> impl Iterator<Item = (u32, &QueuedRequest, Option<&Reason>)> {
        self.entries.values().take(limit).enumerate().map(|(i, q)| {
            let reason = self.judged.get(&q.ticket).or(self.rest.as_ref());
            (i as u32 + 1, q, reason)
        })
    }

    /// Renumbers the slots 1..=len in FIFO order with room to grow, so the
    /// tree's size follows the queue's, not the number of requests ever
    /// seen. Runs after at least `len` joins since the last time: O(1)
    /// amortized per join.
    fn compact(&mut self) {
        let capacity = 2 * self.entries.len() + 1024;
        self.ranks = Ranks::with_capacity(capacity);
        for (i, entry) in self.entries.values_mut().enumerate() {
            entry.slot = i + 1;
            self.ranks.insert(entry.slot);
        }
        self.last_slot = self.entries.len();
    }

    /// Tells waiters what changed after `decision` (which granted nobody).
    /// Returns what was sent; waiters whose stream is gone are dropped.
    pub(super) fn tell(&mut self, decision: &Decision, now: Instant) -> Telling {
        let mut candidates = std::mem::take(&mut self.fresh);
        let last_judged = std::mem::take(&mut self.judged);
        candidates.extend(last_judged.keys());
        for (node, reason) in &decision.judged {
            if let Some(&ticket) = self.by_node.get(node) {
                self.judged.insert(ticket, reason.clone());
                candidates.push(ticket);
            }
        }
        self.rest = decision.rest.clone();
        let mut telling = Telling::default();
        let rest_kind = self.rest.as_ref().map(|r| r.kind);
        if rest_kind != self.rest_told && self.entries.len() > self.judged.len() {
            // The cause every unjudged waiter shares changed: each must hear
            // it. The one walk over the queue, on pause/resume/windows/limit
            // changes, never on a plain handoff.
            candidates = self.entries.keys().copied().collect();
            self.rest_told = rest_kind;
            telling.shared_changed = self.rest.clone();
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut gone = Vec::new();
        for ticket in candidates {
            self.consider(ticket, now, &mut telling, &mut gone);
        }
        while let Some(&Reverse((due, ticket))) = self.due.peek() {
            if due > self.departures {
                break;
            }
            self.due.pop();
            if let Some(entry) = self.entries.get_mut(&ticket)
                && entry.due_at == Some(due)
            {
                entry.due_at = None;
                self.consider(ticket, now, &mut telling, &mut gone);
            }
        }
        while let Some(&Reverse((at, ticket))) = self.deferred.peek() {
            if at > now {
                break;
            }
            self.deferred.pop();
            if let Some(entry) = self.entries.get_mut(&ticket)
                && entry.deferred_until == Some(at)
            {
                entry.deferred_until = None;
                self.consider(ticket, now, &mut telling, &mut gone);
            }
        }
        for node in gone {
            self.take(&node);
        }
        self.trim_schedules();
        telling
    }

    /// Sends `ticket` what is new for it now, or schedules when to look again.
    fn consider(
        &mut self,
        ticket: u64,
        now: Instant,
        telling: &mut Telling,
        gone: &mut Vec<NodeName>,
    ) {
        let judged = self.judged.get(&ticket);
        let Some(reason) = judged.or(self.rest.as_ref()).cloned() else {
            return;
        };
        let queue_length = self.entries.len() as u32;
        let Some(entry) = self.entries.get_mut(&ticket) else {
            return;
        };
        let position = self.ranks.rank(entry.slot) as u32;
        if let Some(told) = &entry.told {
            let new_cause = told.reason.kind != reason.kind
                || (judged.is_some() && told.reason.text != reason.text);
            if !new_cause {
                // Positions only fall (newcomers join at the back): wait
                // until enough waiters ahead have left.
                let target = told.position.saturating_sub(gap(told.position) as u32);
                if position > target {
                    let due = self.departures + u64::from(position - target);
                    if entry.due_at.is_none_or(|d| due < d) {
                        entry.due_at = Some(due);
                        self.due.push(Reverse((due, ticket)));
                    }
                    return;
                }
                let allowed = told.at + POSITION_UPDATE_EVERY;
                if now < allowed {
                    if entry.deferred_until.is_none() {
                        entry.deferred_until = Some(allowed);
                        self.deferred.push(Reverse((allowed, ticket)));
                    }
                    return;
                }
            } else if judged.is_some() {
                telling
                    .new_reasons
                    .push((entry.waiter.node.clone(), position, reason.clone()));
            }
        } else if judged.is_some() {
            telling
                .new_reasons
                .push((entry.waiter.node.clone(), position, reason.clone()));
        }
        let sent = entry.events.send(Ok(AcquireUpdate::Queued {
            position,
            queue_length,
            reason: reason.text.to_string(),
        }));
        if sent.is_err() {
            gone.push(entry.waiter.node.clone());
            return;
        }
        telling.sent += 1;
        entry.told = Some(Told {
            position,
            reason,
            at: now,
        });
        let due = self.departures + gap(position);
        if entry.due_at.is_none_or(|d| due < d) {
            entry.due_at = Some(due);
            self.due.push(Reverse((due, ticket)));
        }
    }

    /// Rebuilds the schedules when stale entries outnumber live ones, so
    /// they stay O(waiters).
    fn trim_schedules(&mut self) {
        let bound = 2 * self.entries.len() + 1024;
        if self.due.len() > bound {
            self.due = self
                .entries
                .values()
                .filter_map(|q| q.due_at.map(|d| Reverse((d, q.ticket))))
                .collect();
        }
        if self.deferred.len() > bound {
            self.deferred = self
                .entries
                .values()
                .filter_map(|q| q.deferred_until.map(|d| Reverse((d, q.ticket))))
                .collect();
        }
    }
}

#[cfg(test)]
mod tests;
