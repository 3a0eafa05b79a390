//! The granter task: follows leadership (reloading the state in every new
//! term), marks overdue holders and runs the grant rule whenever something
//! changed (and once a second, so maintenance windows opening, guards' fresh
//! data and a missed leadership notification are noticed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::{AcquireUpdate, Engine, EngineError, Grant, Inner};
use crate::node::NodeName;
use crate::policy::{Decision, GrantGuard, Waiter, decide};
use crate::state::LeaseState;
use crate::store::Fence;

/// The least time between two position-only updates to one waiter.
pub const POSITION_UPDATE_EVERY: StdDuration = StdDuration::from_secs(1);

/// Holds back nodes whose preparation failed until their retry time.
pub(super) struct PrepareFailures<'a>(pub(super) &'a HashMap<NodeName, (String, DateTime<Utc>)>);

impl GrantGuard for PrepareFailures<'_> {
    fn check(&self, candidate: &Waiter, _: &LeaseState, now: DateTime<Utc>) -> Result<(), String> {
        match self.0.get(&candidate.node) {
            Some((reason, retry_at)) if *retry_at > now => Err(format!(
                "{reason} (retrying at {})",
                retry_at.format("%H:%M:%SZ")
            )),
            _ => Ok(()),
        }
    }
}

impl Engine {
    /// Runs until shutdown. Spawn exactly one per engine.
    pub async fn run_granter(self: Arc<Self>) {
        let mut leadership = self.leadership.clone();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if self.inner.lock().await.shutting_down {
                return;
            }
            self.follow_leadership().await;
            self.mark_overdue().await;
            self.grant_pass().await;
            // Biased: the order of ready branches does not matter here, and
            // a fixed order keeps seeded simulations replayable.
            tokio::select! {
                biased;
                _ = self.wake.notified() => {}
                _ = tick.tick() => {}
                changed = leadership.changed() => {
                    if changed.is_err() {
                        // The store is gone: nothing can be granted any more.
                        let mut inner = self.inner.lock().await;
                        self.step_down(&mut inner);
                        return;
                    }
                }
            }
        }
    }

    /// Loads the state when this replica leads in a term its memory is not
    /// from (or after a failed save), drops waiters when it does not lead.
    async fn follow_leadership(&self) {
        let mut inner = self.inner.lock().await;
        // Errors are logged where they happen (once per distinct error).
        let _ = self.ensure_current(&mut inner).await;
    }

    /// Logs, audits and counts holders that just became overdue. They keep
    /// the baton.
    async fn mark_overdue(&self) {
        let now = self.now();
        let mut inner = self.inner.lock().await;
        if inner.fence.is_none() {
            return;
        }
        let newly: Vec<(NodeName, u64)> = inner
            .state
            .holders
            .iter()
            .filter(|(n, h)| {
                h.is_overdue(now, self.config.overdue_after) && !inner.overdue_seen.contains(*n)
            })
            .map(|(n, h)| (n.clone(), h.fencing_token))
            .collect();
        for (node, token) in newly {
            let reason = format!(
                "no renewal for more than {}s; the node keeps the baton until it returns or is force-released",
                self.config.overdue_after.num_seconds()
            );
            let saved = self
                .commit(&mut inner, |s| {
                    s.record(now, "overdue", node.as_str(), token, "coordinator", &reason);
                    Ok(())
                })
                .await;
            if saved.is_ok() {
                warn!(node = %node, token, "holder is overdue; it keeps the baton");
                self.metrics.overdue_events.inc();
                inner.overdue_seen.insert(node);
                self.changed();
            }
        }
        self.refresh_gauges(&inner);
    }

    pub(super) fn decide_now(&self, inner: &Inner, now: DateTime<Utc>) -> Decision {
        let queue: Vec<Waiter> = inner.queue.iter().map(|q| q.waiter()).collect();
        let failures = PrepareFailures(&inner.prepare_failed);
        let mut guards: Vec<&dyn GrantGuard> = self.guards.iter().map(|g| g.as_ref()).collect();
        guards.push(&failures);
        decide(
            &inner.state,
            &queue,
            &inner.unavailable,
            &self.policy(),
            &guards,
            now,
        )
    }

    /// Grants every node the rule allows, one at a time, then tells the rest
    /// why they wait.
    pub(super) async fn grant_pass(&self) {
        loop {
            let mut inner = self.inner.lock().await;
            if inner.fence.is_none() || inner.shutting_down {
                return;
            }
            // A new term reloads (and resumes lost grants) before deciding:
            // the decision and its save must see the same memory.
            let Ok(decided) = self.ensure_current(&mut inner).await else {
                return;
            };
            inner.queue.retain(|q| !q.events.is_closed());
            let now = self.now();
            inner
                .prepare_failed
                .retain(|_, (_, retry_at)| *retry_at > now);
            let decision = self.decide_now(&inner, now);
            let Some(candidate) = decision.grant else {
                self.tell_waiters(&mut inner, decision);
                if inner.queue.is_empty() {
                    inner.handoff_started = None;
                }
                return;
            };
            if !self.preparers.is_empty() {
                let waiter = inner
                    .queue
                    .iter()
                    .find(|q| q.request.node == candidate)
                    .map(|q| q.waiter())
                    .expect("candidate is queued");
                drop(inner);
                if let Err(reason) = self.prepare(&waiter).await {
                    let retry_at = self.now() + self.config.prepare_retry;
                    warn!(node = %candidate, reason = %reason, "preparing the grant failed; the node keeps waiting");
                    self.inner
                        .lock()
                        .await
                        .prepare_failed
                        .insert(candidate, (reason, retry_at));
                    continue;
                }
                inner = self.inner.lock().await;
                // Leadership may have changed hands while preparing (another
                // replica may have granted in between): make the memory
                // current again (a new term reloads it) and decide again
                // from it. The grant's save is a compare-and-swap on that
                // memory's fence, so a decision from a stale view is never
                // stored.
                let Ok(current) = self.ensure_current(&mut inner).await else {
                    return;
                };
                inner.queue.retain(|q| !q.events.is_closed());
                let now = self.now();
                if current != decided
                    || self.decide_now(&inner, now).grant.as_ref() != Some(&candidate)
                {
                    continue;
                }
            }
            if !self.grant(&mut inner, &candidate, &decided).await {
                return;
            }
        }
    }

    /// Runs every preparer for `waiter`, bounded by the prepare timeout.
    async fn prepare(&self, waiter: &Waiter) -> Result<(), String> {
        let all = async {
            for preparer in &self.preparers {
                preparer.prepare(waiter).await?;
            }
            Ok(())
        };
        let limit = self.config.prepare_timeout;
        tokio::time::timeout(limit, all).await.unwrap_or_else(|_| {
            Err(format!(
                "preparing the grant took longer than {}s; not granting",
                limit.as_secs()
            ))
        })
    }

    /// Grants `node` (which the rule just chose). False when the store
    /// refused, so the pass stops until the next wake.
    async fn grant(&self, inner: &mut Inner, node: &NodeName, decided: &Fence) -> bool {
        let Some(idx) = inner.queue.iter().position(|q| &q.request.node == node) else {
            return true;
        };
        if inner.queue[idx].events.is_closed() {
            inner.queue.remove(idx);
            return true;
        }
        let now = self.now();
        let request = inner.queue[idx].request.clone();
        let result = self
            .commit_under(inner, Some(decided), |s| {
                s.grant(
                    node,
                    request.control_plane,
                    request.manual,
                    &request.reason,
                    now,
                )
            })
            .await;
        let token = match result {
            Ok(token) => token,
            // Decided from memory a reload replaced: decide again from the
            // new memory (the pass goes on).
            Err(EngineError::Moved) => return true,
            Err(e) => {
                warn!(node = %node, error = %e, "grant not saved; the node keeps waiting");
                return false;
            }
        };
        // The commit may have awaited the store; find the waiter afresh.
        let Some(idx) = inner.queue.iter().position(|q| &q.request.node == node) else {
            warn!(node = %node, token, "granted, but its waiter left meanwhile; it resumes the grant when it asks again");
            self.changed();
            return true;
        };
        let queued = inner.queue.remove(idx);
        let phase = inner.state.holders[node].phase;
        let _ = queued.events.send(Ok(AcquireUpdate::Granted(Grant {
            fencing_token: token,
            granted_at: now,
            resumed: false,
            phase,
        })));
        self.metrics.grants.inc();
        if let Some(started) = inner.handoff_started.take() {
            self.metrics
                .handoff_latency
                .observe(started.elapsed().as_secs_f64());
            self.metrics.handoffs.inc();
        }
        self.metrics.queue_length.set(inner.queue.len() as i64);
        info!(node = %node, token, control_plane = request.control_plane, waited_ms = (now - queued.since).num_milliseconds(), "granted");
        self.changed();
        true
    }

    /// Sends Queued updates to waiters whose position or reason changed. A
    /// new reason goes out at once; a position that merely moved goes out at
    /// most once per [`POSITION_UPDATE_EVERY`] per waiter, so a fast-moving
    /// queue of a thousand waiters does not cost a thousand messages per
    /// handoff (the granter's one-second tick sends what was held back).
    fn tell_waiters(&self, inner: &mut Inner, decision: Decision) {
        let etcd_blocked = decision
            .waiting
            .iter()
            .filter(|(_, reason)| crate::etcd::is_guard_reason(reason))
            .count();
        self.metrics.etcd_blocked_waiters.set(etcd_blocked as i64);
        let reasons: HashMap<NodeName, String> = decision.waiting.into_iter().collect();
        let queue_length = inner.queue.len() as u32;
        let now = Instant::now();
        let mut any = false;
        for (i, q) in inner.queue.iter_mut().enumerate() {
            let position = i as u32 + 1;
            let reason = reasons.get(&q.request.node).cloned().unwrap_or_default();
            let reason_changed = q.reason != reason || q.last_told.is_none();
            let moved = q.position != position || q.queue_length != queue_length;
            let due = q.last_told.is_none_or(|t| now - t >= POSITION_UPDATE_EVERY);
            if reason_changed || (moved && due) {
                if q.reason != reason {
                    info!(node = %q.request.node, position, reason = %reason, "waiting");
                }
                q.position = position;
                q.queue_length = queue_length;
                q.reason = reason.clone();
                q.last_told = Some(now);
                let _ = q.events.send(Ok(AcquireUpdate::Queued {
                    position,
                    queue_length,
                    reason,
                }));
                any = true;
            }
        }
        if any {
            self.changed();
        }
    }
}
