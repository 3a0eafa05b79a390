//! The granter task: follows leadership (reloading the state in every new
//! term), marks overdue holders and runs the grant rule whenever something
//! changed (and once a second, so maintenance windows opening, guards' fresh
//! data and a missed leadership notification are noticed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use super::{AcquireUpdate, Engine, EngineError, Grant, Inner};
use crate::node::NodeName;
use crate::policy::{Decision, GrantGuard, Waiter, decide};
use crate::state::LeaseState;
use crate::store::Fence;

/// A grant written into a state copy, to be told once that copy is saved.
pub(super) struct PlannedGrant {
    /// The node granted.
    pub(super) node: NodeName,
    /// Its fencing token.
    pub(super) token: u64,
}

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

/// How often `baton_waiters_without_backup_support` is counted: a look at
/// every waiter (and the guards' judgement of those whose agent makes no
/// backups), under the engine's lock. Its alert waits 10 minutes.
const BACKUP_SUPPORT_COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

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
        self.count_waiters_without_backup_support(&mut inner);
    }

    /// Has `baton_waiters_without_backup_support` counted at the granter's
    /// next turn, which it starts now.
    #[cfg(test)]
    pub(crate) async fn count_backup_support_now(&self) {
        self.inner.lock().await.backup_support_counted = None;
        self.wake.notify_one();
    }

    /// Sets `baton_waiters_without_backup_support`: the waiters whose
    /// agent makes no control-plane backups on a node whose grant needs one
    /// (a guard's [`crate::policy::GrantGuard::pairs_backup`]). They are
    /// never granted until that agent is upgraded, whatever holds them now:
    /// counted from the queue, not from the reasons told, because a pause,
    /// the windows or the limit is what such a waiter is told while it
    /// applies to every waiter, and the alert on this gauge would then
    /// wait for it to pass. At most every [`BACKUP_SUPPORT_COUNT_EVERY`]:
    /// a look at every waiter, which no handoff pays for.
    fn count_waiters_without_backup_support(&self, inner: &mut Inner) {
        if inner
            .backup_support_counted
            .is_some_and(|at| at.elapsed() < BACKUP_SUPPORT_COUNT_EVERY)
        {
            return;
        }
        inner.backup_support_counted = Some(Instant::now());
        let count = inner
            .queue
            .waiters()
            .filter(|w| !w.backs_up_control_plane)
            .filter(|w| self.guards.iter().any(|g| g.pairs_backup(w)))
            .count();
        self.metrics
            .waiters_without_backup_support
            .set(count as i64);
    }

    pub(super) fn decide_now(&self, inner: &Inner, now: DateTime<Utc>) -> Decision {
        self.decide_on(inner, &inner.state, &[], now)
    }

    /// The grant rule over `state` (the memory, or a copy about to be
    /// saved), leaving out the waiters in `planned` (granted in that copy).
    fn decide_on(
        &self,
        inner: &Inner,
        state: &LeaseState,
        planned: &[PlannedGrant],
        now: DateTime<Utc>,
    ) -> Decision {
        let failures = PrepareFailures(&inner.prepare_failed);
        let mut guards: Vec<&dyn GrantGuard> = self.guards.iter().map(|g| g.as_ref()).collect();
        guards.push(&failures);
        decide(
            state,
            inner
                .queue
                .waiters()
                .filter(|w| planned.iter().all(|p| p.node != w.node)),
            &inner.unavailable,
            &self.policy(),
            &guards,
            now,
        )
    }

    /// Group commit: grants, in `next` (a copy about to be saved with the
    /// release that freed a slot), every waiter the rule allows now that
    /// needs no preparation, in FIFO order; stops at the first one that does
    /// (the granter prepares it and grants it in a write of its own). The
    /// grants are told only after `next` is saved ([`Engine::deliver`]).
    pub(super) fn grant_within(
        &self,
        inner: &mut Inner,
        next: &mut LeaseState,
        now: DateTime<Utc>,
    ) -> Vec<PlannedGrant> {
        let mut planned = Vec::new();
        if self.guards.iter().any(|g| g.reads_audit()) {
            // `next` lacks the audit such a guard judges by (who went
            // first, the zone granted last): the granter decides on the
            // memory instead, after this write.
            return planned;
        }
        inner
            .prepare_failed
            .retain(|_, (_, retry_at)| *retry_at > now);
        while let Some(candidate) = self.decide_on(inner, next, &planned, now).grant {
            let Some(queued) = inner.queue.get(&candidate) else {
                break;
            };
            if queued.events.is_closed() {
                // Its stream is gone (the withdrawal may still be on its way).
                inner.queue.take(&candidate);
                continue;
            }
            if !self
                .preparers
                .iter()
                .all(|p| p.nothing_to_prepare(&queued.waiter))
            {
                break;
            }
            let request = queued.request.clone();
            match next.grant(
                &candidate,
                request.control_plane,
                request.manual,
                &request.reason,
                now,
            ) {
                Ok(token) => planned.push(PlannedGrant {
                    node: candidate,
                    token,
                }),
                Err(_) => break,
            }
        }
        planned
    }

    /// Grants every node the rule allows, one at a time, then tells the rest
    /// why they wait.
    pub(super) async fn grant_pass(&self) {
        loop {
            let mut inner = self.inner.lock().await;
            self.withdraw_departed(&mut inner);
            if inner.fence.is_none() || inner.shutting_down {
                return;
            }
            // A new term reloads (and resumes lost grants) before deciding:
            // the decision and its save must see the same memory. (Closed
            // streams are dropped as the rule meets them, in `grant`: the
            // queue is not walked.)
            let Ok(decided) = self.ensure_current(&mut inner).await else {
                return;
            };
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
                    .get(&candidate)
                    .map(|q| q.waiter.clone())
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
        let Some((request, closed)) = inner
            .queue
            .get(node)
            .map(|q| (q.request.clone(), q.events.is_closed()))
        else {
            return true;
        };
        if closed {
            // Its stream is gone (the withdrawal may still be on its way).
            inner.queue.take(node);
            return true;
        }
        let now = self.now();
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
        let started = inner.handoff_started.take();
        let planned = PlannedGrant {
            node: node.clone(),
            token,
        };
        self.deliver(inner, planned, now, started);
        true
    }

    /// Tells a waiter its grant, which is saved (in the memory and the
    /// store) by now. `handoff` is when the release it follows began.
    pub(super) fn deliver(
        &self,
        inner: &mut Inner,
        planned: PlannedGrant,
        now: DateTime<Utc>,
        handoff: Option<Instant>,
    ) {
        let PlannedGrant { node, token } = planned;
        let Some(queued) = inner.queue.take(&node) else {
            // Its waiter left while the grant was saved: it resumes the grant
            // when it asks again.
            warn!(node = %node, token, "granted, but its waiter left meanwhile; it resumes the grant when it asks again");
            self.changed();
            return;
        };
        let phase = inner
            .state
            .holders
            .get(&node)
            .map(|h| h.phase)
            .unwrap_or_default();
        let _ = queued.events.send(Ok(AcquireUpdate::Granted(Grant {
            fencing_token: token,
            granted_at: now,
            resumed: false,
            phase,
        })));
        self.metrics.grants.inc();
        if let Some(started) = handoff {
            self.metrics
                .handoff_latency
                .observe(started.elapsed().as_secs_f64());
            self.metrics.handoffs.inc();
        }
        self.metrics.queue_length.set(inner.queue.len() as i64);
        info!(node = %node, token, control_plane = queued.request.control_plane, waited_ms = (now - queued.since).num_milliseconds(), "granted");
        self.changed();
    }

    /// Tells waiters what changed (see the `queue` module: new reasons at
    /// once, positions as they move, rate-limited, without walking every
    /// waiter on a handoff).
    fn tell_waiters(&self, inner: &mut Inner, decision: Decision) {
        // Only a judged waiter can carry a guard's reason: the reason of the
        // rest is a pause, the windows, the limit or another grant.
        let etcd_blocked = decision
            .judged
            .iter()
            .filter(|(_, reason)| crate::etcd::is_guard_reason(&reason.text))
            .count();
        self.metrics.etcd_blocked_waiters.set(etcd_blocked as i64);
        let telling = inner.queue.tell(&decision, Instant::now());
        for (node, position, reason) in &telling.new_reasons {
            info!(node = %node, position, reason = %reason.text, "waiting");
        }
        if let Some(reason) = &telling.shared_changed {
            info!(waiters = inner.queue.len(), reason = %reason.text, "every waiter waits");
        }
        if telling.sent > 0 {
            self.metrics.queue_length.set(inner.queue.len() as i64);
            self.changed();
        }
    }
}
